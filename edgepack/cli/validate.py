"""`edgepack validate`: run on the field device. Never imports torch."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgepack.validation import share_or_na
from edgepack.cli.common import clean, Format, out, print_json
from edgepack.cli.options import BundleArg, FormatOpt, RunsOpt, ThreadsOpt, TrustedKeyOpt


def validate(
    bundle: BundleArg,
    report: Path = typer.Option(None, "--report", help="Where to write the JSON report (default: <bundle>.validation.json)."),
    threads: ThreadsOpt = None,
    runs: RunsOpt = None,
    format: FormatOpt = Format.human,
    pubkey: TrustedKeyOpt = None,
    validation_file: Path = typer.Option(None, "--validation-file",
                                         help="The bundle's separate validation files (default: <bundle>.validation "
                                              "beside it), for bundles built with --separate-validation."),
) -> None:
    """Check integrity, reproduce the recorded outputs, measure holdout accuracy and latency here."""
    from edgepack.validation import validate as run_validate

    result = run_validate(bundle=bundle, threads=threads, report=report, runs=runs, pubkey=pubkey,
                          validation_file=validation_file)
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    g, lat, h = result["golden"], result["latency"], result["holdout"]
    out.print(f"[green]PASS[/] {escape(result['name'])} {result['version']} ({result['target']}) on {escape(str(result['where']['cpu']))}")
    out.print(f"  integrity      {result['integrity']['files_checked']} files match their sha256")
    if result.get("signature"):
        out.print(f"  signature      valid, key {result['signature']['key_id'][:23]}...")
    else:
        from edgepack.cli.sign import UNSIGNED_NOTE

        out.print(f"  signature      [yellow]not checked (no --pubkey); {UNSIGNED_NOTE}[/]")
    out.print(f"  golden outputs {g['samples']} samples, {g['within_tolerance']:.1%} within tolerance, "
              f"top-1 agreement {share_or_na(g['top1_agreement'])}, max abs diff {g['max_abs_diff']:.4g}")
    if h:
        at_build = f"{h['build_value']:.2f}%" if h.get("build_value") is not None else "-"
        if h.get("build_samples") and h["build_samples"] != h["samples"]:
            at_build += f" on all {h['build_samples']} evaluation samples"
        out.print(f"  holdout        top1 {h['value']:.2f}% on {h['samples']} samples (at build: {at_build})")
    out.print(f"  latency        p50 {lat['p50_ms']:.3f} ms, p90 {lat['p90_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms "
              f"({lat['how']['threads']} threads; at build p50 {lat['build_p50_ms']:.3f} ms"
              + (f", {lat['ratio_to_build']:.2f}x the build's figure" if lat.get("ratio_to_build") else "") + ")")
    fp = result.get("fp32_comparison") or {}
    if fp.get("build_speedup_p50") is not None:
        out.print(f"  vs fp32        {fp['build_speedup_p50']:.2f}x at build (host {escape(str(fp['build_where']))}, timed in "
                  f"turn{', noisy' if fp.get('build_noisy') else ''}); not measured here: the bundle has no FP32 model")
    out.print(f"  report         {escape(result['report'])}")
    acc = result["build_acceptance"]
    if not acc["passed"]:
        out.print(f"[yellow]warning:[/] this bundle failed its acceptance gates at build time: "
                  f"{escape('; '.join(acc['reasons']))}")
