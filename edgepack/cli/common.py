"""Shared CLI pieces: consoles, output formats, typed options."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from enum import Enum
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(str, Enum):
    human = "human"
    json = "json"


def print_json(data: Any) -> None:
    # plain print: rich would wrap long lines and break the JSON
    print(json.dumps(data, indent=2, default=str))


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def clean_text(s: str) -> str:
    """``s`` safe to print on a terminal: control and format characters (escape sequences, carriage
    returns, newlines, bidi overrides, line separators) shown as ``\\x1b``-style escapes, never sent."""
    if s.isprintable():
        return s
    import unicodedata

    parts = []
    for c in s:
        if c.isprintable() or c == " ":
            parts.append(c)
        elif unicodedata.category(c) in ("Zs",):
            parts.append(" ")
        else:
            o = ord(c)
            parts.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(parts)


def clean(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, strings from a manifest, a report, a status file) with every
    string, keys included, passed through :func:`clean_text`. Apply before printing untrusted data."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While a command whose stdout is JSON works, send everything else written to stdout (toolchain
    chatter from Python and from native code: calibrators, converters) to stderr, so that stdout holds
    the JSON document alone."""
    if not active:
        yield
        return
    import os
    import sys

    saved = None
    try:
        fd = sys.__stdout__.fileno() if sys.__stdout__ is not None else None
    except (OSError, ValueError):  # no real stdout (a test runner's capture)
        fd = None
    if fd is not None:
        sys.__stdout__.flush()
        saved = os.dup(fd)
        os.dup2(sys.__stderr__.fileno(), fd)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            sys.__stdout__.flush()
            os.dup2(saved, fd)
            os.close(saved)
