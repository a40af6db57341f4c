"""`edgepack targets list|show`."""

from __future__ import annotations


import typer
import yaml
from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import Format, out, print_json
from edgepack.cli.options import FormatOpt, TargetsDirOpt

app = typer.Typer(no_args_is_help=True)


@app.command("list")
def list_(
    targets_dir: TargetsDirOpt = [],
    format: FormatOpt = Format.human,
) -> None:
    """List the known target profiles."""
    from edgepack.target import discover

    found = discover(extra_dirs=list(targets_dir))
    primary = {p.name: p for p in found.values()}
    if format == Format.json:
        print_json([{"name": p.name, "aliases": p.aliases, "backend": p.backend, "precision": p.precision,
                     "device": p.device.name, "source": p.source} for p in primary.values()])
        return
    t = Table(title="targets")
    for col in ("name", "aliases", "backend", "precision", "device", "description"):
        t.add_column(col)
    for p in sorted(primary.values(), key=lambda p: p.name):
        t.add_row(p.name, ", ".join(p.aliases), p.backend, p.precision, escape(p.device.name), escape(p.description))
    out.print(t)


@app.command("show")
def show(
    name: str = typer.Argument(..., help="Profile name or alias."),
    targets_dir: TargetsDirOpt = [],
    format: FormatOpt = Format.human,
) -> None:
    """Show one resolved target profile."""
    from edgepack.target import load_target

    p = load_target(name_or_path=name, extra_dirs=list(targets_dir))
    data = p.model_dump(mode="json")
    if format == Format.json:
        print_json(data)
    else:
        out.print(escape(yaml.safe_dump(data, sort_keys=False)))
