"""Accuracy metrics. ``top1`` for labelled classification; ``fidelity`` against FP32 outputs."""

from __future__ import annotations

import numpy as np

from edgepack.errors import ModelError


def run_all(runner, samples) -> list[list[np.ndarray]]:
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


def score(metric: str, outputs, labels, reference) -> dict:
    if metric == "top1":
        return top1(outputs, labels)
    return fidelity(outputs, reference)
