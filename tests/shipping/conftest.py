"""Fixtures for shipping: key pairs, signed bundles, a second version, real registry servers on loopback."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import edit_yaml

pytest.importorskip("cryptography", reason="signing needs `cryptography`: pip install 'edgepack[ship]'")

REGISTRY_BIN = Path("/usr/bin/docker-registry")
# htpasswd line for user `fleet`, password `edgepack-test` (bcrypt, as the reference registry requires)
HTPASSWD = "fleet:$2b$12$jw.L5RHDsNTHQA77v2wIl.KJcSqZYuIeoZcLal6Zwi2k0hqozaspa\n"
runner = CliRunner()


def cli(*args: str):
    from edgepack.cli.app import app

    return runner.invoke(app, [str(a) for a in args])


def error_lines(result) -> tuple[str, str]:
    lines = result.output.splitlines()
    err = next((ln for ln in lines if ln.startswith("error:")), None)
    assert err, result.output
    hint = next((ln for ln in lines if ln.startswith("hint:")), "")
    return err, hint


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """Two key pairs: `a` (the fleet's) and `b` (someone else's)."""
    from edgepack.shipping.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    for name in ("a", "b"):
        generate_keypair(d / f"{name}.key", d / f"{name}.pub")
    return d


@pytest.fixture(scope="session")
def signed_v1(built, keys, tmp_path_factory) -> Path:
    """The onnx bundle 1.2.3 from the shared build, signed with key a (a private copy)."""
    from edgepack.shipping.signing import sign_bundle

    out, _ = built
    dst = tmp_path_factory.mktemp("signed-v1") / "digits-1.2.3-onnx.edgepack"
    shutil.copy2(out / "digits-1.2.3-onnx.edgepack", dst)
    sign_bundle(dst, keys / "a.key")
    return dst


@pytest.fixture(scope="session")
def signed_v2(trained_project, keys, tmp_path_factory) -> Path:
    """A real second version (1.3.0, onnx), built and signed in one go with `build --sign`."""
    proj = tmp_path_factory.mktemp("v2") / "proj"
    shutil.copytree(trained_project, proj)
    edit_yaml(proj, "version: 1.2.3", "version: 1.3.0")
    res = cli("build", "--project", proj, "--target", "onnx", "--out", proj / "dist", "--quiet",
              "--sign", keys / "a.key")
    assert res.exit_code == 0, res.output
    assert "signed" in res.output
    return proj / "dist" / "digits-1.3.0-onnx.edgepack"


def rewrite_member(src: Path, dst: Path, name: str, change) -> None:
    """Copy a bundle tar, passing member ``name``'s bytes through ``change``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == name:
                data = change(data)
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))


def edit_manifest(src: Path, dst: Path, change) -> None:
    """Copy a bundle with its manifest dict passed through ``change`` and the build id recomputed,
    as someone who knows the sealing rule would do it (an unsigned bundle cannot tell)."""
    from edgepack.bundle import Manifest, open_bundle, seal

    with open_bundle(src) as opened:
        def edit(data: bytes) -> bytes:
            m = json.loads(data)
            change(m)
            m["build_id"] = seal(opened.root, Manifest.model_validate(m))
            return json.dumps(m, indent=2).encode()

        rewrite_member(src, dst, "manifest.json", edit)


@pytest.fixture(scope="session")
def tampered(signed_v1, tmp_path_factory) -> Path:
    """The signed bundle with a better accuracy figure written into its manifest after signing, and
    the build id recomputed as an editor who knows the rule would: every file and the build id still
    match the manifest, only the signature can tell."""
    dst = tmp_path_factory.mktemp("tampered") / "digits-1.2.3-onnx.edgepack"
    edit_manifest(signed_v1, dst, lambda m: m["measurements"]["compiled"]["accuracy"].update(value=99.99))
    return dst


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_registry(folder: Path, auth: bool = False):
    """The reference distribution registry (Debian `docker-registry`) on a free loopback port."""
    if not REGISTRY_BIN.exists():
        pytest.skip("needs the reference OCI registry: apt-get install -y docker-registry")
    port = _free_port()
    config = [
        "version: 0.1", "log:", "  level: error", "  accesslog:", "    disabled: true",
        "storage:", "  filesystem:", f"    rootdirectory: {folder / 'data'}", "  delete:", "    enabled: true",
        "http:", f"  addr: 127.0.0.1:{port}", "  secret: edgepack-tests",
    ]
    if auth:
        (folder / "htpasswd").write_text(HTPASSWD)
        config += ["auth:", "  htpasswd:", "    realm: edgepack-test", f"    path: {folder / 'htpasswd'}"]
    (folder / "config.yml").write_text("\n".join(config) + "\n")
    log = open(folder / "registry.log", "w")
    proc = subprocess.Popen([str(REGISTRY_BIN), "serve", str(folder / "config.yml")], stdout=log, stderr=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # 401 from the auth registry: it is up
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"registry did not start: {(folder / 'registry.log').read_text()}")
            time.sleep(0.1)
    return proc, f"127.0.0.1:{port}", log


@dataclass(frozen=True)
class Server:
    host: str    # 127.0.0.1:PORT
    data: Path   # the registry's storage folder (tests corrupt blobs there)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A real registry on loopback, without auth."""
    pytest.importorskip("oras", reason="registry tests need `oras`: pip install 'edgepack[ship]'")
    folder = tmp_path_factory.mktemp("registry")
    proc, host, log = _start_registry(folder)
    yield Server(host, folder / "data")
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    """A registry that requires a login (htpasswd): (host, a DOCKER_CONFIG folder holding the login)."""
    pytest.importorskip("oras", reason="registry tests need `oras`: pip install 'edgepack[ship]'")
    folder = tmp_path_factory.mktemp("auth-registry")
    proc, host, log = _start_registry(folder, auth=True)
    docker = folder / "docker"
    docker.mkdir()
    login = base64.b64encode(b"fleet:edgepack-test").decode()
    (docker / "config.json").write_text(json.dumps({"auths": {host: {"auth": login}}}))
    yield host, docker
    proc.terminate()
    proc.wait(timeout=10)
    log.close()


@pytest.fixture
def fast_retries(monkeypatch):
    from edgepack.shipping import registry

    monkeypatch.setattr(registry, "BACKOFF_S", 0.01)
