"""Assembling a bundle's manifest from what the build measured, and writing the validation files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack import __version__
from edgepack.artifact import ModelArtifact
from edgepack.build.context import BuildContext, Outputs
from edgepack.build.gates import comparison, device_status, gates
from edgepack.build.plan import TargetPlan
from edgepack.bundle import Manifest, Measured, Measurements, Runtime, Validation, content_digest, file_entries
from edgepack.calibration.payload import default_budget, write_payload
from edgepack.measure.coverage import coverage_for, describe
from edgepack.validation import tolerance_for


@dataclass(frozen=True)
class Built:
    """What one target's build produced and measured, for its manifest."""

    compiled: ModelArtifact            # moved into the bundle's model/ folder
    exported: ModelArtifact            # the FP32 ONNX it was made from
    reference: Measured
    measured: Measured
    outputs: Outputs                   # the compiled model's outputs on the evaluation set
    tuning: dict[str, Any] | None = None
    target_fp32: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    in_turn: dict[str, Any] | None = None
    precision_choice: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None


def assemble(ctx: BuildContext, plan: TargetPlan, built: Built, staging: Path) -> Manifest:
    """Write the validation files, preprocessing and labels into ``staging``; return the manifest."""
    profile, backend = plan.profile, plan.backend
    compiled, exported, outputs, tuning = built.compiled, built.exported, built.outputs, built.tuning
    ref, got, target_fp32 = built.reference, built.measured, built.target_fp32
    project = ctx.project
    ev = ctx.evaluation
    text = _bundle_text(ctx, staging)
    pre = project.preprocess.model_dump() if project.preprocess else None
    # golden vectors and holdout, compressed, raw images where faithful; counts the project leaves at their
    # defaults fit a budget of the model's size, unless the files ship apart (<bundle>.validation)
    evaluation = project.evaluation
    budget = None if ctx.settings.separate_validation else default_budget(compiled.size_bytes)
    payload = write_payload(staging / "validation", ev, outputs, project.input_specs(),
                            [o.name for o in exported.outputs], pre,
                            evaluation.holdout_samples if evaluation else None, text is not None,
                            evaluation.golden_samples if evaluation else None, budget)
    n = payload["samples"]
    tolerance = tolerance_for(compiled.precision, [outputs[i] for i in range(n)])
    labels = project.label_names()
    (staging / "preprocess.json").write_text(json.dumps(
        {"preprocess": pre, "inputs": [s.to_json() for s in project.input_specs()],
         **({"text": text} if text else {}),
         "note": f"raw image (HxWxC uint8, {_color(pre)}) -> float * scale -> (x - mean) / std -> layout" if pre else
         "text -> the bundled tokenizer (see 'text')" if text else "inputs are fed as raw tensors"},
        indent=2) + "\n")
    (staging / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    stages = [s.to_json() for s in ctx.stages] + [s.to_json() for s in compiled.lineage]
    coverage, coverage_warnings = _coverage(compiled, backend.name)
    toolchain = dict(ctx.toolchain)
    profile_dump = profile.model_dump(mode="json")
    return Manifest(
        name=project.name, version=project.version, target=profile.name,
        build_id=content_digest(staging),
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        edgepack_version=__version__, toolchain=toolchain, source=ctx.source, profile=profile_dump,
        runtime=Runtime(backend=backend.name, runtime_package=backend.runtime_package, format=compiled.format.value,
                        precision=compiled.precision, model_file=compiled.path.relative_to(staging).as_posix(),
                        inputs=[s.to_json() for s in project.input_specs()],
                        outputs=[o.to_json() for o in exported.outputs], io=compiled.details.get("io")),
        stages=stages, files=file_entries(staging),
        calibration=ctx.calibration.describe() | {"seed": project.calibration.seed},
        measurements=Measurements(reference=ref, compiled=got,
                                  target_fp32={k: v for k, v in target_fp32.items() if k != "path"} if target_fp32 else None,
                                  comparison=comparison(ref, got, target_fp32, built.in_turn),
                                  data={"evaluation": ev.describe(), "metric": ctx.metric,
                                        "metrics": ctx.metric_plan.describe() if ctx.metric_plan else None,
                                        "latency_input": "first evaluation sample, batch 1"},
                                  device=device_status(profile, got)),
        acceptance=gates(project, profile, ref, got),
        validation=Validation(**payload, tolerance=tolerance),
        preprocess=pre, labels=labels, tuning=tuning, prune=built.prune, coverage=coverage,
        precision_choice=built.precision_choice,
        timings=built.timings,
        warnings=list(ctx.warnings) + list(compiled.details.get("warnings", [])) + coverage_warnings,
        conversion=_conversion(compiled, tuning), text=text,
    )


def _color(pre: dict[str, Any]) -> str:
    return {"gray": "grayscale (HxW or HxWx1; RGB is converted)", "bgr": "BGR"}.get(pre.get("color", "rgb"), "RGB")


def _coverage(compiled: ModelArtifact, runtime: str) -> tuple[dict[str, Any] | None, list[str]]:
    """What really runs in INT8 (ONNX QDQ and OpenVINO IR; TFLite has its float-op report) on ``runtime``
    (the backend's name: ONNX Runtime fuses a QDQ op only in some patterns, TensorRT in others), and a
    warning when the declared precision is not what most of the model runs in. None for a float build."""
    if compiled.precision in ("fp32", "fp16"):
        return None, []
    try:
        cov = coverage_for(compiled.path, runtime=runtime)
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


def _bundle_text(ctx: BuildContext, staging: Path) -> dict[str, Any] | None:
    """Copy the model's tokenizer into the bundle; the manifest's ``text`` section."""
    spec = ctx.resolved.text
    if spec is None:
        return None
    src = ctx.resolved.text_root / Path(spec.tokenizer_file).parent
    dst = staging / Path(spec.tokenizer_file).parent
    shutil.copytree(src, dst, dirs_exist_ok=True)
    files = sorted(p.relative_to(staging).as_posix() for p in dst.rglob("*") if p.is_file())
    return spec.to_json() | {"files": files}
