"""Ctrl-C and SIGTERM that never land in the middle of an import.

Raising from a signal handler while a module is being imported (a native extension initialising,
importlib holding its locks) can turn the interrupt into an ImportError ("install edgepack[onnx]"),
abort the process, or lose it. So the handlers raise at once only outside imports; inside one they
note the signal, and :func:`check` raises it at the next safe point (the CLI after its imports, every
build stage's start and end, a backend after importing its toolchain). Every `finally` and context
manager then cleans up exactly as for a Ctrl-C anywhere else.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from pathlib import Path
from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is (a KeyboardInterrupt, so cleanup runs as for Ctrl-C)."""


_pending: list[int] = []


def _inside_import(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _raise(signum: int) -> None:
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum: int, frame: FrameType | None) -> None:
    if _inside_import(frame):
        _pending.append(signum)
        return
    _pending.clear()
    _raise(signum)


def install() -> None:
    """SIGTERM always; Ctrl-C unless the process was started with it ignored (nohup, `&`)."""
    signal.signal(signal.SIGTERM, _handler)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise a signal that arrived during an import, now that it is safe to."""
    if _pending:
        signum = _pending[-1]
        _pending.clear()
        _raise(signum)


def note_kept(exc: KeyboardInterrupt, bundles: Iterable[Path]) -> None:
    """Name, on the interrupt itself, the complete bundles this command wrote before it arrived (a
    multi-target build keeps its finished targets), so the error's hint never says nothing was written."""
    kept = [*getattr(exc, "kept", []), *(str(b) for b in bundles)]
    exc.kept = list(dict.fromkeys(kept))  # type: ignore[attr-defined]
