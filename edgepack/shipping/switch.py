"""The crash-safe primitives of an install root: atomic JSON files and links, the one-at-a-time
lock, and the journalled switch of `current`/`previous` (see :mod:`edgepack.shipping.install` for
the layout of ROOT and the order of the steps).

Every change is a rename after an fsync, so a process killed at any point (``kill -9``, power loss)
leaves a root the next command can use: a switch killed half way is finished from ``switch.json``.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgepack.errors import InstallError

CRASH_ENV = "EDGEPACK_TEST_CRASH_AT"
JOURNAL = "switch.json"


def crash(step: str) -> None:
    """Test hook: die like `kill -9` would, without cleanup, right after ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(137)


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: temp file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # status files are read by collectors running as other users
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def link(path: Path, target: Path) -> None:
    """Point the link ``path`` at ``target`` atomically: a new symlink beside it, renamed over it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, path.parent), tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def resolve(link: Path) -> Path | None:
    """The version folder a link points at, or None when absent or dangling."""
    if not link.is_symlink():
        return None
    target = (link.parent / os.readlink(link)).resolve()
    if target.parent != (link.parent / "versions").resolve():  # only ever a folder of ROOT/versions
        return None
    return target if (target / "bundle" / "manifest.json").is_file() else None


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """One install or rollback at a time. flock is released by the kernel when the process dies,
    so a killed install never leaves a stale lock behind."""
    f = open(root / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        f.close()
        raise InstallError(f"{root}: another edgepack install or rollback is running",
                           hint="wait for it to finish; a killed one releases the lock by itself") from e
    try:
        yield
    finally:
        f.close()


def switch(root: Path, current: Path, previous: Path | None, steps: tuple[str, str, str]) -> None:
    """Point `current` (and `previous`, when given) at version folders, crash-safe: the intended
    pair is written to switch.json first, then the links are renamed; a switch killed in between is
    finished by :func:`finish_switch` at the start of the next install, rollback or status."""
    write_json(root / JOURNAL, {"current": current.name, "previous": previous.name if previous else None})
    crash(steps[0])
    if previous is not None:
        link(root / "previous", previous)
    crash(steps[1])
    link(root / "current", current)
    crash(steps[2])
    (root / JOURNAL).unlink()
    fsync_dir(root)


def finish_switch(root: Path) -> None:
    """Complete a switch that switch.json says was under way (both folders must still be there)."""
    j = read_json(root / JOURNAL)
    if j is None:
        (root / JOURNAL).unlink(missing_ok=True)
        return
    folders = []
    for key in ("current", "previous"):
        name = j.get(key)
        ok = isinstance(name, str) and "/" not in name and not name.startswith(".") and \
            (root / "versions" / name / "bundle" / "manifest.json").is_file()
        folders.append(root / "versions" / name if ok else None)
    cur, prev = folders
    if prev is not None:
        link(root / "previous", prev)
    if cur is not None:
        link(root / "current", cur)
    (root / JOURNAL).unlink(missing_ok=True)
    fsync_dir(root)
