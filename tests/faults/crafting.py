"""Making hostile bundles from a good one: edit members, headers and manifest fields."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path


def members(src: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(src, "r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar.getmembers()]


def write(dst: Path, items: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(dst, "w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in items:
            info = _copy(info)
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return dst


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    for k in ("size", "mtime", "mode", "type", "linkname", "uid", "gid", "uname", "gname", "devmajor", "devminor"):
        setattr(new, k, getattr(info, k))
    return new


def entry(name: str, data: bytes = b"", **kw) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


def set_field(m: dict, path: str, value) -> None:
    """``m["a"]["b"][0] = value`` for ``path`` "a.b.0"."""
    *parents, last = path.split(".")
    d = m
    for p in parents:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if isinstance(d, list):
        d[int(last)] = value
    else:
        d[last] = value


def with_manifest(src: Path, dst: Path, change: Callable[[dict], None], reseal: bool = False) -> Path:
    """A copy whose manifest dict went through ``change``; ``reseal`` recomputes the build id as an
    editor who knows the rule would (only possible while the manifest still validates)."""
    items = members(src)
    out = []
    for info, data in items:
        if info.name == "manifest.json":
            m = json.loads(data)
            change(m)
            if reseal:
                m["build_id"] = seal_of(items, m)
            data = json.dumps(m, indent=2).encode()
        out.append((info, data))
    return write(dst, out)


def seal_of(items: list[tuple[tarfile.TarInfo, bytes]], m: dict) -> str:
    import tempfile

    from edgepack.bundle import Manifest, seal

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for info, data in items:
            if info.isreg() and info.name != "manifest.json":
                (root / info.name).parent.mkdir(parents=True, exist_ok=True)
                (root / info.name).write_bytes(data)
        return seal(root, Manifest.model_validate(m))


def with_member(src: Path, dst: Path, name: str, change: Callable[[bytes], bytes]) -> Path:
    return write(dst, [(i, change(d) if i.name == name else d) for i, d in members(src)])


def without(src: Path, dst: Path, name: str) -> Path:
    return write(dst, [(i, d) for i, d in members(src) if i.name != name])


def plus(src: Path, dst: Path, *extra: tuple[tarfile.TarInfo, bytes]) -> Path:
    return write(dst, members(src) + list(extra))


def gzipped(src: Path, dst: Path) -> Path:
    dst.write_bytes(gzip.compress(src.read_bytes()))
    return dst
