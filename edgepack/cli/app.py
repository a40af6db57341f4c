"""Composes the commands. Each command lives in its own module."""

from __future__ import annotations

import typer

from edgepack import __version__
from edgepack.cli import build, doctor, engine, init, inspect, targets, validate
from edgepack.cli import device, fleet, registry, sign
from edgepack.cli.group import EdgepackGroup
from edgepack.cli.options import DebugOpt

app = typer.Typer(
    cls=EdgepackGroup,
    name="edgepack",
    help="Compile trained models into measured, versioned bundles for edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"edgepack {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    debug: DebugOpt = False,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    ctx.obj = {"debug": debug}


app.command("build")(build.build)
app.command("validate")(validate.validate)
app.command("inspect")(inspect.inspect)
app.command("init")(init.init)
app.command("build-engine")(engine.build_engine)
app.command("doctor")(doctor.doctor)
app.add_typer(targets.app, name="targets", help="List and show target profiles.")
app.command("keygen")(sign.keygen)
app.command("sign")(sign.sign)
app.command("verify")(sign.verify)
app.command("push")(registry.push)
app.command("pull")(registry.pull)
app.command("install")(device.install)
app.command("rollback")(device.rollback)
app.command("status")(device.status)
app.add_typer(fleet.app, name="fleet", help="The fleet view: which device runs which version.")
from edgepack.cli import toolchain as toolchain_cli  # noqa: E402

app.add_typer(toolchain_cli.app, name="toolchain", help="Isolated converter environments (onnx2tf, quark).")
from edgepack.cli import compare as compare_cli  # noqa: E402

app.command("compare")(compare_cli.compare)
