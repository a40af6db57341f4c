"""Pruning to a latency goal: which channels of which layer group to remove so that the model runs
at the goal on the target, losing as little accuracy as possible.

The pieces, all on the PyTorch model:

- :func:`channel_groups`: torch-pruning's dependency groups (each a set of layers whose output, and
  input, channels must shrink together), named by their root layer.
- :class:`LatencyTable`: per layer, time against the share of its weights kept, measured on the
  target's runtime at a few uniform widths (see :mod:`edgepack.build.prune_latency`) and interpolated;
  predicts any allocation's latency.
- :func:`sensitivity`: per group, the accuracy lost when its least important channels are removed
  (zeroed, which is what removing them does to the layers downstream), at a few shares, no training.
- :func:`allocate`: greedy over the table (NetAdapt's criterion without its per-step training): each
  step takes one step of channels from the group that buys the most predicted latency per unit of
  accuracy lost, until the predicted latency reaches the goal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepack.artifact import TensorSpec
from edgepack.errors import MissingDependencyError
from edgepack.loaders.torch import example_inputs, require_torch
from edgepack.stages.prune import find_modules

KEEP_SHARES = (1.0, 0.75, 0.5, 0.25)   # uniform widths the table is measured at, and sensitivity shares
MAX_JUMP = 4   # the greedy also looks this many steps ahead in one group
SLACK = 0.02   # a goal out of reach: the first allocation within this share of the unpruned time of the last


@dataclass
class Group:
    root: str                 # the layer torch-pruning roots the group at: the name prune.layers uses
    channels: int
    out_layers: list[str] = field(default_factory=list)   # weighted layers whose output channels these are
    in_layers: list[str] = field(default_factory=list)    # weighted layers that read them


@dataclass(frozen=True)
class Shape:
    cout: int
    cin: int
    depthwise: bool


def _tp() -> Any:
    try:
        import torch_pruning
    except ImportError as e:
        raise MissingDependencyError("torch-pruning", "prune", "structured pruning") from e
    return torch_pruning


def weighted_shapes(module: Any) -> dict[str, Shape]:
    torch = require_torch()
    out = {}
    for name, m in module.named_modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
            out[name] = Shape(m.out_channels, m.in_channels, m.groups > 1 and m.groups == m.in_channels == m.out_channels)
        elif isinstance(m, torch.nn.Linear):
            out[name] = Shape(m.out_features, m.in_features, False)
    return out


def _graph(module: Any, specs: list[TensorSpec], ignore: list[str]) -> tuple[Any, list[Any]]:
    tp, torch = _tp(), require_torch()
    dg = tp.DependencyGraph().build_dependency(module, example_inputs(specs))
    ignored = find_modules(module, ignore, "ignore")
    groups = list(dg.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.Conv2d, torch.nn.Conv1d,
                                                                               torch.nn.Linear]))
    return dg, groups


def channel_groups(module: Any, specs: list[TensorSpec], ignore: list[str]) -> list[Group]:
    """The prunable groups, in graph order. Every layer that ``ignore`` names keeps its channels."""
    dg, groups = _graph(module, specs, ignore)
    names = {id(m): n for n, m in module.named_modules()}
    shapes = weighted_shapes(module)
    out = []
    for g in groups:
        root = g[0].dep.target.module
        grp = Group(names[id(root)], int(dg.get_out_channels(root)))
        for dep, _ in g:
            n = names.get(id(dep.target.module))
            if n not in shapes:
                continue
            side = grp.out_layers if dg.is_out_channel_pruning_fn(dep.handler) else grp.in_layers
            if n not in side:
                side.append(n)
        out.append(grp)
    return out


def shares(groups: list[Group], shapes: dict[str, Shape], keep: dict[str, int]) -> dict[str, tuple[float, float]]:
    """Per weighted layer: (share of its weights kept, share of its output channels kept) under ``keep``."""
    out_share = {n: 1.0 for n in shapes}
    in_share = {n: 1.0 for n in shapes}
    for g in groups:
        s = keep.get(g.root, g.channels) / g.channels
        for n in g.out_layers:
            out_share[n] = s
        for n in g.in_layers:
            in_share[n] = s
    return {n: (out_share[n] if sh.depthwise else out_share[n] * in_share[n], out_share[n]) for n, sh in shapes.items()}


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear through the points, extended by the end segments' slopes (never below 0)."""
    order = np.argsort(xs)
    xs_, ys_ = np.asarray(xs, float)[order], np.asarray(ys, float)[order]
    if len(xs_) == 1:
        return float(ys_[0]) * x / xs_[0] if xs_[0] > 0 else float(ys_[0])
    if x < xs_[0]:
        slope = (ys_[1] - ys_[0]) / max(xs_[1] - xs_[0], 1e-9)
        return max(0.0, float(ys_[0] - slope * (xs_[0] - x)))
    return max(0.0, float(np.interp(x, xs_, ys_)))


@dataclass
class LatencyTable:
    """Per layer, (share of weights kept, ms) points; per layer the ops that follow it (pooling,
    activations, reorders) against its output share; and what runs before the first layer."""
    # (``_lines``/``_extra_lines``: the fitted lines, set after init)

    layers: dict[str, list[tuple[float, float]]]
    extra: dict[str, list[tuple[float, float]]]
    fixed_ms: float
    source: str                     # "measured: ..." or "estimated: ..."
    overhead_ms: float = 0.0        # the runtime call's cost outside the profiled nodes (p50 minus the node sum)

    def __post_init__(self) -> None:
        self._lines = {k: fit_line(v) for k, v in self.layers.items()}
        self._extra_lines = {k: fit_line(v) for k, v in self.extra.items()}

    def predict(self, layer_shares: dict[str, tuple[float, float]]) -> float:
        """Each layer's time is a line in the share of its weights kept (the ops after it: in the share
        of its outputs kept), fitted to the measured widths (:func:`fit_line`)."""
        t = self.fixed_ms + self.overhead_ms
        for name, (w, o) in layer_shares.items():
            if name in self._lines:
                a, b = self._lines[name]
                t += max(0.0, a + b * w)
            if name in self._extra_lines:
                a, b = self._extra_lines[name]
                t += max(0.0, a + b * o)
        return t

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "fixed_ms": round(self.fixed_ms, 5), "overhead_ms": round(self.overhead_ms, 5),
                "fit": "ms = a + b * share kept, Theil-Sen over the measured widths",
                "lines": {k: [round(a, 6), round(b, 6)] for k, (a, b) in self._lines.items()},
                "layers": {k: [[round(a, 4), round(b, 5)] for a, b in v] for k, v in self.layers.items()},
                "extra": {k: [[round(a, 4), round(b, 5)] for a, b in v] for k, v in self.extra.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        return cls({k: [tuple(p) for p in v] for k, v in d["layers"].items()},
                   {k: [tuple(p) for p in v] for k, v in d["extra"].items()},
                   d["fixed_ms"], d["source"], d.get("overhead_ms", 0.0))


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """``(a, b)`` of ``ms = a + b * share``, robust to one point in four thrown off by a busy host:
    Theil-Sen (the median of the pairwise slopes, never negative: a narrower layer is taken to be never
    slower) and the median intercept."""
    if len(points) < 2:
        return (0.0, points[0][1]) if points else (0.0, 0.0)
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1:]
              if abs(x2 - x1) > 1e-9]
    b = max(0.0, float(np.median(slopes))) if slopes else 0.0
    a = float(np.median([y - b * x for x, y in points]))
    return a, b


def table_from_profiles(profiles: list[tuple[dict[str, tuple[float, float]], dict[str, Any]]], source: str) -> LatencyTable:
    """``profiles``: per measured width, (each layer's shares there, :func:`layer_times.attribute`'s result)."""
    layers: dict[str, list[tuple[float, float]]] = {}
    extra: dict[str, list[tuple[float, float]]] = {}
    for layer_shares, att in profiles:
        for name, (w, o) in layer_shares.items():
            if name in att["layers"]:
                layers.setdefault(name, []).append((w, att["layers"][name]))
            if name in att["extra"]:
                extra.setdefault(name, []).append((o, att["extra"][name]))
    fixed = float(np.median([att["fixed_ms"] for _, att in profiles]))
    return LatencyTable(layers, extra, fixed, source)


def _zeroed(group: Any, idxs: list[int], dg: Any) -> list[tuple[Any, Any, Any]]:
    """Zero the output channels ``idxs`` of every layer (and norm) of the group; return what to restore."""
    torch = require_torch()
    saved = []
    with torch.no_grad():
        for dep, _ in group:
            if not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            m = dep.target.module
            for attr in ("weight", "bias"):
                p = getattr(m, attr, None)
                if isinstance(p, torch.Tensor) and p.dim() >= 1 and p.shape[0] > max(idxs):
                    saved.append((p, idxs, p[idxs].clone()))
                    p[idxs] = 0
    return saved


def sensitivity(module: Any, specs: list[TensorSpec], ignore: list[str], importance: str,
                cost: Callable[[Any], float], shares_: tuple[float, ...] = KEEP_SHARES[1:],
                budget_s: float = 120.0) -> dict[str, list[tuple[float, float]]]:
    """Per group root: (share kept, accuracy cost) points, each with only that group's least important
    channels removed (zeroed) and ``cost(module)`` measured. Stops measuring at ``budget_s``: groups
    left get the median cost of those measured at each share."""
    import time

    tp, torch = _tp(), require_torch()
    dg, groups = _graph(module, specs, ignore)
    names = {id(m): n for n, m in module.named_modules()}
    imp_fn = tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2)
    out: dict[str, list[tuple[float, float]]] = {}
    t0 = time.perf_counter()
    module.eval()
    for g in groups:
        root = names[id(g[0].dep.target.module)]
        if time.perf_counter() - t0 > budget_s:
            break
        with torch.no_grad():
            imp = imp_fn(g)
        if imp is None:
            continue
        order = torch.argsort(imp).tolist()
        c = len(order)
        pts = [(1.0, 0.0)]
        for s in shares_:
            drop = order[: c - max(1, int(c * s))]
            if not drop:
                continue
            saved = _zeroed(g, drop, dg)
            try:
                pts.append((s, max(0.0, float(cost(module)))))
            finally:
                with torch.no_grad():
                    for p, idxs, vals in saved:
                        p[idxs] = vals
        out[root] = pts
    return out


def _sens_cost(points: list[tuple[float, float]] | None, share: float, fallback: float) -> float:
    if not points:
        return fallback * (1 - share)
    return _interp(share, [p[0] for p in points], [p[1] for p in points])


@dataclass
class Allocation:
    keep: dict[str, int]
    predicted_ms: float
    cost: float
    path: list[dict[str, float]]
    lowest_ms: float   # the lowest prediction the greedy reached (before stepping back near the end)
    capped: bool       # a step was refused for the accuracy cap


def step_of(g: Group, round_to: int | None) -> int:
    return max(round_to or 1, math.ceil(g.channels / 16))


def allocate(groups: list[Group], shapes: dict[str, Shape], table: LatencyTable,
             sens: dict[str, list[tuple[float, float]]], goal_ms: float, start: dict[str, int] | None = None,
             pinned: dict[str, int] | None = None, round_to: int | None = None, min_share: float = 1 / 16,
             max_cost: float | None = None) -> Allocation:
    """Greedy: from ``start`` (default: every channel kept), remove one step of channels at a time
    from the group with the most predicted latency saved per unit of accuracy cost (plus a small
    constant, so free steps go by latency), until the prediction reaches ``goal_ms`` or no step saves
    time, or every step left would take the summed accuracy cost over ``max_cost``. ``pinned`` groups
    keep the given channel count."""
    pinned = pinned or {}
    keep = {g.root: pinned.get(g.root, g.channels) for g in groups}
    keep.update({k: v for k, v in (start or {}).items() if k not in pinned})
    known = [p[-1][1] for p in sens.values() if p]
    fallback = float(np.median(known)) if known else 1.0

    def total_cost(k: dict[str, int]) -> float:
        return sum(_sens_cost(sens.get(g.root), k[g.root] / g.channels, fallback) for g in groups)

    pred = table.predict(shares(groups, shapes, keep))
    cost = total_cost(keep)
    path = [{"predicted_ms": round(pred, 5), "cost": round(cost, 4)}]
    eps = 0.05
    history = [(dict(keep), pred, cost)]
    capped = False
    while pred > goal_ms:
        best = None
        for g in groups:
            if g.root in pinned:
                continue
            step = step_of(g, round_to)
            floor = max(step if round_to else 1, math.ceil(g.channels * min_share))
            new = keep[g.root]
            here = _sens_cost(sens.get(g.root), keep[g.root] / g.channels, fallback)
            for _ in range(MAX_JUMP):  # a few steps at once too: a table is not always monotone in width
                new -= step
                if round_to:
                    new -= new % round_to
                if new < floor:
                    break
                p = table.predict(shares(groups, shapes, {**keep, g.root: new}))
                gain = pred - p
                if gain <= 0:
                    continue
                dc = max(0.0, _sens_cost(sens.get(g.root), new / g.channels, fallback) - here)
                if max_cost is not None and cost + dc > max_cost:
                    capped = True
                    break
                score = gain / (dc + eps)
                if best is None or score > best[0]:
                    best = (score, g.root, new, p)
        if best is None:
            break
        _, root, new, pred = best
        keep[root] = new
        cost = total_cost(keep)
        path.append({"predicted_ms": round(pred, 5), "cost": round(cost, 4), "group": root, "keep": new})
        history.append((dict(keep), pred, cost))
    lowest = pred
    if pred > goal_ms:  # out of reach: the last steps bought little time at much accuracy; stop near the end
        slack = SLACK * history[0][1]
        keep, pred, cost = next(h for h in history if h[1] <= pred + slack)
        path = path[: next(i for i, h in enumerate(history) if h[1] <= history[-1][1] + slack) + 1]
    return Allocation(keep, pred, cost, path, lowest, capped)


def layer_ratios(groups: list[Group], keep: dict[str, int]) -> dict[str, float]:
    """``prune.layers`` for an allocation: each pruned group's root -> share of its channels removed,
    written so that torch-pruning (which keeps ``int(C * (1 - ratio))``) keeps exactly ``keep``."""
    out = {}
    for g in groups:
        k = keep.get(g.root, g.channels)
        if k >= g.channels:
            continue
        r = round((g.channels - k) / g.channels, 4)
        while int(g.channels * (1 - r)) < k and r > 0:
            r = round(r - 0.0001, 4)
        while int(g.channels * (1 - r)) > k:
            r = round(r + 0.0001, 4)
        out[g.root] = r
    return out
