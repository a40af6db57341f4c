"""`edgepack build`: compile the project for one or more targets into bundles."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import stdout_to_stderr, Format, err, fmt, out, print_json
from edgepack.cli.options import ClusterOpt, DistOpt, FormatOpt, ProjectOpt, QuietOpt, TargetsDirOpt, ThreadsOpt


class _Progress:
    """One line per stage with its seconds; a spinner while a stage runs."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.status = None

    def __call__(self, stage: str, status: str, seconds: float | None, detail: str) -> None:
        if self.quiet:
            return
        if status == "note":
            err.print(f"    [dim]{escape(stage)}[/]")
            return
        if status == "warn":
            err.print(f"[yellow]! {escape(stage)}[/]")
            return
        if status == "start":
            self.status = err.status(f"{escape(stage)} ...")
            self.status.start()
            return
        if self.status:
            self.status.stop()
            self.status = None
        mark = "[green]✓[/]" if status == "done" else "[red]✗[/]"
        err.print(f"{mark} {escape(stage):<40} {seconds:7.2f}s  [dim]{escape(detail)}[/]")


def build(
    target: list[str] = typer.Option(..., "--target", "-t", help="Target profile name or .yaml path; repeatable."),
    out_dir: DistOpt = None,
    project: ProjectOpt = None,
    threads: ThreadsOpt = None,
    targets_dir: TargetsDirOpt = [],
    sign: Path = typer.Option(None, "--sign", help="Ed25519 private key (edgepack keygen): sign bundles that pass their gates."),
    format: FormatOpt = Format.human,
    quiet: QuietOpt = False,
    cluster: ClusterOpt = None,
    tune: bool = typer.Option(True, "--tune/--no-tune",
                              help="When INT8 misses the accuracy budget, search for a build that meets it."),
    max_tuning_minutes: float = typer.Option(10.0, "--max-tuning-minutes", help="Time cap of that search, per target."),
    prune: str = typer.Option(None, "--prune", help="Prune before export: structured, sparse-2of4, or off "
                              "(overrides the project's prune block)."),
    prune_ratio: float = typer.Option(None, "--prune-ratio", help="Share of channels removed per layer (structured)."),
    prune_macs: float = typer.Option(None, "--prune-macs", help="Share of MACs to remove, e.g. 0.4 (structured)."),
    prune_params: float = typer.Option(None, "--prune-params", help="Share of parameters to remove (structured)."),
    prune_latency: float = typer.Option(None, "--prune-latency", help="Latency to reach, as a share of the unpruned "
                                        "INT8 p50 on the target, e.g. 0.5 (structured; the per-layer allocation is "
                                        "searched on the target's timings)."),
    prune_finetune_epochs: int = typer.Option(None, "--prune-finetune-epochs", min=0,
                                              help="Recovery fine-tuning epochs after pruning (0: none)."),
    separate_validation: bool = typer.Option(False, "--separate-validation",
                                             help="Write the validation files as <bundle>.validation beside the "
                                                  "bundle instead of inside it (validate reads it from there)."),
) -> None:
    """Build bundles: load -> export ONNX -> calibrate -> compile -> measure -> bundle."""
    from edgepack.api import build as run_build
    from edgepack.api import raise_for_acceptance
    from edgepack.cluster.connect import cluster_address

    if prune is not None and prune not in ("structured", "sparse-2of4", "off"):
        from edgepack.errors import ConfigError

        raise ConfigError(f"--prune: unknown method '{prune}'", hint="use structured, sparse-2of4 or off")
    flags = {"method": prune, "ratio": prune_ratio, "target_macs": prune_macs, "target_params": prune_params,
             "target_latency": prune_latency, "finetune_epochs": prune_finetune_epochs}
    key = None
    if sign is not None:  # load the key before a long build, so a bad path fails fast
        from edgepack.shipping.signing import load_private_key, sign_bundle

        key = load_private_key(path=sign)
    progress = _Progress(quiet)
    try:
        with stdout_to_stderr(format == Format.json):
            if cluster_address(cluster):  # each target a task on a Ray cluster (edgepack.cluster)
                from edgepack.cluster.builds import build_on_cluster

                run_build = partial(build_on_cluster, cluster_address(cluster))
            results = run_build(project_path=project, targets=list(target), out=out_dir, threads=threads,
                                progress=progress, targets_dirs=list(targets_dir), tune=tune,
                                max_tuning_minutes=max_tuning_minutes, prune=flags,
                                separate_validation=separate_validation)
    finally:
        if progress.status:
            progress.status.stop()
    for r in results if key is not None else []:  # a bundle that failed a gate is kept, never vouched for
        if r.manifest.acceptance.passed:
            signed = sign_bundle(bundle=r.bundle, key=key)
            err.print(f"signed {escape(str(r.bundle))} with key {signed['key_id'][:23]}...")
        else:
            err.print(f"[yellow]not signed[/] {escape(str(r.bundle))}: it failed its acceptance gates")
    if format == Format.json:
        print_json([headline(r.manifest, r.bundle) for r in results])
    else:
        table = Table(title="edgepack build", show_lines=False)
        for col in ("target", "runtime", "accuracy fp32 -> built", "p50 ms fp32 -> built", "speed-up",
                    "size MB (vs fp32)", "gates"):
            table.add_column(col)
        for r in results:
            h = headline(r.manifest, r.bundle)
            acc = f"{fmt(h['reference']['accuracy'], 2)} -> {fmt(h['compiled']['accuracy'], 2)} {h['metric']}"
            lat = f"{fmt(h['reference']['p50_ms'])} -> {fmt(h['compiled']['p50_ms'])}"
            size = f"{h['compiled']['size_bytes'] / 1e6:.3f} ({h['size_ratio']:.0%})"
            gates = "[green]pass[/]" if h["acceptance_passed"] else "[red]FAIL[/]"
            runtime = f"{h['backend']} {h['precision']}" + (" (host proxy)" if h["host_proxy"] else "")
            speed = f"{h['speedup_p50']:.2f}x" if h["speedup_p50"] else "n/a"
            table.add_row(h["target"], runtime, acc, lat, speed, size, gates)
        out.print(table)
        for r in results:
            out.print(f"{r.target}: {escape(str(r.bundle))}")
            if r.manifest.measurements.compiled.proxy:
                out.print(f"  [dim]{escape(r.manifest.measurements.compiled.proxy)}: accuracy is the QDQ model's on "
                          "this host; device latency comes from `edgepack validate` on the device[/]")
            if r.manifest.prune:
                from edgepack.cli.inspect import prune_lines

                for line in prune_lines(r.manifest.prune):
                    out.print(f"  [dim]{escape(line)}[/]")
            pc = r.manifest.precision_choice
            if pc is not None:
                from edgepack.cli.inspect import precision_line

                out.print(f"  [dim]{escape(precision_line(pc.model_dump(mode='json')))}[/]")
            cov = r.manifest.coverage
            if cov and cov.get("summary"):
                out.print(f"  [dim]{escape(cov['summary'])}[/]")
            conv = r.manifest.conversion
            if conv is not None:
                from edgepack.backends import describe_conversion

                out.print(f"  [dim]level {conv['reached']} ({escape(conv['why'])}); "
                          f"{escape('; '.join(describe_conversion(r.manifest)))}[/]")
    raise_for_acceptance(results)


def headline(manifest, bundle: Path) -> dict:
    m = manifest.measurements
    return {
        "target": manifest.target, "bundle": str(bundle), "build_id": manifest.build_id,
        "backend": manifest.runtime.backend, "precision": manifest.runtime.precision,
        "metric": m.data.metric,
        "reference": {"accuracy": m.reference.accuracy.value if m.reference.accuracy else None,
                      "p50_ms": m.reference.latency.p50_ms, "p90_ms": m.reference.latency.p90_ms,
                      "size_bytes": m.reference.size.bytes},
        "compiled": {"accuracy": m.compiled.accuracy.value if m.compiled.accuracy else None,
                     "p50_ms": m.compiled.latency.p50_ms, "p90_ms": m.compiled.latency.p90_ms,
                     "size_bytes": m.compiled.size.bytes,
                     "peak_memory_mb": m.compiled.peak_memory.peak_mb},
        "accuracy_delta_points": m.comparison.accuracy_delta_points,
        "speedup_p50": m.comparison.speedup_p50, "size_ratio": m.comparison.size_ratio,
        "target_fp32_p50_ms": m.target_fp32.latency.p50_ms if m.target_fp32 else None,
        "speedup_p50_vs_target_fp32": m.comparison.speedup_p50_vs_target_fp32,
        "host_proxy": m.compiled.proxy,
        "acceptance_passed": manifest.acceptance.passed, "acceptance_reasons": manifest.acceptance.reasons,
        "tuning": None if manifest.tuning is None else {
            "budget_met": manifest.tuning.budget_met, "stopped": manifest.tuning.stopped,
            "calibration_method": manifest.tuning.chosen.get("calibration_method"),
            "level": manifest.tuning.chosen.get("level"),
            "kept_in_higher_precision": [k["layer"] for k in manifest.tuning.get("kept_in_higher_precision", [])]},
        "conversion": None if manifest.conversion is None else {
            "level": manifest.conversion.reached, "why": manifest.conversion.why,
            "float_ops": manifest.conversion["float_op_report"]["float_ops"]},
        "precision_choice": None if manifest.precision_choice is None else {
            "policy": manifest.precision_choice.policy, "chosen": manifest.precision_choice.chosen,
            "runner_up": manifest.precision_choice.runner_up, "why": manifest.precision_choice.why},
        "warnings": manifest.warnings,
    }
