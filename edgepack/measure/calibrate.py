"""Calibrating roofline estimates on the build host.

The host's own peaks are derived from its CPU (cores x clock x operations per cycle for its ISA) and a
measured copy bandwidth. A suite of generated reference CNNs (not the user's model, so the estimate
for the user's model is an out-of-sample prediction) is compiled with a target's backend, timed on
the host, and :func:`edgepack.measure.estimate.fit` turns the points into an overhead and an
efficiency. Results are cached in a folder, keyed by host, runtime, profile and suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifact import ModelArtifact, ModelFormat, TensorSpec
from edgepack.measure.estimate import Calibration, Peaks, count_graph, fit, roofline_ms
from edgepack.measure.host import host_info

SUITE_VERSION = 3  # bump when the suite, the timing or the fit changes: invalidates cached calibrations
ROUNDS = 3

# (ISA flag, int8 ops/cycle/core, fp32 FLOP/cycle/core, how): the first flag the host has wins
ISA_RATES: list[tuple[str, int, int, str]] = [
    ("avx512_vnni", 128, 32, "one 512-bit VNNI+FMA port: 64 int8 MAC or 16 fp32 FMA per cycle (client cores; "
                             "two-port server cores are up to 2x faster)"),
    ("avx_vnni", 128, 32, "two 256-bit ports: 2 x 32 int8 MAC (VPDPBUSD) or 2 x 8 fp32 FMA per cycle"),
    ("avx2", 64, 32, "two 256-bit ports: 32 int8 MAC (VPMADDUBSW+VPMADDWD) or 2 x 8 fp32 FMA per cycle"),
    ("asimddp", 64, 16, "two 128-bit NEON pipes: 2 x 16 int8 MAC (SDOT) or 2 x 4 fp32 FMA per cycle"),
    ("asimd", 32, 16, "two 128-bit NEON pipes: 16 int8 MAC (SMLAL) or 2 x 4 fp32 FMA per cycle"),
]


@dataclass(frozen=True)
class RefModel:
    """A generated CNN. ``blocks``: ``("conv", channels, stride)`` a 3x3 conv; ``("res", channels)`` a 3x3
    conv with a residual add; ``("bottleneck", channels, mid)`` 1x1 -> 3x3 -> 1x1 with a residual add
    (ResNet's block). Each conv is followed by ReLU. Then a global average pool and the classifier, or,
    with ``head`` set, a flatten, a hidden fully connected layer of that width and the classifier."""

    name: str
    input_chw: tuple[int, int, int]
    blocks: tuple[tuple[Any, ...], ...]
    classes: int = 10
    head: int | None = None


_TINY = RefModel("ref-tiny", (1, 16, 16), (("conv", 8, 1),))
_SMALL = RefModel("ref-small", (3, 32, 32), (("conv", 16, 1), ("conv", 32, 2), ("res", 32), ("conv", 64, 2)))
SUITES: dict[str, tuple[RefModel, ...]] = {
    "standard": (
        _TINY,
        _SMALL,
        RefModel("ref-fc-head", (3, 32, 32), (("conv", 32, 2), ("conv", 64, 2)), head=512),
        RefModel("ref-medium", (3, 64, 64), (("conv", 32, 2), ("conv", 64, 1), ("res", 64), ("conv", 128, 2),
                                             ("res", 128), ("conv", 256, 2)), 100),
        RefModel("ref-bottleneck", (64, 28, 28), (("conv", 256, 1), ("bottleneck", 256, 64), ("conv", 512, 2),
                                                  ("bottleneck", 512, 128)), 1000),
        RefModel("ref-large", (3, 112, 112), (("conv", 64, 2), ("res", 64), ("conv", 128, 2), ("res", 128),
                                              ("conv", 256, 2), ("res", 256), ("conv", 512, 2)), 1000),
    ),
    "quick": (
        _TINY,
        _SMALL,
        RefModel("ref-medium", (3, 64, 64), (("conv", 32, 2), ("conv", 64, 1), ("res", 64), ("conv", 128, 2)), 100),
    ),
}


def _cpuinfo() -> dict[str, Any]:
    mhz, cores, siblings = [], None, None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "cpu MHz":
                    mhz.append(float(value))
                elif key == "cpu cores" and cores is None:
                    cores = int(value)
                elif key == "siblings" and siblings is None:
                    siblings = int(value)
    except OSError:
        pass
    max_khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_khz.is_file():
        return {"ghz": int(max_khz.read_text()) / 1e6, "clock_source": "cpufreq cpuinfo_max_freq",
                "cores": cores, "siblings": siblings}
    return {"ghz": max(mhz) / 1e3 if mhz else None, "clock_source": "/proc/cpuinfo 'cpu MHz' (current clock)",
            "cores": cores, "siblings": siblings}


def copy_bandwidth_gbs(mib: int = 64, repeats: int = 10) -> float:
    """Best-of-``repeats`` numpy copy of ``mib`` MiB, counting bytes read plus written (STREAM 'copy')."""
    a = np.ones(mib * 1024 * 1024 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best / 1e9


def host_peaks(precision: str, threads: int) -> tuple[Peaks, dict[str, Any]]:
    """The host's peaks for ``precision`` with ``threads`` threads, and how each figure was derived."""
    info, cpu = host_info(), _cpuinfo()
    flags = set(info["isa"])
    rate = next((r for r in ISA_RATES if r[0] in flags), ("scalar/sse", 16, 8, "no AVX2/NEON: 4-wide SSE"))
    logical = int(info["logical_cpus"] or 1)
    per_core = (cpu["siblings"] // cpu["cores"]) if cpu["cores"] and cpu["siblings"] else 1
    physical = max(1, logical // max(per_core, 1))
    cores = max(1, min(threads, physical))
    ghz = cpu["ghz"] or 2.0
    int8 = cores * ghz * 1e9 * rate[1]
    fp32 = cores * ghz * 1e9 * rate[2]
    ops = {"int8": int8, "fp16": fp32, "fp32": fp32}[precision]
    bw = copy_bandwidth_gbs()
    how = {
        "cpu": info["cpu"], "isa": rate[0], "cores_used": cores, "physical_cores": physical, "ghz": round(ghz, 3),
        "peak_int8_tops": {"value": round(int8 / 1e12, 4),
                           "source": f"derived: {cores} cores x {ghz:.2f} GHz ({cpu['clock_source']}) x "
                                     f"{rate[1]} int8 ops/cycle ({rate[3]})"},
        "peak_fp32_tflops": {"value": round(fp32 / 1e12, 4),
                             "source": f"derived: {cores} cores x {ghz:.2f} GHz x {rate[2]} FLOP/cycle; fp16 runs "
                                       "at the fp32 rate on CPUs without native fp16 arithmetic"},
        "memory_bandwidth_gbs": {"value": round(bw, 2),
                                 "source": "measured: numpy copy of 64 MiB, best of 10, bytes read + written"},
    }
    notes = (f"host peaks derived from {info['cpu']} ({rate[0]}), bandwidth measured",)
    return Peaks(ops, bw * 1e9, precision, notes), how


def make_reference_model(spec: RefModel, path: Path, seed: int = 0) -> ModelArtifact:
    """Write ``spec`` as an FP32 ONNX model (dynamic batch) with random weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    c, h, w = spec.input_chw
    nodes, inits = [], []
    x, ch = "input", c

    def weight(name: str, shape: tuple[int, ...]) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
        return name

    def conv(src: str, cin: int, cout: int, k: int, stride: int) -> str:
        i = len(nodes)
        wname, bname = weight(f"w{i}", (cout, cin, k, k)), weight(f"b{i}", (cout,))
        nodes.append(helper.make_node("Conv", [src, wname, bname], [f"conv{i}"], pads=[k // 2] * 4,
                                      strides=[stride, stride], kernel_shape=[k, k]))
        return f"conv{i}"

    def op(kind: str, *srcs: str) -> str:
        out = f"{kind.lower()}{len(nodes)}"
        nodes.append(helper.make_node(kind, list(srcs), [out]))
        return out

    for block in spec.blocks:
        kind, cout = block[0], block[1]
        if kind == "conv":
            x = op("Relu", conv(x, ch, cout, 3, block[2]))
        elif kind == "res":
            x = op("Relu", op("Add", conv(x, ch, cout, 3, 1), x))
        elif kind == "bottleneck":
            mid = block[2]
            y = op("Relu", conv(x, ch, mid, 1, 1))
            y = op("Relu", conv(y, mid, mid, 3, 1))
            x = op("Relu", op("Add", conv(y, mid, cout, 1, 1), x))
        else:
            raise ValueError(f"unknown block kind {kind!r}")
        ch = cout
    if spec.head is None:
        flat, width = op("Flatten", op("GlobalAveragePool", x)), ch
    else:
        size = [c, h, w]                    # static sizes give the flattened width
        for block in spec.blocks:
            stride = block[2] if block[0] == "conv" else 1
            size = [block[1], (size[1] + stride - 1) // stride, (size[2] + stride - 1) // stride]
        flat = op("Flatten", x)
        hidden = f"fc{len(nodes)}"
        nodes.append(helper.make_node("Gemm", [flat, weight("fc_h_w", (spec.head, int(np.prod(size)))),
                                               weight("fc_h_b", (spec.head,))], [hidden], transB=1))
        flat, width = op("Relu", hidden), spec.head
    nodes.append(helper.make_node("Gemm", [flat, weight("fc_w", (spec.classes, width)), weight("fc_b", (spec.classes,))],
                                  ["logits"], transB=1))
    graph = helper.make_graph(nodes, spec.name,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", spec.classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgepack")
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    inputs = (TensorSpec("input", ("batch", c, h, w)),)
    outputs = (TensorSpec("logits", ("batch", spec.classes)),)
    return ModelArtifact(ModelFormat.ONNX, path, inputs, outputs, (path,), precision="fp32", details={"opset": 17})


def _samples(spec: RefModel, n: int, seed: int) -> Any:
    from edgepack.calibration.reader import SampleSet

    rng = np.random.default_rng(seed)
    return SampleSet([{"input": rng.standard_normal((1, *spec.input_chw)).astype(np.float32)} for _ in range(n)],
                     None, f"random normal (seed {seed})")


def cache_key(profile: Any, threads: int, suite: str, toolchain: dict[str, str]) -> str:
    info = host_info()
    data = {"suite": suite, "suite_version": SUITE_VERSION, "models": [repr(m) for m in SUITES[suite]],
            "cpu": info["cpu"], "isa": info["isa"], "logical_cpus": info["logical_cpus"], "threads": threads,
            "profile": {k: v for k, v in profile.model_dump(mode="json").items() if k not in ("source", "device")},
            "toolchain": toolchain}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load_suite(profile: Any, backend: Any, options: Any, workdir: Path, threads: int, suite: str, peaks: Peaks,
               progress: Callable[[str], None] | None = None) -> list[tuple[str, Any, dict[str, Any], float]]:
    """Generate and compile the suite's models: ``(name, runner, sample, roofline_ms)`` each."""
    loaded = []
    for i, spec in enumerate(SUITES[suite]):
        if progress:
            progress(f"{backend.name} {profile.precision}: compile {spec.name}")
        folder = workdir / f"{profile.name}-{spec.name}"
        art = make_reference_model(spec, folder / "fp32" / "model.onnx", seed=i)
        compiled = backend.compile(art, profile, options, _samples(spec, 8, i), folder / "compile")
        runner, _ = backend.host_runner(compiled.path, threads)
        roof = roofline_ms(count_graph(art.path), peaks)["roofline_ms"]
        loaded.append((spec.name, runner, _samples(spec, 1, 1000 + i).samples[0], roof))
    return loaded


def time_rounds(runners: list[tuple[str, Any, dict[str, Any]]], threads: int, rounds: int = ROUNDS,
                progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """p50 of each runner per round; rounds interleave the models, so a burst of load on a shared
    machine hits every model alike."""
    from edgepack.measure.latency import measure_latency

    p50s: dict[str, list[float]] = {name: [] for name, *_ in runners}
    for rnd in range(rounds):
        if progress:
            progress(f"timing round {rnd + 1}/{rounds}")
        for name, runner, sample in runners:
            p50s[name].append(measure_latency(runner, sample, 5, 30, 3.0, threads)["p50_ms"])
    return p50s


def calibrate_host(profile: Any, backend: Any, options: Any, workdir: Path, threads: int, suite: str = "standard",
                   cache_dir: Path | None = None, toolchain: dict[str, str] | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[Calibration, dict[str, Any]]:
    """Compile and time the reference suite with ``backend`` on this host; fit overhead and efficiency."""
    if suite not in SUITES:
        from edgepack.errors import ConfigError, did_you_mean

        raise ConfigError(f"unknown calibration suite '{suite}'", hint=did_you_mean(suite, SUITES))
    key = cache_key(profile, threads, suite, toolchain or {})
    cached = cache_dir / f"host-calibration-{key}.json" if cache_dir else None
    runtime = f"{backend.name} {profile.precision}"
    if cached and cached.is_file():
        data = json.loads(cached.read_text())
        cal = Calibration(data["efficiency"], data["overhead_ms"], data["runtime"], tuple(data["fitted_on"]),
                          data["where"], tuple(data["points"]))
        return cal, data["host_peaks"] | {"cached": str(cached)}
    peaks, how = host_peaks(profile.precision, threads)
    loaded = load_suite(profile, backend, options, workdir, threads, suite, peaks, progress)
    p50s = time_rounds([(name, runner, sample) for name, runner, sample, _ in loaded], threads, ROUNDS,
                       (lambda d: progress(f"{runtime}: {d}")) if progress else None)
    points = [(name, roof, float(np.median(p50s[name]))) for name, _, _, roof in loaded]
    del loaded
    cal = fit(points, runtime, f"{host_info()['cpu']} (host)")
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cal.to_json() | {"host_peaks": how}, indent=2) + "\n")
        os.replace(tmp, cached)
    return cal, how


def peaks_from(how: dict[str, Any], precision: str) -> Peaks:
    """The host's :class:`Peaks` from the figures :func:`host_peaks` recorded (kept with a cached calibration)."""
    key = "peak_int8_tops" if precision == "int8" else "peak_fp32_tflops"
    return Peaks(how[key]["value"] * 1e12, how["memory_bandwidth_gbs"]["value"] * 1e9, precision,
                 (f"host peaks derived from {how['cpu']} ({how['isa']}), bandwidth measured",))
