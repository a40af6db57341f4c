"""Size on disk of a model's files."""

from __future__ import annotations

from pathlib import Path


def size_of(files: list[Path], root: Path) -> dict:
    per = {p.relative_to(root).as_posix(): p.stat().st_size for p in files}
    return {"bytes": sum(per.values()), "files": per}
