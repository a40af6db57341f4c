"""Scratch folders that clean up after processes that could not (kill -9, power loss).

Each folder holds an flock on ``.lock`` for as long as its owner lives; the kernel releases it when
the process dies. Before making a new one, folders of the same kind whose lock is free are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"
# a folder without its lock yet may be one another process is creating right now
GRACE_S = 60.0


def sweep(parent: Path, prefix: str, suffix: str = "") -> list[Path]:
    """Remove ``parent/prefix*suffix`` folders whose owner is gone. Returns what was removed."""
    removed = []
    for d in Path(parent).glob(f"{prefix}*{suffix}"):
        try:
            if not d.is_dir() or d.is_symlink():
                continue
            with open(d / LOCK) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner is running
        except FileNotFoundError:
            try:
                if time.time() - d.stat().st_mtime < GRACE_S:
                    continue
            except OSError:
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


@contextlib.contextmanager
def locked_dir(parent: Path | None, prefix: str, suffix: str = "") -> Iterator[Path]:
    """A new folder in ``parent`` (the system's temp folder when None), locked while in use and removed
    after; stale ones of the same prefix and suffix are swept first."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep(parent, prefix, suffix)
    d = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    lock = open(d / LOCK, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
        lock.close()
