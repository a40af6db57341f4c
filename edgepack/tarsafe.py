"""Plain tar archives read and written safely: what a hostile archive can make edgepack read, allocate
or write is bounded before a byte lands on disk (used for bundles and their validation files)."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from edgepack.errors import BundleError
from edgepack.manifest import safe_member_path

MAX_MEMBERS = 10_000


def write_tar(paths: list[Path], root: Path, tmp_dir: Path, name: str) -> Path:
    """A plain tar of ``paths`` (names relative to ``root``, owner root, mode 0644) in a temp file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=tmp_dir)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for p in paths:
                info = tar.gettarinfo(str(p), arcname=p.relative_to(root).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
        os.chmod(tmp, 0o644)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def read_members(tar: tarfile.TarFile, where: str) -> dict[str, tarfile.TarInfo]:
    """The archive's members by normalised name, read header by header (nothing extracted):
    regular files and folders only, each name once, every name inside the bundle."""
    found: dict[str, tarfile.TarInfo] = {}
    while True:
        m = tar.next()
        if m is None:
            return found
        if len(found) >= MAX_MEMBERS:
            raise BundleError(f"{where}: the archive holds more than {MAX_MEMBERS} members; a bundle has a few dozen")
        name = safe_member_path(m.name)
        if name is None:
            raise BundleError(f"{where}: refusing archive member {m.name[:120]!r} that points outside the bundle")
        if m.issparse() or not (m.isreg() or m.isdir()):
            raise BundleError(f"{where}: refusing archive member {name!r} (links and devices are not allowed)")
        if name in found:
            raise BundleError(f"{where}: archive member {name!r} appears twice (only one copy can be trusted)")
        found[name] = m


def free_bytes(folder: Path) -> int:
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def extract_members(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name, m in sorted(members.items()):
        target = dest / name
        if m.isdir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tar.extractfile(m)
        with open(target, "xb") as out:
            remaining = m.size
            while remaining:
                chunk = src.read(min(remaining, 1 << 20))
                if not chunk:
                    raise BundleError(f"{tar.name}: member '{name}' ends early (truncated archive)")
                out.write(chunk)
                remaining -= len(chunk)
        os.chmod(target, 0o644)
