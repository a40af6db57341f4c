"""Latency: warm-up, then timed single-sample runs; percentiles of wall-clock time."""

from __future__ import annotations

import time

import numpy as np

from edgepack.measure.host import host_info


def _call_of(runner, sample: dict[str, np.ndarray]):
    """What is timed: a runner that converts inputs for its model (layout, int8 quantization) or binds
    them to the runtime does that once, untimed, so the figure is the model on its runtime as device
    code that feeds the model's own format sees it."""
    prepared = getattr(runner, "prepare", None)
    if prepared is not None:
        return prepared(sample), runner.invoke, "the runtime call on inputs already in the model's format"
    return sample, runner.run, "the runner's run(), inputs as the project feeds them"


def _how(warmup: int, done: int, runs: int, max_seconds: float, threads: int, batch: int, timed: str) -> dict:
    return {"warmup_runs": warmup, "runs": done, "runs_requested": runs, "max_seconds": max_seconds,
            "threads": threads, "batch": batch, "clock": "time.perf_counter, wall clock per run", "timed": timed}


def _stats(times: list[float], batch: int, how: dict) -> dict:
    t = np.asarray(times)
    p50 = float(np.percentile(t, 50))
    return {
        "p50_ms": round(p50, 4),
        "p90_ms": round(float(np.percentile(t, 90)), 4),
        "p99_ms": round(float(np.percentile(t, 99)), 4),
        "mean_ms": round(float(t.mean()), 4),
        "throughput_per_s": round(1000.0 * batch / p50, 2) if p50 > 0 else None,
        "how": how,
        "where": host_info(),
    }


def measure_latency(runner, sample: dict[str, np.ndarray], warmup: int, runs: int, max_seconds: float,
                    threads: int) -> dict:
    feeds, call, timed = _call_of(runner, sample)
    for _ in range(warmup):
        call(feeds)
    times = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(runs):
        t0 = time.perf_counter()
        call(feeds)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > deadline and len(times) >= 10:
            break
    batch = int(next(iter(sample.values())).shape[0])
    return _stats(times, batch, _how(warmup, len(times), runs, max_seconds, threads, batch, timed))


def measure_interleaved(runners: dict[str, object], sample: dict[str, np.ndarray], warmup: int, runs: int,
                        max_seconds: float, threads: int, block: int = 20) -> dict[str, dict]:
    """Several models timed in turn, ``block`` calls each per round (after one untimed call that warms
    the caches back up), the order alternating between rounds, until each has ``runs`` timed calls or
    ``max_seconds`` have passed: the load of a shared host then falls on all of them alike, for ratios
    between models (pruned vs unpruned) measured in one run."""
    calls = {name: _call_of(r, sample) for name, r in runners.items()}
    for _ in range(warmup):
        for feeds, call, _ in calls.values():
            call(feeds)
    times: dict[str, list[float]] = {name: [] for name in calls}
    deadline = time.perf_counter() + max_seconds
    rnd = 0
    while min(len(t) for t in times.values()) < runs:
        order = list(calls.items()) if rnd % 2 == 0 else list(calls.items())[::-1]  # neither always goes first
        for name, (feeds, call, _) in order:
            call(feeds)
            for _ in range(min(block, runs - len(times[name]))):
                t0 = time.perf_counter()
                call(feeds)
                times[name].append((time.perf_counter() - t0) * 1e3)
        rnd += 1
        if time.perf_counter() > deadline and min(len(t) for t in times.values()) >= 10:
            break
    batch = int(next(iter(sample.values())).shape[0])
    return {name: _stats(times[name], batch, {
        **_how(warmup, len(times[name]), runs, max_seconds, threads, batch, calls[name][2]),
        "interleaved": f"in turn with {', '.join(n for n in calls if n != name)}: {rnd} rounds of up to {block} "
                       "calls each (after one untimed call), the order alternating"})
        for name in calls}


def resize_along(sample: dict[str, np.ndarray], shapes: dict[str, tuple], dim: str, size: int) -> dict[str, np.ndarray]:
    """``sample`` with every axis named ``dim`` cut, or zero-padded, to ``size``."""
    out = {}
    for name, a in sample.items():
        for axis, d in enumerate(shapes.get(name, ())):
            if d == dim:
                if a.shape[axis] >= size:
                    a = np.take(a, np.arange(size), axis=axis)
                else:
                    pad = [(0, 0)] * a.ndim
                    pad[axis] = (0, size - a.shape[axis])
                    a = np.pad(a, pad)
        out[name] = np.ascontiguousarray(a)
    return out


def latency_at_shapes(runner, sample: dict[str, np.ndarray], project, m, threads: int) -> list[dict] | None:
    """Latency at each representative size the project declares for a symbolic dim (``dims.NAME.measure``),
    e.g. text at 32 and 128 tokens. None when no dim declares sizes."""
    shapes = {i.name: tuple(i.shape) for i in project.inputs or []}
    rows = []
    for dim, spec in project.dims.items():
        for size in spec.measure:
            feed = resize_along(sample, shapes, dim, size)
            lat = measure_latency(runner, feed, max(1, m.warmup_runs // 2), max(10, m.runs // 2),
                                  max(1.0, m.max_seconds / 2), threads)
            rows.append({"dims": {dim: size}, "p50_ms": lat["p50_ms"], "p90_ms": lat["p90_ms"],
                         "p99_ms": lat["p99_ms"], "runs": lat["how"]["runs"],
                         "input": f"the latency input cut or zero-padded along '{dim}' to {size}"})
    return rows or None
