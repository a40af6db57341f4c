"""The rows of a comparison: manifest figures where measured, roofline estimates where not, budgets."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from edgepack.backends import get_backend
from edgepack.build.plan import backend_versions, toolchain_versions
from edgepack.build.source import load_torch, source_of

from edgepack.compare.model import NA, Budget, Cell, Comparison, CompareProgress, Plan, Row, bytes_mb, estimate_for
from edgepack.errors import ToolchainError, EdgepackError
from edgepack.loaders.resolve import Resolved, representative_dims
from edgepack.measure.calibrate import calibrate_host, peaks_from
from edgepack.measure.estimate import UNCALIBRATED, Calibration, GraphCounts, count_graph, error_pct
from edgepack.measure.host import host_info
from edgepack.target import load_target


def fp32_counts(resolved: Resolved, work: Path, batch: int, progress: CompareProgress) -> GraphCounts:
    """MACs and bytes per layer of the project's FP32 ONNX export (made once, kept by content digest).
    ``resolved`` is the project as the build resolves it, and the model is loaded and exported by the
    build's own steps (Hugging Face folders at the representative size of their dims)."""
    project = resolved.project
    dims = representative_dims(project)
    if project.model.kind == "onnx":
        return count_graph(project.resolve(project.model.path), batch, dims)
    src = source_of(project)
    key = hashlib.sha256(f"{src.digest}|{src.weights_digest}|{[s.to_json() for s in project.input_specs()]}|"
                         f"{project.outputs}|{dims}".encode()).hexdigest()[:16]
    folder = work / f"export-{key}"
    path = folder / "model.onnx"
    if not path.is_file():
        from edgepack.stages.export_onnx import export

        progress("export", "start", "FP32 ONNX export for graph counts")
        module, names = load_torch(resolved, lambda *_: None)
        tmp = work / f".export-{key}.partial"
        art = export(module, project.input_specs(), names, tmp, None, src.digest, dims=project.dims)
        folder.parent.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            shutil.rmtree(folder)
        art.path.parent.rename(folder)
        progress("export", "done", str(path))
    counts = count_graph(path, batch, dims)
    if counts.macs == 0 and counts.params > 0:  # shapes could not be inferred through the graph: no estimate
        raise ToolchainError("ONNX shape inference did not reach the weighted layers of the exported graph "
                             "(0 MACs counted), so latency cannot be estimated")
    return counts


def _calibrations(plans: list[Plan], work: Path, suite: str, progress: CompareProgress
                  ) -> tuple[dict[str, tuple[Calibration, dict[str, Any]]], list[str]]:
    """One calibration per host runtime measured in this run (or the `cpu`/`onnx` runtime when none was)."""
    notes: list[str] = []
    chosen: dict[str, Any] = {}
    for p in plans:
        if p.manifest is not None and p.host_class and not p.manifest.measurements.compiled.proxy:
            chosen.setdefault(p.profile.backend, p.profile)
    if not chosen:
        for name in ("cpu", "onnx"):
            try:
                prof = load_target(name)
                get_backend(prof.backend).check_environment(compile=True)
            except EdgepackError:
                continue
            chosen[prof.backend] = prof
            notes.append(f"no target was measured on this host in this run: estimates are calibrated with the "
                         f"'{name}' runtime on the reference models only")
            break
    found: dict[str, tuple[Calibration, dict[str, Any]]] = {}
    for backend_name, prof in chosen.items():
        backend = get_backend(backend_name)
        versions = toolchain_versions([]) | backend_versions(backend)
        options = backend.options(prof.backend_options, f"{prof.source}: backend_options")
        phase = f"calibrate {backend_name}"
        progress(phase, "start", f"{prof.precision} on the reference models ({suite} suite)")
        try:
            found[backend_name] = calibrate_host(prof, backend, options, work / "calibration", prof.measurement.threads,
                                                 suite, work, versions,
                                                 lambda d, ph=phase: progress(ph, "info", d))
            cal = found[backend_name][0]
            progress(phase, "done", f"{cal.runtime}: efficiency {cal.efficiency:.3f}, overhead "
                                    f"{cal.overhead_ms:.3f} ms")
        except EdgepackError as e:
            notes.append(f"calibration with {backend_name} failed: {e.message}")
            progress(phase, "failed", e.message)
    if not found:
        notes.append("estimates are uncalibrated roofline figures (a lower bound): no host runtime could be timed")
    return found, notes


def _pick(cals: dict[str, tuple[Calibration, dict[str, Any]]], backend: str) -> tuple[Calibration, str | None]:
    if backend in cals:
        return cals[backend][0], None
    if not cals:
        return UNCALIBRATED, "uncalibrated roofline: a lower bound"
    name = "openvino" if "openvino" in cals else next(iter(cals))
    cal = cals[name][0]
    return cal, f"efficiency and overhead transferred from {cal.runtime} on the host ({backend} not timed here)"


def _bundle_note(backend: str) -> str | None:
    try:
        return get_backend(backend).bundle_note
    except EdgepackError:
        return None


def _latency_cells(row: Row, p50: float, p90: float | None, source: str, batch: int, note: str | None = None) -> None:
    row.p50_ms = Cell(round(p50, 4), source, note)
    row.p90_ms = (Cell(round(p90, 4), source, note) if p90 is not None
                  else Cell(None, "n/a", "an estimate is one typical figure (p50); spread needs a measurement"))
    row.throughput_per_s = Cell(round(1000.0 * batch / p50, 2) if p50 > 0 else None, source, note)


def _row(plan: Plan, counts: GraphCounts | None, cals: dict[str, tuple[Calibration, dict[str, Any]]],
         fp32: Cell, metric: str | None) -> Row:
    prof, dev = plan.profile, plan.profile.device
    row = Row(prof.name, dev.name, prof.backend, prof.precision, status="", reason=None, metric=metric,
              fp32_accuracy=fp32, price_usd=dev.price_usd.value if dev.price_usd else None,
              tdp_w=dev.tdp_w.value if dev.tdp_w else None, reused=plan.reused,
              bundle=str(plan.bundle) if plan.manifest is not None else None)
    row.details["device"] = dev.model_dump(mode="json", exclude_none=True)
    batch = prof.measurement.batch
    cal, cal_note = _pick(cals, prof.backend)
    est, why_not = estimate_for(counts, prof, cal)
    m = plan.manifest
    if m is not None:
        mm, got = m.measurements, m.measurements.compiled
        where = f"host: {got.latency.where['cpu']}"
        acc_src = got.proxy if got.proxy else f"measured ({where})"
        row.metric = mm.data.metric
        if got.accuracy:
            row.accuracy = Cell(got.accuracy.value, acc_src)
        if mm.reference.accuracy:
            row.fp32_accuracy = Cell(mm.reference.accuracy.value, f"measured ({where}, FP32 onnxruntime)")
        if mm.comparison.accuracy_delta_points is not None:
            row.accuracy_delta = Cell(mm.comparison.accuracy_delta_points, acc_src)
        note = _bundle_note(prof.backend)
        row.size_mb = Cell(round(got.size.bytes / 1e6, 4), "bundle", note)
        pm = got.peak_memory
        on_device = plan.host_class and not got.proxy
        row.peak_memory_mb = (Cell(pm["peak_mb"], f"measured ({where})" if on_device else f"measured on the host, "
                                   f"not the device ({got.proxy or got.runtime})")
                              if pm.get("measured") else Cell(None, "n/a", pm.get("reason")))
        if mm.comparison.noisy:  # the build's in-turn timing never settled: say so beside its figures
            row.details["noisy"] = mm.comparison.in_turn["noise"]
            row.reason = ("latency measured on a noisy host (ratios between models timed in turn spread by "
                          f"{mm.comparison.in_turn['noise']['checks'][-1]['worst']:.0%}): treat as approximate")
        if on_device:
            row.status = "measured"
            _latency_cells(row, got.latency.p50_ms, got.latency.p90_ms, f"measured ({where})", batch)
            if counts is not None and prof.backend in cals:
                host_est, _ = estimate_for(counts, prof, cal, peaks_from(cals[prof.backend][1], prof.precision))
                row.estimate = host_est
                row.estimate_error_pct = error_pct(host_est["p50_ms"], got.latency.p50_ms) if host_est else None
            return row
        row.status = "estimated"
        row.details["host_latency"] = {"p50_ms": got.latency.p50_ms, "p90_ms": got.latency.p90_ms,
                                       "runtime": got.proxy or got.runtime, "where": where,
                                       "note": "the host's figure, not the device's"}
        row.reason = ((f"accuracy from the {got.proxy}; its latency is not the device's: latency is an estimate"
                       if got.proxy else f"this host is not the device ({dev.name}): latency is an estimate; "
                                         "accuracy and size were measured with the target's runtime on this host")
                      + (f"; {row.reason}" if row.reason else ""))
    else:
        row.status = "failed" if plan.buildable else "estimate only"
        row.reason = (f"build failed: {plan.error}" if plan.buildable else plan.reason) or "not built"
        row.reason += "; latency, size and memory are estimates, accuracy is not measured"
        if counts is not None:
            row.size_mb = Cell(bytes_mb(counts.params, prof.precision), "estimate", "weights only")
            row.peak_memory_mb = Cell(bytes_mb(counts.params + counts.peak_activation_elements, prof.precision),
                                      "estimate", "weights + the largest layer's activations; runtimes add arenas")
    if est is None:
        row.reason = f"{row.reason}; no latency estimate: {why_not}"
        return row
    row.estimate = est
    _latency_cells(row, est["p50_ms"], None, "estimate", batch, cal_note)
    return row


def apply_budget(rows: list[Row], budget: Budget) -> tuple[dict[str, Any] | None, str | None]:
    """Mark each row meets / fails / unknown; name the cheapest row that meets the budget."""
    if not budget.active:
        return None, None
    for row in rows:
        checks = []
        for name, limit, cell, unit in (("max_latency_ms", budget.max_latency_ms, row.p50_ms, "ms"),
                                        ("max_drop", budget.max_drop, row.accuracy_delta, "points"),
                                        ("max_size_mb", budget.max_size_mb, row.size_mb, "MB")):
            if limit is None:
                continue
            value = cell.value
            if value is not None and name == "max_drop":
                value = -value                      # delta is built - fp32; a drop is its negative
            ok = None if value is None else value <= limit
            checks.append({"check": name, "limit": limit, "value": value, "unit": unit, "passed": ok,
                           "source": cell.source})
        verdicts = [c["passed"] for c in checks]
        meets = False if False in verdicts else (None if None in verdicts else True)
        row.budget = {"meets": meets, "checks": checks}
    meeting = [r for r in rows if r.budget and r.budget["meets"] and r.price_usd is not None]
    cheapest = min(meeting, key=lambda r: (r.price_usd, r.p50_ms.value or 0.0)).target if meeting else None
    summary = {"max_latency_ms": budget.max_latency_ms, "max_drop": budget.max_drop, "max_size_mb": budget.max_size_mb,
               "latency_checked": "p50, measured or estimated (an estimate has no p90)",
               "meeting": [r.target for r in rows if r.budget and r.budget["meets"]],
               "unknown": [r.target for r in rows if r.budget and r.budget["meets"] is None],
               "cheapest": cheapest,
               "cheapest_by": "device price_usd in the target profile (indicative)"}
    return summary, cheapest


def assemble(resolved: Resolved, plans: list[Plan], out: Path, work: Path, suite: str, budget: Budget,
             progress: CompareProgress) -> Comparison:
    project = resolved.project
    notes: list[str] = []
    batch = max((p.profile.measurement.batch for p in plans), default=1)
    try:
        counts: GraphCounts | None = fp32_counts(resolved, work, batch, progress)
    except EdgepackError as e:
        counts = None
        notes.append(f"no estimates: counting the FP32 ONNX graph failed: {e.message}")
        progress("export", "failed", e.message)
    cals, cal_notes = _calibrations(plans, work, suite, progress)
    notes += cal_notes
    ref = next((p.manifest for p in plans if p.manifest is not None), None)
    fp32 = NA
    metric = None
    if ref is not None and ref.measurements.reference.accuracy:
        where = ref.measurements.reference.latency.where["cpu"]
        fp32 = Cell(ref.measurements.reference.accuracy.value, f"measured (host: {where}, FP32 onnxruntime)")
        metric = ref.measurements.data.metric
    rows = [_row(p, counts, cals, fp32, metric) for p in plans]
    summary, cheapest = apply_budget(rows, budget)
    cal_json = [c.to_json() | {"host_peaks": how} for c, how in cals.values()]
    return Comparison(project.name, project.version, out, host_info(), rows,
                      counts.summary() if counts else None, cal_json, summary, cheapest, notes)
