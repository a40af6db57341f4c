"""The bundle: one tar archive holding ``manifest.json``, ``model/``, ``preprocess.json``,
``labels.json``, ``validation/`` and, for text models, ``tokenizer/``. The manifest lists every
other file with its sha256."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError as PydanticValidationError

from edgepack.artifact import digest_paths, sha256_file
from edgepack.errors import BundleError, ConfigError, DiskFullError
from edgepack.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    SIGNATURE,
    SUFFIX,
    VALIDATION_DIR,
    VALIDATION_SUFFIX,
    Acceptance,
    FileEntry,
    Manifest,
    Measured,
    Measurements,
    Runtime,
    Source,
    Validation,
    ValidationArtifact,
    manifest_schema,
    safe_member_path,
)
from edgepack.tarsafe import (
    COMPRESSED,
    extract_members,
    free_bytes,
    read_members,
    write_tar,
)

# What an archive may hold before anything is written (see read_archive). A bundle is a plain tar:
# its members cannot unpack to more bytes than the archive has, and each member's size must be the
# one the manifest lists. The caps bound what a hostile header can make edgepack read or allocate.
MAX_MANIFEST_BYTES = 32 << 20
MAX_SIGNATURE_BYTES = 64 << 10
MAX_BYTES_ENV = "EDGEPACK_MAX_BUNDLE_BYTES"
DEFAULT_MAX_BYTES = 16 << 30
# free space kept on the destination's file system beyond what the bundle needs
DISK_MARGIN_BYTES = 16 << 20

def bundle_name(name: str, version: str, target: str) -> str:
    return f"{name}-{version}-{target}{SUFFIX}"


def file_entries(root: Path) -> list[FileEntry]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in files]


def _covered(root: Path, p: Path) -> bool:
    """Files the manifest lists and the build id covers: all but manifest.json and the root signature."""
    return p.is_file() and p.name != MANIFEST and p.relative_to(root).as_posix() != SIGNATURE


def content_digest(root: Path, apart: dict[str, str] | None = None) -> str:
    """The digest of the files under ``root``; ``apart`` (path -> sha256) stands in for listed files that
    ship in the separate validation artifact and are not there."""
    files = [p for p in root.rglob("*") if _covered(root, p)]
    missing = {rel: sha for rel, sha in (apart or {}).items() if not (root / rel).is_file()}
    if not missing:
        return "sha256:" + digest_paths(files, root)
    h = hashlib.sha256()
    for p in sorted(files + [root / rel for rel in missing]):
        rel = p.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0" + (missing.get(rel) or sha256_file(p)).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def apart_files(manifest: Manifest) -> dict[str, str]:
    """The listed files a separate validation artifact holds (path -> sha256); empty for inline ones."""
    if manifest.validation.artifact is None:
        return {}
    return {f.path: f.sha256 for f in manifest.files if f.path.startswith(VALIDATION_DIR + "/")}


def seal(root: Path, manifest: "Manifest") -> str:
    """The build id: the files' digest and every manifest field but build_id itself, in canonical JSON.
    An edited figure in an unsigned bundle no longer matches it (an editor who knows the rule can
    recompute it: only a signature protects against that)."""
    body = manifest.model_dump(mode="json", exclude={"build_id"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True)
    h = hashlib.sha256(content_digest(root, apart_files(manifest)).encode())
    h.update(b"\n")
    h.update(canonical.encode())
    return "sha256:" + h.hexdigest()


def write_bundle(staging: Path, manifest: Manifest, out: Path, separate_validation: bool = False) -> Manifest:
    """Seal the manifest (build id), write it into ``staging``, tar it, then rename into place.
    The partial archive is written beside ``staging`` when that is on ``out``'s file system (so a
    killed build leaves it inside its own scratch folder), else beside ``out``. Returns the sealed manifest.

    With ``separate_validation`` the ``validation/`` files go into ``<out>.validation`` (renamed into
    place first, so a bundle never appears without it); the manifest lists them and that file's digest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = staging.parent if os.stat(staging.parent).st_dev == os.stat(out.parent).st_dev else out.parent
    files = sorted(q for q in staging.rglob("*") if q.is_file() and q.name != MANIFEST)
    apart = [q for q in files if q.relative_to(staging).parts[0] == VALIDATION_DIR] if separate_validation else []
    art_out = out.with_name(out.name + VALIDATION_SUFFIX)
    temps: list[Path] = []
    try:
        if apart:
            temps.append(write_tar(apart, staging, tmp_dir, art_out.name))
            artifact = ValidationArtifact(file=art_out.name, sha256="sha256:" + sha256_file(temps[-1]),
                                          bytes=temps[-1].stat().st_size)
            manifest = manifest.model_copy(update={"validation": manifest.validation.model_copy(
                update={"artifact": artifact})})
        manifest = manifest.model_copy(update={"build_id": seal(staging, manifest)})
        (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        temps.append(write_tar([staging / MANIFEST] + [q for q in files if q not in apart], staging, tmp_dir, out.name))
        if apart:
            os.replace(temps[0], art_out)
        os.replace(temps[-1], out)
        if not apart:
            art_out.unlink(missing_ok=True)  # an earlier build's, which this bundle does not use
    except BaseException:
        for t in temps:
            t.unlink(missing_ok=True)
        raise
    return manifest


@dataclass
class OpenedBundle:
    path: Path
    root: Path
    manifest: Manifest
    validation_files: bool = True  # False: they ship apart and no <bundle>.validation was found

    def file(self, rel: str) -> Path:
        return self.root / rel


def read_manifest_json(data: dict, where: str) -> Manifest:
    if not isinstance(data, dict):
        raise BundleError(f"{where}: manifest.json is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        version = version if isinstance(version, (int, float)) or version is None else str(version)[:20]
        raise BundleError(f"{where}: manifest schema_version {version!r} is not supported (this edgepack reads "
                          f"{SCHEMA_VERSION})", hint="use the edgepack version that built the bundle, or rebuild it")
    try:
        return Manifest.model_validate(data)
    except PydanticValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        msg = first["msg"].removeprefix("Value error, ")[:200]
        at = f" at '{key[:120]}'" if key else ""
        raise BundleError(f"{where}: manifest.json is invalid{at}: {msg}") from e


def parse_manifest(data: bytes, where: str) -> Manifest:
    """manifest.json's bytes -> a validated Manifest, or a BundleError (never another exception)."""
    try:
        return read_manifest_json(json.loads(data.decode("utf-8")), where)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"{where}: manifest.json is not valid JSON: {str(e)[:200]}") from e


def max_bundle_bytes() -> int:
    raw = os.environ.get(MAX_BYTES_ENV)
    if raw is None:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
        if value <= 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"${MAX_BYTES_ENV}={raw[:40]!r}: not a positive number of bytes") from None
    return value


def _check_members(members: dict[str, tarfile.TarInfo], manifest: Manifest, where: str) -> int:
    """Each member is listed with the size the manifest gives (or is manifest/signature, or a folder
    of listed files); every listed file is there. Returns the bytes the archive unpacks to."""
    listed = {f.path: f.bytes for f in manifest.files}
    total = 0
    unlisted = []
    for name, m in members.items():
        if m.isdir():
            if not any(p.startswith(name + "/") for p in listed):
                unlisted.append(name + "/")
            continue
        total += m.size
        if name in (MANIFEST, SIGNATURE):
            continue
        if name not in listed:
            unlisted.append(name)
        elif m.size != listed[name]:
            raise BundleError(f"{where}: file '{name}' has {m.size} bytes, the manifest says {listed[name]} "
                              "(truncated or modified)")
    if unlisted:
        raise BundleError(f"{where}: files not listed in the manifest: {', '.join(sorted(unlisted)[:5])}")
    missing = sorted(set(listed) - set(members) - set(apart_files(manifest)))
    if missing:
        raise BundleError(f"{where}: file '{missing[0]}' listed in the manifest is missing")
    cap = max_bundle_bytes()
    if total > cap:
        raise BundleError(f"{where}: the bundle unpacks to {total:,} bytes, more than the limit of {cap:,}",
                          hint=f"raise ${MAX_BYTES_ENV} if this bundle is expected to be that large")
    return total


def read_archive(path: Path, dest: Path | None, where: str | None = None) -> Manifest:
    """Read a bundle archive safely and, with ``dest``, extract it there.

    Before a byte is written: the file is a plain (uncompressed) tar; members are regular files or
    folders with names inside the bundle, each once; there is exactly one manifest.json, which parses
    and validates; every other member is a file the manifest lists, with the size it lists; the total
    is under the limit and fits in the destination's free space. Files are then written one by one,
    never more than their header's size. Files are not hashed here (:func:`verify_files` does that)."""
    path = Path(path)
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        for magic, kind in COMPRESSED.items():
            if head.startswith(magic):
                raise BundleError(f"{where}: a {kind}-compressed archive; edgepack bundles are plain tar files",
                                  hint="fetch the .edgepack file itself; bundles are never compressed")
        with tarfile.open(path, "r:") as tar:
            members = read_members(tar, where)
            man = members.get(MANIFEST)
            if man is None or not man.isreg():
                raise BundleError(f"{where}: no manifest.json inside")
            if man.size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{where}: manifest.json is {man.size:,} bytes (a manifest is a few kB; "
                                  f"limit {MAX_MANIFEST_BYTES:,})")
            sig = members.get(SIGNATURE)
            if sig is not None and (not sig.isreg() or sig.size > MAX_SIGNATURE_BYTES):
                raise BundleError(f"{where}: signature.json is not a small file")
            manifest = parse_manifest(tar.extractfile(man).read(), where)
            total = _check_members(members, manifest, where)
            if dest is None:
                return manifest
            free = free_bytes(dest)
            if total + DISK_MARGIN_BYTES > free:
                raise DiskFullError(f"{dest}: the bundle unpacks to {total:,} bytes and only {free:,} are free; "
                                    "nothing was written")
            extract_members(tar, members, dest)
            return manifest
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{where}: not a readable bundle archive (truncated or corrupt?): {e}") from e
    except OSError as e:
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise DiskFullError(f"no space left in {dest} while unpacking {path.name}") from e
        if dest is not None and e.filename and str(e.filename).startswith(str(dest)):
            raise BundleError(f"cannot unpack {path.name} into {dest}: {e.strerror or e}",
                              hint="check that the folder is writable") from e
        raise BundleError(f"{where}: cannot read the bundle: {e.strerror or e}") from e


@contextlib.contextmanager
def open_bundle(path: Path, verify: bool = True, validation: Path | bool | None = None) -> Iterator[OpenedBundle]:
    """Extract ``path`` into a temporary folder (see :func:`read_archive`), read and (by default)
    verify it. A folder is read in place. When the bundle's validation files ship apart, they are read
    from ``validation`` or ``<path>.validation`` into the extracted copy; without that file the bundle
    opens with ``validation_files`` False (everything else verified); ``validation=False`` never looks."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: bundle not found")
    where = str(path)
    if path.is_dir():
        mfile = path / MANIFEST
        if not mfile.is_file() or mfile.is_symlink():
            raise BundleError(f"{where}: no manifest.json inside")
        if mfile.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{where}: manifest.json is larger than {MAX_MANIFEST_BYTES:,} bytes")
        manifest = parse_manifest(mfile.read_bytes(), where)
        if verify:
            verify_files(path, manifest, where)
        yield OpenedBundle(path, path, manifest, all((path / f).is_file() for f in apart_files(manifest)))
        return
    from edgepack.scratch import locked_dir

    with locked_dir(None, "edgepack-bundle-") as tmp:  # a killed reader's copy is removed by the next one
        root = tmp / "bundle"
        manifest = read_archive(path, root, where)
        present = attach_validation(path, root, manifest, validation) if validation is not False \
            else not apart_files(manifest)
        if verify:
            verify_files(root, manifest, where)
        yield OpenedBundle(path, root, manifest, present)


def attach_validation(bundle: Path, root: Path, manifest: Manifest, artifact: Path | None = None) -> bool:
    """Unpack the bundle's separate validation files (``artifact``, else ``<bundle>.validation``, else
    the file name the manifest recorded, beside the bundle) into ``root``. The file must have the
    digest the manifest records and hold exactly the listed validation files. True when the bundle's
    validation files are in ``root`` (also when they were inside it); False when none was found."""
    apart = apart_files(manifest)
    if not apart or all((root / f).is_file() for f in apart):
        return True
    rec = manifest.validation.artifact
    found = [p for p in ([artifact] if artifact else [bundle.with_name(bundle.name + VALIDATION_SUFFIX),
                                                      bundle.with_name(rec.file)]) if p.is_file()]
    if not found:
        if artifact is not None:
            raise ConfigError(f"{artifact}: validation file not found")
        return False
    art = found[0]
    if art.stat().st_size != rec.bytes or "sha256:" + sha256_file(art) != rec.sha256:
        raise BundleError(f"{art}: not this bundle's validation file (its sha256 or size differs from the "
                          f"manifest's {rec.sha256[:19]}...)", hint=f"fetch {rec.file} built with {bundle.name}")
    where = str(art)
    try:
        with tarfile.open(art, "r:") as tar:
            members = read_members(tar, where)
            files = {n: m for n, m in members.items() if not m.isdir()}
            listed = {f.path: f.bytes for f in manifest.files if f.path in apart}
            if set(files) != set(listed) or any(files[n].size != listed[n] for n in files):
                raise BundleError(f"{where}: does not hold exactly the bundle's listed validation files")
            extract_members(tar, files, root)
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{where}: not a readable validation archive (truncated or corrupt?): {e}") from e
    return True


def verify_files(root: Path, manifest: Manifest, where: str) -> None:
    """Every listed file present with its sha256 and size; nothing unlisted, no links; build id
    consistent with the files and the manifest's own fields."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if p.is_symlink() or not (p.is_file() or p.is_dir()):
                raise BundleError(f"{where}: '{p.relative_to(root).as_posix()}' is a link or a device; "
                                  "a bundle holds plain files only")
    listed = {f.path for f in manifest.files}
    apart = apart_files(manifest)
    for f in manifest.files:
        p = root / f.path
        if not p.is_file() and f.path in apart:
            continue  # shipped in the separate validation artifact; its sha256 stands in for it in the seal
        if not p.is_file():
            raise BundleError(f"{where}: file '{f.path}' listed in the manifest is missing")
        size = p.stat().st_size
        if size != f.bytes:
            raise BundleError(f"{where}: file '{f.path}' has {size} bytes, the manifest says {f.bytes} (truncated or modified)")
        if sha256_file(p) != f.sha256:
            raise BundleError(f"{where}: file '{f.path}' does not match its sha256 in the manifest (modified after the build)")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if _covered(root, p) and p.relative_to(root).as_posix() not in listed)
    if extra:
        raise BundleError(f"{where}: files not listed in the manifest: {', '.join(extra[:5])}")
    if seal(root, manifest) != manifest.build_id:
        raise BundleError(f"{where}: build_id does not match the bundle's content and manifest "
                          "(manifest.json was edited after the build)",
                          hint="fetch the bundle again from its publisher; do not edit a bundle")


__all__ = ["MANIFEST", "SCHEMA_VERSION", "SIGNATURE", "SUFFIX", "VALIDATION_SUFFIX", "Acceptance", "FileEntry", "Manifest", "Measured",
           "Measurements", "OpenedBundle", "Runtime", "Source", "Validation", "ValidationArtifact", "apart_files",
           "attach_validation", "bundle_name", "content_digest",
           "file_entries", "manifest_schema", "open_bundle", "parse_manifest", "read_archive", "read_manifest_json",
           "safe_member_path", "seal", "verify_files", "write_bundle"]
