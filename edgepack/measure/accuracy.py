"""Accuracy metrics. ``top1`` for labelled classification; ``fidelity`` against FP32 outputs. ``run_all``
runs a model over a set: here, or inside a cluster build task in shards as parallel tasks (merged in
sample order, then scored once on the whole set)."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ModelError

SHARD_SAMPLES = 256  # samples per shard when a large set runs as parallel tasks (>= 2 shards' worth)


@dataclass(frozen=True)
class ModelFiles:
    """What a shard task needs to load the very model ``runner`` runs: the backend (``host_runner``), the
    model file, every file it needs, and the folder they are relative to."""

    backend: str
    path: Path
    files: tuple[Path, ...]
    root: Path


@dataclass(frozen=True)
class Sharding:
    """``run(model, samples, shard_samples)`` -> the outputs of every sample in order, run in shards as
    parallel tasks (:mod:`edgepack.cluster.evaluation`); a cluster build task sets it for its build."""

    run: Callable[[ModelFiles, list, int], list[list[np.ndarray]]]
    shard_samples: int = SHARD_SAMPLES


sharding: ContextVar[Sharding | None] = ContextVar("sharding", default=None)


def run_all(runner, samples, model: ModelFiles | None = None) -> list[list[np.ndarray]]:
    """``runner``'s outputs on each sample, in order. With ``model`` (what ``runner`` runs) and
    :data:`sharding` set (inside a cluster build task), a set of at least two shards runs as shards in
    parallel tasks and is merged in sample order: the same outputs, so the score is computed once, on
    counts over the whole set. Otherwise (no cluster, or a small set) here, one sample after another."""
    shard = sharding.get() if model is not None else None
    if shard is not None and len(samples) >= 2 * shard.shard_samples:
        return shard.run(model, list(samples), shard.shard_samples)
    return [runner.run(s) for s in samples]


def check_finite(outputs: list[list[np.ndarray]], data, names: list[str] | None = None) -> None:
    """Refuse NaN/Inf in the FP32 model's outputs on real samples (``data``, a SampleSet): every accuracy
    figure and calibration range made from them would be meaningless."""
    for j, outs in enumerate(outputs):
        for k, o in enumerate(outs):
            o = np.asarray(o)
            if o.dtype.kind in "fc" and not np.isfinite(o).all():
                what = "NaN" if np.isnan(o).any() else "Inf"
                i = data.indices[j] if getattr(data, "indices", None) else j
                name = names[k] if names and k < len(names) else str(k)
                raise ModelError(f"the model's outputs hold {what} (output '{name}') on sample {i} of {data.source}",
                                 hint="the data is finite, so the model makes it: check the weights and forward() "
                                      "for log/sqrt/division of values that can be zero or negative")


def top1(outputs: list[list[np.ndarray]], labels: list[int]) -> dict:
    pred = np.array([int(np.argmax(o[0].reshape(-1))) for o in outputs])
    correct = int((pred == np.asarray(labels)).sum())
    return {"metric": "top1", "value": round(100.0 * correct / len(labels), 3), "unit": "percent",
            "correct": correct, "samples": len(labels)}


def fidelity(outputs: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> dict:
    agree, cos = 0, []
    for o, r in zip(outputs, reference):
        a, b = o[0].reshape(-1).astype(np.float64), r[0].reshape(-1).astype(np.float64)
        agree += int(np.argmax(a) == np.argmax(b))
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cos.append(float(a @ b / denom) if denom > 0 else 1.0)
    n = len(outputs)
    return {"metric": "fidelity", "value": round(100.0 * agree / n, 3), "unit": "percent top-1 agreement with FP32",
            "top1_agreement": round(agree / n, 5), "cosine_mean": round(float(np.mean(cos)), 6),
            "cosine_min": round(float(np.min(cos)), 6), "samples": n}


def score(metric, outputs, labels, reference) -> dict:
    """``metric``: a MetricPlan (per output), or the name of a metric on the first output."""
    if isinstance(metric, MetricPlan):
        return metric.score(outputs, labels, reference)
    if metric == "top1":
        return top1(outputs, labels)
    return fidelity(outputs, reference)


# ---- metrics per output -------------------------------------------------------------------------
# A plan says which metric scores which output and which one gates (the budget, tuning, the exit code).
# `top1` needs labels; every other built-in compares with the FP32 reference's outputs, so it measures
# what quantization changed. The form of `fidelity` is picked from the output's shape and stated.

BUILTIN = ("top1", "fidelity", "iou", "mae", "rmse")
LOWER_IS_BETTER = ("mae", "rmse")


@dataclass(frozen=True)
class Entry:
    output: str
    index: int
    metric: str
    threshold: float = 0.5
    gate: bool = False
    fn: Any = None  # a user's file.py:function


@dataclass
class MetricPlan:
    entries: list[Entry]

    @property
    def headline(self) -> str:
        return next(e for e in self.entries if e.gate).metric

    def score(self, outputs, labels, reference) -> dict:
        per = [_score_entry(e, outputs, labels, reference) for e in self.entries]
        gate = next(i for i, e in enumerate(self.entries) if e.gate)
        return {**per[gate], "per_output": per} if len(per) > 1 else dict(per[0])

    def describe(self) -> list[dict]:
        return [{"output": e.output, "metric": e.metric, "gate": e.gate,
                 **({"threshold": e.threshold} if e.metric == "iou" else {})} for e in self.entries]


def plan(spec, output_names: list[str], has_labels: bool, root: Path, where: str) -> MetricPlan:
    """``spec`` (edgepack.yaml's evaluation.metric: a name, a list of {output, metric, threshold, gate},
    or None) -> a plan over the model's outputs. A name alone scores every output: `top1` on the first
    (it gates) and fidelity on the others; `fidelity` on each, the first gating."""
    from edgepack.errors import ConfigError

    if spec is None or isinstance(spec, str):
        name = spec or ("top1" if has_labels else "fidelity")
        entries = [Entry(o, i, name if i == 0 else "fidelity", gate=i == 0) for i, o in enumerate(output_names)]
    else:
        entries = []
        for k, item in enumerate(spec):
            out = item.output or output_names[0]
            if out not in output_names:
                from edgepack.errors import did_you_mean

                raise ConfigError(f"{where}: key 'evaluation.metric.{k}.output': the model has no output '{out}'",
                                  hint=did_you_mean(out, output_names))
            fn = None
            if item.metric not in BUILTIN:
                from edgepack.calibration.reader import import_callable

                fn = import_callable(item.metric, root, f"{where}: evaluation.metric.{k}")
                if not callable(fn):
                    raise ConfigError(f"{where}: key 'evaluation.metric.{k}': {item.metric} is not a function")
            entries.append(Entry(out, output_names.index(out), item.metric, item.threshold, item.gate, fn))
        if not any(e.gate for e in entries):
            entries[0] = Entry(**{**entries[0].__dict__, "gate": True})
    if any(e.metric == "top1" for e in entries) and not has_labels:
        raise ConfigError(f"{where}: key 'evaluation.metric': top1 needs labels, but the evaluation data has none",
                          hint="add labels to the data, or use metric: fidelity")
    return MetricPlan(entries)


def drop(ref: dict, got: dict) -> float:
    """How much worse ``got`` is than ``ref`` in the metric's own units (positive = worse)."""
    d = ref["value"] - got["value"]
    return round(-d if not ref.get("higher_is_better", True) else d, 6)


def goodness(a: dict) -> float:
    """A value to maximise: the metric's value, negated for error metrics."""
    return a["value"] if a.get("higher_is_better", True) else -a["value"]


def _outs(outputs, index: int) -> list[np.ndarray]:
    return [np.asarray(o[index]) for o in outputs]


def form_of(sample_output: np.ndarray) -> str:
    """How `fidelity` scores an output, from one sample's output (batch dim included, size 1)."""
    a = np.asarray(sample_output)
    squeezed = [d for d in a.shape if d != 1]
    if a.size == 1:
        return "value"
    if len(squeezed) == 1:
        return "scores"
    if a.ndim == 4 and a.shape[0] == 1:
        return "map"
    if len(squeezed) == 2:
        return "sequence"
    return "values"


def _score_entry(e: Entry, outputs, labels, reference) -> dict:
    got, ref = _outs(outputs, e.index), _outs(reference, e.index)
    base = {"output": e.output, "samples": len(got)}
    if e.fn is not None:
        res = e.fn(got, list(labels) if labels is not None else None, ref)
        res = res if isinstance(res, dict) else {"value": res}
        try:
            value = float(res["value"])
        except (KeyError, TypeError, ValueError) as err:
            from edgepack.errors import ConfigError

            raise ConfigError(f"evaluation metric {e.metric} returned {res!r}; expected a number or "
                              "{'value': number, 'higher_is_better': bool}") from err
        return {**base, "metric": e.metric, "value": round(value, 6), "unit": res.get("unit", "user metric"),
                "higher_is_better": bool(res.get("higher_is_better", True)), "form": "user function"}
    if e.metric == "top1":
        return {**base, **top1([[g] for g in got], labels), "output": e.output, "higher_is_better": True,
                "form": "top-1 over the output's class scores (labels)"}
    if e.metric == "iou":
        return {**base, **_iou(got, ref, e.threshold), "higher_is_better": True}
    if e.metric in LOWER_IS_BETTER:
        err = [np.asarray(g, np.float64) - np.asarray(r, np.float64) for g, r in zip(got, ref)]
        flat = np.concatenate([x.reshape(-1) for x in err]) if err else np.zeros(1)
        value = float(np.mean(np.abs(flat))) if e.metric == "mae" else float(np.sqrt(np.mean(flat ** 2)))
        return {**base, "metric": e.metric, "value": round(value, 8), "unit": "output units, vs FP32",
                "higher_is_better": False, "form": f"{e.metric} of every element against the FP32 outputs"}
    return {**base, **_fidelity(got, ref)}


def _fidelity(got: list[np.ndarray], ref: list[np.ndarray]) -> dict:
    """Fidelity of one output against FP32. Always recorded: cosine, SNR, max abs/rel error. The value
    (percent, higher is better) depends on the form: scores -> top-1 agreement; sequence -> per-position
    top-1 agreement (last axis); map -> per-pixel agreement (channel axis) or, for a one-channel map in
    [0, 1], mean IoU of the masks at 0.5; value -> share of samples within 1% of the output's range."""
    g64 = [np.asarray(g, np.float64) for g in got]
    r64 = [np.asarray(r, np.float64) for r in ref]
    form = form_of(r64[0]) if r64 else "value"
    form = "values" if form == "value" else form
    flat_g = np.concatenate([g.reshape(-1) for g in g64])
    flat_r = np.concatenate([r.reshape(-1) for r in r64])
    err = flat_g - flat_r
    noise = float(np.mean(err ** 2))
    snr = 120.0 if noise == 0 else float(10 * np.log10(max(np.mean(flat_r ** 2), 1e-30) / noise))
    span = float(flat_r.max() - flat_r.min()) if flat_r.size else 0.0
    cos = []
    for g, r in zip(g64, r64):
        a, b = g.reshape(-1), r.reshape(-1)
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        cos.append(float(a @ b / denom) if denom > 0 else float(np.array_equal(a, b)))
    rec = {"metric": "fidelity", "unit": "percent", "higher_is_better": True,
           "cosine_mean": round(float(np.mean(cos)), 6), "cosine_min": round(float(np.min(cos)), 6),
           "snr_db": round(min(snr, 120.0), 3), "max_abs_error": round(float(np.max(np.abs(err))), 8),
           "max_rel_error": round(float(np.max(np.abs(err) / np.maximum(np.abs(flat_r), 1e-12))), 6)}
    n = len(g64)
    if form == "scores":
        agree = sum(int(np.argmax(g.reshape(-1)) == np.argmax(r.reshape(-1))) for g, r in zip(g64, r64))
        rec.update(value=round(100.0 * agree / n, 3), top1_agreement=round(agree / n, 5),
                   form="scores: top-1 agreement with FP32")
    elif form == "sequence":
        same = [float(np.mean(np.argmax(np.squeeze(g), -1) == np.argmax(np.squeeze(r), -1)))
                for g, r in zip(g64, r64)]
        rec.update(value=round(100.0 * float(np.mean(same)), 3),
                   form="sequence: per-position top-1 agreement with FP32 (last axis)")
    elif form == "map" and r64[0].shape[1] == 1 and flat_r.min() >= 0 and flat_r.max() <= 1:
        rec.update({k: v for k, v in _iou(got, ref, 0.5).items() if k != "metric"}, metric="fidelity",
                   form="map in [0, 1]: mean IoU with FP32's masks at 0.5")
    elif form == "map":
        same = [float(np.mean(np.argmax(g[0], 0) == np.argmax(r[0], 0))) for g, r in zip(g64, r64)]
        rec.update(value=round(100.0 * float(np.mean(same)), 3),
                   form="map: per-pixel top-1 agreement with FP32 (channel axis)")
    else:
        tol = 0.01 * span if span > 0 else 1e-6
        within = sum(int(float(np.mean(np.abs(g - r))) <= tol) for g, r in zip(g64, r64))
        rec.update(value=round(100.0 * within / n, 3), tolerance=round(tol, 8),
                   form="values: share of samples whose mean abs error is within 1% of the output's range")
    return rec


def _iou(got: list[np.ndarray], ref: list[np.ndarray], threshold: float) -> dict:
    ious = []
    for g, r in zip(got, ref):
        a, b = np.asarray(g) > threshold, np.asarray(r) > threshold
        union = int(np.logical_or(a, b).sum())
        ious.append(1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union)
    return {"metric": "iou", "value": round(100.0 * float(np.mean(ious)), 3), "unit": "percent",
            "iou_min": round(float(np.min(ious)), 5), "threshold": threshold,
            "form": f"mean IoU of (output > {threshold}) masks with FP32's"}
