"""Compile one target to meet the accuracy budget: the plain build, the backend's fallback ladder, or the
tuning search (:mod:`edgepack.tuning`) that keeps the most sensitive layers in higher precision."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact
from edgepack.build.context import BuildContext, Outputs, Progress, Reference, Stage
from edgepack.build.plan import TargetPlan
from edgepack.errors import ToolchainError
from edgepack.measure import accuracy as acc
from edgepack.measure.latency import measure_in_turn, measure_latency
from edgepack.project import Project
from edgepack.target import TargetProfile
from edgepack.tuning import Trial, TuningResult, rank_layers, search

TryBuild = Callable[..., Trial]


def accuracy_budget(project: Project, profile: TargetProfile, ref: dict) -> Callable[[float], bool] | None:
    """A predicate on the compiled model's value of the gating metric, from max_accuracy_drop (points,
    or the metric's units) and/or max_relative_accuracy_drop (fraction of the FP32 figure); None when no
    budget is set. For error metrics (mae, rmse) a drop is a rise."""
    gates = {**profile.acceptance.model_dump(exclude_none=True), **project.acceptance.model_dump(exclude_none=True)}
    absolute, relative = gates.get("max_accuracy_drop"), gates.get("max_relative_accuracy_drop")
    if absolute is None and relative is None:
        return None
    limits = [v for v in (absolute, None if relative is None else relative * abs(ref["value"])) if v is not None]
    return lambda value: acc.drop(ref, {**ref, "value": value}) <= min(limits) + 1e-9


# Tuning trials are scored on the first SUBSET_SAMPLES evaluation samples first; the rest of the set is run
# only for a trial within SUBSET_MARGIN standard errors of the budget or better (the finalists), so a clear
# miss costs a fraction of an evaluation pass. Only for percent metrics (top-1, top-1 agreement).
SUBSET_SAMPLES = 100
SUBSET_MARGIN = 2.0


@dataclass
class Trials:
    """Compiles and scores one variant of a target per call (``try_build(step, method, kept, level)``).

    Each compiled model's evaluation outputs are cached by its digest: a variant that compiles to the same
    model is not run again, and the measure stage takes the chosen trial's outputs (``Trial.outputs``)."""

    ctx: BuildContext
    plan: TargetPlan
    src: ModelArtifact
    ref: Reference
    workdir: Path
    threads: int
    on_error: Callable[[ToolchainError, Path], ToolchainError]
    budget: Callable[[float], bool] | None = None
    trials: list[Trial] = field(default_factory=list)
    subset: int | None = SUBSET_SAMPLES
    outputs_by_digest: dict[str, Outputs] = field(default_factory=dict)

    def __call__(self, step: str, method: str, kept: list[str], level: str | None = None,
                 precision: str | None = None, recipe: str | None = None) -> Trial:
        ctx, profile, backend = self.ctx, self.plan.profile, self.plan.backend
        q: dict[str, Any] = {"calibration_method": method, "keep_float": kept}
        if recipe is not None:
            q["recipe"] = recipe
        update: dict[str, Any] = {"quantization": profile.quantization.model_copy(update=q)}
        if precision is not None:
            update["precision"] = precision
        variant = profile.model_copy(update=update)
        opts = self.plan.options if level is None else self.plan.options.model_copy(update={"level": level})
        t0 = time.perf_counter()
        where = self.workdir / f"try-{len(self.trials)}"
        try:
            compiled = backend.compile(self.src, variant, opts, ctx.calibration, where)
        except ToolchainError as e:
            raise self.on_error(e, where) from e
        runner, _ = backend.host_runner(compiled.path, self.threads)
        files = acc.ModelFiles(backend.name, compiled.path, tuple(compiled.all_files), compiled.path.parent)
        outputs, score, scored_on = self.evaluate(runner, compiled.digest, files)
        p50 = measure_latency(runner, ctx.evaluation.samples[0], 5, 30, 5.0, self.threads)["p50_ms"]
        trial = Trial(step, method, kept, compiled, score, outputs, p50, time.perf_counter() - t0,
                      self.budget is None or self.budget(score["value"]), variant.quantization.recipe, scored_on)
        self.trials.append(trial)
        return trial

    def evaluate(self, runner: Any, digest: str,
                 files: acc.ModelFiles | None = None) -> tuple[Outputs, dict[str, Any], int | None]:
        """Outputs and score: from the cache, or on the subset first and on the whole set only for a
        finalist. Returns how many samples were scored when it was only the subset. ``files``: the
        model the runner runs, so a large set can run in shards on a cluster (see accuracy.run_all)."""
        samples = self.ctx.evaluation.samples
        cached = self.outputs_by_digest.get(digest)
        if cached is not None:
            return cached, self.score(cached), None
        n = self.subset if self.subset and self.budget is not None and self.subset < len(samples) else None
        head = acc.run_all(runner, samples[:n] if n else samples, files)
        if n:
            score = self.score(head, n)
            if not self.finalist(score, n):
                return head, score, n
            head = head + acc.run_all(runner, samples[n:], files)
        self.outputs_by_digest[digest] = head
        return head, self.score(head), None

    def finalist(self, score: dict[str, Any], n: int) -> bool:
        """True when the subset's score meets the budget or misses it by less than the margin (two
        standard errors of a share measured on ``n`` samples); non-percent metrics are always scored whole."""
        if self.budget is None or "percent" not in str(score.get("unit", "")):
            return True
        margin = SUBSET_MARGIN * 100.0 * 0.5 / n ** 0.5
        sign = 1.0 if score.get("higher_is_better", True) else -1.0
        return self.budget(score["value"]) or self.budget(score["value"] + sign * margin)

    def score(self, outputs: Outputs, n: int | None = None) -> dict[str, Any]:
        """The metric plan's score of ``outputs`` on the evaluation set (its first ``n`` samples), against
        the FP32 reference's."""
        labels, ref = self.ctx.evaluation.labels, self.ref.outputs
        if n is not None:
            labels, ref = (labels[:n] if labels is not None else None), ref[:n]
        return acc.score(self.ctx.metric_plan, outputs, labels, ref)

    def time_in_turn(self, trials: list[Trial]) -> list[float]:
        """p50 of each trial's compiled model, timed in turn in one window on the target's runtime."""
        runners = {str(i): self.plan.backend.host_runner(t.compiled.path, self.threads)[0] for i, t in enumerate(trials)}
        lat, _ = measure_in_turn(runners, self.ctx.evaluation.samples[0], 5, 100, 20.0, self.threads, tries=1)
        return [lat[str(i)]["p50_ms"] for i in range(len(trials))]


def compile_to_budget(ctx: BuildContext, plan: TargetPlan, trials: Trials,
                      fp32_onnx: Path) -> tuple[Trial, dict[str, Any] | None]:
    """The chosen build and the ``tuning`` record (None when the plain build was all that ran)."""
    profile, backend = plan.profile, plan.backend
    ref_acc = trials.ref.accuracy
    settings = ctx.settings
    int8_tuned = profile.precision == "int8" and settings.tune
    ladder = backend.fallback_levels if int8_tuned and getattr(plan.options, "level", None) is None else ()
    tuning = None
    if not int8_tuned:  # no search: the build is scored once, on the whole set (the measure stage reuses it)
        trials.subset = None
    with Stage(ctx.progress, f"compile {profile.name} ({backend.name} {profile.precision})") as st:
        if ladder:
            plain, tuning = fall_back(ladder, trials, ref_acc, profile.name, ctx.progress)
        else:
            q = profile.quantization
            plain = trials(f"plain {profile.precision}", q.calibration_method, list(q.keep_float))
        st.detail = f"{plain.compiled.size_bytes / 1e6:.2f} MB, {ctx.metric} {plain.accuracy['value']:.2f}"
    if plain.meets_budget or not int8_tuned or ladder:
        return plain, tuning
    with Stage(ctx.progress, f"tune {profile.name} for the accuracy budget") as st:
        result = search(plain, list(backend.calibration_methods), trials,
                        lambda deadline: rank_layers(fp32_onnx, ctx.calibration, trials.workdir / "sensitivity",
                                                     deadline=deadline),
                        settings.max_tuning_minutes, settings.max_tuning_steps,
                        lambda msg: ctx.progress(f"tune {profile.name}: {msg}", "note", None, ""),
                        recipes=recovery_methods(backend, profile), time_in_turn=trials.time_in_turn)
        st.detail = result.stopped
    return result.best, tuning_record(result, ref_acc, settings.tuning_record())


def recovery_methods(backend: Any, profile: TargetProfile) -> tuple[str, ...]:
    """The backend's INT8 recovery methods the search tries (those after the profile's own recipe)."""
    methods = tuple(getattr(backend, "recovery_methods", ()))
    mine = profile.quantization.recipe
    return methods[methods.index(mine) + 1:] if mine in methods else methods


def fall_back(levels: tuple[str, ...], try_build: TryBuild, ref_acc: dict, target: str,
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


def _finite(v: float | None) -> float | None:
    return round(v, 6) if v is not None and v == v else None


def tuning_record(result: TuningResult, ref_acc: dict, settings: dict[str, Any]) -> dict[str, Any]:
    sens = dict(result.sensitivity)
    best = result.best
    return {
        "budget_met": best.meets_budget, "stopped": result.stopped,
        "max_minutes": settings["max_minutes"], "max_steps": settings["max_steps"],
        "chosen": {"step": best.step, "calibration_method": best.method, "recipe": best.recipe},
        "why": _why(result),
        "recovery_methods": [t.recipe for t in result.trials if t.step.startswith("recovery ")],
        "finalists": result.finalists,
        "kept_in_higher_precision": [{"layer": n, "sensitivity": _finite(sens.get(n))} for n in best.kept],
        "steps": [t.to_json(ref_acc) for t in result.trials],
        "failed_steps": list(result.failed),
        "sensitivity": [{"layer": n, "output_error": round(e, 6)} for n, e in result.sensitivity if e == e],
        "ranking": {"ranked": sum(1 for _, e in result.sensitivity if e == e), "layers": len(result.sensitivity),
                    "seconds": result.ranking_seconds,
                    "note": "the ranking stops at half the time left; layers not ranked are kept in float last"},
        "sensitivity_how": "each weighted layer quantized alone (ONNX Runtime, host); mean relative squared "
                           "error of the model output vs FP32 on calibration samples",
    } | ({"parallel": result.parallel} if result.parallel else {})


def _why(result: TuningResult) -> str:
    best = result.best
    if not best.meets_budget:
        return "no build met the accuracy budget: the most accurate one is kept and the gate reports the miss"
    where = "every layer in INT8" if not best.kept else f"{len(best.kept)} layer(s) kept in higher precision"
    how = (f"the fastest of {len(result.finalists['p50_ms'])} builds that met the budget "
           f"({result.finalists['how']})" if result.finalists else "the only build that met the budget")
    return f"{best.step} ({where}): {how}"


def precision_label(compiled: ModelArtifact, profile: TargetProfile) -> str:
    """What runs, and the profile's precision when a fallback moved off it (e.g. "fp16 (fallback from int8)")."""
    if compiled.precision == profile.precision:
        return compiled.precision
    return f"{compiled.precision} (fallback from {profile.precision})"
