"""Accuracy metrics. ``top1`` for labelled classification; ``fidelity`` against FP32 outputs."""

from __future__ import annotations

import numpy as np


def run_all(runner, samples) -> list[list[np.ndarray]]:
    return [runner.run(s) for s in samples]


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
