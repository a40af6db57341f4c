"""Accuracy first: when plain INT8 misses the accuracy budget, search for a build that meets it.

The search is shared by every backend; each backend only knows how to honour
``quantization.calibration_method`` and ``quantization.keep_float`` (ONNX node names left in higher
precision). Steps, each compiled and scored on the target's own runtime:

1. the other calibration methods the backend supports; keep the most accurate;
2. the backend's INT8 recovery methods (``recovery_methods``: bias correction, learned rounding...,
   cheapest first), each with every layer still in INT8; keep the most accurate;
3. rank layer sensitivity once, on the host with ONNX Runtime: quantize one weighted layer at a
   time and measure the output error on calibration samples;
4. keep the most sensitive layers in higher precision (from the most accurate all-INT8 build of
   steps 1-2): 1, 2, 4, ... layers until the budget holds, then bisect down to the fewest that
   still meet it.

It stops when the budget holds, or at the step or time cap, and returns every trial (the trade
curve) with the best one: of the builds that meet the budget, the fastest (timed in turn when more
than one does; within ``NEAR_TIE`` the one with fewer layers in float), else the most accurate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ToolchainError
from edgepack.measure.accuracy import drop, goodness

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SENSITIVITY_SAMPLES = 32
DEFAULT_RECIPE = "default"
NEAR_TIE = 0.03  # p50s within 3% are a tie: fewer layers in float, then accuracy, win it
# recipes the float fallback does not start from: AdaRound's learned model lost most of its accuracy with
# one layer kept in float (EfficientNet-Lite0, the first depthwise conv: 86% -> 45-47% agreement, whether
# Quark excluded the layer or it was given back its FP32 weights and bias afterwards)
ALL_INT8_ONLY = ("adaround",)


@dataclass
class Trial:
    step: str
    method: str
    kept: list[str]
    compiled: Any
    accuracy: dict
    outputs: list
    p50_ms: float
    seconds: float
    meets_budget: bool
    recipe: str = DEFAULT_RECIPE
    scored_on: int | None = None  # evaluation samples scored, when only a subset was (None: all of them)
    node: str | None = None       # the cluster node that built, scored and timed it (None: this process)

    def to_json(self, ref_acc: dict) -> dict[str, Any]:
        row = {"step": self.step, "calibration_method": self.method, "recipe": self.recipe,
               "kept_in_higher_precision": len(self.kept), "accuracy": self.accuracy["value"],
               "drop_points": round(drop(ref_acc, self.accuracy), 3), "p50_ms_host": self.p50_ms,
               "seconds": round(self.seconds, 2), "meets_budget": self.meets_budget}
        if self.accuracy.get("cosine_mean") is not None:
            row["cosine_mean"] = self.accuracy["cosine_mean"]
        if self.scored_on is not None:
            row["scored_on_samples"] = self.scored_on
        if self.node is not None:
            row["built_on_node"] = self.node
        return row


@dataclass
class TuningResult:
    best: Trial
    trials: list[Trial]
    sensitivity: list[tuple[str, float]] = field(default_factory=list)
    stopped: str = ""
    failed: list[dict[str, str]] = field(default_factory=list)
    ranking_seconds: float | None = None
    finalists: dict[str, Any] | None = None  # the budget-meeting builds timed in turn, when more than one
    parallel: dict[str, Any] | None = None   # rounds built at once through trial_map, when it was set


# How rank_layers scores its layers: None scores them here, one after another; a cluster run sets a
# map(scorer, layer names) -> errors that scores them as parallel tasks (edgepack.cluster.ranking)
layer_map: ContextVar[Callable[["LayerScorer", list[str]], list[float]] | None] = ContextVar("layer_map", default=None)


# How search builds a round of independent candidates (the other calibration methods; the recovery
# recipes; the 1, 2, 4, ... layer counts; a short bisection's layer counts): None builds each one when the
# serial search reaches it; a cluster run sets a map(try_build, calls) -> one Trial or ToolchainError per
# call, that builds the whole round at once as parallel tasks (edgepack.cluster.trials). The search then
# walks the round in its serial order over those results, so it keeps the trials, and chooses the build,
# that the serial search would have; what it never reached is counted, not used.
Call = tuple[str, str, list[str], dict[str, Any]]  # step, calibration method, layers kept, extra (recipe)
trial_map: ContextVar[Callable[[Callable[..., Trial], list[Call]], list[Any]] | None] = ContextVar("trial_map",
                                                                                                  default=None)
SPECULATIVE_BISECT = 8  # a bisection over at most this many layer counts is built as one parallel round


@dataclass
class LayerScorer:
    """Scores one weighted layer quantized alone. It carries everything it needs (the prepared model's
    and ONNX Runtime's range file's bytes, the samples, the FP32 outputs), so it runs on any machine."""

    model: bytes
    ranges: Any            # the CalibrationTable fitted once on the prepared model
    range_file: bytes      # ONNX Runtime's own file of those ranges
    range_name: str
    nodes: list[str]
    subset: Any
    ref: list[np.ndarray]
    symmetric: bool

    def __call__(self, node: str, workdir: Path | None = None) -> float:
        import tempfile

        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="edgepack-rank-") as tmp:
                return self(node, Path(tmp))
        workdir.mkdir(parents=True, exist_ok=True)
        pre, rf = workdir / "pre.onnx", workdir / "calib" / self.range_name
        if not pre.is_file():
            pre.write_bytes(self.model)
        if not rf.is_file():
            rf.parent.mkdir(parents=True, exist_ok=True)
            rf.write_bytes(self.range_file)
        return _score(pre, (self.ranges, rf), self.nodes, node, self.subset, self.ref, workdir, self.symmetric)


def _outputs(path: Path, subset: Any) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [sess.run(None, s)[0] for s in subset]


def _score(pre: Path, ranges: Any, nodes: list[str], node: str, subset: Any, ref: list[np.ndarray], workdir: Path,
           symmetric: bool) -> float:
    from edgepack.stages import quantize_qdq

    out = workdir / f"only-{nodes.index(node)}.onnx"
    quantize_qdq.quantize(pre, out, subset, "minmax", workdir, symmetric_activations=symmetric,
                          exclude=[n for n in nodes if n != node], ranges=ranges)
    got = _outputs(out, subset)
    out.unlink(missing_ok=True)
    return float(np.mean([np.sum((g - r) ** 2) / max(float(np.sum(r ** 2)), 1e-12) for g, r in zip(got, ref)]))


def rank_layers(fp32_onnx: Path, calibration: Any, workdir: Path, samples: int = SENSITIVITY_SAMPLES,
                symmetric: bool = True, deadline: float | None = None,
                map: Callable[[LayerScorer, list[str]], list[float]] | None = None) -> list[tuple[str, float]]:
    """(node name, output error) for each weighted layer quantized alone, most sensitive first.

    The error is the mean relative squared error of the model's first output against FP32,
    ``||y_q - y||^2 / ||y||^2``, over ``samples`` calibration samples. Past ``deadline`` (a
    time.monotonic() value) the ranking stops after the layer in hand: the layers not ranked follow the
    ranked ones in graph order, with error NaN. ``map`` (default: :data:`layer_map`'s value) scores
    every layer at once, in parallel, with the same scorer: the same errors, so the same order; the
    deadline is then not checked between layers.
    """
    import onnx

    from edgepack.calibration.reader import SampleSet
    from edgepack.calibration.table import fit_ranges
    from edgepack.stages import quantize_qdq

    workdir.mkdir(parents=True, exist_ok=True)
    subset = SampleSet(calibration.samples[:samples], None, calibration.source)
    pre = quantize_qdq.preprocess(fp32_onnx, workdir / "pre.onnx")
    ranges = fit_ranges(pre, subset, "minmax", workdir / "calib")
    nodes = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in WEIGHTED_OPS]
    ref = _outputs(pre, subset)
    map = map or layer_map.get()
    if map is not None:
        scorer = LayerScorer(pre.read_bytes(), ranges[0], ranges[1].read_bytes(), ranges[1].name, nodes,
                             SampleSet([{k: np.array(v) for k, v in s.items()} for s in subset], None, subset.source),
                             ref, symmetric)
        return sorted(zip(nodes, (float(e) for e in map(scorer, nodes))), key=lambda t: -t[1])
    scores = []
    for node in nodes:
        if scores and deadline is not None and time.monotonic() > deadline:
            ranked = sorted(scores, key=lambda t: -t[1])
            return ranked + [(n, float("nan")) for n in nodes[len(scores):]]
        scores.append((node, _score(pre, ranges, nodes, node, subset, ref, workdir, symmetric)))
    return sorted(scores, key=lambda t: -t[1])


def pick(trials: list[Trial], time_in_turn: Callable[[list[Trial]], list[float]] | None = None
         ) -> tuple[Trial, dict[str, Any] | None]:
    """Accuracy first, then cost: of the trials that meet the budget, the fastest (``time_in_turn`` times
    them in one window and returns their p50s; else each trial's own p50); p50s within ``NEAR_TIE`` of the
    fastest are a tie that fewer layers in float, then accuracy, win. None meets it: the most accurate."""
    meeting = [t for t in trials if t.meets_budget]
    if not meeting:
        return max(trials, key=lambda t: goodness(t.accuracy)), None
    if len(meeting) == 1:
        return meeting[0], None
    timed = time_in_turn(meeting) if time_in_turn is not None else None
    p50 = timed or [t.p50_ms for t in meeting]
    fastest = min(p50)
    order = sorted(range(len(meeting)), key=lambda i: (p50[i] > fastest * (1 + NEAR_TIE), len(meeting[i].kept),
                                                       -goodness(meeting[i].accuracy), p50[i]))
    best = meeting[order[0]]
    return best, {"how": "timed in turn in one window" if timed else "each build's own host p50",
                  "p50_ms": {t.step: round(p, 4) for t, p in zip(meeting, p50)}, "chosen": best.step,
                  "near_tie": NEAR_TIE}


def search(plain: Trial, methods: list[str], try_build: Callable[..., Trial],
           rank: Callable[[float], list[tuple[str, float]]], max_minutes: float, max_steps: int,
           progress: Callable[[str], None], recipes: tuple[str, ...] | list[str] = (),
           time_in_turn: Callable[[list[Trial]], list[float]] | None = None,
           all_int8_only: tuple[str, ...] | list[str] = ALL_INT8_ONLY) -> TuningResult:
    """Run the search from the plain INT8 trial. ``try_build(step, method, kept[, recipe=...])`` compiles
    and scores (``recipe`` is passed for the recovery methods only); ``rank(deadline)`` ranks the layers,
    stopping at ``deadline``; ``time_in_turn`` times the builds that meet the budget in one window. The float
    fallback starts from the most accurate all-INT8 build whose recipe is not in ``all_int8_only``. With
    :data:`trial_map` set, each round's candidates are built at once (see there)."""
    deadline = time.monotonic() + max_minutes * 60
    trials = [plain]
    mapper = trial_map.get()
    prebuilt: dict[str, Any] = {}  # step -> Trial or ToolchainError, from a parallel round
    rounds: list[int] = []

    def steps_left() -> int:
        return max_steps - (len(trials) - 1)  # tuning trials after the plain build

    def out_of_budget(step: str = "") -> str:
        if steps_left() <= 0:
            return f"step cap ({max_steps}) reached"
        if step not in prebuilt and time.monotonic() > deadline:  # a result in hand is used, whatever the time
            return f"time cap ({max_minutes:g} min) reached"
        return ""

    def prebuild(calls: list[Call]) -> None:
        calls = calls[:steps_left()]
        if mapper is None or len(calls) < 2 or time.monotonic() > deadline:
            return
        progress(f"building {len(calls)} candidates at once: " + ", ".join(c[0] for c in calls))
        prebuilt.update(zip((c[0] for c in calls), mapper(try_build, calls)))
        rounds.append(len(calls))

    def build(step: str, method: str, kept: list[str], **extra: Any) -> Trial:
        if step in prebuilt:
            found = prebuilt.pop(step)
            if isinstance(found, BaseException):
                raise found
            return found
        return try_build(step, method, kept, **extra)

    failed: list[dict[str, str]] = []
    ranking_seconds: float | None = None

    def finish(stopped: str, sens=()) -> TuningResult:
        best, finalists = pick(trials, time_in_turn)
        par = {"rounds": rounds, "builds": sum(rounds), "not_reached": len(prebuilt),
               "how": "each round's candidates built at once; the serial order then walked over the results"}
        return TuningResult(best, trials, list(sens), stopped, failed, ranking_seconds, finalists,
                            par if rounds else None)

    def attempt(step: str, method: str, recipe: str = DEFAULT_RECIPE) -> Trial | None:
        progress(step)
        try:
            t = build(step, method, [], **({} if recipe == DEFAULT_RECIPE else {"recipe": recipe}))
        except ToolchainError as e:  # a method the toolchain cannot fit on this model is skipped, and said
            failed.append({"step": step, "error": e.message})
            progress(f"{step} failed: {e.message}")
            return None
        trials.append(t)
        return t

    if plain.meets_budget:
        return finish("plain INT8 met the budget")
    best_method = plain
    others = [m for m in methods if m != plain.method]
    prebuild([(f"calibration {m}", m, [], {}) for m in others])
    for m in others:
        if stop := out_of_budget(f"calibration {m}"):
            return finish(stop)
        t = attempt(f"calibration {m}", m)
        if t is None:
            continue
        if t.meets_budget:
            return finish(f"calibration method {m} met the budget")
        if goodness(t.accuracy) > goodness(best_method.accuracy):
            best_method = t
    prebuild([(f"recovery {r}", best_method.method, [], {} if r == DEFAULT_RECIPE else {"recipe": r})
              for r in recipes])
    fallback_from = best_method
    for r in recipes:  # INT8 recovery on every layer, before any layer is kept in float
        if stop := out_of_budget(f"recovery {r}"):
            return finish(stop)
        t = attempt(f"recovery {r}", best_method.method, r)
        if t is None:
            continue
        if t.meets_budget:
            return finish(f"recovery method {r} met the budget with every layer in INT8")
        if goodness(t.accuracy) > goodness(fallback_from.accuracy) and r not in all_int8_only:
            fallback_from = t
    best_method = fallback_from
    if stop := out_of_budget():
        return finish(stop)
    progress("ranking layer sensitivity")
    # the ranking may use half of the time left; the layers it has not reached come last
    t_rank = time.monotonic()
    sens = rank(time.monotonic() + (deadline - time.monotonic()) / 2)
    ranking_seconds = round(time.monotonic() - t_rank, 2)
    unranked = sum(1 for _, e in sens if e != e)
    if unranked:
        progress(f"ranking stopped at half the time left: {len(sens) - unranked} of {len(sens)} layers ranked")
    order = [name for name, _ in sens]
    method = best_method.method
    extra = {} if best_method.recipe == DEFAULT_RECIPE else {"recipe": best_method.recipe}
    counts, k = [], 1
    while k <= len(order):  # grow 1, 2, 4, ... until the budget holds
        counts.append(k)
        k = len(order) if k < len(order) < 2 * k else 2 * k
    prebuild([(f"keep {k} in float", method, order[:k], extra) for k in counts])
    lo, hi = 0, None
    for k in counts:
        if stop := out_of_budget(f"keep {k} in float"):
            return finish(stop, sens)
        progress(f"keeping {k} layer(s) in higher precision")
        t = build(f"keep {k} in float", method, order[:k], **extra)
        trials.append(t)
        if t.meets_budget:
            hi = k
            break
        lo = k
    if hi is None:
        return finish(f"budget not met even with all {len(order)} weighted layers in higher precision", sens)
    if 1 < hi - lo <= SPECULATIVE_BISECT + 1 and hi - lo - 1 <= steps_left():
        prebuild([(f"keep {m} in float", method, order[:m], extra) for m in range(lo + 1, hi)])
    while hi - lo > 1:  # bisect down to the fewest layers that still meet it
        mid = (lo + hi) // 2
        if stop := out_of_budget(f"keep {mid} in float"):
            return finish(stop, sens)
        progress(f"keeping {mid} layer(s) in higher precision")
        t = build(f"keep {mid} in float", method, order[:mid], **extra)
        trials.append(t)
        lo, hi = (lo, mid) if t.meets_budget else (mid, hi)
    return finish(f"budget met keeping {hi} layer(s) in higher precision", sens)
