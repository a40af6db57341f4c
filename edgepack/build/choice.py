"""Choosing the precision by measurement: a build is never slower than FP32 on the target's own runtime
unless the user forces its precision.

After the INT8 build is measured, its speed-up over FP32 on the same runtime (timed in turn) decides:
at or above ``MIN_GAIN`` it stays; below it, the candidates (INT8 on the weighted ops only, and FP32)
are built, scored on the evaluation set and timed in turn with it in one window, and the fastest one
that meets the accuracy budget is bundled (size breaks near-ties, or leads with ``objective: size``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact
from edgepack.build.context import BuildContext
from edgepack.build.plan import TargetPlan
from edgepack.build.search import Trials
from edgepack.errors import ToolchainError
from edgepack.measure.accuracy import drop
from edgepack.measure.latency import measure_in_turn
from edgepack.target import TargetProfile
from edgepack.tuning import Trial

MIN_GAIN = 1.0     # INT8 must be at least as fast as FP32 on the target's runtime to stay without a choice
NEAR_TIE = 0.03    # p50s within 3% are a tie: the smaller model wins it
WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def policy(profile: TargetProfile) -> str:
    """``fastest`` (the build chooses) or ``fixed`` (the profile's or project's precision is forced)."""
    return profile.select_precision


def gain(in_turn: dict[str, Any] | None) -> float | None:
    """The compiled model's speed-up over FP32 on the target's own runtime, timed in turn: against the
    FP32 model compiled for the target when one was built, else against the reference (FP32 on ONNX
    Runtime, which is the target's runtime when no separate FP32 build was made)."""
    if in_turn is None:
        return None
    return in_turn.get("speedup_p50_vs_target_fp32", in_turn["speedup_p50"])


def weighted_only(fp32_onnx: Path) -> list[str]:
    """Node names to keep in float so that only the weighted ops (conv, matmul, gemm) run in INT8."""
    import onnx

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    return [n.name for n in model.graph.node if n.name and n.op_type not in WEIGHTED_OPS]


def kept_note(p: TargetProfile, g: float | None, where: str) -> dict[str, Any]:
    """The record when INT8 stays without a search: it is fast enough, or the user forced it."""
    forced = policy(p) == "fixed"
    why = (f"precision {p.precision} is fixed by the profile or project (select_precision: fixed)" if forced else
           f"{p.precision} runs {g:.2f}x FP32's speed on {where} (timed in turn): at least {MIN_GAIN:.2f}x, so "
           "no other candidate was built")
    return {"policy": policy(p), "objective": p.objective, "chosen": p.precision, "speedup_vs_fp32": g,
            "why": why, "candidates": []}


def choose(ctx: BuildContext, plan: TargetPlan, trials: Trials, int8: Trial, int8_art: ModelArtifact,
           fp32_onnx: Path, threads: int) -> tuple[Trial, dict[str, Any]]:
    """Build INT8-on-weighted-ops and FP32, score them, time all of them in turn with the INT8 build
    (``int8_art``: its files where they are now), pick the fastest that meets the budget. Returns the
    pick and the manifest's ``precision_choice`` record."""
    profile, backend = plan.profile, plan.backend
    method = profile.quantization.calibration_method
    found: dict[str, tuple[Trial, ModelArtifact]] = {"int8": (int8, int8_art)}
    failed: list[dict[str, str]] = []
    weighted = sorted(set(int8.kept) | set(weighted_only(fp32_onnx)))
    for name, step, kept, precision in (("int8 weighted ops", "int8, weighted ops only", weighted, None),
                                        ("fp32", "fp32", [], "fp32")):
        ctx.progress(f"{profile.name}: building candidate {name}", "note", None, "")
        try:
            trial = trials(step, method, kept, precision=precision)
        except ToolchainError as e:
            failed.append({"candidate": name, "reason": e.message})
            continue
        if name != "fp32" and trial.compiled.digest == int8_art.digest:
            continue  # the backend already quantizes only the weighted ops: the same model
        found[name] = (trial, trial.compiled)
    runners = {n: backend.host_runner(a.path, threads)[0] for n, (_, a) in found.items()}
    m = profile.measurement
    lat, noise = measure_in_turn(runners, ctx.evaluation.samples[0], m.warmup_runs, max(m.runs, 200),
                                 m.max_seconds * 2, threads)
    ref_acc = trials.ref.accuracy
    rows = [{"candidate": n, "precision": a.precision, "accuracy": t.accuracy["value"],
             "drop_points": round(drop(ref_acc, t.accuracy), 3), "meets_budget": t.meets_budget,
             "p50_ms": lat[n]["p50_ms"], "p90_ms": lat[n]["p90_ms"], "size_bytes": a.size_bytes,
             **({"scored_on_samples": t.scored_on} if t.scored_on else {})}
            for n, (t, a) in found.items()]
    pick, runner_up, why = _pick(rows, profile.objective)
    return found[pick][0], {
        "policy": "fastest", "objective": profile.objective, "chosen": pick, "runner_up": runner_up,
        "speedup_vs_fp32": gain_of(rows, pick), "why": why, "candidates": rows, "failed": failed,
        "how": "each candidate compiled for the target, scored on the evaluation set, and timed in turn in one "
               "window with the others (" + lat["int8"]["how"]["interleaved"] + ")", "noise": noise,
    }


def gain_of(rows: list[dict[str, Any]], name: str) -> float | None:
    fp32 = next((r for r in rows if r["candidate"] == "fp32"), None)
    mine = next(r for r in rows if r["candidate"] == name)
    return round(fp32["p50_ms"] / mine["p50_ms"], 3) if fp32 else None


def _pick(rows: list[dict[str, Any]], objective: str) -> tuple[str, str | None, str]:
    ok = [r for r in rows if r["meets_budget"]] or [r for r in rows if r["candidate"] == "fp32"] or rows
    fastest = min(r["p50_ms"] for r in ok)
    smallest = min(r["size_bytes"] for r in ok)
    if objective == "size":
        key = lambda r: (r["size_bytes"], r["p50_ms"])  # noqa: E731
    elif objective == "balanced":
        key = lambda r: r["p50_ms"] / fastest + r["size_bytes"] / smallest  # noqa: E731
    else:  # latency: the fastest; within NEAR_TIE of it, the smallest
        key = lambda r: (r["p50_ms"] > fastest * (1 + NEAR_TIE), r["size_bytes"], r["p50_ms"])  # noqa: E731
    ranked = sorted(ok, key=key)
    best, second = ranked[0], (ranked[1]["candidate"] if len(ranked) > 1 else None)
    budget = "meets the accuracy budget" if best["meets_budget"] else "no candidate met the accuracy budget; FP32 kept"
    why = (f"{best['candidate']}: p50 {best['p50_ms']:.4g} ms, {best['size_bytes'] / 1e6:.3g} MB, {budget}"
           + (f"; runner-up {second}" if second else ""))
    return best["candidate"], second, why
