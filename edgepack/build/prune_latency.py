"""Pruning to a latency goal inside the build (``prune.target_latency`` / ``target_latency_ms``,
``--prune-latency``): the per-layer allocation is found from the target's own timings.

1. Latency table: the model pruned uniformly to a few widths, each compiled for the target (INT8 as
   it ships, calibrated on a few samples: ranges do not change the time) and profiled per layer on the
   target's runtime (OpenVINO performance counters, ONNX Runtime's profiler) or, where the host cannot
   run it, from the profile's roofline (labelled estimated). Cached by model digest and target.
2. Sensitivity: the accuracy each group's channels cost, with no training.
3. Greedy allocation to the goal (:func:`edgepack.stages.prune_search.allocate`); the candidate is
   pruned, compiled and timed in turn with the unpruned model. Short of the goal, the shortfall is
   taken off the predicted goal and the greedy continues from there (up to ``MAX_ROUNDS``). Every
   round is a point of the trade curve (measured latency ratio, FP32 accuracy before recovery).

Recovery (fine-tuning or distillation) then runs once on the chosen allocation, as for any prune."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edgepack.build.context import BuildContext, Stage
from edgepack.build.plan import plan_target
from edgepack.errors import ConfigError
from edgepack.measure import layer_times as lt
from edgepack.measure.host import host_info
from edgepack.measure.latency import measure_in_turn
from edgepack.stages import prune as pr
from edgepack.stages import prune_search as ps
from edgepack.target import TargetProfile

MAX_ROUNDS = 4
TOLERANCE = 0.03   # a measured ratio this far under the goal is close enough: no further round
# The accuracy budget bounds the search: the summed sensitivity (points lost before any recovery) may
# reach this many times acceptance.max_accuracy_drop. A heuristic from the example (three epochs of
# recovery): a summed sensitivity of about 9.5 came back to within 0.6 points, one of 23 lost 2.9.
RECOVERABLE = 12.0
LARGE = 5_000_000   # parameters: above this, sensitivity is measured at one share on 8 samples
TABLE_CALIBRATION_SAMPLES = 32
CACHE_ENV = "EDGEPACK_CACHE"
PROFILED = {"openvino": "OpenVINO per-layer performance counters (PERF_COUNT)",
            "onnxruntime": "ONNX Runtime node profiling (enable_profiling)"}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "edgepack")) / "latency-tables"


def _table_key(ctx: BuildContext, profile: TargetProfile, runtime: str, ignore: list[str], threads: int,
               round_to: int | None) -> str:
    src = ctx.source
    what = {"model": src.digest, "weights": src.weights_digest, "inputs": [i.model_dump() for i in ctx.project.inputs or []],
            "target": profile.name, "backend": profile.backend, "precision": profile.precision, "runtime": runtime,
            "threads": threads, "ignore": sorted(ignore), "round_to": round_to, "widths": list(ps.KEEP_SHARES),
            "host": host_info().get("cpu"), "schema": 4}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _layer_shares(before: dict[str, ps.Shape], module: Any) -> dict[str, tuple[float, float]]:
    after = ps.weighted_shapes(module)
    out = {}
    for n, b in before.items():
        a = after.get(n, b)
        o = a.cout / b.cout
        out[n] = (o if b.depthwise else o * a.cin / b.cin, o)
    return out


class Search:
    """One target's latency-goal search: compile and time candidates, keep the trade curve."""

    def __init__(self, ctx: BuildContext, module: Any, specs: list, names: list[str], profile: TargetProfile,
                 ignore: list[str]):
        self.ctx, self.module, self.specs, self.names, self.profile, self.ignore = ctx, module, specs, names, profile, ignore
        self.cfg = ctx.project.prune
        plan = plan_target(profile.name, profile)
        self.backend, self.options = plan.backend, plan.options
        self.mode = self.backend.name if self.backend.name in PROFILED else "estimate"
        self.threads = ctx.settings.threads or min(profile.measurement.threads, os.cpu_count() or 1)
        cal = ctx.calibration
        self.calibration = replace(cal, samples=cal.samples[:TABLE_CALIBRATION_SAMPLES], labels=None,
                                   indices=None, raw=None, texts=None)
        self.sample = ctx.evaluation.samples[0]
        self.workdir = ctx.scratch / f"prune-latency-{profile.name}"
        self.shapes = ps.weighted_shapes(module)
        self.n = 0

    def compiled(self, module: Any, tag: str) -> tuple[Any, Any]:
        """(exported ONNX, the target's compiled model) of ``module``; no compile when estimated."""
        from edgepack.stages.export_onnx import export

        self.n += 1
        d = self.workdir / f"{self.n:02d}-{tag}"
        art = export(module, self.specs, self.names, d / "onnx", self.profile.max_opset, self.ctx.source.digest,
                     dims=self.ctx.project.dims)
        if self.mode == "estimate":
            return art, None
        return art, self.backend.compile(art, self.profile, self.options, self.calibration, d / "compiled")

    def node_times(self, arts: list[Any], compiled: list[Any]) -> list[list[tuple[str, float]]]:
        """Per model, its nodes' times: the compiled models profiled in turn, or each estimated."""
        if self.mode == "openvino":
            return lt.openvino_times([c.path for c in compiled], self.sample, self.threads)
        if self.mode == "onnxruntime":
            return lt.onnxruntime_times([c.path for c in compiled], self.sample, self.threads)
        return [lt.estimated_times(a.path, self.profile.device, self.profile.precision) for a in arts]

    def table(self) -> tuple[ps.LatencyTable, Any, dict[str, Any]]:
        """The latency table (from the cache when this model was profiled on this target before) and the
        unpruned model compiled for the target (None when estimated)."""
        runtime = f"{self.backend.runtime_package} {self.ctx.toolchain.get(self.backend.runtime_package, '?')}"
        key = _table_key(self.ctx, self.profile, runtime, self.ignore, self.threads, self.cfg.round_to)
        path = cache_dir() / f"{key}.json"
        modules = {n for n, _ in self.module.named_modules()}
        note = {"key": key, "path": str(path), "widths": list(ps.KEEP_SHARES), "runtime": runtime,
                "calibration_samples": len(self.calibration)}
        if path.is_file():
            try:
                table = ps.LatencyTable.from_json(json.loads(path.read_text())["table"])
                _, unpruned = self.compiled(self.module, "unpruned")
                return table, unpruned, {**note, "cached": True}
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is measured again
        built = []
        for share in ps.KEEP_SHARES:
            m = self.module if share == 1.0 else pr.structured(
                self.module, self.specs, self.cfg.importance, self.ignore, round(1 - share, 4), None, None, None,
                self.cfg.round_to)[0]
            built.append((m, *self.compiled(m, f"width-{int(share * 100)}")))
        unpruned = built[0][2]
        times = self.node_times([b[1] for b in built], [b[2] for b in built])
        profiles = [(_layer_shares(self.shapes, m), lt.attribute(t, lt.onnx_layers(art.path, modules)))
                    for (m, art, _), t in zip(built, times)]
        source = (f"measured: {PROFILED[self.mode]} on this host" if self.mode in PROFILED else
                  f"estimated: roofline of {self.profile.name}'s spec-sheet peaks ({self.profile.precision}); "
                  f"{self.backend.runtime_package} does not run on this host")
        table = ps.table_from_profiles(profiles, source)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"what": note, "table": table.to_json()}))
            tmp.replace(path)
        except OSError:
            pass  # no cache: measured again next time
        return table, unpruned, {**note, "cached": False}

    def in_turn(self, unpruned: Any, candidate: Any) -> dict[str, float]:
        u, _ = self.backend.host_runner(unpruned.path, self.threads)
        p, _ = self.backend.host_runner(candidate.path, self.threads)
        m = self.profile.measurement
        lat, noise = measure_in_turn({"unpruned": u, "pruned": p}, self.sample, m.warmup_runs, max(m.runs, 300),
                                     m.max_seconds, self.threads)
        up, pp = lat["unpruned"]["p50_ms"], lat["pruned"]["p50_ms"]
        return {"unpruned_p50_ms": up, "pruned_p50_ms": pp, "ratio": round(pp / up, 4), "noisy": noise["noisy"]}


def _cost_fn(ctx: BuildContext, module: Any) -> tuple[Any, dict[str, Any]]:
    """Accuracy cost of a masked model on a slice of the evaluation set: points of top-1 lost (or of
    agreement with the unpruned model, without labels) plus ten times the logits' relative error."""
    ev = ctx.evaluation
    params = sum(p.numel() for p in module.parameters())
    n = min(len(ev), 512 if params < LARGE else 8)
    xs = {k: v[:n] for k, v in ev.stacked().items()}
    labels = ev.labels[:n] if ev.labels is not None else None
    ref = pr.evaluate(module, xs, labels, None)
    ref_logits = ref["logits"]
    scale = float(np.mean((ref_logits - ref_logits.mean(-1, keepdims=True)) ** 2)) or 1.0

    def cost(m: Any) -> float:
        got = pr.evaluate(m, xs, labels, ref_logits)
        rel = float(np.mean((got["logits"] - ref_logits) ** 2)) / scale
        base = ref["value"] if labels is not None else 100.0
        return max(0.0, base - got["value"]) + 10.0 * rel

    return cost, {"samples": n, "metric": ref["metric"],
                  "how": "each group's least important channels zeroed alone (75/50/25% kept; 50% alone for large models), "
                         "no training: points "
                         "of the metric lost plus 10x the logits' relative squared error"}


def next_goal(goal: float, points: list[tuple[float, float]]) -> float | None:
    """The predicted ratio to aim at next, from the (predicted, measured) pairs so far: interpolated
    between the two that bracket the goal, else extrapolated from the two nearest it (secant); the
    greedy walks the same path whatever the goal, so this searches along it for the measured goal."""
    below = [p for p in points if p[1] <= goal]
    above = [p for p in points if p[1] > goal]
    if below and above:
        lo, hi = max(below, key=lambda p: p[1]), min(above, key=lambda p: p[1])
    else:
        near = sorted(points, key=lambda p: abs(p[1] - goal))[:2]
        if len(near) < 2:
            return None
        lo, hi = near
    if abs(hi[1] - lo[1]) < 1e-6:
        return None
    aim = goal - TOLERANCE / 2
    return float(min(0.999, max(0.01, lo[0] + (aim - lo[1]) * (hi[0] - lo[0]) / (hi[1] - lo[1]))))


def _pinned(groups: list[ps.Group], layers: dict[str, float]) -> dict[str, int]:
    roots = {g.root: g for g in groups}
    bad = [n for n in layers if n not in roots]
    if bad:
        raise ConfigError(f"prune.layers: {bad} are not prunable group roots for a latency goal",
                          hint=f"group roots: {', '.join(list(roots)[:20])}")
    return {n: int(roots[n].channels * (1 - r)) for n, r in layers.items()}


def search(ctx: BuildContext, module: Any, specs: list, names: list[str], profile: TargetProfile,
           ignore: list[str]) -> tuple[Any, dict[str, Any]]:
    """Prune ``module`` to the latency goal on ``profile``'s target: (pruned module, prune record)."""
    cfg = ctx.project.prune
    s = Search(ctx, module, specs, names, profile, ignore)
    groups = ps.channel_groups(module, specs, ignore)
    if not groups:
        raise ConfigError("prune: no layer can be pruned (every group is under prune.ignore)",
                          hint="list fewer layers under prune.ignore")
    pinned = _pinned(groups, cfg.layers)
    with Stage(ctx.progress, f"latency table on {profile.name}") as st:
        table, unpruned, table_note = s.table()
        st.detail = f"{'cached' if table_note['cached'] else table.source.split(':')[0]}, {len(table.layers)} layers"
    full = ps.shares(groups, s.shapes, {})
    with Stage(ctx.progress, "layer sensitivity") as st:
        cost, cost_note = _cost_fn(ctx, module)
        big = sum(p.numel() for p in module.parameters()) >= LARGE  # one share per group, on fewer samples
        sens = ps.sensitivity(module, specs, ignore, cfg.importance, cost, (0.5,) if big else ps.KEEP_SHARES[1:])
        st.detail = f"{len(sens)} groups on {cost_note['samples']} samples"
    measured = s.mode != "estimate"
    if measured:
        base = s.in_turn(unpruned, unpruned)  # the window's own p50; overhead = p50 minus the profiled nodes
        unpruned_ms = base["unpruned_p50_ms"]
        table.overhead_ms = max(0.0, unpruned_ms - table.predict(full))
    else:
        unpruned_ms = table.predict(full)
    goal_ratio = cfg.target_latency if cfg.target_latency is not None else cfg.target_latency_ms / unpruned_ms
    # the search works in the table's own scale (profiled in another window than the one timed now):
    # a goal is a share of the table's unpruned prediction
    table_full = table.predict(full)
    budget = ctx.project.acceptance.max_accuracy_drop
    max_cost = RECOVERABLE * budget if budget is not None else None
    curve: list[dict[str, Any]] = [{"round": 0, "layers": {}, "predicted_ratio": 1.0, "measured_ratio": 1.0 if measured else None,
                                    "fp32_accuracy": None, "macs_removed": 0.0}]
    ev = ctx.evaluation
    ev_x, ev_y = ev.stacked(), ev.labels
    ref_logits = pr.evaluate(module, ev_x, ev_y, None)["logits"]
    tried: list[tuple[float, float, Any, dict, dict, Any]] = []   # (predicted, measured, module, record, point, alloc)
    pred_goal = goal_ratio
    for rnd in range(1, MAX_ROUNDS + 1):
        with Stage(ctx.progress, f"latency search round {rnd} (goal {goal_ratio:.2f}x)") as st:
            alloc = ps.allocate(groups, s.shapes, table, sens, pred_goal * table_full, None, pinned, cfg.round_to,
                                max_cost=max_cost)
            layers = ps.layer_ratios(groups, alloc.keep)
            if not layers:
                if tried:
                    break  # a later round with nothing to remove: keep what the earlier rounds found
                raise nothing_to_prune(alloc, goal_ratio, unpruned_ms, table_full, max_cost, profile.name)
            if any(t[4]["layers"] == layers for t in tried):
                st.detail = "the same allocation as an earlier round: the search ends"
                break
            pruned, record = pr.structured(module, specs, cfg.importance, ignore, None, None, None, layers, cfg.round_to)
            acc = pr.evaluate(pruned, ev_x, ev_y, ref_logits)["value"]
            predicted = alloc.predicted_ms / table_full
            point = {"round": rnd, "layers": layers, "predicted_ratio": round(predicted, 4),
                     "fp32_accuracy": acc, "macs_removed": record["macs_removed"]}
            if measured:
                _, comp = s.compiled(pruned, f"round-{rnd}")
                timed = s.in_turn(unpruned, comp)
                point.update(measured_ratio=timed["ratio"], unpruned_p50_ms=timed["unpruned_p50_ms"],
                             pruned_p50_ms=timed["pruned_p50_ms"], noisy=bool(timed["noisy"]))
            curve.append(point)
            ratio = point.get("measured_ratio", predicted)
            tried.append((predicted, ratio, pruned, record, point, alloc))
            st.detail = (f"{'measured' if measured else 'estimated'} {ratio:.3f}x, fp32 {acc:.2f}, "
                         f"{record['macs_removed']:.0%} of MACs removed")
            if not measured or goal_ratio - TOLERANCE <= ratio <= goal_ratio:
                break  # reached closely, or estimated (nothing to check)
            if ratio > goal_ratio and predicted > pred_goal + 1e-4:
                break  # short of the goal, and the greedy could not go further (widths or the accuracy cap)
            nxt = next_goal(goal_ratio, [(1.0, 1.0)] + [(t[0], t[1]) for t in tried])
            if nxt is None or any(abs(nxt - t[0]) < 0.005 for t in tried):
                break
            pred_goal = nxt
    # accuracy first: of the rounds that reached the goal, the most accurate before recovery (then the
    # fastest); none reached it: the fastest. Not the least pruned by measured ratio: rounds are timed in
    # their own windows, and on a busy host a more pruned round can measure slower than a less pruned one.
    ok = [t for t in tried if t[1] <= goal_ratio]
    _, _, pruned, record, point, alloc = (max(ok, key=lambda t: (t[4]["fp32_accuracy"], -t[1])) if ok
                                          else min(tried, key=lambda t: t[1]))
    reached = bool(ok)
    if not reached:
        ctx.warn(f"{profile.name}: prune.target_latency {goal_ratio:.2f}x not reached: "
                 f"{point.get('measured_ratio', point['predicted_ratio']):.3f}x after {len(curve) - 1} rounds "
                 "(the smallest widths the search allows); the bundle is built with that allocation")
    chosen = dict(point["layers"])
    record["layer_ratios"] = chosen
    record["latency_search"] = {
        "goal": {"target_latency": cfg.target_latency, "target_latency_ms": cfg.target_latency_ms,
                 "ratio": round(goal_ratio, 4), "unpruned_p50_ms": round(unpruned_ms, 5)},
        "target": profile.name, "estimated": not measured, "reached": reached,
        "table": {**table_note, "source": table.source, "layers": len(table.layers), "overhead_ms": round(table.overhead_ms, 5)},
        "accuracy_cap": {"max_cost": max_cost, "how": f"summed sensitivity at most {RECOVERABLE:g}x "
                                                     "acceptance.max_accuracy_drop (none without it)"},
        "sensitivity": {**cost_note, "points": {k: [[a, round(b, 3)] for a, b in v] for k, v in sens.items()}},
        "pinned": dict(cfg.layers),
        "allocation": {g.root: [g.channels, alloc.keep.get(g.root, g.channels)] for g in groups},
        "trade_curve": curve, "greedy_steps": len(alloc.path) - 1,
        "greedy_path": [{"predicted_ratio": round(p["predicted_ms"] / table_full, 4), "cost": p["cost"],
                         **({"group": p["group"], "keep": p["keep"]} if "group" in p else {})}
                        for p in alloc.path[:: max(1, len(alloc.path) // 30)]],
        "how": "greedy over the latency table: each step removes the channels that save the most predicted time "
               "per unit of accuracy cost, until the predicted goal; each round's allocation pruned, compiled and "
               "timed in turn with the unpruned model; the next round's predicted goal is interpolated (secant) "
               "from the measured ones, until one lands within "
               f"{TOLERANCE} under the goal or an allocation repeats; of the rounds that reached the goal, the "
               "most accurate before recovery (then the fastest) is kept, else the fastest round"}
    record["latency_search"]["layers_block"] = write_layers_block(ctx, profile, chosen, ignore)
    return pruned, record


def nothing_to_prune(alloc: ps.Allocation, goal_ratio: float, unpruned_ms: float, table_full: float,
                     max_cost: float | None, target: str) -> ConfigError:
    """Why the first round's allocation removes no channel, as the error that says so."""
    if goal_ratio >= 1.0:
        return ConfigError(f"prune: the latency goal {goal_ratio:.2f}x is met unpruned "
                           f"({unpruned_ms:.4g} ms p50 on {target})", hint="lower the goal")
    if alloc.capped and alloc.lowest_ms >= table_full:
        return ConfigError(f"prune: no channel of any layer can be removed within the accuracy cap on {target} "
                           f"(summed sensitivity at most {max_cost:g}: {RECOVERABLE:g}x acceptance.max_accuracy_drop)",
                           hint="raise acceptance.max_accuracy_drop, or set prune.layers by hand")
    saved = max(0.0, 1.0 - alloc.lowest_ms / table_full) if table_full > 0 else 0.0
    if alloc.capped:
        where, why = "as far as the accuracy cap lets the layers narrow", "raise acceptance.max_accuracy_drop, "
    else:
        where, why = "with every prunable layer at its narrowest", "the runtime's fixed costs dominate this model; "
    return ConfigError(f"prune: the latency goal {goal_ratio:.2f}x is out of pruning's reach on {target}: the latency "
                       f"table predicts {saved:.1%} of the time saved {where}, under the {ps.SLACK:.0%} worth its "
                       f"accuracy cost ({unpruned_ms:.4g} ms p50 unpruned)",
                       hint=why + "drop prune.target_latency, or prune by MACs (prune.target_macs)")


def write_layers_block(ctx: BuildContext, profile: TargetProfile, layers: dict[str, float], ignore: list[str]) -> str:
    """The chosen allocation as a ``prune`` block beside the bundles, to pin and review (returns its name)."""
    cfg = ctx.project.prune
    block: dict[str, Any] = {"method": "structured", "importance": cfg.importance, "ignore": list(ignore),
                             "layers": dict(layers)}
    if cfg.round_to:
        block["round_to"] = cfg.round_to
    if cfg.finetune:
        block["finetune"] = cfg.finetune.model_dump(exclude_none=True)
    path = ctx.out / f"{ctx.project.name}-{ctx.project.version}-{profile.name}.prune.yaml"
    path.write_text(f"# found by the latency search for {profile.name} (goal "
                    f"{cfg.target_latency or str(cfg.target_latency_ms) + ' ms'}); paste over the project's prune "
                    "block to pin it\n" + yaml.safe_dump({"prune": block}, sort_keys=False))
    return path.name
