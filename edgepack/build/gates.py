"""The manifest's verdicts from what the build measured: the ratios to FP32, the acceptance gates, and
what was (and was not) measured on the device itself."""

from __future__ import annotations

from typing import Any

from edgepack.bundle import Acceptance, Measured
from edgepack.measure.accuracy import drop
from edgepack.project import Project
from edgepack.target import TargetProfile


def comparison(ref: Measured, got: Measured, target_fp32: dict[str, Any] | None = None,
               in_turn: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"note": "speed-ups from the models timed in turn in one window (in_turn), when the "
                                   "compiled model ran on this host; each model's own p50 is in its section"}
    if ref.accuracy and got.accuracy:
        # positive = better than FP32 (for error metrics such as mae the difference is negated)
        out["accuracy_delta_points"] = round(-drop(ref.accuracy, got.accuracy), 3)
    if got.proxy:
        out["speedup"] = "not derived: the compiled model's latency was taken on a host proxy, not the device"
    else:
        if in_turn is not None:
            p90 = in_turn["p90_ms"]
            out["speedup_p50"] = in_turn["speedup_p50"]
            out["speedup_p90"] = round(p90["fp32 reference"] / p90["compiled"], 3)
            if "speedup_p50_vs_target_fp32" in in_turn:
                out["speedup_p50_vs_target_fp32"] = in_turn["speedup_p50_vs_target_fp32"]
            out["noisy"] = in_turn["noise"]["noisy"]
            out["in_turn"] = in_turn
        else:
            out["speedup_p50"] = round(ref.latency.p50_ms / got.latency.p50_ms, 3)
            out["speedup_p90"] = round(ref.latency.p90_ms / got.latency.p90_ms, 3)
            if target_fp32:
                out["speedup_p50_vs_target_fp32"] = round(target_fp32["latency"]["p50_ms"] / got.latency.p50_ms, 3)
    out["size_ratio"] = round(got.size.bytes / ref.size.bytes, 4)
    if ref.peak_memory.measured and got.peak_memory.measured and ref.peak_memory.peak_mb > 0:
        out["peak_memory_ratio"] = round(got.peak_memory.peak_mb / ref.peak_memory.peak_mb, 3)
    return out


def gates(project: Project, profile: TargetProfile, ref: Measured, got: Measured) -> Acceptance:
    gates = {k: v for k, v in profile.acceptance.model_dump().items() if v is not None}
    gates.update({k: v for k, v in project.acceptance.model_dump().items() if v is not None})
    results, reasons = [], []
    if "max_accuracy_drop" in gates:
        lost = round(drop(ref.accuracy, got.accuracy), 3)
        ok = lost <= gates["max_accuracy_drop"] + 1e-9
        what = f"{got.accuracy.metric} on output '{got.accuracy.output}'" if got.accuracy.output is not None \
            else got.accuracy.metric
        results.append({"gate": "max_accuracy_drop", "limit": gates["max_accuracy_drop"], "value": lost,
                        "unit": "points" if got.accuracy.higher_is_better else "metric units (rise)",
                        "metric": what, "passed": ok})
        if not ok:
            reasons.append(f"accuracy dropped {lost:.2f} points ({what}), "
                           f"more than max_accuracy_drop {gates['max_accuracy_drop']}")
    if "max_relative_accuracy_drop" in gates:
        rel = round(drop(ref.accuracy, got.accuracy) / max(abs(ref.accuracy.value), 1e-9), 5)
        ok = rel <= gates["max_relative_accuracy_drop"] + 1e-9
        results.append({"gate": "max_relative_accuracy_drop", "limit": gates["max_relative_accuracy_drop"],
                        "value": rel, "unit": "fraction of the FP32 figure", "passed": ok})
        if not ok:
            reasons.append(f"accuracy dropped {rel:.2%} of the FP32 figure, more than max_relative_accuracy_drop "
                           f"{gates['max_relative_accuracy_drop']:.2%}")
    if "max_latency_ms_p90" in gates:
        p90 = got.latency.p90_ms
        ok = p90 <= gates["max_latency_ms_p90"]
        results.append({"gate": "max_latency_ms_p90", "limit": gates["max_latency_ms_p90"], "value": p90,
                        "unit": "ms", "passed": ok, "where": "host"})
        if not ok:
            reasons.append(f"p90 latency {p90:.3f} ms exceeds max_latency_ms_p90 {gates['max_latency_ms_p90']}")
    if "max_size_mb" in gates:
        mb = round(got.size.bytes / 1e6, 4)
        ok = mb <= gates["max_size_mb"]
        results.append({"gate": "max_size_mb", "limit": gates["max_size_mb"], "value": mb, "unit": "MB (10^6 bytes)",
                        "passed": ok})
        if not ok:
            reasons.append(f"model size {mb:.3f} MB exceeds max_size_mb {gates['max_size_mb']}")
    return Acceptance(passed=not reasons, gates=gates, results=results, reasons=reasons)


def device_status(profile: TargetProfile, got: Measured) -> dict[str, Any]:
    if got.proxy is None and profile.device.kind == "cpu":
        return {"measured_on_device": False, "host_is_target_class": True,
                "note": f"measured on the build host with the target's runtime; run `edgepack validate` on the "
                        f"{profile.device.name} itself for its own figures"}
    return {"measured_on_device": False, "host_is_target_class": False,
            "accuracy": f"measured on the build host with a stand-in runtime: {got.proxy}" if got.proxy else "measured on the host with the target's runtime",
            "latency": "not measured on the device: the figures above are the host's. Run `edgepack validate` "
                       f"on the {profile.device.name} for device latency, or `edgepack compare` for an estimate",
            }
