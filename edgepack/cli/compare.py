"""`edgepack compare`: build or reuse a bundle per target, estimate what cannot be measured here,
print one table (human, json or markdown) and optionally write the HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import stdout_to_stderr, err, out, print_json
from edgepack.cli.options import ClusterOpt, CompareFormat, CompareFormatOpt, DistOpt, QuietOpt, TargetsDirOpt
from edgepack.compare import Comparison
from edgepack.errors import ConfigError


class _View:
    """One progress view on stderr: a line per build group, plus export and calibration."""

    def __init__(self, quiet: bool):
        self.progress = None
        self.tasks: dict[str, Any] = {}
        if quiet:
            return
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=err, transient=False)
        self.progress.start()

    def _task(self, key: str, text: str) -> None:
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(text, total=None)
        self.progress.update(self.tasks[key], description=text)

    def _finish(self, key: str, text: str) -> None:
        self._task(key, text)
        if self.progress is not None:
            self.progress.update(self.tasks[key], total=1, completed=1)

    def phase(self, phase: str, status: str, detail: str) -> None:
        mark = {"done": "[green]✓[/]", "failed": "[red]✗[/]"}.get(status, "")
        text = f"{mark} {escape(phase)}: {escape(detail)}".strip()
        if status in ("done", "failed"):
            self._finish(phase, text)
        else:
            self._task(phase, text)

    def build_event(self, event: tuple) -> None:
        group, stage, status, seconds, detail = event
        key = f"build [{group}]"
        when = f" {seconds:.1f}s" if seconds is not None else ""
        self._task(key, f"build [{escape(group)}]: {escape(stage)} {status}{when} [dim]{escape(detail)}[/]")

    def stop(self) -> None:
        if self.progress is not None:
            for key in list(self.tasks):
                self.progress.update(self.tasks[key], total=1, completed=1)
            self.progress.stop()


def _split_targets(raw: list[str]) -> list[str]:
    names = [t.strip() for item in raw for t in item.split(",")]
    if not names or any(not n for n in names):
        raise ConfigError(f"--targets {','.join(raw)!r}: empty target name",
                          hint="give a comma-separated list such as --targets cpu,onnx,jetson-orin-nano")
    return names


def _check_limit(flag: str, value: float | None) -> float | None:
    if value is not None and value < 0:
        raise ConfigError(f"{flag} {value}: must not be negative", hint=f"{flag} is an upper limit, e.g. {flag} 20")
    return value


def compare(
    targets: list[str] = typer.Option(..., "--targets", "-t", help="Comma-separated target names or .yaml paths; repeatable."),
    projects: list[Path] = typer.Option(None, "--project", "-p", help="Project folder or edgepack.yaml (default: .); "
                                        "repeat for one table over models x targets."),
    out_dir: DistOpt = None,
    format: CompareFormatOpt = CompareFormat.human,
    html: Path = typer.Option(None, "--html", help="Write a self-contained HTML report (plots also as PNG beside it)."),
    max_latency_ms: float = typer.Option(None, "--max-latency-ms", help="Budget: p50 latency limit, ms."),
    max_drop: float = typer.Option(None, "--max-drop", help="Budget: accuracy drop limit vs FP32, points."),
    max_size_mb: float = typer.Option(None, "--max-size-mb", help="Budget: model size limit, MB."),
    workers: int = typer.Option(None, "--workers", help="Parallel build processes (default: min(targets, CPUs // 2))."),
    suite: str = typer.Option("standard", "--calibration-suite", help="Reference models for the estimates: standard or quick."),
    targets_dir: TargetsDirOpt = [],
    cluster: ClusterOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Compare targets: measured where possible, estimated where not, each figure labelled."""
    from edgepack.api import Budget
    from edgepack.cluster.connect import cluster_address
    from edgepack.compare import compare_projects

    names = _split_targets(list(targets))
    budget = Budget(max_latency_ms=_check_limit("--max-latency-ms", max_latency_ms),
                    max_drop=_check_limit("--max-drop", max_drop),
                    max_size_mb=_check_limit("--max-size-mb", max_size_mb))
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: must be at least 1")
    if html is not None and html.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--html {html}: the report file must end in .html", hint="e.g. --html report.html")
    view = _View(quiet)
    try:
        with stdout_to_stderr(format == CompareFormat.json):
            results = compare_projects(projects=list(projects or [None]), targets=names, out=out_dir,
                                       targets_dirs=list(targets_dir), budget=budget, suite=suite, workers=workers,
                                       progress=view.phase, on_build_event=view.build_event,
                                       cluster=cluster_address(cluster))
    finally:
        view.stop()
    if html is not None and len(results) > 1:
        raise ConfigError("--html writes the report of one project", hint="compare one --project at a time for --html")
    written: dict[str, Path] = {}
    if html is not None:
        from edgepack.compare.html import write_html

        written = write_html(c=results[0], path=html)
    if format == CompareFormat.json:
        docs = [r.to_json() for r in results]
        print_json(docs[0] | {"report": {k: str(v) for k, v in written.items()}} if len(docs) == 1 else docs)
        return
    if format == CompareFormat.markdown:
        from edgepack.compare.report import to_markdown

        print("\n".join(to_markdown(c=r) for r in results), end="")
    else:
        _human(results)
    for key, path in written.items():
        out.print(f"{key}: {escape(str(path))}")


def _human(cs: list[Comparison]) -> None:
    many = len(cs) > 1
    title = ", ".join(f"{c.project} {c.version}" for c in cs)
    t = Table(title=f"edgepack compare: {title}", show_lines=True)
    cols = ["target", "device", "runtime", "accuracy (Δ)", "p50 ms", "p90 ms", "per s", "size MB", "peak MB",
            "estimate p50 (error)", "status"]
    if any(c.budget for c in cs):
        cols.insert(-1, "budget")
    if many:
        cols.insert(0, "model")
    for col in cols:
        t.add_column(col, overflow="fold")
    for c in cs:
        _rows(t, c, many, any(c.budget for c in cs))
    out.print(t)
    for c in cs:
        _notes(c, f"{c.project}/" if many else "")


def _rows(t: Table, c: Comparison, many: bool, budgeted: bool) -> None:
    from edgepack.compare.report import accuracy_text, budget_text, error_text, fmt_cell, short_source

    def cell(x, nd=3) -> str:
        return f"{fmt_cell(x, nd)} [dim]{escape(short_source(x))}[/]" if x.value is not None else "n/a"

    for r in c.rows:
        acc = f"{accuracy_text(r)} [dim]{escape(short_source(r.accuracy))}[/]" if r.accuracy.value is not None else "n/a"
        est = (f"{r.estimate['p50_ms']:.3f}" + (f" ({error_text(r)})" if r.estimate_error_pct is not None else ""))\
            if r.estimate else "n/a"
        values = [r.target, escape(r.device), f"{r.backend} {r.precision}", acc, cell(r.p50_ms), cell(r.p90_ms),
                  cell(r.throughput_per_s, 1), cell(r.size_mb), cell(r.peak_memory_mb, 2), est, r.status]
        if budgeted:
            values.insert(-1, budget_text(r) + (" [bold](cheapest)[/]" if r.target == c.cheapest else "")
                          if c.budget else "")
        if many:
            values.insert(0, escape(c.project))
        t.add_row(*values)


def _notes(c: Comparison, prefix: str) -> None:
    from edgepack.compare.report import error_text

    for r in c.rows:
        if r.reason:
            out.print(f"[bold]{escape(prefix + r.target)}[/]: {escape(r.reason)}")
    measured = [r for r in c.rows if r.estimate_error_pct is not None]
    if measured:
        out.print(escape(prefix) + "estimate vs measured on this host: " + ", ".join(
            f"{r.target} {r.estimate['p50_ms']:.3f} vs {r.p50_ms.value:.3f} ms ({error_text(r)})" for r in measured))
    if c.budget:
        from edgepack.compare.report import budget_line

        out.print(escape(prefix) + "budget: " + escape(budget_line(c)))
    for n in c.notes:
        out.print(f"[dim]note: {escape(n)}[/]")
