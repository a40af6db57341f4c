"""Per-layer time of a compiled model on the target's own runtime, attributed to the PyTorch layers it
came from: OpenVINO's per-node performance counters, ONNX Runtime's node profiler, or (where the host
cannot run the target's runtime: Jetson, phones) the roofline of the target profile's spec-sheet
peaks, labelled as an estimate.

Each source returns the executed nodes in execution order with their time in milliseconds (the median
over ``runs`` calls). :func:`attribute` maps them onto the torch modules whose weights the ONNX export's
Conv/Gemm/MatMul nodes carry: a node that is not a weighted layer (pooling, activation, a layout
reorder) is charged to the weighted layer that ran before it (whose output channels it carries), and
what runs before the first weighted layer is a fixed cost."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import MissingDependencyError

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
BOUNDARY = "/_:.;"   # what follows an ONNX node's name in the runtime's name for it (node_Conv_3/WithoutBiases)


def onnx_layers(onnx_path: Path, modules: set[str]) -> dict[str, str]:
    """ONNX node name -> torch module name, for weighted nodes whose weight initializer is ``<module>.weight``."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    out = {}
    for node in graph.node:
        if node.op_type not in WEIGHTED_OPS or len(node.input) < 2:
            continue
        for name in node.input[1:2]:
            mod = name.removesuffix(".weight")
            if mod in modules and node.name:
                out[node.name] = mod
    return out


def _owner(name: str, nodes: list[str]) -> str | None:
    """The longest ONNX node name that ``name`` (the runtime's name for a node) starts with, at a boundary."""
    best = None
    for n in nodes:
        at_boundary = name == n or (name.startswith(n) and name[len(n)] in BOUNDARY)
        if at_boundary and (best is None or len(n) > len(best)):
            best = n
    return best


def attribute(times: list[tuple[str, float]], node_to_module: dict[str, str]) -> dict[str, Any]:
    """``{"layers": {module: ms}, "extra": {module: ms}, "fixed_ms": ms, "total_ms": ms, "unattributed": [...]}``."""
    names = sorted(node_to_module, key=len, reverse=True)
    layers: dict[str, float] = defaultdict(float)
    extra: dict[str, float] = defaultdict(float)
    fixed, last = 0.0, None
    for name, ms in times:
        owner = _owner(name, names)
        if owner is not None:
            last = node_to_module[owner]
            layers[last] += ms
        elif last is not None:
            extra[last] += ms
        else:
            fixed += ms
    return {"layers": dict(layers), "extra": dict(extra), "fixed_ms": fixed,
            "total_ms": sum(ms for _, ms in times)}


def _per_node(runs: list[list[tuple[str, float]]], per_round: int) -> list[tuple[str, float]]:
    """Each node's time: per round (``per_round`` consecutive runs) the mean of the middle 80% (the
    counters tick in whole microseconds, so a median would round a 1.4 us node to 1 us), then the
    median over rounds (a round that a busy host slowed down does not move it)."""
    order: list[str] = []
    per: dict[str, list[list[float]]] = defaultdict(list)
    for i, run in enumerate(runs):
        r = i // per_round
        for name, ms in run:
            if name not in per:
                order.append(name)
            rounds = per[name]
            while len(rounds) <= r:
                rounds.append([])
            rounds[r].append(ms)
    out = []
    for n in order:
        means = []
        for vals in per[n]:
            if vals:
                v = np.sort(np.asarray(vals))
                cut = len(v) // 10
                means.append(float(v[cut:len(v) - cut].mean()))
        out.append((n, float(np.median(means))))
    return out


def openvino_times(models: list[Path], sample: dict[str, np.ndarray], threads: int, rounds: int = 16,
                   per_round: int = 20) -> list[list[tuple[str, float]]]:
    """OpenVINO CPU plugin's per-node performance counters (``PERF_COUNT``) of each model, the models
    profiled in turn (``rounds`` rounds of ``per_round`` calls each) so that a shared host's load falls
    on all of them alike."""
    try:
        import openvino as ov
    except ImportError as e:
        raise MissingDependencyError("openvino", "openvino", "per-layer timings on OpenVINO") from e
    core = ov.Core()
    requests = []
    for path in models:
        compiled = core.compile_model(str(path), "CPU", {
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": "YES"})
        feeds = {i.get_any_name(): np.ascontiguousarray(sample[i.get_any_name()]) for i in compiled.inputs}
        requests.append((compiled, compiled.create_infer_request(), feeds))
    runs: list[list[list[tuple[str, float]]]] = [[] for _ in models]
    order = list(range(len(requests)))
    for rnd in range(rounds + 1):
        for k in (order if rnd % 2 else order[::-1]):  # neither always goes first
            _, request, feeds = requests[k]
            for _ in range(per_round):
                request.infer(feeds)
                if rnd:  # round 0 warms up
                    runs[k].append([(p.node_name, p.real_time.total_seconds() * 1e3) for p in request.profiling_info
                                    if str(p.status) == "Status.EXECUTED"])
    return [_per_node(r, per_round) for r in runs]


def onnxruntime_times(models: list[Path], sample: dict[str, np.ndarray], threads: int, rounds: int = 16,
                      per_round: int = 20) -> list[list[tuple[str, float]]]:
    """ONNX Runtime's node profiler (``enable_profiling``): each node's kernel time, the models run in turn."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("onnxruntime", "onnx", "per-layer timings on ONNX Runtime") from e
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, path in enumerate(models):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.log_severity_level = 3
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / f"ort-{i}")
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            sessions.append((session, {x.name: np.ascontiguousarray(sample[x.name]) for x in session.get_inputs()}))
        for rnd in range(rounds + 1):
            for session, feeds in (sessions if rnd % 2 else sessions[::-1]):
                for _ in range(per_round):
                    session.run(None, feeds)
        for session, _ in sessions:
            events = json.loads(Path(session.end_profiling()).read_text())
            per_run: list[list[tuple[str, float]]] = []
            current: list[tuple[str, float]] = []
            for ev in events:
                if ev.get("cat") == "Session" and ev.get("name") == "model_run":
                    per_run.append(current)  # a run's node events come before its model_run event
                    current = []
                elif ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
                    current.append((ev["name"].removesuffix("_kernel_time"), ev.get("dur", 0) / 1e3))
            out.append(_per_node(per_run[per_round:] or per_run, per_round))  # the first round warms up
    return out


def estimated_times(onnx_path: Path, device: Any, precision: str) -> list[tuple[str, float]]:
    """Roofline per layer, ``max(2 * MACs / peak, bytes / bandwidth)``, from the profile's device figures."""
    from edgepack.measure.estimate import BYTES_PER_ELEMENT, count_graph, device_peaks

    counts = count_graph(onnx_path)
    peaks = device_peaks(device, precision if precision in BYTES_PER_ELEMENT else "int8")
    esize = BYTES_PER_ELEMENT[peaks.precision]
    out = []
    for layer in counts.layers:
        if layer.fused or not (layer.macs or layer.elements):
            continue
        c = 2.0 * layer.macs / peaks.ops_per_s
        b = layer.elements * esize / peaks.bytes_per_s if peaks.bytes_per_s else 0.0
        out.append((layer.name, max(c, b) * 1e3))
    return out
