"""`edgepack fleet report`: which device runs which version, from collected status files."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import clean, Format, fmt, out, print_json
from edgepack.cli.options import FormatOpt

app = typer.Typer(no_args_is_help=True)


@app.command("report")
def report(
    folder: Path = typer.Argument(..., help="A folder of device-status.json files gathered from devices."),
    stale_hours: float = typer.Option(24.0, "--stale-after", help="Flag reports older than this many hours."),
    format: FormatOpt = Format.human,
) -> None:
    """Print one line per device: version, validation result, previous version, last attempt."""
    from edgepack.shipping.fleet import report as run_report

    r = run_report(folder=folder, stale_hours=stale_hours)
    if format == Format.json:
        print_json(r)
        return
    r = clean(r)  # manifest and report fields are untrusted
    t = Table(title=f"fleet: {len(r['devices'])} devices")
    for col in ("device", "running", "validation here", "previous", "last attempt", "reported"):
        t.add_column(col)
    for d in r["devices"]:
        running = f"{d['name']} {d['version']} ({d['target']})" + ("" if d["signed"] else " unsigned") if d["version"] else "-"
        check = d["validation"] if d["validation"] != "pass" else \
            f"pass, top1 {fmt(d['holdout_top1'], 1)}, p50 {fmt(d['p50_ms'])} ms"
        last = d["last_attempt"] or "-"
        if d["last_attempt"] == "failed":
            last = f"[red]failed[/] {escape(str(d['last_attempt_version'] or ''))}: {escape(str(d['last_error'])[:80])}"
        age = f"{d['age_hours']} h ago" if d["age_hours"] is not None else "-"
        t.add_row(escape(str(d["device"])), escape(running), check, str(d["previous"] or "-"), last,
                  f"[yellow]{age} (stale)[/]" if d["stale"] else age)
    out.print(t)
    for v, n in r["versions"].items():
        out.print(f"{n} x {escape(v)}")
    for p in r["unreadable"]:
        out.print(f"[yellow]skipped[/] {escape(p)}: not a device status file")
