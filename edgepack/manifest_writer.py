"""Assembling a bundle's manifest from what the build measured: ratios, gates, validation files."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.artifact import ModelArtifact
from edgepack.backends.base import Backend
from edgepack.measure.accuracy import drop
from edgepack.bundle import Acceptance, Manifest, Measured, Measurements, Runtime, Validation, content_digest, file_entries
from edgepack.project import Project
from edgepack.target import TargetProfile
from edgepack.validation import HOLDOUT_SAMPLES, VALIDATION_SAMPLES, tolerance_for


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
            out["speedup_p50"] = round(ref.latency["p50_ms"] / got.latency["p50_ms"], 3)
            out["speedup_p90"] = round(ref.latency["p90_ms"] / got.latency["p90_ms"], 3)
            if target_fp32:
                out["speedup_p50_vs_target_fp32"] = round(target_fp32["latency"]["p50_ms"] / got.latency["p50_ms"], 3)
    out["size_ratio"] = round(got.size["bytes"] / ref.size["bytes"], 4)
    if ref.peak_memory.get("measured") and got.peak_memory.get("measured") and ref.peak_memory["peak_mb"] > 0:
        out["peak_memory_ratio"] = round(got.peak_memory["peak_mb"] / ref.peak_memory["peak_mb"], 3)
    return out


def gates(project: Project, profile: TargetProfile, ref: Measured, got: Measured) -> Acceptance:
    gates = {k: v for k, v in profile.acceptance.model_dump().items() if v is not None}
    gates.update({k: v for k, v in project.acceptance.model_dump().items() if v is not None})
    results, reasons = [], []
    if "max_accuracy_drop" in gates:
        lost = round(drop(ref.accuracy, got.accuracy), 3)
        ok = lost <= gates["max_accuracy_drop"] + 1e-9
        what = f"{got.accuracy['metric']} on output '{got.accuracy['output']}'" if "output" in got.accuracy \
            else got.accuracy["metric"]
        results.append({"gate": "max_accuracy_drop", "limit": gates["max_accuracy_drop"], "value": lost,
                        "unit": "points" if got.accuracy.get("higher_is_better", True) else "metric units (rise)",
                        "metric": what, "passed": ok})
        if not ok:
            reasons.append(f"accuracy dropped {lost:.2f} points ({what}), "
                           f"more than max_accuracy_drop {gates['max_accuracy_drop']}")
    if "max_relative_accuracy_drop" in gates:
        rel = round(drop(ref.accuracy, got.accuracy) / max(abs(ref.accuracy["value"]), 1e-9), 5)
        ok = rel <= gates["max_relative_accuracy_drop"] + 1e-9
        results.append({"gate": "max_relative_accuracy_drop", "limit": gates["max_relative_accuracy_drop"],
                        "value": rel, "unit": "fraction of the FP32 figure", "passed": ok})
        if not ok:
            reasons.append(f"accuracy dropped {rel:.2%} of the FP32 figure, more than max_relative_accuracy_drop "
                           f"{gates['max_relative_accuracy_drop']:.2%}")
    if "max_latency_ms_p90" in gates:
        p90 = got.latency["p90_ms"]
        ok = p90 <= gates["max_latency_ms_p90"]
        results.append({"gate": "max_latency_ms_p90", "limit": gates["max_latency_ms_p90"], "value": p90,
                        "unit": "ms", "passed": ok, "where": "host"})
        if not ok:
            reasons.append(f"p90 latency {p90:.3f} ms exceeds max_latency_ms_p90 {gates['max_latency_ms_p90']}")
    if "max_size_mb" in gates:
        mb = round(got.size["bytes"] / 1e6, 4)
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


def assemble(shared: Any, profile: TargetProfile, backend: Backend, compiled: ModelArtifact,
             exported: ModelArtifact, staging: Path, ref: Measured, got: Measured,
             outputs: list[list[np.ndarray]], tuning: dict[str, Any] | None = None,
             target_fp32: dict[str, Any] | None = None, prune: dict[str, Any] | None = None,
             in_turn: dict[str, Any] | None = None) -> Manifest:
    project = shared.project
    ev = shared.evaluation
    vdir = staging / "validation"
    vdir.mkdir(parents=True, exist_ok=True)
    n = min(VALIDATION_SAMPLES, len(ev))
    in_names = [s.name for s in project.input_specs()]
    out_names = [o.name for o in exported.outputs]
    # samples stacked on a new first axis: each entry is one sample as the model takes it (batch 1 wherever
    # the batch dim is, e.g. a recurrent state [layers, batch, hidden])
    np.savez(vdir / "inputs.npz", **{k: np.stack([ev.samples[i][k] for i in range(n)]) for k in in_names})
    np.savez(vdir / "outputs.npz", **{k: np.stack([outputs[i][j] for i in range(n)])
                                      for j, k in enumerate(out_names)})
    holdout_file, n_hold = None, 0
    text = _bundle_text(shared, staging)
    if ev.labels is not None and text is not None and ev.texts is not None:
        # text models: the whole labelled evaluation set as raw text, tokenized on the device with the
        # bundled tokenizer, so that `edgepack validate` reproduces the build's accuracy figure
        with open(vdir / "holdout.jsonl", "w", encoding="utf-8") as f:
            for t, y in zip(ev.texts, ev.labels):
                f.write(json.dumps({"text": t, "label": int(y)}) + "\n")  # ASCII: no line breaks but "\n"
        holdout_file, n_hold = "validation/holdout.jsonl", len(ev)
    elif ev.labels is not None:
        # the holdout is drawn from the end of the evaluation set, the golden vectors from its start
        idx = list(range(len(ev)))[-min(HOLDOUT_SAMPLES, len(ev)):]
        n_hold = len(idx)
        np.savez(vdir / "holdout.npz", labels=np.asarray([ev.labels[i] for i in idx], np.int64),
                 **{k: np.stack([ev.samples[i][k] for i in idx]) for k in in_names})
        holdout_file = "validation/holdout.npz"
    tolerance = tolerance_for(compiled.precision, [outputs[i] for i in range(n)])
    pre = project.preprocess.model_dump() if project.preprocess else None
    labels = project.label_names()
    (staging / "preprocess.json").write_text(json.dumps(
        {"preprocess": pre, "inputs": [s.to_json() for s in project.input_specs()],
         **({"text": text} if text else {}),
         "note": f"raw image (HxWxC uint8, {_color(pre)}) -> float * scale -> (x - mean) / std -> layout" if pre else
         "text -> the bundled tokenizer (see 'text')" if text else "inputs are fed as raw tensors"},
        indent=2) + "\n")
    (staging / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    stages = [s.to_json() for s in shared.stages] + [s.to_json() for s in compiled.lineage]
    coverage, coverage_warnings = _coverage(compiled)
    toolchain = dict(shared.toolchain)
    profile_dump = profile.model_dump(mode="json")
    return Manifest(
        name=project.name, version=project.version, target=profile.name,
        build_id=content_digest(staging),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edgepack_version=__version__, toolchain=toolchain, source=shared.source, profile=profile_dump,
        runtime=Runtime(backend=backend.name, runtime_package=backend.runtime_package, format=compiled.format.value,
                        precision=compiled.precision, model_file=compiled.path.relative_to(staging).as_posix(),
                        inputs=[s.to_json() for s in project.input_specs()],
                        outputs=[o.to_json() for o in exported.outputs], io=compiled.details.get("io")),
        stages=stages, files=file_entries(staging),
        calibration=shared.calibration.describe() | {"seed": project.calibration.seed},
        measurements=Measurements(reference=ref, compiled=got,
                                  target_fp32={k: v for k, v in target_fp32.items() if k != "path"} if target_fp32 else None,
                                  comparison=comparison(ref, got, target_fp32, in_turn),
                                  data={"evaluation": ev.describe(), "metric": shared.metric,
                                        "metrics": shared.metric_plan.describe() if shared.metric_plan else None,
                                        "latency_input": "first evaluation sample, batch 1"},
                                  device=device_status(profile, got)),
        acceptance=gates(project, profile, ref, got),
        validation=Validation(inputs_file="validation/inputs.npz", outputs_file="validation/outputs.npz",
                              holdout_file=holdout_file, samples=n, holdout_samples=n_hold, tolerance=tolerance),
        preprocess=pre, labels=labels, tuning=tuning, prune=prune, coverage=coverage,
        warnings=list(shared.warnings) + list(compiled.details.get("warnings", [])) + coverage_warnings,
        conversion=_conversion(compiled, tuning), text=text,
    )


def _color(pre: dict[str, Any]) -> str:
    return {"gray": "grayscale (HxW or HxWx1; RGB is converted)", "bgr": "BGR"}.get(pre.get("color", "rgb"), "RGB")


def _coverage(compiled: ModelArtifact) -> tuple[dict[str, Any] | None, list[str]]:
    """What really runs in INT8 (ONNX QDQ and OpenVINO IR; TFLite has its float-op report), and a warning
    when the declared precision is not what most of the model runs in."""
    from edgepack.measure.coverage import coverage_for, describe

    try:
        cov = coverage_for(compiled.path)
    except Exception as e:  # noqa: BLE001 - a report must never fail a build
        return {"error": f"coverage could not be computed: {type(e).__name__}: {e}"}, []
    if cov is None:
        return None, []
    cov = {**cov, "summary": describe(cov)}
    warnings = []
    share = cov.get("macs_share")
    if compiled.precision.startswith("int8") and share is not None and share < 0.9:
        warnings.append(f"declared int8, but {describe(cov)}")
    return cov, warnings


def _conversion(compiled: ModelArtifact, tuning: dict[str, Any] | None) -> dict[str, Any] | None:
    conv = compiled.details.get("conversion")
    if conv is None:
        return None
    if tuning and tuning.get("kind") == "fallback ladder":
        return {**conv, "reached": tuning["reached"], "why": tuning["why"], "ladder": tuning["steps"]}
    return {**conv, "reached": conv["level"], "why": "the level the profile asks for (no fallback ran)"}


def _bundle_text(shared: Any, staging: Path) -> dict[str, Any] | None:
    """Copy the model's tokenizer into the bundle; the manifest's ``text`` section."""
    spec = getattr(shared, "text", None)
    if spec is None:
        return None
    src = shared.text_root / Path(spec.tokenizer_file).parent
    dst = staging / Path(spec.tokenizer_file).parent
    shutil.copytree(src, dst, dirs_exist_ok=True)
    files = sorted(p.relative_to(staging).as_posix() for p in dst.rglob("*") if p.is_file())
    return spec.to_json() | {"files": files}
