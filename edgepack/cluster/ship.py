"""What goes to the cluster: the project folder (model code, weights, data, the project file) and any
``--targets-dir`` folders, as one zip made once per run and put in Ray's object store once. Every task
of the run reads that one object (Ray moves it to each node once) and unpacks it into a temporary
folder that is removed when the task ends: nothing on a worker's disk is needed after the run.

Not sent: the output folder, hidden folders (``.git``, ``.venv``, build scratch), ``__pycache__`` and
bundles (``*.edgepack``). Files the project names outside its folder (an absolute data path) are not
sent either: they must exist at the same path on every node.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

STAMP = (2020, 1, 1, 0, 0, 0)  # fixed times: the same files give the same bytes, so the same digest


@dataclass(frozen=True)
class Payload:
    data: bytes
    digest: str
    project_file: str            # the project file, relative to the unpacked folder
    targets_dirs: tuple[str, ...]
    specs: dict[str, str]         # a target given as a .yaml path -> its path in the unpacked folder
    files: int


def _skip(rel: Path, out: Path | None, path: Path) -> bool:
    if any(part.startswith(".") or part == "__pycache__" for part in rel.parts[:-1]):
        return True
    if rel.name.endswith((".edgepack", ".pyc")) or rel.name.startswith(".edgepack-"):
        return True
    return out is not None and (path == out or out in path.parents)


def _add_tree(z: zipfile.ZipFile, root: Path, prefix: str, out: Path | None) -> int:
    n = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or _skip(rel, out, path.resolve()):
            continue
        info = zipfile.ZipInfo(f"{prefix}/{rel.as_posix()}", STAMP)
        info.external_attr = (path.stat().st_mode & 0o777) << 16
        info.compress_type = zipfile.ZIP_STORED
        with path.open("rb") as f:
            z.writestr(info, f.read())
        n += 1
    return n


def pack(project_file: Path, targets_dirs: list[Path], out: Path | None, specs: list[str] = ()) -> Payload:
    """Zip the project's folder, the extra target-profile folders and the targets given as .yaml paths
    (the output folder left out)."""
    project_file = project_file.resolve()
    root = project_file.parent
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        files = _add_tree(z, root, "project", out.resolve() if out else None)
        dirs = []
        for i, d in enumerate(targets_dirs):
            files += _add_tree(z, Path(d).resolve(), f"targets-{i}", None)
            dirs.append(f"targets-{i}")
        paths = {}
        for i, spec in enumerate(specs):
            if spec.endswith((".yaml", ".yml")) and Path(spec).is_file():
                paths[spec] = f"specs/{i}/{Path(spec).name}"
                info = zipfile.ZipInfo(paths[spec], STAMP)
                info.external_attr = 0o644 << 16
                z.writestr(info, Path(spec).read_bytes())
                files += 1
    data = buf.getvalue()
    return Payload(data, "sha256:" + hashlib.sha256(data).hexdigest(), f"project/{project_file.name}",
                   tuple(dirs), paths, files)


def unpack(data: bytes, dest: Path) -> Path:
    """Extract a payload into ``dest`` (an empty folder); names are checked to stay inside it."""
    dest = dest.resolve()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            target = (dest / info.filename).resolve()
            if dest not in target.parents:
                raise ValueError(f"payload member outside its folder: {info.filename}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(z.read(info))
            target.chmod((info.external_attr >> 16) & 0o777 or 0o644)
    return dest
