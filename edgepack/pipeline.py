"""The build: load -> export to ONNX -> calibrate -> backend compile -> measure -> bundle.

Work shared by all targets of one build (export, data, FP32 reference) is done once. Each target
is compiled in a temporary folder inside the output folder and renamed into place at the end, so
a failed or interrupted build leaves no partial bundle.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import __version__
from edgepack.artifact import ModelArtifact, ModelFormat, StageRecord, digest_paths, sha256_file
from edgepack.backends import get_backend
from edgepack.backends.base import Backend
from edgepack.bundle import Manifest, Measured, Source, bundle_name, write_bundle
from edgepack.calibration.reader import SampleSet, load_samples
from edgepack.errors import (AcceptanceError, CalibrationError, ConfigError, DiskFullError, EdgepackError,
                             ToolchainError, no_space)
from edgepack.measure import accuracy as acc
from edgepack.scratch import locked_dir
from edgepack.measure.latency import latency_at_shapes, measure_interleaved, measure_latency
from edgepack.measure.memory import measure_peak_memory
from edgepack.project import Project, find_project, load_project, with_prune_flags
from edgepack.target import TargetProfile, load_target
from edgepack.manifest_writer import assemble
from edgepack.tuning import Trial, rank_layers, search

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
    exports: dict[Any, ModelArtifact] = field(default_factory=dict)
    calibration: SampleSet | None = None
    evaluation: SampleSet | None = None
    metric: str = "fidelity"          # the gating metric's name (display, manifest data)
    metric_plan: Any = None           # edgepack.measure.accuracy.MetricPlan, once the outputs are known
    references: dict[int | None, dict[str, Any]] = field(default_factory=dict)
    toolchain: dict[str, str] = field(default_factory=dict)
    stages: list[StageRecord] = field(default_factory=list)
    tuning: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    prune: dict[str, Any] | None = None
    prune_flags: dict[str, Any] = field(default_factory=dict)  # the build command's --prune* flags, if any
    # live torch modules ("model", and "unpruned" when pruning) for backends that convert from PyTorch
    modules: dict[str, Any] = field(default_factory=dict)
    text: Any = None        # edgepack.text.TextSpec for text models
    text_root: Path | None = None
    hf: Any = None          # edgepack.loaders.hf.HFModel for hf sources


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


def check_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder: {e.strerror}",
                          hint="choose a folder you can write to") from e
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the output folder is not writable", hint="choose a folder you can write to")
    return out


def source_of(project: Project, project_file: Path | None = None) -> Source:
    src = project.model
    path = project.resolve(src.path.split(":")[0] if src.kind == "callable" else src.location)
    if path.is_dir():  # a Hugging Face folder: config, weights, tokenizer files
        digest = "sha256:" + digest_paths([p for p in path.rglob("*") if p.is_file()], path)
    else:
        digest = "sha256:" + sha256_file(path) if path.is_file() else "missing"
    weights = project.resolve(src.weights) if src.weights else None
    wdig = "sha256:" + sha256_file(weights) if weights and weights.is_file() else None
    pdig = "sha256:" + sha256_file(project_file) if project_file and project_file.is_file() else None
    return Source(kind=src.kind, path=src.location, digest=digest, weights_digest=wdig, project_digest=pdig)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"edgepack": __version__, "numpy": np.__version__}
    for pkg in ("torch", "onnx", "onnxruntime", "openvino", "nncf", "transformers", "tokenizers", "ai-edge-litert",
                "litert-torch", "ai-edge-quantizer"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def build(project_path: Path | None, targets: list[str], out: Path | None = None, threads: int | None = None,
          progress: Progress | None = None, targets_dirs: list[Path] | None = None, tune: bool = True,
          max_tuning_minutes: float = 10.0, max_tuning_steps: int = 12,
          prune: dict[str, Any] | None = None) -> list[BuildResult]:
    """Build one bundle per target. Returns results; failed gates are in each manifest
    (call :func:`raise_for_acceptance` to turn them into an AcceptanceError).

    ``prune`` overrides the project's ``prune`` block (see :func:`edgepack.project.with_prune_flags`).

    When INT8 misses the accuracy budget and ``tune`` is on, :mod:`edgepack.tuning` searches for a
    build that meets it within ``max_tuning_minutes`` / ``max_tuning_steps`` per target."""
    progress = progress or _no_progress
    project = with_prune_flags(load_project(project_path), prune or {})
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
    out = check_out_dir(Path(out) if out else project.root / "dist")
    if project.model.kind == "onnx" and any(b.consumes == ModelFormat.TORCH for _, b, _ in plans):
        from edgepack.toolchains import require

        require("onnx2tf")  # ONNX sources reach TFLite through the isolated onnx2tf toolchain
    if project.prune and project.model.kind in ("onnx", "hf"):
        raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'prune': pruning needs the PyTorch model (file.py:factory), "
                          f"but the model is {'an ONNX file' if project.model.kind == 'onnx' else 'an hf folder'}",
                          hint="point model.path at file.py:factory, or remove prune")
    if max_tuning_minutes <= 0 or max_tuning_steps < 1:
        raise ConfigError("--max-tuning-minutes must be > 0 and the step cap >= 1")
    # inside --out (bundles are renamed from it); a killed build's folder is removed by the next one
    try:
        with locked_dir(out, ".edgepack-", ".build") as scratch:
            from edgepack.loaders.resolve import resolve

            resolved = resolve(project, scratch / "source")
            shared = _Shared(resolved.project, source_of(project, find_project(project_path)), toolchain=_versions(),
                             tuning={"enabled": tune, "max_minutes": max_tuning_minutes, "max_steps": max_tuning_steps},
                             text=resolved.text, text_root=resolved.text_root, hf=resolved.hf,
                             prune_flags={k: v for k, v in (prune or {}).items() if v is not None})
            _prepare_data(shared, profiles[0], progress)
            return [_build_target(shared, prof, backend, options, out, scratch, threads, progress)
                    for prof, backend, options in plans]
    except (OSError, EdgepackError) as e:
        if isinstance(e, DiskFullError) or not no_space(e):
            raise
        raise DiskFullError(f"--out {out}: no space left on its file system while building; nothing partial "
                            "was kept") from e


def raise_for_acceptance(results: list[BuildResult]) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        parts = [f"{r.target}: {'; '.join(r.manifest.acceptance.reasons)}" for r in failed]
        raise AcceptanceError("acceptance gate failed: " + " | ".join(parts),
                              hint=f"bundle kept at {failed[0].bundle}; its manifest records the failed gates",
                              bundle=str(failed[0].bundle))


def read_data(project: Project, profile: TargetProfile, text_spec: Any, text_root: Path | None,
              which: str) -> SampleSet:
    """The calibration or evaluation set of a resolved project, read as the build reads it (``compare``
    uses it to fingerprint the data a bundle was built from)."""
    text = None
    if text_spec is not None:
        from edgepack.text import TextEncoder

        text = TextEncoder(text_spec, text_root)
    src = project.calibration if which == "calibration" else project.evaluation
    n = (src.samples or profile.quantization.samples) if which == "calibration" else src.samples
    pre = project.preprocess.model_dump() if project.preprocess else None
    return load_samples(src.source, project.root, project.input_specs(), pre, n, src.seed, project.label_names(),
                        which, text, src.text_column, src.label_column)


def _prepare_data(shared: _Shared, profile: TargetProfile, progress: Progress) -> None:
    project = shared.project
    with _Stage(progress, "calibration data") as st:
        shared.calibration = read_data(project, profile, shared.text, shared.text_root, "calibration")
        st.detail = f"{len(shared.calibration)} samples"
    with _Stage(progress, "evaluation data") as st:
        ev = project.evaluation
        if ev is None:
            shared.evaluation = shared.calibration
            shared.metric = "fidelity"
            st.detail = "no evaluation block: fidelity on the calibration samples"
        else:
            shared.evaluation = read_data(project, profile, shared.text, shared.text_root, "evaluation")
            has_labels = shared.evaluation.labels is not None
            names = [ev.metric] if isinstance(ev.metric, str) else [m.metric for m in ev.metric or []]
            if "top1" in names and not has_labels:
                raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'evaluation.metric': top1 needs labels, "
                                  f"but {ev.source} has none", hint="add labels to the data, or use metric: fidelity")
            if isinstance(ev.metric, list):
                shared.metric = next((m.metric for m in ev.metric if m.gate), ev.metric[0].metric)
            else:
                shared.metric = ev.metric or ("top1" if has_labels else "fidelity")
            st.detail = f"{len(shared.evaluation)} samples, metric {shared.metric}"
    _check_data(shared, project.label_names(), progress)
    shared.stages.append(StageRecord("data", {"calibration": shared.calibration.describe(),
                                              "evaluation": shared.evaluation.describe()}, None, None, 0.0))


def _check_data(shared: _Shared, labels: list[str] | None, progress: Progress) -> None:
    """Refuse overlapping calibration/evaluation sets; warn on few samples or missing classes."""
    cal, ev = shared.calibration, shared.evaluation
    project = shared.project
    if ev is not cal:
        shared_samples = set(cal.sample_digests()) & set(ev.sample_digests())
        if shared_samples:
            raise CalibrationError(
                f"the calibration and evaluation sets share {len(shared_samples)} identical sample(s): accuracy "
                "measured on them would be optimistic",
                hint="draw calibration data from the training split and evaluation data from a held-out split",
            )
    notes = []
    if len(cal) < project.calibration.min_samples:
        notes.append(f"only {len(cal)} calibration samples (fewer than calibration.min_samples = "
                     f"{project.calibration.min_samples}): INT8 ranges may not represent real inputs")
    if cal.labels is not None and labels:
        missing = sorted(set(range(len(labels))) - set(cal.labels))
        if missing:
            names = ", ".join(labels[i] for i in missing[:10])
            notes.append(f"calibration samples cover {len(labels) - len(missing)} of {len(labels)} classes "
                         f"(missing: {names})")
    for n in notes:
        shared.warnings.append(n)
        progress(n, "warn", None, "")


def _export(shared: _Shared, profile: TargetProfile, workdir: Path, progress: Progress) -> ModelArtifact:
    key = profile.max_opset
    if key in shared.exports:
        return shared.exports[key]
    project = shared.project
    specs = project.input_specs()
    from edgepack.loaders.resolve import representative_dims

    dims = representative_dims(project)
    if project.model.kind == "onnx":
        from edgepack.loaders.onnx import load_onnx

        with _Stage(progress, "load onnx") as st:
            art, info = load_onnx(project.resolve(project.model.path), specs, workdir / f"load-{key}")
            st.detail = f"opset {art.details.get('opset')}" + (f", {info['producer']}" if info["producer"] else "")
            record = StageRecord("load", {"source": project.model.path, "kind": "onnx", **info}, shared.source.digest,
                                 art.digest, st_time(st))
            art = ModelArtifact(art.format, art.path, art.inputs, art.outputs, art.files, (record,), "fp32", art.details)
    else:
        from edgepack.loaders.torch import check_forward, load_module
        from edgepack.stages.export_onnx import export

        with _Stage(progress, "load model") as st:
            if project.model.kind == "hf":
                from edgepack.loaders import hf

                module = hf.load_module(project, shared.hf)
            else:
                module = load_module(project)
            n_out = check_forward(module, specs, dims)
            st.detail = f"{sum(p.numel() for p in module.parameters()):,} parameters"
        default_names = [shared.hf.output] if shared.hf is not None else ["output"]
        names = project.outputs or (default_names if n_out == 1 else [f"output_{i}" for i in range(n_out)])
        if len(names) != n_out:
            raise ConfigError(f"key 'outputs' names {len(names)} outputs, the model returns {n_out}")
        unpruned = module
        shared.modules["unpruned"] = unpruned
        if project.prune:
            module = _prune(shared, module, specs, progress)
        shared.modules["model"] = module
        with _Stage(progress, "export onnx") as st:
            art = export(module, specs, names, workdir / f"export-{key}", key, shared.source.digest,
                         dims=project.dims)
            if project.prune and project.prune.method == "sparse-2of4":
                art = replace(art, details={**art.details, "sparsity": "2:4"})
            st.detail = f"opset {art.details['opset']}, {art.size_bytes / 1e6:.2f} MB"
        if project.prune:
            shared.exports[("unpruned", key)] = export(unpruned, specs, names, workdir / f"unpruned-{key}", key,
                                                       shared.source.digest)
    if project.dim_ranges():  # for backends that need static shapes (TensorRT profiles)
        art = replace(art, details={**art.details, "dim_ranges": project.dim_ranges()})
    if shared.hf is not None and shared.hf.model_type:
        art = replace(art, details={**art.details, "model_type": shared.hf.model_type})
    shared.exports[key] = art
    return art


def _compile_source(shared: _Shared, profile: TargetProfile, backend: Backend, options: Any, onnx_art: ModelArtifact,
                    workdir: Path, progress: Progress, which: str = "model") -> ModelArtifact:
    """What ``backend.compile`` reads: the exported ONNX, or for backends that convert from PyTorch a
    ``torch.export`` program of the same (pruned) module at static shapes."""
    if backend.consumes == ModelFormat.ONNX:
        return onnx_art if which == "model" else shared.exports[("unpruned", profile.max_opset)]
    from edgepack.stages.export_torch import export_program, static_specs

    # static shapes: the project's dims (the data is padded to their max), then the profile's static_dims
    dims = {k: v.max or v.opt for k, v in shared.project.dims.items() if (v.max or v.opt)}
    dims.update(getattr(options, "static_dims", {}) or {})
    specs = static_specs(shared.project.input_specs(), 1, dims, f"target '{profile.name}' ({backend.name})")
    if shared.project.model.kind == "onnx":  # converted by onnx2tf from the file, at these shapes
        return replace(onnx_art, inputs=tuple(specs))
    key = ("torch", which, tuple(s.shape for s in specs))
    if key not in shared.exports:
        with _Stage(progress, f"export torch program{' (unpruned)' if which != 'model' else ''}") as st:
            names = [o.name for o in onnx_art.outputs]
            shared.exports[key] = export_program(shared.modules[which], specs, names,
                                                 workdir / f"torch-{which}-{len(shared.exports)}", shared.source.digest)
            st.detail = ", ".join(f"{s.name} {s.shape_str}" for s in specs)
    return shared.exports[key]


def _prune(shared: _Shared, module: Any, specs: list, progress: Progress) -> Any:
    """Prune (and recover) the torch module; the record goes into the manifest's ``prune`` section."""
    import copy

    from edgepack.stages import prune as pr

    cfg = shared.project.prune
    ev = shared.evaluation
    ev_x, ev_y = ev.stacked(), ev.labels
    with _Stage(progress, f"prune ({cfg.method})") as st:
        before = pr.evaluate(module, ev_x, ev_y, None)
        ref_logits = before.pop("logits")
        teacher = module
        ignore = cfg.ignore if cfg.ignore is not None else pr.default_ignore(module)
        masks = None
        if cfg.method == "structured":
            pruned, record = pr.structured(module, specs, cfg.importance, ignore, cfg.ratio, cfg.target_macs,
                                           cfg.target_params, cfg.layers, cfg.round_to)
        else:
            pruned = copy.deepcopy(module)
            masks = pr.masks_2of4(pruned, ignore)
            pr.apply_masks(pruned, masks)
            counts = pr.count(module, specs)
            eligible = [n for n, m in pruned.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
            record = {"method": "sparse-2of4", "ignored": ignore, "layers_sparse": sorted(masks),
                      "layers_dense": [n for n in eligible if n not in masks and n not in ignore],
                      "before": counts, "after": counts,
                      "note": "2 of every 4 consecutive input weights are zero; dense runtimes gain nothing, "
                              "TensorRT's sparse tensor-core kernels use it when the engine is built with sparsity"}
        after = pr.evaluate(pruned, ev_x, ev_y, ref_logits)
        after.pop("logits")
        record["accuracy_fp32"] = {"metric": before["metric"] if ev_y is not None else "fidelity",
                                   "before_pruning": before["value"] if ev_y is not None else 100.0,
                                   "after_pruning": after["value"], "samples": len(ev)}
        st.detail = (f"{record.get('macs_removed', 0):.0%} of MACs removed, accuracy {record['accuracy_fp32']['before_pruning']:.2f} "
                     f"-> {after['value']:.2f}")
    if cfg.finetune:
        ft = cfg.finetune
        with _Stage(progress, f"fine-tune pruned model ({ft.epochs} epochs)") as st:
            data = shared.calibration
            if ft.data is not None:
                data = load_samples(ft.data.source, shared.project.root, shared.project.input_specs(),
                                    shared.project.preprocess.model_dump() if shared.project.preprocess else None,
                                    ft.data.samples, ft.data.seed, shared.project.label_names(), "prune.finetune.data")
            xs = data.stacked()
            pr.check_training_data(xs, specs)
            record["finetune"] = pr.finetune(
                pruned, teacher, xs, data.labels, ft.epochs, ft.lr, ft.batch_size, cfg.seed, masks,
                lambda e, loss: progress(f"epoch {e}/{ft.epochs}: loss {loss:.4f}", "note", None, ""))
            record["finetune"]["data"] = data.describe()
            rec = pr.evaluate(pruned, ev_x, ev_y, ref_logits)
            rec.pop("logits")
            record["accuracy_fp32"]["after_recovery"] = rec["value"]
            st.detail = f"accuracy {rec['value']:.2f}"
    if masks:
        record["sparsity_check"] = _check_2of4(pruned, masks)
    if shared.prune_flags:
        record["set_by_flags"] = shared.prune_flags  # the project file's prune block was overridden
    shared.prune = record
    shared.stages.append(StageRecord("prune", {k: v for k, v in record.items() if k != "finetune"}, None, None, 0.0))
    return pruned.eval()


def _check_2of4(module: Any, masks: dict) -> dict[str, Any]:
    subs = dict(module.named_modules())
    zero_share = {n: round(float((subs[n].weight == 0).float().mean()), 4) for n in masks}
    return {"zero_share_per_layer": zero_share}


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
    by_shape = latency_at_shapes(runner, sample, shared.project, m, threads)
    del runner
    memory = measure_peak_memory(backend.name, model_file, sample, threads)
    runtime = proxy or f"{backend.runtime_package} {shared.toolchain.get(backend.runtime_package, '?')}"
    measured = Measured(model=what, runtime=runtime, proxy=proxy, accuracy=None, latency=latency,
                        latency_by_shape=by_shape, size=size_of(files, root), peak_memory=memory)
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
            acc.check_finite(outputs, shared.evaluation, [o.name for o in art.outputs])
            labels = shared.evaluation.labels
            if shared.metric_plan is None:
                ev = shared.project.evaluation
                spec = ev.metric if ev is not None and ev.metric is not None else shared.metric
                shared.metric_plan = acc.plan(spec, [o.name for o in art.outputs],
                                              labels is not None, shared.project.root,
                                              str(shared.project.root / "edgepack.yaml"))
            for e in shared.metric_plan.entries:
                if e.metric == "top1" and shared.project.labels is None:  # no class list: the output width is it
                    from edgepack.calibration.reader import check_label_classes
                    check_label_classes(shared.evaluation, int(outputs[0][e.index].shape[-1]),
                                        f"the model's output '{e.output}'")
            measured.accuracy = acc.score(shared.metric_plan, outputs, labels, outputs)
            st.detail = f"{shared.metric} {measured.accuracy['value']:.2f}, p50 {measured.latency['p50_ms']:.3f} ms"
        shared.references[key] = {"measured": measured, "outputs": outputs}
    return shared.references[key]


def _build_target(shared: _Shared, profile: TargetProfile, backend: Backend, options: Any, out: Path,
                  scratch: Path, threads: int | None, progress: Progress) -> BuildResult:
    project = shared.project
    # a phone profile's 4 threads on a 2-core build host would measure contention, not the model
    threads = threads or min(profile.measurement.threads, os.cpu_count() or 1)
    final = out / bundle_name(project.name, project.version, profile.name)
    art = _export(shared, profile, scratch, progress)
    ref = _reference(shared, art, threads, profile, progress)
    src = _compile_source(shared, profile, backend, options, art, scratch, progress)
    workdir = scratch / profile.name
    staging = workdir / "bundle"
    budget = accuracy_budget(project, profile, ref["measured"].accuracy)
    trials: list[Trial] = []

    def try_build(step: str, method: str, kept: list[str], level: str | None = None) -> Trial:
        variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(
            update={"calibration_method": method, "keep_float": kept})})
        opts = options if level is None else options.model_copy(update={"level": level})
        t0 = time.perf_counter()
        try:
            compiled = backend.compile(src, variant, opts, shared.calibration, workdir / f"try-{len(trials)}")
        except ToolchainError as e:
            raise _keep_logs(e, workdir / f"try-{len(trials)}", out, final.name) from e
        runner, _ = backend.host_runner(compiled.path, threads)
        outputs = acc.run_all(runner, shared.evaluation)
        score = acc.score(shared.metric_plan, outputs, shared.evaluation.labels, ref["outputs"])
        p50 = measure_latency(runner, shared.evaluation.samples[0], 5, 30, 5.0, threads)["p50_ms"]
        trial = Trial(step, method, kept, compiled, score, outputs, p50, time.perf_counter() - t0,
                      budget is None or budget(score["value"]))
        trials.append(trial)
        return trial

    q = profile.quantization
    ladder = backend.fallback_levels if (profile.precision == "int8" and shared.tuning["enabled"]
                                         and getattr(options, "level", None) is None) else ()
    with _Stage(progress, f"compile {profile.name} ({backend.name} {profile.precision})") as st:
        if ladder:
            plain, tuning = _fall_back(ladder, try_build, ref["measured"].accuracy, profile.name, progress)
        else:
            plain, tuning = try_build(f"plain {profile.precision}", q.calibration_method, list(q.keep_float)), None
        st.detail = f"{plain.compiled.size_bytes / 1e6:.2f} MB, {shared.metric} {plain.accuracy['value']:.2f}"
    chosen = plain
    if not plain.meets_budget and profile.precision == "int8" and shared.tuning["enabled"] and not ladder:
        with _Stage(progress, f"tune {profile.name} for the accuracy budget") as st:
            result = search(plain, list(backend.calibration_methods), try_build,
                            lambda deadline: rank_layers(art.path, shared.calibration, workdir / "sensitivity",
                                                         deadline=deadline),
                            shared.tuning["max_minutes"], shared.tuning["max_steps"],
                            lambda msg: progress(f"tune {profile.name}: {msg}", "note", None, ""))
            chosen = result.best
            tuning = _tuning_record(result, ref["measured"].accuracy, shared.tuning)
            st.detail = result.stopped
    compiled = _move_into(chosen.compiled, staging / "model")
    with _Stage(progress, f"measure {profile.name}") as st:
        measured, outputs = _measure(shared, backend, compiled.path, list(compiled.all_files), staging,
                                     threads, profile, f"compiled: {_precision_label(compiled, profile)} on {backend.name}")
        measured.accuracy = acc.score(shared.metric_plan, outputs, shared.evaluation.labels, ref["outputs"])
        st.detail = f"{shared.metric} {measured.accuracy['value']:.2f}, p50 {measured.latency['p50_ms']:.3f} ms"
    if shared.prune is not None:
        with _Stage(progress, f"measure unpruned {profile.name}") as st:
            unpruned_src = _compile_source(shared, profile, backend, options, art, scratch, progress, "unpruned")
            prune_effect = _unpruned_latency(shared, backend, options, profile, unpruned_src, workdir / "unpruned",
                                             threads, compiled.path)
            st.detail = f"p50 {prune_effect['unpruned_p50_ms']:.3f} ms -> pruned {prune_effect['pruned_p50_ms']:.3f} ms"
        shared_prune = {**shared.prune, "latency_effect": prune_effect}
    else:
        shared_prune = None
    target_fp32 = None
    if backend.name != "onnxruntime" and measured.proxy is None and profile.precision != "fp32":
        with _Stage(progress, f"measure fp32 on {backend.name}") as st:
            target_fp32 = _target_fp32(backend, options, profile, src, workdir / "fp32", shared, threads)
            st.detail = f"p50 {target_fp32['latency']['p50_ms']:.3f} ms"
    in_turn = None
    if measured.proxy is None:
        with _Stage(progress, f"time {profile.name} in turn with fp32") as st:
            in_turn = _in_turn(shared, backend, profile, art, compiled, target_fp32, threads)
            st.detail = (f"speed-up {in_turn['speedup_p50']:.2f}x"
                         + (" [noisy host: figures flagged]" if in_turn["noise"]["noisy"] else ""))
            if in_turn["noise"]["noisy"]:
                note = (f"{profile.name}: latency ratios are noisy (round-to-round spread "
                        f"{in_turn['noise']['checks'][-1]['worst']:.0%} after {in_turn['noise']['tries']} tries; host "
                        f"load {in_turn['noise']['checks'][-1]['load_per_cpu_after']} per CPU): the speed-ups are "
                        "flagged noisy in the manifest")
                shared.warnings.append(note)
                progress(note, "warn", None, "")
    with _Stage(progress, f"bundle {profile.name}") as st:
        manifest = assemble(shared, profile, backend, compiled, art, staging, ref["measured"], measured, outputs,
                            tuning, target_fp32, shared_prune, in_turn)
        manifest = write_bundle(staging, manifest, final)
        st.detail = str(final)
    return BuildResult(profile.name, final, manifest)


def _unpruned_latency(shared: _Shared, backend: Backend, options: Any, profile: TargetProfile, art: ModelArtifact,
                      workdir: Path, threads: int, pruned_path: Path) -> dict[str, Any]:
    """The unpruned model compiled for the same target (plain, no tuning) and timed turn about with the
    pruned one, so that a shared host's load falls on both alike."""
    compiled = backend.compile(art, profile, options, shared.calibration, workdir)
    unpruned, proxy = backend.host_runner(compiled.path, threads)
    pruned, _ = backend.host_runner(pruned_path, threads)
    m = profile.measurement
    # many more runs than a bundle's own figure: a ratio of two p50s needs both steady
    lat = measure_interleaved({"unpruned": unpruned, "pruned": pruned}, shared.evaluation.samples[0],
                              m.warmup_runs, max(m.runs, 2000), m.max_seconds * 2, threads)
    u, p = lat["unpruned"]["p50_ms"], lat["pruned"]["p50_ms"]
    return {"unpruned_p50_ms": u, "pruned_p50_ms": p, "speedup_p50": round(u / p, 3),
            "unpruned_p90_ms": lat["unpruned"]["p90_ms"], "pruned_p90_ms": lat["pruned"]["p90_ms"],
            "precision": profile.precision, "runs": lat["pruned"]["how"]["runs"], "threads": threads,
            "how": "both compiled for the target and timed in turn in one session, after the bundle's own "
                   "measurement: " + lat["pruned"]["how"]["interleaved"] + "; timed: " + lat["pruned"]["how"]["timed"],
            "where": "host proxy" if proxy else "host, the target's runtime", "measured_in_same_run": True}


def _in_turn(shared: _Shared, backend: Backend, profile: TargetProfile, art: ModelArtifact, compiled: ModelArtifact,
             target_fp32: dict[str, Any] | None, threads: int) -> dict[str, Any]:
    """The FP32 reference, the compiled model and (when built) FP32 on the target's runtime, timed in
    turn in one window with a noise check: the speed-ups in the manifest come from here, so a busy
    host's load falls on every model alike, and a window that never settles is flagged noisy."""
    from edgepack.measure.latency import measure_in_turn

    ort = get_backend("onnxruntime")
    runners = {"fp32 reference": ort.load(art.path, threads), "compiled": backend.host_runner(compiled.path, threads)[0]}
    if target_fp32 is not None:
        runners["fp32 on the target's runtime"] = backend.host_runner(Path(target_fp32["path"]), threads)[0]
    m = profile.measurement
    lat, noise = measure_in_turn(runners, shared.evaluation.samples[0], m.warmup_runs, max(m.runs, 200),
                                 m.max_seconds * 2, threads)
    p50 = {k: v["p50_ms"] for k, v in lat.items()}
    out = {"p50_ms": p50, "p90_ms": {k: v["p90_ms"] for k, v in lat.items()},
           "runs": {k: v["how"]["runs"] for k, v in lat.items()},
           "speedup_p50": round(p50["fp32 reference"] / p50["compiled"], 3), "noise": noise,
           "how": lat["compiled"]["how"]["interleaved"] + "; timed: " + lat["compiled"]["how"]["timed"]}
    if target_fp32 is not None:
        out["speedup_p50_vs_target_fp32"] = round(p50["fp32 on the target's runtime"] / p50["compiled"], 3)
    return out


def _target_fp32(backend: Backend, options: Any, profile: TargetProfile, art: ModelArtifact, workdir: Path,
                 shared: _Shared, threads: int) -> dict[str, Any]:
    """The FP32 model compiled and timed on the target's own runtime: the speed-up INT8 buys there."""
    if getattr(options, "level", None) is not None:
        options = options.model_copy(update={"level": None})
    fp32 = backend.compile(art, profile.model_copy(update={"precision": "fp32"}), options, shared.calibration, workdir)
    runner, _ = backend.host_runner(fp32.path, threads)
    m = profile.measurement
    latency = measure_latency(runner, shared.evaluation.samples[0], m.warmup_runs, m.runs, m.max_seconds, threads)
    return {"model": f"fp32 on {backend.name}", "latency": latency, "size_bytes": fp32.size_bytes,
            "path": str(fp32.path)}  # "path" is for timing in turn; it is not written to the manifest


def _fall_back(levels: tuple[str, ...], try_build: Callable[..., Trial], ref_acc: dict, target: str,
               progress: Progress) -> tuple[Trial, dict[str, Any]]:
    """Try each quantization level, most integer first, until one converts and meets the accuracy
    budget; the record says which level was reached and why each earlier one was left."""
    trials: list[Trial] = []
    steps: list[dict[str, Any]] = []
    for level in levels:
        try:
            trial = try_build(f"level {level}", "minmax", [], level)
        except ToolchainError as e:
            steps.append({"level": level, "outcome": "failed to convert", "reason": e.message})
            progress(f"{target}: level {level} failed to convert; falling back", "warn", None, "")
            continue
        trials.append(trial)
        drop = round(acc.drop(ref_acc, trial.accuracy), 3)
        steps.append({"level": level, "outcome": "meets the accuracy budget" if trial.meets_budget
                      else "misses the accuracy budget", "accuracy": trial.accuracy["value"], "drop_points": drop,
                      "p50_ms_host": trial.p50_ms, "seconds": round(trial.seconds, 2)})
        if trial.meets_budget:
            break
        progress(f"{target}: level {level} misses the accuracy budget (drop {drop:.2f} points); falling back",
                 "warn", None, "")
    if not trials:
        raise ToolchainError(f"target '{target}': no quantization level converted: "
                             + "; ".join(f"{s['level']}: {s['reason']}" for s in steps),
                             hint="the converter output is in the build log; report the op it names upstream")
    best = next((t for t in trials if t.meets_budget), None) or max(trials, key=lambda t: acc.goodness(t.accuracy))
    reached = best.step.removeprefix("level ")
    why = ("the first level that converted and met the accuracy budget" if best.meets_budget else
           "no level met the accuracy budget: the most accurate one is kept and the gate reports the miss")
    return best, {"kind": "fallback ladder", "budget_met": best.meets_budget, "levels": list(levels),
                  "reached": reached, "why": why, "chosen": {"step": best.step, "level": reached},
                  "steps": steps, "stopped": why}


def accuracy_budget(project: Project, profile: TargetProfile, ref: dict):
    """A predicate on the compiled model's value of the gating metric, from max_accuracy_drop (points,
    or the metric's units) and/or max_relative_accuracy_drop (fraction of the FP32 figure); None when no
    budget is set. For error metrics (mae, rmse) a drop is a rise."""
    gates = {**profile.acceptance.model_dump(exclude_none=True), **project.acceptance.model_dump(exclude_none=True)}
    absolute, relative = gates.get("max_accuracy_drop"), gates.get("max_relative_accuracy_drop")
    if absolute is None and relative is None:
        return None
    limits = [v for v in (absolute, None if relative is None else relative * abs(ref["value"])) if v is not None]
    return lambda value: acc.drop(ref, {**ref, "value": value}) <= min(limits) + 1e-9


def _precision_label(compiled: ModelArtifact, profile: TargetProfile) -> str:
    """What runs, and the profile's precision when a fallback moved off it (e.g. "fp16 (fallback from int8)")."""
    if compiled.precision == profile.precision:
        return compiled.precision
    return f"{compiled.precision} (fallback from {profile.precision})"


def _finite(v: float | None) -> float | None:
    return round(v, 6) if v is not None and v == v else None


def _tuning_record(result: Any, ref_acc: dict, settings: dict[str, Any]) -> dict[str, Any]:
    sens = dict(result.sensitivity)
    best = result.best
    return {
        "budget_met": best.meets_budget, "stopped": result.stopped,
        "max_minutes": settings["max_minutes"], "max_steps": settings["max_steps"],
        "chosen": {"step": best.step, "calibration_method": best.method},
        "kept_in_higher_precision": [{"layer": n, "sensitivity": _finite(sens.get(n))} for n in best.kept],
        "steps": [t.to_json(ref_acc) for t in result.trials],
        "failed_steps": list(result.failed),
        "sensitivity": [{"layer": n, "output_error": round(e, 6)} for n, e in result.sensitivity if e == e],
        "ranking": {"ranked": sum(1 for _, e in result.sensitivity if e == e), "layers": len(result.sensitivity),
                    "seconds": result.ranking_seconds,
                    "note": "the ranking stops at half the time left; layers not ranked are kept in float last"},
        "sensitivity_how": "each weighted layer quantized alone (ONNX Runtime, host); mean relative squared "
                           "error of the model output vs FP32 on calibration samples",
    }


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
    """Copy a failed toolchain's logs out of the scratch folder before it is removed; a toolchain that
    wrote none (OpenVINO, NNCF raise exceptions) gets its full error text and traceback kept instead."""
    import traceback

    logs = sorted(workdir.glob("*.log"))
    kept = out / f"{name}.log"
    if logs:
        kept.write_text("".join(f"== {p.name}\n{p.read_text(errors='replace')}\n" for p in logs))
    else:
        cause = err.__cause__ or err
        kept.write_text(f"== {err.message}\n" + "".join(traceback.format_exception(cause)))
    first = err.message.strip().splitlines()[0] if err.message.strip() else err.message
    return ToolchainError(first[:500], hint=f"the toolchain's full message and log are kept in {kept}")
