"""Entry point and the one place where errors become `error:` / `hint:` lines and exit codes."""

from __future__ import annotations


import typer
from rich.markup import escape
from typer.core import TyperGroup

from edgepack.errors import EdgepackError, InterruptedBuildError


def report(exc: EdgepackError) -> None:
    from edgepack.cli.common import err

    err.print(f"[bold red]error:[/] {escape(exc.message)}")
    err.print(f"[dim]hint:[/] {escape(exc.hint)}")


class EdgepackGroup(TyperGroup):
    """Catches EdgepackError once for every command; a traceback only with --debug."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            exc = InterruptedBuildError("interrupted; no partial output was left behind")
            report(exc)
            raise typer.Exit(exc.exit_code) from None
        except EdgepackError as exc:
            if (ctx.obj or {}).get("debug"):
                import traceback

                traceback.print_exc()
            report(exc)
            raise typer.Exit(exc.exit_code) from None


def main() -> None:
    from edgepack.cli.app import app

    app(prog_name="edgepack")


if __name__ == "__main__":
    main()
