"""Roofline latency estimates from an ONNX graph and a device's spec-sheet peaks.

``count_graph`` walks an ONNX model with concrete input shapes (batch 1 by default) and counts, per
node, the multiply-accumulates (Conv, ConvTranspose, Gemm, MatMul) and the bytes it moves (its
inputs, weights and outputs). Elementwise ops that every edge runtime fuses into the producing
Conv/Gemm (BatchNorm, ReLU, Clip, ...) are marked fused and cost nothing; shape-only ops are free.

``roofline_ms`` gives, per layer, ``max(2 * MACs / peak_ops, bytes / bandwidth)`` and sums it.
A :class:`Calibration` turns that ideal figure into a latency: ``overhead_ms + roofline / efficiency``,
both fitted on models measured on the host (see :mod:`edgepack.measure.calibrate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ConfigError, ModelError

COMPUTE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# ops that move no data in any runtime we target (views, shape arithmetic, constants)
FREE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Shape", "Constant", "ConstantOfShape", "Identity",
            "Size", "Cast", "Range", "QuantizeLinear", "DequantizeLinear", "Dropout"}
# single-input ops (or per-channel affine) that runtimes fuse into the Conv/Gemm that feeds them
FUSABLE_OPS = {"BatchNormalization", "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
               "Elu", "Selu", "Gelu", "Mul", "Add", "Sub", "Div", "PRelu"}
BYTES_PER_ELEMENT = {"int8": 1, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Layer:
    name: str
    op: str
    macs: int
    elements: int          # tensor elements read and written (inputs, weights, outputs)
    fused: bool = False


@dataclass
class GraphCounts:
    layers: list[Layer]
    params: int            # float weight elements (initializers)
    peak_activation_elements: int
    input_shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def elements(self) -> int:
        return sum(layer.elements for layer in self.layers if not layer.fused)

    @property
    def costed_layers(self) -> int:
        return sum(1 for layer in self.layers if not layer.fused and (layer.macs or layer.elements))

    def summary(self) -> dict[str, Any]:
        return {"macs": self.macs, "gmacs": round(self.macs / 1e9, 4), "params": self.params,
                "layers": self.costed_layers, "nodes": len(self.layers),
                "fused_nodes": sum(1 for layer in self.layers if layer.fused),
                "elements_moved": self.elements, "input_shapes": self.input_shapes}


def _require_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        from edgepack.errors import MissingDependencyError

        raise MissingDependencyError("onnx", "onnx", "counting MACs for estimates") from e
    return onnx


def _dims(vi: Any) -> list[int] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    out = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        out.append(int(d.dim_value))
    return out


def _concrete(model: Any, batch: int, dims: dict[str, int] | None) -> tuple[Any, dict[str, list[int]]]:
    """A copy of ``model`` with every graph input's symbolic dims made concrete, shapes inferred."""
    onnx = _require_onnx()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {"batch": batch, **(dims or {})}
    inits = {i.name for i in m.graph.initializer}
    shapes: dict[str, list[int]] = {}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if not d.HasField("dim_value"):
                # the first symbolic dim is the batch, whatever its exported name
                value = known.get(d.dim_param, batch if i == 0 else None)
                if value is None:
                    raise ConfigError(f"input '{inp.name}' has a symbolic dim '{d.dim_param}' without a value",
                                      hint="give its size in the project file's inputs")
                d.Clear()
                d.dim_value = int(value)
        shapes[inp.name] = _dims(inp) or []
    del m.graph.value_info[:]
    for out in m.graph.output:
        for d in out.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises its own InferenceError types
        raise ModelError(f"ONNX shape inference failed while counting MACs: {e}") from e
    if any(_dims(vi) is None for vi in inferred.graph.value_info):
        # shapes computed at run time (Shape -> Gather -> Concat -> Reshape, as torch.export writes attention)
        # lose their dims in ONNX's inference; ONNX Runtime's symbolic inference follows them
        inferred = _symbolic(m) or inferred
    return inferred, shapes


def _symbolic(model: Any) -> Any | None:
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return None
    try:
        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # noqa: BLE001 - a better count when it works; ONNX's own inference otherwise
        return None


def count_graph(path: Path, batch: int = 1, dims: dict[str, int] | None = None) -> GraphCounts:
    """Per-node MACs and elements moved for the ONNX model at ``path`` (weights may be external)."""
    onnx = _require_onnx()

    model = onnx.load(str(path), load_external_data=False)
    m, in_shapes = _concrete(model, batch, dims)
    g = m.graph
    shapes: dict[str, list[int]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        s = _dims(vi)
        if s is not None:
            shapes[vi.name] = s
    params = 0
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
            params += int(np.prod(init.dims)) if init.dims else 1
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == onnx.TensorProto.FLOAT:
                    shapes[node.output[0]] = list(a.t.dims)
                    params += int(np.prod(a.t.dims)) if a.t.dims else 1
    consumers: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            if name:
                consumers[name] = consumers.get(name, 0) + 1
    fusable_from: set[str] = set()     # tensors produced by a Conv/Gemm (or a fused chain) with one consumer
    layers: list[Layer] = []
    weights = {i.name for i in g.initializer}
    peak_act = 0
    for node in g.node:
        in_names = [n for n in node.input if n]
        ins = [shapes.get(n) for n in in_names]
        outs = [shapes.get(n) for n in node.output if n]
        n_el = sum(_numel(s) for s in ins + outs if s is not None)
        macs = _macs(node, ins, outs) if node.op_type in COMPUTE_OPS else 0
        fused = False
        if node.op_type in FREE_OPS:
            n_el = 0
        elif node.op_type in FUSABLE_OPS and any(n in fusable_from for n in in_names):
            # fused into its producer; a second activation input (a residual Add) is still read
            fused = True
            extra = [s for n, s in zip(in_names, ins) if n not in fusable_from and n not in weights and s]
            n_el = sum(_numel(s) for s in extra if _numel(s) > 1)
        if node.op_type in COMPUTE_OPS or fused:
            for o in node.output:
                if consumers.get(o, 0) == 1:
                    fusable_from.add(o)
        live = [s for n, s in zip(in_names, ins) if s is not None and n not in weights] + outs
        peak_act = max(peak_act, sum(_numel(s) for s in live if s is not None))
        layers.append(Layer(node.name or node.op_type, node.op_type, int(macs), int(n_el), fused and n_el == 0))
    if not layers:
        raise ModelError(f"{path}: the ONNX graph has no nodes")
    return GraphCounts(layers, params, int(peak_act), in_shapes)


def _numel(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _macs(node: Any, ins: list[list[int] | None], outs: list[list[int] | None]) -> int:
    out = outs[0] if outs else None
    if out is None or len(ins) < 2 or ins[0] is None or ins[1] is None:
        return 0
    a, w = ins[0], ins[1]
    if node.op_type == "Conv":
        return _numel(out) * _numel(w[1:])                    # w: [Cout, Cin/g, kh, kw]
    if node.op_type == "ConvTranspose":
        return _numel(a) * _numel(w[1:])                      # w: [Cin, Cout/g, kh, kw]
    if node.op_type == "Gemm":
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
        return _numel(out) * int(k)
    if node.op_type == "MatMul":
        return _numel(out) * int(a[-1])
    return 0


@dataclass(frozen=True)
class Peaks:
    """What the roofline needs from a device: ops/s for the precision and bytes/s."""

    ops_per_s: float
    bytes_per_s: float | None
    precision: str
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"peak_tops": round(self.ops_per_s / 1e12, 4),
                "bandwidth_gbs": round(self.bytes_per_s / 1e9, 2) if self.bytes_per_s else None,
                "precision": self.precision, "notes": list(self.notes)}


def device_peaks(device: Any, precision: str) -> Peaks:
    """Peaks of a profile's ``device`` for ``precision``; falls back (and says so) when a figure is missing."""
    orders = {"int8": ["peak_int8_tops", "peak_fp16_tflops", "peak_fp32_tflops"],
              "fp16": ["peak_fp16_tflops", "peak_fp32_tflops"],
              "fp32": ["peak_fp32_tflops", "peak_fp16_tflops"]}
    if precision not in orders:  # a backend's own precision (w8a16, int16...): no peak figure says its rate
        raise ConfigError(f"no roofline for precision '{precision}': the estimate knows {', '.join(orders)}")
    order = orders[precision]
    notes = []
    for key in order:
        fig = getattr(device, key, None)
        if fig is not None:
            if key != order[0]:
                notes.append(f"no {order[0]} figure: used {key} ({fig.value})")
            bw = device.memory_bandwidth_gbs
            if bw is None:
                notes.append("no memory_bandwidth_gbs figure: compute-bound estimate only")
            return Peaks(fig.value * 1e12, bw.value * 1e9 if bw else None, precision, tuple(notes))
    raise ConfigError(f"device '{device.name}' has no peak throughput figures",
                      hint="add peak_int8_tops / peak_fp16_tflops / peak_fp32_tflops to its profile")


def roofline_ms(counts: GraphCounts, peaks: Peaks) -> dict[str, Any]:
    """The ideal time: per layer max(compute, memory), summed; plus which bound dominates."""
    esize = BYTES_PER_ELEMENT[peaks.precision]
    compute_ms = memory_ms = total = 0.0
    for layer in counts.layers:
        if layer.fused:
            continue
        c = 2.0 * layer.macs / peaks.ops_per_s
        b = layer.elements * esize / peaks.bytes_per_s if peaks.bytes_per_s else 0.0
        total += max(c, b)
        if c >= b:
            compute_ms += c
        else:
            memory_ms += b
    return {"roofline_ms": total * 1e3, "compute_bound_ms": compute_ms * 1e3, "memory_bound_ms": memory_ms * 1e3,
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


@dataclass(frozen=True)
class Calibration:
    """``latency = overhead_ms + roofline_ms / efficiency``, fitted on models measured on a host runtime."""

    efficiency: float
    overhead_ms: float
    runtime: str                      # e.g. "openvino int8"
    fitted_on: tuple[str, ...]        # model names
    where: str                        # host CPU
    points: tuple[dict[str, Any], ...] = ()

    def latency_ms(self, roofline: float) -> float:
        return self.overhead_ms + roofline / self.efficiency

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["fitted_on"], d["points"] = list(self.fitted_on), list(self.points)
        return d


UNCALIBRATED = Calibration(1.0, 0.0, "none", (), "uncalibrated: pure roofline, a lower bound")


def _log_error(r: np.ndarray, t: np.ndarray, overheads: np.ndarray, effs: np.ndarray) -> np.ndarray:
    """Sum over points of log(predicted / measured)^2, for every (overhead, efficiency) pair."""
    pred = overheads[:, None, None] + r[None, None, :] / effs[None, :, None]
    return (np.log(pred / t[None, None, :]) ** 2).sum(axis=2)


def fit(points: list[tuple[str, float, float]], runtime: str, where: str) -> Calibration:
    """Fit overhead (ms, >= 0) and efficiency (0..1] to ``(model, roofline_ms, measured_ms)`` points.

    Least squares on log(predicted / measured): over- and under-estimates by the same factor weigh
    alike, and a 1 ms and a 100 ms model count the same. A coarse grid, then a fine one around the best.
    """
    if not points:
        raise ValueError("no calibration points")
    r = np.array([max(p[1], 1e-9) for p in points], dtype=np.float64)
    t = np.array([p[2] for p in points], dtype=np.float64)
    if len(points) == 1:
        overhead, eff = 0.0, min(1.0, float(r[0] / t[0]))
    else:
        effs = np.geomspace(1e-4, 1.0, 241)
        overheads = np.concatenate([[0.0], np.geomspace(1e-4 * t.min(), t.min(), 160)])
        err = _log_error(r, t, overheads, effs)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        overhead, eff = float(overheads[i]), float(effs[j])
        effs = np.clip(eff * np.geomspace(0.95, 1.05, 101), 1e-4, 1.0)
        lo, hi = overheads[max(i - 1, 0)], overheads[min(i + 1, len(overheads) - 1)]
        overheads = np.unique(np.concatenate([[0.0] if i == 0 else [], np.linspace(lo, hi, 101)]))
        err = _log_error(r, t, overheads, effs)
        i, j = np.unravel_index(np.argmin(err), err.shape)
        overhead, eff = float(overheads[i]), float(effs[j])
    cal = Calibration(eff, overhead, runtime, tuple(p[0] for p in points), where)
    pts = tuple({"model": name, "roofline_ms": round(rf, 5), "measured_ms": round(ms, 4),
                 "fitted_ms": round(cal.latency_ms(rf), 4),
                 "error_pct": error_pct(cal.latency_ms(rf), ms)} for name, rf, ms in points)
    return Calibration(cal.efficiency, cal.overhead_ms, runtime, cal.fitted_on, where, pts)


def estimate(counts: GraphCounts, peaks: Peaks, calibration: Calibration) -> dict[str, Any]:
    """A labelled latency estimate for one model on one device."""
    roof = roofline_ms(counts, peaks)
    p50 = calibration.latency_ms(roof["roofline_ms"])
    return {"kind": "estimate", "p50_ms": round(p50, 4), **{k: round(v, 5) if isinstance(v, float) else v
                                                            for k, v in roof.items()},
            "efficiency": round(calibration.efficiency, 4), "overhead_ms": round(calibration.overhead_ms, 4),
            "calibration": {"runtime": calibration.runtime, "fitted_on": list(calibration.fitted_on),
                            "where": calibration.where},
            "peaks": peaks.to_json(), "model": counts.summary()}


def error_pct(estimated: float, measured: float) -> float:
    return float(round(100.0 * (estimated - measured) / measured, 1))
