"""`edgepack toolchain`: isolated environments for converters whose pins clash with edgepack's."""

from __future__ import annotations

import typer

from edgepack.cli.common import err, out

app = typer.Typer(no_args_is_help=True)


@app.command("install")
def install(name: str = typer.Argument(..., help="The toolchain: onnx2tf (ONNX -> TFLite) or quark (AdaRound INT8 rounding).")) -> None:
    """Create the toolchain's own virtual environment (once; it needs the package index)."""
    from edgepack.toolchains import install as run_install

    exe = run_install(name=name, progress=lambda msg: err.print(f"[dim]{msg}[/]"))
    out.print(f"{name}: {exe}")


@app.command("list")
def list_() -> None:
    """The isolated toolchains and whether each is installed."""
    from edgepack.toolchains import TOOLCHAINS, executable

    for name, spec in TOOLCHAINS.items():
        exe = executable(name)
        out.print(f"{name}: {exe if exe else 'not installed'} ({spec['purpose']})")
