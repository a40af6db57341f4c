"""Bundles as OCI artifacts in any OCI registry (Harbor, GHCR, ECR, Docker Hub, a plain registry:2).

The artifact's shape (one bundle layer, the manifest as config blob, headline annotations) and the
checks on a manifest a registry serves are in :mod:`edgepack.shipping.oci`; this module moves bytes.
Transport and auth come from oras (it reads ``~/.docker/config.json`` like docker does); edgepack adds
its own retry policy, the manifest PUT (to know the exact digest it wrote) and verified downloads.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from edgepack.artifact import sha256_file
from edgepack.bundle import MANIFEST, VALIDATION_SUFFIX, open_bundle
from edgepack.errors import (BundleError, ConfigError, DigestMismatchError, DiskFullError, EdgepackError,
                             MissingDependencyError, NotInRegistryError, RegistryError, RegistryUnreachableError)
from edgepack.shipping.oci import (ARTIFACT_TYPE, MEDIA_BUNDLE, MEDIA_CONFIG, MEDIA_VALIDATION, OCI_MANIFEST,
                                   annotations, bundle_layer, file_name, validation_layer)
from edgepack.shipping.reference import TAG_RE, Ref, parse_ref, tag_for

# Retry policy for transient failures (refused connection, timeout, 429/502/503/504): RETRIES
# attempts, waiting BACKOFF_S, 2*BACKOFF_S, ... between them. oras' own policy waits 2+3**n s
# (over two minutes against a registry that is down), too long for an install script to report.
RETRIES = 4
BACKOFF_S = 0.5
TIMEOUT_S = (5.0, 20.0)  # connect, read (between bytes): requests has no default and would wait forever
# A registry that accepts connections but never answers is hung, not busy: one retry, then give up
# (with every attempt waiting the full read timeout, four attempts took over four minutes).
MAX_READ_TIMEOUTS = 2
RETRY_STATUS = {429, 502, 503, 504}
CHUNKED_ABOVE_BYTES = 64 << 20  # monolithic PUT reads the blob into memory; chunk bigger ones

def _oras():
    try:
        import oras.container
        import oras.provider
        import requests
    except ImportError as e:
        raise MissingDependencyError("oras", "ship", "OCI registry push/pull") from e
    return oras, requests


def _docker_config() -> str | None:
    """docker's own lookup: $DOCKER_CONFIG/config.json, else ~/.docker/config.json (oras' default)."""
    d = os.environ.get("DOCKER_CONFIG")
    if d and (Path(d) / "config.json").is_file():
        return str(Path(d) / "config.json")
    return None


def with_retries(call: Callable[[], Any], registry: str, what: str) -> Any:
    """Run ``call`` (returning a requests.Response) with edgepack's retry policy."""
    _, requests = _oras()
    last: str = ""
    read_timeouts = 0
    for attempt in range(RETRIES):
        try:
            resp = call()
        except requests.exceptions.SSLError as e:
            raise RegistryError(f"TLS with registry {registry} failed while trying to {what}: {e}",
                                hint="for a plain-HTTP registry pass --plain-http") from e
        except requests.exceptions.ReadTimeout as e:
            read_timeouts += 1
            last = _reason(e)
            if read_timeouts >= MAX_READ_TIMEOUTS:
                raise RegistryUnreachableError(
                    f"registry {registry} accepted the connection but did not answer within {TIMEOUT_S[1]:g} s, "
                    f"{read_timeouts} times, while trying to {what}",
                    hint="the registry is hung or overloaded; check it, then retry") from e
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            last = _reason(e)
        else:
            if resp.status_code not in RETRY_STATUS or attempt == RETRIES - 1:
                return resp
            last = f"HTTP {resp.status_code} {resp.reason}"
        if attempt < RETRIES - 1:
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise RegistryUnreachableError(f"registry {registry} is unreachable: could not {what} after {RETRIES} attempts ({last})")


def _reason(e: Exception) -> str:
    """'Connection refused' rather than urllib3's nested repr."""
    if "timed out" in str(e).lower() or "Timeout" in type(e).__name__:
        return "timed out"
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
    return found[-1].strip() if found else type(e).__name__


class Client:
    """One repository on one registry: oras' Registry with edgepack's retries, timeouts and auth choice."""

    def __init__(self, ref: Ref, plain_http: bool | None = None):
        oras, requests = _oras()
        self.ref = ref
        insecure = ref.loopback if plain_http is None else plain_http
        self.base = f"{'http' if insecure else 'https'}://{ref.registry}"
        backend = self._auth_backend(requests)
        self.reg = _make_registry(oras, requests, ref.registry, insecure, backend)
        ns, _, name = ref.repository.rpartition("/")
        self.container = oras.container.Container(name, registry=ref.registry)
        self.container.namespace, self.container.repository = ns or None, name
        self.container.tag, self.container.digest = ref.tag or "latest", ref.digest
        self.reg.auth.load_configs(self.container, configs=[c] if (c := _docker_config()) else None)
        if backend == "basic" and not getattr(self.reg.auth, "_basic_auth", None):
            raise RegistryError(f"registry {ref.registry} asks for a login and there are no credentials for it",
                                hint=f"`docker login {ref.registry}` (or `oras login`) writes them to ~/.docker/config.json")

    def _auth_backend(self, requests) -> str:
        """Ping /v2/ (what docker does first): reachability, and which auth scheme the registry wants.
        oras' token backend cannot answer a Basic challenge (a registry:2 with htpasswd), so pick."""
        resp = with_retries(lambda: requests.get(f"{self.base}/v2/", timeout=TIMEOUT_S), self.ref.registry,
                            "reach its /v2/ API")
        if resp.status_code == 404:
            raise RegistryError(f"{self.base} does not serve the OCI distribution API (/v2/ answered 404)")
        challenge = resp.headers.get("Www-Authenticate", "")
        return "basic" if resp.status_code == 401 and challenge.lower().startswith("basic") else "token"

    def request(self, method: str, url: str, **kw) -> Any:
        return self.reg.do_request(url, method, **kw)

    def manifest_url(self, reference: str) -> str:
        return f"{self.base}/v2/{self.ref.repository}/manifests/{reference}"

    def tags(self) -> list[str]:
        resp = self.request("GET", f"{self.base}/v2/{self.ref.repository}/tags/list")
        return sorted((resp.json() or {}).get("tags") or []) if resp.status_code == 200 else []

    def check(self, resp, what: str, ok: tuple[int, ...] = (200, 201, 202)) -> None:
        if resp.status_code in ok:
            return
        if resp.status_code in (401, 403):
            raise RegistryError(f"registry {self.ref.registry} denied access to {self.ref.repository} while trying to "
                                f"{what} (HTTP {resp.status_code})",
                                hint=f"log in with `docker login {self.ref.registry}` and check your permissions on the repository")
        raise RegistryError(f"registry {self.ref.registry} answered HTTP {resp.status_code} while trying to {what}: "
                            f"{_registry_message(resp)}")


def _make_registry(oras, requests, host: str, insecure: bool, backend: str):
    """An oras Registry whose every request (oras' own blob uploads included) goes through
    edgepack's retry policy and a session with timeouts, instead of oras' retry decorator."""
    from http.cookiejar import DefaultCookiePolicy

    class _Session(requests.Session):
        def request(self, method, url, **kw):  # type: ignore[override]
            kw.setdefault("timeout", TIMEOUT_S)
            return super().request(method, url, **kw)

    plain = oras.provider.Registry.do_request.__wrapped__  # skip oras' 2+3**n s retry decorator

    class _Registry(oras.provider.Registry):
        def do_request(self, url, method="GET", data=None, headers=None, json=None, stream=False):
            headers = dict(headers or {})
            if backend == "basic" and getattr(self.auth, "_basic_auth", None):
                headers.update(self.auth.get_auth_header())  # answer the Basic challenge up front
            what = f"{method} /{url.split('://', 1)[-1].split('/', 1)[-1]}"
            return with_retries(lambda: plain(self, url, method, data, headers, json, stream), host, what)

    reg = _Registry(hostname=host, insecure=insecure, auth_backend=backend)
    session = _Session()
    session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
    reg.session = reg.auth.session = session
    return reg


def _registry_message(resp) -> str:
    try:
        errors = resp.json().get("errors") or []
        return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or resp.text[:200]
    except ValueError:
        return (resp.text or resp.reason or "")[:200]


def push(bundle: Path, ref_text: str, extra_tags: list[str] | None = None, plain_http: bool | None = None) -> dict[str, Any]:
    """Upload a verified bundle; tag it (default `<version>-<target>`); return the digest to pin."""
    from edgepack.shipping.signing import read_signature

    ref = parse_ref(ref_text)
    if ref.digest:
        raise ConfigError(f"'{ref_text}': push to a tag, not a digest", hint="the digest is computed and printed by push")
    bundle = Path(bundle)
    if bundle.is_dir():
        raise ConfigError(f"{bundle}: is a folder; push a .edgepack file")
    with open_bundle(bundle, verify=True) as opened:  # never publish a corrupt bundle
        m = opened.manifest
        config_bytes = (opened.root / MANIFEST).read_bytes()
        sig = read_signature(opened.root, str(bundle))
    tags = [ref.tag or tag_for(m.version, m.target)] + [t for t in extra_tags or [] if t]
    for t in tags:
        if not TAG_RE.match(t):
            raise ConfigError(f"tag '{t}' is not valid (letters, digits, _ . -, at most 128)")
    client = Client(ref.with_tag(tags[0]), plain_http)
    layer = {"mediaType": MEDIA_BUNDLE, "size": bundle.stat().st_size, "digest": "sha256:" + sha256_file(bundle),
             "annotations": {"org.opencontainers.image.title": bundle.name}}
    layers = [(bundle, layer, "upload the bundle")]
    if opened.validation_files and m.validation.artifact is not None:  # <bundle>.validation was beside it
        art = bundle.with_name(bundle.name + VALIDATION_SUFFIX)
        art = art if art.is_file() else bundle.with_name(m.validation.artifact.file)
        layers.append((art, {"mediaType": MEDIA_VALIDATION, "size": m.validation.artifact.bytes,
                             "digest": m.validation.artifact.sha256,
                             "annotations": {"org.opencontainers.image.title": m.validation.artifact.file}},
                       "upload the validation files"))
    config = {"mediaType": MEDIA_CONFIG, "size": len(config_bytes),
              "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest()}
    with tempfile.TemporaryDirectory(prefix="edgepack-push-") as tmp:
        cfile = Path(tmp) / "manifest.json"
        cfile.write_bytes(config_bytes)
        for path, desc, what in layers + [(cfile, config, "upload the manifest blob")]:
            resp = _guard(lambda: client.reg.upload_blob(str(path), client.container, desc,
                                                         do_chunked=desc["size"] > CHUNKED_ABOVE_BYTES), client, what)
            client.check(resp, what)
    oci = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
           "config": config, "layers": [d for _, d, _ in layers], "annotations": annotations(m, sig)}
    body = json.dumps(oci, separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    for t in tags:
        resp = client.request("PUT", client.manifest_url(t), data=body,
                              headers={"Content-Type": OCI_MANIFEST})
        client.check(resp, f"write tag {t}")
        served = resp.headers.get("Docker-Content-Digest")
        if served and served != digest:
            raise DigestMismatchError(f"registry {ref.registry} stored tag {t} as {served}, edgepack sent {digest}")
    return {"ref": str(ref.with_tag(tags[0])), "tags": tags, "digest": digest, "pinned": str(ref.pinned(digest)),
            "bundle": str(bundle), "size_bytes": layer["size"], "annotations": oci["annotations"],
            "validation_file": str(layers[1][0]) if len(layers) > 1 else None}


def _guard(call: Callable[[], Any], client: Client, what: str) -> Any:
    """oras raises ValueError for some failed answers (e.g. no upload location); name the registry."""
    try:
        return call()
    except EdgepackError:
        raise
    except ValueError as e:
        raise RegistryError(f"registry {client.ref.registry} failed to {what}: {e}") from e


def _sink(path: Path) -> IO[bytes]:
    """Where pulled bytes go (a seam the tests use to simulate a full disk)."""
    return open(path, "wb")


def _download(client: Client, layer: dict[str, Any], tmp: Path, ref: Ref) -> None:
    """Stream the blob to ``tmp``, hashing as it goes; refuse a wrong size or digest. A broken
    connection restarts the download; a failed write (disk full) stops it."""
    _, requests = _oras()
    url = f"{client.base}/v2/{ref.repository}/blobs/{layer['digest']}"
    size = int(layer["size"])
    for attempt in range(RETRIES):
        h, done = hashlib.sha256(), 0
        resp = client.request("GET", url, stream=True)
        client.check(resp, "download the bundle")
        try:
            with resp, _sink(tmp) as f:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    done += len(chunk)
                    if done > size:
                        break
                    h.update(chunk)
                    f.write(chunk)
            break
        except requests.exceptions.RequestException as e:  # a read from the registry broke off: start over
            if attempt == RETRIES - 1:
                raise RegistryUnreachableError(f"registry {ref.registry}: the download of {ref} broke off after "
                                               f"{done} of {size} bytes ({type(e).__name__})") from e
            time.sleep(BACKOFF_S * 2 ** attempt)
        except OSError as e:  # a write failed (including the flush on close)
            raise _write_error(e, tmp.parent, f"pulling {ref} ({done} of {size} bytes)") from e
    got = "sha256:" + h.hexdigest()
    if done != size or got != layer["digest"]:
        raise DigestMismatchError(f"{ref}: downloaded {done} bytes with digest {got[:19]}..., the artifact names "
                                  f"{size} bytes with {layer['digest'][:19]}...")


def _write_error(e: OSError, folder: Path, doing: str) -> EdgepackError:
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return DiskFullError(f"no space left in {folder} while {doing}; nothing was kept")
    return ConfigError(f"cannot write in {folder} while {doing}: {e.strerror or e}",
                       hint="check the destination folder exists and is writable")


def pull(ref_text: str, dest: Path, pubkey: Path | None = None, plain_http: bool | None = None) -> dict[str, Any]:
    """Download a bundle; check manifest digest (when pinned), blob digest, every file's sha256 and the
    signature (when a key is given) before the final file appears (temp file, then rename)."""
    ref = parse_ref(ref_text)
    if not ref.tag and not ref.digest:
        raise ConfigError(f"'{ref_text}' names no tag or digest", hint="add :TAG (e.g. :1.2.3-onnx) or @sha256:...")
    client = Client(ref, plain_http)
    reference = ref.digest or ref.tag or ""
    resp = client.request("GET", client.manifest_url(reference),
                          headers={"Accept": OCI_MANIFEST})
    if resp.status_code == 404:
        known = client.tags()
        what = f"digest {ref.digest}" if ref.digest else f"tag '{ref.tag}'"
        raise NotInRegistryError(f"{what} not found in {ref.registry}/{ref.repository}",
                                 hint=(f"tags there: {', '.join(known[-10:])}" if known else
                                       "the repository has no tags (or does not exist); check the name"))
    client.check(resp, f"fetch {reference}")
    body = resp.content
    got = "sha256:" + hashlib.sha256(body).hexdigest()
    if ref.digest and got != ref.digest:
        raise DigestMismatchError(f"{ref}: the registry served a manifest with digest {got}, not the pinned one")
    try:
        oci = json.loads(body)
    except ValueError as e:
        raise RegistryError(f"{ref}: the registry's manifest is not JSON ({e})") from e
    layer = bundle_layer(oci, ref)
    dest = Path(dest)
    final = dest / file_name(layer, oci)
    try:
        dest.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest).free
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=dest)
        os.close(fd)
    except OSError as e:
        raise _write_error(e, dest, f"pulling {ref}") from e
    if free < int(layer["size"]):
        Path(name).unlink(missing_ok=True)
        raise DiskFullError(f"{dest} has {free} bytes free, {ref} needs {layer['size']}; nothing was kept")
    tmp = Path(name)
    try:
        _download(client, layer, tmp, ref)
        with open_bundle(tmp, verify=True, validation=False) as opened:
            m = opened.manifest
            sig = None
            if pubkey is not None:
                from edgepack.shipping.signing import verify_signature

                sig = verify_signature(opened.root, pubkey, str(ref))
        os.chmod(tmp, 0o644)
        vlayer = validation_layer(oci, m)
        if vlayer is not None:  # the digest is the verified manifest's: _download refuses any other bytes
            vtmp = tmp.with_name(tmp.name + VALIDATION_SUFFIX)
            try:
                _download(client, vlayer, vtmp, ref)
                os.chmod(vtmp, 0o644)
                os.replace(vtmp, final.with_name(final.name + VALIDATION_SUFFIX))
            finally:
                vtmp.unlink(missing_ok=True)
        os.replace(tmp, final)
    except BundleError as e:
        tmp.unlink(missing_ok=True)
        e.message = e.message.replace(str(tmp), str(ref))
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"ref": str(ref), "digest": got, "pinned": str(ref.pinned(got)), "bundle": str(final), "name": m.name,
            "version": m.version, "target": m.target, "build_id": m.build_id, "signature": sig,
            "validation_file": str(final.with_name(final.name + VALIDATION_SUFFIX)) if vlayer else None}
