"""The build: load -> export to ONNX -> calibrate -> backend compile -> measure -> bundle.

Work shared by all targets of one build (export, data, FP32 reference) is done once. Each target
is compiled in a temporary folder inside the output folder and renamed into place at the end, so
a failed or interrupted build leaves no partial bundle.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.artifact import ModelArtifact, StageRecord, sha256_file
from edgepack.backends import get_backend
from edgepack.backends.base import Backend
from edgepack.bundle import (Acceptance, Manifest, Measured, Measurements, Runtime, Source, Validation,
                             bundle_name, content_digest, file_entries, write_bundle)
from edgepack.calibration.reader import SampleSet, load_samples
from edgepack.errors import AcceptanceError, ConfigError, ToolchainError
from edgepack.measure import accuracy as acc
from edgepack.measure.latency import measure_latency
from edgepack.measure.memory import measure_peak_memory
from edgepack.project import Project, find_project, load_project
from edgepack.target import TargetProfile, load_target
from edgepack.validation import VALIDATION_SAMPLES, HOLDOUT_SAMPLES, tolerance_for

Progress = Callable[[str, str, float | None, str], None]


def _no_progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
    pass


@dataclass
class BuildResult:
    target: str
    bundle: Path
    manifest: Manifest

    @property
    def passed(self) -> bool:
        return self.manifest.acceptance.passed


@dataclass
class _Shared:
    """What every target of one build reuses."""

    project: Project
    source: Source
    exports: dict[int | None, ModelArtifact] = field(default_factory=dict)
    calibration: SampleSet | None = None
    evaluation: SampleSet | None = None
    metric: str = "fidelity"
    references: dict[int | None, dict[str, Any]] = field(default_factory=dict)
    toolchain: dict[str, str] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)


class _Stage:
    def __init__(self, progress: Progress, name: str):
        self.progress, self.name, self.detail = progress, name, ""

    def __enter__(self) -> "_Stage":
        self.t0 = time.perf_counter()
        self.progress(self.name, "start", None, "")
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            self.progress(self.name, "done", self.seconds, self.detail)
        else:
            self.progress(self.name, "failed", self.seconds, "")


def _check_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder: {e.strerror}",
                          hint="choose a folder you can write to") from e
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the output folder is not writable", hint="choose a folder you can write to")
    return out


def _source_of(project: Project, project_file: Path | None = None) -> Source:
    src = project.model
    path = project.resolve(src.path.split(":")[0] if src.kind == "callable" else src.path)
    digest = "sha256:" + sha256_file(path) if path.is_file() else "missing"
    weights = project.resolve(src.weights) if src.weights else None
    wdig = "sha256:" + sha256_file(weights) if weights and weights.is_file() else None
    pdig = "sha256:" + sha256_file(project_file) if project_file and project_file.is_file() else None
    return Source(kind=src.kind, path=src.path, digest=digest, weights_digest=wdig, project_digest=pdig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgepack": __version__, "numpy": np.__version__}
    for pkg in ("torch", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def build(project_path: Path | None, targets: list[str], out: Path | None = None, threads: int | None = None,
          progress: Progress | None = None, targets_dirs: list[Path] | None = None) -> list[BuildResult]:
    """Build one bundle per target. Returns results; failed gates are in each manifest
    (call :func:`raise_for_acceptance` to turn them into an AcceptanceError)."""
    progress = progress or _no_progress
    project = load_project(project_path)
    if not targets:
        raise ConfigError("no target given", hint="pass --target NAME (see `edgepack targets list`)")
    profiles = [load_target(t, targets_dirs) for t in targets]
    plans: list[tuple[TargetProfile, Backend, Any]] = []
    for prof in profiles:
        backend = get_backend(prof.backend, needed_by=f"target '{prof.name}' ({prof.source})")
        if prof.precision not in backend.precisions:
            raise ConfigError(f"{prof.source}: precision '{prof.precision}' is not supported by backend "
                              f"'{backend.name}' (it supports {', '.join(backend.precisions)})")
        options = backend.options(prof.backend_options, f"{prof.source}: backend_options")
        backend.check_environment(compile=True)
        plans.append((prof, backend, options))
    out = _check_out_dir(Path(out) if out else project.root / "dist")
    shared = _Shared(project, _source_of(project, find_project(project_path)), toolchain=_versions())
    _prepare_data(shared, profiles[0], progress)
    scratch = Path(tempfile.mkdtemp(prefix=".edgepack-", suffix=".build", dir=out))
    try:
        return [_build_target(shared, prof, backend, options, out, scratch, threads, progress)
                for prof, backend, options in plans]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def raise_for_acceptance(results: list[BuildResult]) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        parts = [f"{r.target}: {'; '.join(r.manifest.acceptance.reasons)}" for r in failed]
        raise AcceptanceError("acceptance gate failed: " + " | ".join(parts),
                              hint=f"bundle kept at {failed[0].bundle}; its manifest records the failed gates",
                              bundle=str(failed[0].bundle))


def _prepare_data(shared: _Shared, profile: TargetProfile, progress: Progress) -> None:
    project = shared.project
    specs = project.input_specs()
    pre = project.preprocess.model_dump() if project.preprocess else None
    labels = project.label_names()
    with _Stage(progress, "calibration data") as st:
        cal = project.calibration
        shared.calibration = load_samples(cal.source, project.root, specs, pre,
                                          cal.samples or profile.quantization.samples, cal.seed, labels, "calibration")
        st.detail = f"{len(shared.calibration)} samples"
    with _Stage(progress, "evaluation data") as st:
        ev = project.evaluation
        if ev is None:
            shared.evaluation = shared.calibration
            shared.metric = "fidelity"
            st.detail = "no evaluation block: fidelity on the calibration samples"
        else:
            shared.evaluation = load_samples(ev.source, project.root, specs, pre, ev.samples, ev.seed, labels,
                                             "evaluation")
            has_labels = shared.evaluation.labels is not None
            if ev.metric == "top1" and not has_labels:
                raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'evaluation.metric': top1 needs labels, "
                                  f"but {ev.source} has none", hint="add labels to the data, or use metric: fidelity")
            shared.metric = ev.metric or ("top1" if has_labels else "fidelity")
            st.detail = f"{len(shared.evaluation)} samples, metric {shared.metric}"
    shared.stages.append(StageRecord("data", {"calibration": shared.calibration.describe(),
                                              "evaluation": shared.evaluation.describe()}, None, None, 0.0))


def _export(shared: _Shared, profile: TargetProfile, workdir: Path, progress: Progress) -> ModelArtifact:
    key = profile.max_opset
    if key in shared.exports:
        return shared.exports[key]
    project = shared.project
    specs = project.input_specs()
    if project.model.kind == "onnx":
        from edgepack.loaders.onnx import load_onnx

        with _Stage(progress, "load onnx") as st:
            art = load_onnx(project.resolve(project.model.path), specs)
            st.detail = f"opset {art.details.get('opset')}"
            record = StageRecord("load", {"source": project.model.path, "kind": "onnx"}, None, art.digest, st_time(st))
            art = ModelArtifact(art.format, art.path, art.inputs, art.outputs, art.files, (record,), "fp32", art.details)
    else:
        from edgepack.loaders.torch import check_forward, load_module
        from edgepack.stages.export_onnx import export

        with _Stage(progress, "load model") as st:
            module = load_module(project)
            n_out = check_forward(module, specs)
            st.detail = f"{sum(p.numel() for p in module.parameters()):,} parameters"
        names = project.outputs or (["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        if len(names) != n_out:
            raise ConfigError(f"key 'outputs' names {len(names)} outputs, the model returns {n_out}")
        with _Stage(progress, "export onnx") as st:
            art = export(module, specs, names, workdir / f"export-{key}", key, shared.source.digest)
            st.detail = f"opset {art.details['opset']}, {art.size_bytes / 1e6:.2f} MB"
    shared.exports[key] = art
    return art


def st_time(st: _Stage) -> float:
    return time.perf_counter() - st.t0


def _measure(shared: _Shared, backend: Backend, model_file: Path, files: list[Path], root: Path,
             threads: int, profile: TargetProfile, what: str) -> tuple[Measured, list[list[np.ndarray]]]:
    from edgepack.measure.size import size_of

    runner, proxy = backend.host_runner(model_file, threads)
    outputs = acc.run_all(runner, shared.evaluation)
    m = profile.measurement
    sample = shared.evaluation.samples[0]
    latency = measure_latency(runner, sample, m.warmup_runs, m.runs, m.max_seconds, threads)
    del runner
    memory = measure_peak_memory(backend.name, model_file, sample, threads)
    runtime = proxy or f"{backend.runtime_package} {shared.toolchain.get(backend.runtime_package, '?')}"
    measured = Measured(model=what, runtime=runtime, proxy=proxy, accuracy=None, latency=latency, size=size_of(files, root), peak_memory=memory)
    return measured, outputs


def _reference(shared: _Shared, art: ModelArtifact, threads: int, profile: TargetProfile,
               progress: Progress) -> dict[str, Any]:
    key = (profile.max_opset, threads)
    if key not in shared.references:
        ort = get_backend("onnxruntime")
        ort.check_environment(compile=False)
        with _Stage(progress, "measure fp32 reference") as st:
            measured, outputs = _measure(shared, ort, art.path, list(art.all_files), art.path.parent, threads,
                                         profile, "fp32 reference: exported ONNX on onnxruntime")
            labels = shared.evaluation.labels
            measured.accuracy = acc.score(shared.metric, outputs, labels, outputs)
            st.detail = f"{shared.metric} {measured.accuracy['value']:.2f}, p50 {measured.latency['p50_ms']:.3f} ms"
        shared.references[key] = {"measured": measured, "outputs": outputs}
    return shared.references[key]


def _build_target(shared: _Shared, profile: TargetProfile, backend: Backend, options: Any, out: Path,
                  scratch: Path, threads: int | None, progress: Progress) -> BuildResult:
    project = shared.project
    threads = threads or profile.measurement.threads
    final = out / bundle_name(project.name, project.version, profile.name)
    art = _export(shared, profile, scratch, progress)
    ref = _reference(shared, art, threads, profile, progress)
    workdir = scratch / profile.name
    staging = workdir / "bundle"
    with _Stage(progress, f"compile {profile.name} ({backend.name} {profile.precision})") as st:
        try:
            compiled = backend.compile(art, profile, options, shared.calibration, workdir / "compile")
        except ToolchainError as e:
            raise _keep_logs(e, workdir / "compile", out, final.name) from e
        compiled = _move_into(compiled, staging / "model")
        st.detail = f"{compiled.size_bytes / 1e6:.2f} MB"
    with _Stage(progress, f"measure {profile.name}") as st:
        measured, outputs = _measure(shared, backend, compiled.path, list(compiled.all_files), staging,
                                     threads, profile, f"compiled: {profile.precision} on {backend.name}")
        measured.accuracy = acc.score(shared.metric, outputs, shared.evaluation.labels, ref["outputs"])
        st.detail = f"{shared.metric} {measured.accuracy['value']:.2f}, p50 {measured.latency['p50_ms']:.3f} ms"
    with _Stage(progress, f"bundle {profile.name}") as st:
        manifest = _assemble(shared, profile, backend, compiled, art, staging, ref["measured"], measured, outputs)
        write_bundle(staging, manifest, final)
        st.detail = str(final)
    return BuildResult(profile.name, final, manifest)


def _move_into(art: ModelArtifact, folder: Path) -> ModelArtifact:
    """Move a compiled model's files into the bundle's model/ folder, keeping their paths relative
    to the main file (so names, and so digests, are unchanged)."""
    base = art.path.parent
    moved = []
    for f in art.all_files:
        dst = folder / f.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), dst)
        moved.append(dst)
    return replace(art, path=folder / art.path.relative_to(base), files=tuple(moved))


def _keep_logs(err: ToolchainError, workdir: Path, out: Path, name: str) -> ToolchainError:
    """Copy a failed toolchain's logs out of the scratch folder before it is removed."""
    logs = sorted(workdir.glob("*.log"))
    if not logs:
        return err
    kept = out / f"{name}.log"
    kept.write_text("".join(f"== {p.name}\n{p.read_text()}\n" for p in logs))
    return ToolchainError(err.message, hint=f"the toolchain's log is kept in {kept}")


def _comparison(ref: Measured, got: Measured) -> dict[str, Any]:
    out: dict[str, Any] = {"note": "derived from the reference and compiled figures measured side by side in this run"}
    if ref.accuracy and got.accuracy:
        out["accuracy_delta_points"] = round(got.accuracy["value"] - ref.accuracy["value"], 3)
    if got.proxy:
        out["speedup"] = "not derived: the compiled model's latency was taken on a host proxy, not the device"
    else:
        out["speedup_p50"] = round(ref.latency["p50_ms"] / got.latency["p50_ms"], 3)
        out["speedup_p90"] = round(ref.latency["p90_ms"] / got.latency["p90_ms"], 3)
    out["size_ratio"] = round(got.size["bytes"] / ref.size["bytes"], 4)
    if ref.peak_memory.get("measured") and got.peak_memory.get("measured") and ref.peak_memory["peak_mb"] > 0:
        out["peak_memory_ratio"] = round(got.peak_memory["peak_mb"] / ref.peak_memory["peak_mb"], 3)
    return out


def _gates(project: Project, profile: TargetProfile, ref: Measured, got: Measured) -> Acceptance:
    gates = {k: v for k, v in profile.acceptance.model_dump().items() if v is not None}
    gates.update({k: v for k, v in project.acceptance.model_dump().items() if v is not None})
    results, reasons = [], []
    if "max_accuracy_drop" in gates:
        drop = round(ref.accuracy["value"] - got.accuracy["value"], 3)
        ok = drop <= gates["max_accuracy_drop"]
        results.append({"gate": "max_accuracy_drop", "limit": gates["max_accuracy_drop"], "value": drop,
                        "unit": "points", "passed": ok})
        if not ok:
            reasons.append(f"accuracy dropped {drop:.2f} points ({got.accuracy['metric']}), "
                           f"more than max_accuracy_drop {gates['max_accuracy_drop']}")
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


def _device_status(profile: TargetProfile, got: Measured) -> dict[str, Any]:
    if got.proxy is None and profile.device.kind == "cpu":
        return {"measured_on_device": False, "host_is_target_class": True,
                "note": f"measured on the build host with the target's runtime; run `edgepack validate` on the "
                        f"{profile.device.name} itself for its own figures"}
    return {"measured_on_device": False, "host_is_target_class": False,
            "accuracy": f"host proxy: {got.proxy}" if got.proxy else "measured on the host with the target's runtime",
            "latency": "not measured on the device: the figures above are the host's. Run `edgepack validate` "
                       f"on the {profile.device.name} for device latency",
            }


def _assemble(shared: _Shared, profile: TargetProfile, backend: Backend, compiled: ModelArtifact,
              exported: ModelArtifact, staging: Path, ref: Measured, got: Measured,
              outputs: list[list[np.ndarray]]) -> Manifest:
    project = shared.project
    ev = shared.evaluation
    vdir = staging / "validation"
    vdir.mkdir(parents=True, exist_ok=True)
    n = min(VALIDATION_SAMPLES, len(ev))
    in_names = [s.name for s in project.input_specs()]
    out_names = [o.name for o in exported.outputs]
    np.savez(vdir / "inputs.npz", **{k: np.concatenate([ev.samples[i][k] for i in range(n)]) for k in in_names})
    np.savez(vdir / "outputs.npz", **{k: np.concatenate([outputs[i][j] for i in range(n)])
                                      for j, k in enumerate(out_names)})
    holdout_file, n_hold = None, 0
    if ev.labels is not None:
        # the holdout is drawn from the end of the evaluation set, the golden vectors from its start
        idx = list(range(len(ev)))[-min(HOLDOUT_SAMPLES, len(ev)):]
        n_hold = len(idx)
        np.savez(vdir / "holdout.npz", labels=np.asarray([ev.labels[i] for i in idx], np.int64),
                 **{k: np.concatenate([ev.samples[i][k] for i in idx]) for k in in_names})
        holdout_file = "validation/holdout.npz"
    tolerance = tolerance_for(compiled.precision, [outputs[i] for i in range(n)])
    pre = project.preprocess.model_dump() if project.preprocess else None
    labels = project.label_names()
    (staging / "preprocess.json").write_text(json.dumps(
        {"preprocess": pre, "inputs": [s.to_json() for s in project.input_specs()],
         "note": "raw image (HxWxC uint8, RGB) -> float * scale -> (x - mean) / std -> layout" if pre else
         "inputs are fed as raw tensors"}, indent=2) + "\n")
    (staging / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")
    stages = [s.to_json() for s in shared.stages] + [s.to_json() for s in compiled.lineage]
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
                        outputs=[o.to_json() for o in exported.outputs]),
        stages=stages, files=file_entries(staging),
        calibration=shared.calibration.describe() | {"seed": project.calibration.seed},
        measurements=Measurements(reference=ref, compiled=got, comparison=_comparison(ref, got),
                                  data={"evaluation": ev.describe(), "metric": shared.metric,
                                        "latency_input": "first evaluation sample, batch 1"},
                                  device=_device_status(profile, got)),
        acceptance=_gates(project, profile, ref, got),
        validation=Validation(inputs_file="validation/inputs.npz", outputs_file="validation/outputs.npz",
                              holdout_file=holdout_file, samples=n, holdout_samples=n_hold, tolerance=tolerance),
        preprocess=pre, labels=labels,
    )
