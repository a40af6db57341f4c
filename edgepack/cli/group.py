"""The one place where errors become `error:` / `hint:` lines and exit codes: every command runs
inside :class:`EdgepackGroup`, which turns EdgepackError, file-system errors and interrupts into one
line each and the class's exit code."""

from __future__ import annotations

import errno

import typer
from typer.core import TyperGroup

from edgepack.errors import (ConfigError, DiskFullError, EdgepackError, InterruptedBuildError, TerminatedError,
                             no_space)
from edgepack.interrupts import Terminated, check  # Terminated: SIGTERM as a KeyboardInterrupt


def report(exc: EdgepackError) -> None:
    from rich.markup import escape

    from edgepack.cli.common import clean_text, err

    err.print(f"[bold red]error:[/] {escape(clean_text(exc.message))}")
    err.print(f"[dim]hint:[/] {escape(clean_text(exc.hint))}")


def from_os_error(e: OSError) -> EdgepackError:
    """A file-system failure no module turned into an EdgepackError: one line, the class's exit code."""
    where = f"{e.filename}: " if e.filename else ""
    if no_space(e):
        return DiskFullError(f"{where}no space left on the device; nothing partial was kept")
    what = e.strerror or str(e)
    if e.errno in (errno.EEXIST, errno.ENOTDIR) and e.filename:  # mkdir below a file
        from pathlib import Path

        p = Path(e.filename)
        while p != p.parent and not p.exists():
            p = p.parent
        if p.exists() and not p.is_dir():
            return ConfigError(f"{p}: is a file, not a folder", hint="choose a path whose folders are folders")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ConfigError(f"{where}{what}", hint="choose a folder you can write to (or fix its permissions)")
    if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG):
        return ConfigError(f"{where}{what}", hint="check the path: its folder must exist and be a folder")
    return EdgepackError(f"{where}{what}")


def interrupted(exc: KeyboardInterrupt) -> EdgepackError:
    kept = getattr(exc, "kept", None)  # complete bundles of targets finished before the interrupt
    hint = (f"the bundles finished before it were kept: {', '.join(kept)}; run the command again for the rest"
            if kept else None)
    if isinstance(exc, Terminated):
        return TerminatedError("terminated (SIGTERM); no partial output was left behind", hint)
    return InterruptedBuildError("interrupted; no partial output was left behind", hint)


class EdgepackGroup(TyperGroup):
    """Catches EdgepackError once for every command; a traceback only with --debug."""

    def invoke(self, ctx: typer.Context):
        try:
            check()
            result = super().invoke(ctx)
            check()  # a signal noted during an import the command did last
            return result
        except (KeyboardInterrupt, EdgepackError, OSError) as e:
            if (ctx.obj or {}).get("debug"):
                import traceback

                traceback.print_exc()
            exc = as_edgepack_error(e)
        report(exc)
        raise typer.Exit(exc.exit_code) from None


def as_edgepack_error(e: BaseException) -> EdgepackError:
    if isinstance(e, KeyboardInterrupt):
        return interrupted(e)
    if isinstance(e, EdgepackError) and not isinstance(e, DiskFullError) and no_space(e):
        # a converter or writer wrapped the ENOSPC in its own error: say what it really was
        return DiskFullError(f"{e.message} (no space left on the device)")
    if isinstance(e, EdgepackError):
        return e
    return from_os_error(e)
