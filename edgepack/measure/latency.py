"""Latency: warm-up, then timed single-sample runs; percentiles of wall-clock time."""

from __future__ import annotations

import time
from collections.abc import Collection

import numpy as np

from edgepack.measure.host import LoadWatch, host_info

# A measurement is noisy when the per-round ratio between models timed in turn (or, for one model, the
# median of each block of calls) spreads by more than this (interquartile range over median).
RATIO_SPREAD_LIMIT = 0.10
BLOCK_SPREAD_LIMIT = 0.25
# Other processes keeping this share of the CPUs busy during a window make it noisy whatever the spread:
# multi-threaded runtimes slow down unequally under contention, so ratios shift without scattering.
OTHERS_CPU_LIMIT = 0.25
NOISE_TRIES = 3


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


def _spread(values: list[float]) -> float:
    """Interquartile range over median: how much a series of block medians (or ratios) moves."""
    if len(values) < 4:
        return 0.0
    q25, q50, q75 = np.percentile(values, [25, 50, 75])
    return float((q75 - q25) / q50) if q50 > 0 else 0.0


def _blocks(times: list[float], size: int = 20) -> list[float]:
    return [float(np.median(times[i:i + size])) for i in range(0, len(times) - size + 1, size)]


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
    watch = LoadWatch()
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
    batch = _batch(sample)
    stats = _stats(times, batch, _how(warmup, len(times), runs, max_seconds, threads, batch, timed))
    spread = _spread(_blocks(times))
    load = watch.result()
    stats["noise"] = {**load, "block_median_spread": round(spread, 4), "limit": BLOCK_SPREAD_LIMIT,
                      "noisy": spread > BLOCK_SPREAD_LIMIT or (load["others_cpu_share"] or 0.0) > OTHERS_CPU_LIMIT,
                      "how": "medians of blocks of 20 consecutive calls: interquartile range over median"}
    return stats


def _batch(sample: dict[str, np.ndarray]) -> int:
    first = np.asarray(next(iter(sample.values())))
    return int(first.shape[0]) if first.ndim else 1


def measure_interleaved(runners: dict[str, object], sample: dict[str, np.ndarray], warmup: int, runs: int,
                        max_seconds: float, threads: int, block: int = 20, warmed: int = 0,
                        rewarm: Collection[str] | None = None) -> dict[str, dict]:
    """Several models timed in turn, ``block`` calls each per round (after one untimed call that warms
    the caches back up: for the models named in ``rewarm``, all of them when None), the order
    alternating between rounds, until each has ``runs`` timed calls or ``max_seconds`` have passed: the
    load of a shared host then falls on all of them alike, for ratios between models (pruned vs
    unpruned) measured in one run. ``warmup`` untimed calls per model come first, ``warmed`` of them
    already made by the caller on these very runners and input."""
    calls = {name: _call_of(r, sample) for name, r in runners.items()}
    for _ in range(max(0, warmup - warmed)):
        for feeds, call, _ in calls.values():
            call(feeds)
    times: dict[str, list[float]] = {name: [] for name in calls}
    rounds: dict[str, list[float]] = {name: [] for name in calls}  # each round's block median
    deadline = time.perf_counter() + max_seconds
    rnd = 0
    while min(len(t) for t in times.values()) < runs:
        order = list(calls.items()) if rnd % 2 == 0 else list(calls.items())[::-1]  # neither always goes first
        for name, (feeds, call, _) in order:
            if rewarm is None or name in rewarm:
                call(feeds)
            start = len(times[name])
            for _ in range(min(block, runs - len(times[name]))):
                t0 = time.perf_counter()
                call(feeds)
                times[name].append((time.perf_counter() - t0) * 1e3)
            if len(times[name]) > start:
                rounds[name].append(float(np.median(times[name][start:])))
        rnd += 1
        if time.perf_counter() > deadline and min(len(t) for t in times.values()) >= 10:
            break
    batch = _batch(sample)
    return {name: _stats(times[name], batch, {
        **_how(warmup, len(times[name]), runs, max_seconds, threads, batch, calls[name][2]),
        "interleaved": f"in turn with {', '.join(n for n in calls if n != name)}: {rnd} rounds of up to {block} "
                       "calls each" + (" (after one untimed call)" if rewarm is None or name in rewarm else
                                       f" (no untimed call first: {REWARM_BELOW_MS:g} ms or more per call)")
                       + ", the order alternating"})
        | {"round_medians_ms": [round(v, 5) for v in rounds[name]]} for name in calls}


PROBE_CALLS = 6  # calls per model that _block_for makes (1 + 5): they count as warm-up
BLOCK_MS = 25.0  # a block of calls long enough that timer and scheduler jitter average out
MIN_BLOCK = 4    # a model slower than 6 ms still gets a median of 4 calls per block
# A model this slow per call gets no untimed call before each block: the call after another model's
# block is no slower (ResNet-50 on 2 threads: the first call of a block over the median of the rest,
# 1.001 FP32 on ONNX Runtime at 45 ms, 1.002 INT8 on OpenVINO at 12 ms, 1.008 FP32 on OpenVINO at 42 ms).
REWARM_BELOW_MS = 5.0


def _block_for(runners: dict[str, object], sample: dict[str, np.ndarray]) -> tuple[int, dict[str, float]]:
    """Calls per block (about BLOCK_MS of the slowest model's calls, between MIN_BLOCK and 10000) and
    each model's mean call in ms over the probe's calls."""
    per_call = {}
    for name, r in runners.items():
        feeds, call, _ = _call_of(r, sample)
        call(feeds)
        t0 = time.perf_counter()
        for _ in range(PROBE_CALLS - 1):
            call(feeds)
        per_call[name] = (time.perf_counter() - t0) * 1e3 / (PROBE_CALLS - 1)
    slowest = max(per_call.values(), default=0.0)
    return int(min(10000, max(MIN_BLOCK, np.ceil(BLOCK_MS / max(slowest, 1e-4))))), per_call


def measure_in_turn(runners: dict[str, object], sample: dict[str, np.ndarray], warmup: int, runs: int,
                    max_seconds: float, threads: int, tries: int = NOISE_TRIES,
                    rounds: int = 12) -> tuple[dict[str, dict], dict]:
    """Models timed in turn (:func:`measure_interleaved`) with a noise check: the ratio of each model
    to the first is taken round by round; when those ratios spread by more than RATIO_SPREAD_LIMIT
    the measurement is repeated, up to ``tries`` times, and the last one is flagged noisy if it never
    settles. Returns (stats per model, the noise record)."""
    base = next(iter(runners))
    block, per_call = _block_for(runners, sample)
    rewarm = {name for name, ms in per_call.items() if ms < REWARM_BELOW_MS}
    runs = max(runs, rounds * block)  # a dozen rounds at least: the spread of their ratios needs them
    checks = []
    for attempt in range(1, tries + 1):
        watch = LoadWatch()
        # the block sizing's calls warmed every model up (and from the second window on, the last window)
        res = measure_interleaved(runners, sample, warmup, runs, max_seconds, threads, block,
                                  warmed=PROBE_CALLS if attempt == 1 else warmup, rewarm=rewarm)
        spreads = {}
        for name in runners:
            if name == base:
                continue
            pairs = zip(res[name]["round_medians_ms"], res[base]["round_medians_ms"])
            spreads[name] = round(_spread([a / b for a, b in pairs if b > 0]), 4)
        worst = max(spreads.values(), default=0.0)
        load = watch.result()
        contended = (load["others_cpu_share"] or 0.0) > OTHERS_CPU_LIMIT
        checks.append({"attempt": attempt, **load, "ratio_spread": spreads, "worst": worst, "contended": contended})
        if worst <= RATIO_SPREAD_LIMIT and not contended:
            break
    noise = {"noisy": worst > RATIO_SPREAD_LIMIT or contended, "limit": RATIO_SPREAD_LIMIT,
             "others_cpu_limit": OTHERS_CPU_LIMIT, "tries": len(checks), "checks": checks,
             "how": f"per round, each model's block median over {base}'s; the spread is their interquartile "
                    "range over their median; a window is also noisy when other processes kept more than "
                    f"{OTHERS_CPU_LIMIT:.0%} of the CPUs busy; re-measured (up to {tries} windows) while noisy"}
    return res, noise


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
