"""Measuring inside the build: a model's figures on the evaluation set, the FP32 reference, FP32 on the
target's runtime, and the ratios from models timed in turn in one window."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact
from edgepack.backends import get_backend
from edgepack.backends.base import Backend
from edgepack.build.context import BuildContext, Outputs, Reference, Stage
from edgepack.bundle import Measured
from edgepack.calibration.reader import check_label_classes
from edgepack.measure import accuracy as acc
from edgepack.measure.latency import latency_at_shapes, measure_in_turn, measure_interleaved, measure_latency
from edgepack.measure.memory import Probe, start_peak_memory
from edgepack.measure.size import size_of
from edgepack.target import TargetProfile


REFERENCE_BACKEND = "onnxruntime"   # the FP32 reference: the exported ONNX on ONNX Runtime
REFERENCE_RUNTIME = "onnxruntime"


def measure(ctx: BuildContext, backend: Backend, model_file: Path, files: list[Path], root: Path, threads: int,
            profile: TargetProfile, what: str, outputs: Outputs | None = None,
            timed: bool = True, probe_now: bool = True) -> tuple[Measured, Outputs]:
    """Outputs on the whole evaluation set, latency, peak memory and size. ``accuracy`` is left for the
    caller, which knows what to score against. ``outputs``: this very model's outputs on the evaluation
    set when they were already computed (the chosen trial's, on the same runtime and files), so the set
    is not run twice.

    Latency: a model that runs on this host's own runtime is timed once, in turn with FP32 in one window
    (:func:`in_turn`), which fills its section; only one that runs on a host proxy (no window) is timed
    alone here. ``timed`` False: no timing at all here (the FP32 reference, timed in that window too).
    The sizes a project declares for its symbolic dims are timed alone (the window times one input).
    Peak memory: a probe in a fresh process, started in the background once the timing here is done
    (``probe_now`` False: started by the next :func:`start_probes`); :func:`settle_probes` collects it
    before any other latency is timed."""
    runner, proxy = backend.host_runner(model_file, threads)
    if outputs is None or len(outputs) != len(ctx.evaluation):
        outputs = acc.run_all(runner, ctx.evaluation, acc.ModelFiles(backend.name, model_file, tuple(files), root))
    sample = ctx.evaluation.samples[0]
    latency, by_shape = UNTIMED, None
    if timed and (proxy is not None or any(d.measure for d in ctx.project.dims.values())):
        settle_probes(ctx)
        m = profile.measurement
        if proxy is not None:
            latency = measure_latency(runner, sample, m.warmup_runs, m.runs, m.max_seconds, threads)
        by_shape = latency_at_shapes(runner, sample, ctx.project, m, threads)
    if proxy is None:  # timed next in turn with FP32 (:func:`in_turn`): loaded once, kept for that window
        ctx.runners[(backend.name, str(model_file), threads)] = runner
    del runner
    runtime = proxy or f"{backend.runtime_package} {ctx.toolchain.get(backend.runtime_package, '?')}"
    measured = Measured(model=what, runtime=runtime, proxy=proxy, accuracy=None, latency=latency,
                        latency_by_shape=by_shape, size=size_of(files, root), peak_memory=PENDING)
    ctx.probes.append(PendingMemory(measured, lambda: start_peak_memory(backend.name, model_file, sample, threads)))
    if probe_now:
        start_probes(ctx)
    return measured, outputs


# a latency not yet taken: replaced by the timing in turn (or alone) before any manifest is written
UNTIMED = {"p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "how": {"untimed": True}}
PENDING = {"measured": False, "reason": "probe not collected yet"}  # replaced by settle_probes


@dataclass
class PendingMemory:
    """A model's peak-memory probe: started (``probe``) while untimed work goes on, collected into
    ``measured.peak_memory`` by :func:`settle_probes`."""

    measured: Measured
    start: Callable[[], Probe]
    probe: Probe | None = None


def start_probes(ctx: BuildContext) -> None:
    """Start the memory probes not started yet (each a fresh process, in the background)."""
    for p in ctx.probes:
        if p.probe is None:
            p.probe = p.start()


def settle_probes(ctx: BuildContext) -> None:
    """Wait for every memory probe and record its figure: called before any latency is timed, so that no
    probe runs during a timing, and before a build's figures are written."""
    start_probes(ctx)
    if any(p.probe is not None and p.probe.running for p in ctx.probes):  # a wait shows in the timings
        with Stage(ctx.progress, "wait for memory probes") as st:
            st.detail = f"{len(ctx.probes)} fresh processes"
            _collect(ctx)
    _collect(ctx)


def _collect(ctx: BuildContext) -> None:
    while ctx.probes:
        p = ctx.probes.pop(0)
        assert p.probe is not None
        p.measured.peak_memory = p.probe.result()


def cancel_probes(ctx: BuildContext) -> None:
    """Stop the probes of a build that failed or was interrupted."""
    while ctx.probes:
        p = ctx.probes.pop(0)
        if p.probe is not None:
            p.probe.cancel()


def loaded(ctx: BuildContext, backend: Backend, model_file: Path, threads: int) -> Any:
    """The runner :func:`measure` kept for this model (taken out of the cache), or a new one."""
    kept = ctx.runners.pop((backend.name, str(model_file), threads), None)
    return kept if kept is not None else backend.host_runner(model_file, threads)[0]


def time_alone(ctx: BuildContext, runner: Any, profile: TargetProfile, threads: int) -> tuple[dict, list | None]:
    """One model timed on its own (the profile's runs / seconds), and at the dims' sizes."""
    settle_probes(ctx)
    m = profile.measurement
    sample = ctx.evaluation.samples[0]
    return (measure_latency(runner, sample, m.warmup_runs, m.runs, m.max_seconds, threads),
            latency_at_shapes(runner, sample, ctx.project, m, threads))


def in_turn_latency(stats: dict[str, Any]) -> dict[str, Any]:
    """One model's figures from a timing in turn, as a manifest latency section."""
    return {k: v for k, v in stats.items() if k != "round_medians_ms"}


def reference(ctx: BuildContext, art: ModelArtifact, threads: int, profile: TargetProfile) -> Reference:
    """The exported FP32 ONNX on ONNX Runtime (once per opset and thread count); fixes the metric plan.
    Its latency is taken later, in turn with each compiled model (see :class:`Reference`)."""
    key = (profile.max_opset, threads)
    if key in ctx.references:
        return ctx.references[key]
    ort = get_backend(REFERENCE_BACKEND)
    ort.check_environment(compile=False)

    def alone() -> tuple[dict, list | None]:
        with Stage(ctx.progress, "time fp32 reference") as st:
            timed = time_alone(ctx, loaded(ctx, ort, art.path, threads), profile, threads)
            st.detail = f"p50 {timed[0]['p50_ms']:.3f} ms"
        return timed

    with Stage(ctx.progress, "measure fp32 reference") as st:
        # its memory probe starts with the compiled model's, after the compile (whose trials time latency)
        measured, outputs = measure(ctx, ort, art.path, list(art.all_files), art.path.parent, threads, profile,
                                    "fp32 reference: exported ONNX on onnxruntime", timed=False, probe_now=False)
        out_names = [o.name for o in art.outputs]
        acc.check_finite(outputs, ctx.evaluation, out_names)
        labels = ctx.evaluation.labels
        project = ctx.project
        if ctx.metric_plan is None:
            ev = project.evaluation
            spec = ev.metric if ev is not None and ev.metric is not None else ctx.metric
            ctx.metric_plan = acc.plan(spec, out_names, labels is not None, project.root,
                                       str(project.root / "edgepack.yaml"))
        for e in ctx.metric_plan.entries:
            if e.metric == "top1" and project.labels is None:  # no class list: the output width is it
                check_label_classes(ctx.evaluation, int(outputs[0][e.index].shape[-1]), f"the model's output '{e.output}'")
        measured.accuracy = acc.score(ctx.metric_plan, outputs, labels, outputs)
        st.detail = f"{ctx.metric} {measured.accuracy.value:.2f}"
    ctx.references[key] = Reference(measured, outputs, alone)
    return ctx.references[key]


def target_fp32(ctx: BuildContext, backend: Backend, options: Any, profile: TargetProfile, art: ModelArtifact,
                workdir: Path, threads: int) -> dict[str, Any]:
    """The FP32 model compiled for the target's own runtime: the speed-up INT8 buys there. Its latency
    is filled in from the timing in turn with the compiled model (:func:`in_turn`)."""
    if getattr(options, "level", None) is not None:
        options = options.model_copy(update={"level": None})
    fp32 = backend.compile(art, profile.model_copy(update={"precision": "fp32"}), options, ctx.calibration, workdir)
    return {"model": f"fp32 on {backend.name}", "size_bytes": fp32.size_bytes,
            "path": str(fp32.path)}  # "path" is for timing in turn; it is not written to the manifest


IN_TURN_ROUNDS = 12  # rounds of each model's block of calls (measure_in_turn's minimum; a block is ~25 ms, >= 5 calls)


def in_turn(ctx: BuildContext, backend: Backend, profile: TargetProfile, art: ModelArtifact,
            compiled: ModelArtifact, fp32_on_target: dict[str, Any] | None,
            threads: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The FP32 reference, the compiled model and (when built) FP32 on the target's runtime, timed in
    turn in one window with a noise check: the speed-ups in the manifest come from here, so a busy
    host's load falls on every model alike, and a window that never settles is flagged noisy. Returns
    the manifest's ``in_turn`` record, the reference's latency and the compiled model's from it (each
    model is timed once: this is the compiled model's own figure too, the one ``validate`` compares a
    device with: the same runtime call, threads and input); FP32 on the target gets its latency section
    from it too. The memory probes are collected once the models are loaded: none runs during the window."""
    ort = get_backend(REFERENCE_BACKEND)
    runners = {"fp32 reference": loaded(ctx, ort, art.path, threads), "compiled": loaded(ctx, backend, compiled.path, threads)}
    if fp32_on_target is not None:
        runners["fp32 on the target's runtime"] = backend.host_runner(Path(fp32_on_target["path"]), threads)[0]
    settle_probes(ctx)
    m = profile.measurement
    lat, noise = measure_in_turn(runners, ctx.evaluation.samples[0], m.warmup_runs, 0, m.max_seconds * 2, threads,
                                 rounds=IN_TURN_ROUNDS)
    p50 = {k: v["p50_ms"] for k, v in lat.items()}
    out = {"p50_ms": p50, "p90_ms": {k: v["p90_ms"] for k, v in lat.items()},
           "runs": {k: v["how"]["runs"] for k, v in lat.items()},
           "speedup_p50": round(p50["fp32 reference"] / p50["compiled"], 3), "noise": noise,
           "how": lat["compiled"]["how"]["interleaved"] + "; timed: " + lat["compiled"]["how"]["timed"]}
    if fp32_on_target is not None:
        out["speedup_p50_vs_target_fp32"] = round(p50["fp32 on the target's runtime"] / p50["compiled"], 3)
        fp32_on_target["latency"] = in_turn_latency(lat["fp32 on the target's runtime"])
    last = noise["checks"][-1]
    window_noise = {k: last[k] for k in ("load_per_cpu_before", "load_per_cpu_after", "cpu_steal_pct",
                                         "others_cpu_share") if k in last}
    compiled_latency = in_turn_latency(lat["compiled"]) | {"noise": {
        **window_noise, "noisy": noise["noisy"],
        "how": "the in-turn window's noise check (comparison.in_turn.noise): the round-by-round ratio spread "
               "and the CPU share of other processes during the window"}}
    return out, in_turn_latency(lat["fp32 reference"]), compiled_latency


def unpruned_latency(ctx: BuildContext, backend: Backend, profile: TargetProfile, unpruned_path: Path,
                     threads: int, pruned_path: Path, pruned_precision: str) -> dict[str, Any]:
    """The unpruned model compiled for the same target (plain, no tuning, the profile's precision) timed
    turn about with the pruned one as bundled (``pruned_precision``: FP32 when the precision choice
    picked it), so that a shared host's load falls on both alike."""
    unpruned, proxy = backend.host_runner(unpruned_path, threads)
    pruned, _ = backend.host_runner(pruned_path, threads)
    m = profile.measurement
    # many more runs than a bundle's own figure: a ratio of two p50s needs both steady
    lat = measure_interleaved({"unpruned": unpruned, "pruned": pruned}, ctx.evaluation.samples[0],
                              m.warmup_runs, max(m.runs, 2000), m.max_seconds * 2, threads)
    u, p = lat["unpruned"]["p50_ms"], lat["pruned"]["p50_ms"]
    return {"unpruned_p50_ms": u, "pruned_p50_ms": p, "speedup_p50": round(u / p, 3),
            "unpruned_p90_ms": lat["unpruned"]["p90_ms"], "pruned_p90_ms": lat["pruned"]["p90_ms"],
            "precision": profile.precision, "pruned_precision": pruned_precision,
            "runs": lat["pruned"]["how"]["runs"], "threads": threads,
            "how": "both compiled for the target and timed in turn in one session, after the bundle's own "
                   "measurement: " + lat["pruned"]["how"]["interleaved"] + "; timed: " + lat["pruned"]["how"]["timed"],
            "where": "host proxy" if proxy else "host, the target's runtime", "measured_in_same_run": True}


def noisy_note(profile: TargetProfile, timed: dict[str, Any]) -> str:
    noise = timed["noise"]
    return (f"{profile.name}: latency ratios are noisy (round-to-round spread {noise['checks'][-1]['worst']:.0%} "
            f"after {noise['tries']} tries; host load {noise['checks'][-1]['load_per_cpu_after']} per CPU): the "
            "speed-ups are flagged noisy in the manifest")
