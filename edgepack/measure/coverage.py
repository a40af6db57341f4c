"""Quantization coverage: what share of a compiled model's MACs and weighted ops really runs in INT8.

The TFLite backend reports the ops its converter left in float (``describe_float_ops``); this module
gives the same answer for the other formats, read from the artifact itself:

* ONNX QDQ models (the ``onnx`` and TensorRT targets, written by :mod:`edgepack.stages.quantize_qdq`):
  a Conv/ConvTranspose/Gemm/MatMul is INT8 when both its activation and its weight come from a
  DequantizeLinear of an 8-bit tensor (directly or through Transpose/Reshape and other views), as
  TensorRT runs it. ``runtime="onnxruntime"`` adds what ONNX Runtime's QDQ fusion needs (1.32, CPU,
  checked on its optimized graph): a Conv only with its output read by QuantizeLinear alone (else it
  stays a float Conv); a Gemm the same, or with no QuantizeLinear after it only when its bias is absent
  or dequantized too (QGemm with float output); no ConvTranspose (no CPU kernel); MatMul needs no
  QuantizeLinear (MatMulIntegerToFloat). Integer ops (QLinearConv, MatMulInteger, ...) count as INT8.
* OpenVINO IR (the ``cpu`` target, quantized by NNCF): a Convolution/GroupConvolution/
  ConvolutionBackpropData/MatMul is INT8 when its activation comes from an 8-bit FakeQuantize and its
  weights reach a FakeQuantize or an i8/u8 Constant (compressed weights: Constant -> Convert ->
  Subtract -> Multiply).

Subgraphs are walked too (ONNX ``If``/``Loop``/``Scan`` bodies, OpenVINO ``If``/``Loop``/
``TensorIterator`` bodies); every branch of an ``If`` is counted although only one runs per call.
MACs come from shapes (ONNX shape inference; OpenVINO's static shapes); a symbolic or dynamic dim
counts as 1 and an op whose shapes are unknown counts its weight elements, both marked estimated.
"""

from __future__ import annotations

import contextlib
import math
from collections import ChainMap
from pathlib import Path
from typing import Any

MAX_FLOAT_OPS = 50
TWO_GB = 2 * 1024**3

# ONNX: op -> (kind, activation input index, weight input index)
ONNX_WEIGHTED = {"Conv": ("Conv", 0, 1), "ConvTranspose": ("ConvTranspose", 0, 1),
                 "Gemm": ("Gemm", 0, 1), "MatMul": ("MatMul", 0, 1)}
# ONNX Runtime's integer ops (QOperator format, dynamic quantization): INT8 by construction
ONNX_INTEGER = {"QLinearConv": ("Conv", 0, 3), "ConvInteger": ("Conv", 0, 1),
                "QLinearMatMul": ("MatMul", 0, 3), "MatMulInteger": ("MatMul", 0, 1),
                "QGemm": ("Gemm", 0, 3), "DynamicQuantizeMatMul": ("MatMul", 0, 1),
                "MatMulIntegerToFloat": ("MatMul", 0, 1)}
# ops that only move or view a tensor between a DequantizeLinear and the op that reads it
ONNX_VIEWS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}
ONNX_8BIT = {2, 3}  # TensorProto.UINT8, TensorProto.INT8

OV_WEIGHTED = {"Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData",
               "MatMul"}
# ops that keep a quantized tensor quantized: OpenVINO's low-precision transformations move the
# FakeQuantize through them (a Conv after FakeQuantize -> MaxPool runs in INT8)
OV_ACTIVATION_SKIP = {"Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "StridedSlice", "Slice",
                      "Split", "VariadicSplit", "Pad", "DepthToSpace", "SpaceToDepth", "ShuffleChannels", "Gather",
                      "Broadcast", "Tile"}
OV_WEIGHT_SKIP = {"Convert", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Subtract", "Multiply"}
OV_8BIT = {"i8", "u8"}


class _Tally:
    """Counts per op, split main graph / subgraphs, and the float ops."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.subgraphs = 0

    def add(self, name: str, op_type: str, macs: int, estimated: bool, int8: bool, where: str) -> None:
        self.ops.append({"name": name, "type": op_type, "macs": int(macs), "macs_estimated": estimated,
                         "int8": int8, "where": where})

    def result(self, how: str) -> dict[str, Any]:
        def share(a: int, b: int) -> float | None:
            return a / b if b else None

        n = len(self.ops)
        n8 = sum(1 for o in self.ops if o["int8"])
        macs = sum(o["macs"] for o in self.ops)
        macs8 = sum(o["macs"] for o in self.ops if o["int8"])
        sub = [o for o in self.ops if o["where"] != "main graph"]
        floats = sorted((o for o in self.ops if not o["int8"]), key=lambda o: -o["macs"])
        return {
            "weighted_ops": n, "int8_ops": n8, "ops_share": share(n8, n),
            "macs": macs, "int8_macs": macs8, "macs_share": share(macs8, macs),
            "macs_estimated": any(o["macs_estimated"] for o in self.ops),
            "float_ops": [{k: o[k] for k in ("name", "type", "macs", "where")} for o in floats[:MAX_FLOAT_OPS]],
            "float_ops_total": len(floats),
            "subgraphs": {"count": self.subgraphs, "weighted_ops": len(sub),
                          "int8_ops": sum(1 for o in sub if o["int8"]),
                          "macs": sum(o["macs"] for o in sub),
                          "int8_macs": sum(o["macs"] for o in sub if o["int8"])},
            "how": how,
        }


def _prod(dims: list[int | None]) -> tuple[int, bool]:
    """Product of dims, unknown (symbolic/dynamic) ones taken as 1; True when one was unknown."""
    known = [d for d in dims if d is not None]
    return math.prod(known), len(known) != len(dims)


def _macs(kind: str, act: list[int | None] | None, w: list[int | None] | None, out: list[int | None] | None,
          trans_a: bool = False) -> tuple[int, bool]:
    """MACs of one weighted op from its activation, weight and output shapes (``None`` = unknown)."""
    if kind in ("Conv", "ConvTranspose"):
        spatial_from = out if kind == "Conv" else act       # ConvTranspose: one weight pass per input pixel
        if w is not None and spatial_from is not None and len(spatial_from) >= 2:
            (pw, e1), (ps, e2) = _prod(w), _prod([spatial_from[0]] + list(spatial_from[2:]))
            return pw * ps, e1 or e2
    elif out is not None:                                   # Gemm / MatMul: output elements x reduction dim
        k = None
        if act is not None and len(act) >= 1:
            k = act[-2] if trans_a and len(act) >= 2 else act[-1]
        elif w is not None and len(w) >= 1:
            k = w[-2] if len(w) >= 2 else w[0]
        if k is not None:
            po, e = _prod(out)
            return po * k, e
    if w is not None:                                       # shapes unknown: one pass over the weights
        return _prod(w)[0], True
    return 0, True


# ---------------------------------------------------------------------------------------------- ONNX

def _load_onnx(path: Path) -> Any:
    """The model with its external data (read from the file's folder) when that fits protobuf's 2 GB;
    shapes are all coverage needs, so a bigger model is read without its weights' values."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {e.value for g in _onnx_graphs(model.graph) for t in g.initializer
                 for e in t.external_data if e.key == "location"}
    if locations:
        files = [path.parent / loc for loc in locations]
        if sum(f.stat().st_size for f in files if f.is_file()) + path.stat().st_size < TWO_GB:
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, str(path.parent))
    return model


def _onnx_graphs(graph: Any):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == attr.GRAPH else list(attr.graphs) if attr.type == attr.GRAPHS else []):
                yield from _onnx_graphs(sub)


def _onnx_shape(vi: Any) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in t.shape.dim]


def onnx_coverage(path: Path, runtime: str | None = None) -> dict[str, Any]:
    """INT8 coverage of an ONNX model (QDQ as :mod:`edgepack.stages.quantize_qdq` writes it), as ``runtime``
    runs it: ``"onnxruntime"`` (its QDQ fusion rules) or any other/None (TensorRT's: DQ'd inputs suffice)."""
    import onnx

    path = Path(path)
    model = _load_onnx(path)
    # shapes are only for MACs: a model shape inference rejects keeps the shapes it has (MACs estimated)
    with contextlib.suppress(Exception):
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    tally = _Tally()
    ort = runtime == "onnxruntime"
    _walk_onnx(model.graph, ChainMap(), ChainMap(), ChainMap(), "main graph", tally, ort)
    rule = (" and, for ONNX Runtime (its QDQ fusion), a Conv/Gemm's output goes to QuantizeLinear only (a Gemm "
            "without one needs its bias absent or dequantized: QGemm with float output), ConvTranspose never "
            "(no CPU kernel), MatMul as is (MatMulIntegerToFloat)" if ort else
            " (the rule TensorRT runs QDQ by; ONNX Runtime also needs a QuantizeLinear after a Conv/Gemm)")
    return tally.result(
        "Conv/ConvTranspose/Gemm/MatMul nodes of the main graph and every subgraph (If/Loop/Scan bodies); "
        "one is INT8 when its activation and its weight both come from an 8-bit DequantizeLinear (directly or "
        f"through Transpose/Reshape){rule}, or it is an integer op (QLinearConv, MatMulInteger, ...); MACs from "
        f"ONNX shape inference, symbolic dims as 1. Rule: {'onnxruntime' if ort else 'tensorrt'} "
        f"(runtime: {runtime or 'not given'}).")


def _walk_onnx(graph: Any, producers: ChainMap, shapes: ChainMap, types: ChainMap, where: str,
               tally: _Tally, ort: bool = False) -> None:
    """Count the weighted nodes of ``graph``; names from enclosing graphs resolve through the chain maps."""
    producers, shapes, types = producers.new_child(), shapes.new_child(), types.new_child()
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        s = _onnx_shape(vi)
        if s is not None:
            shapes[vi.name] = s
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
        types[init.name] = init.data_type
    for node in graph.node:
        for o in node.output:
            producers[o] = node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == a.TENSOR:
                    shapes[node.output[0]] = [int(d) for d in a.t.dims]
                    types[node.output[0]] = a.t.data_type

    def from_dq(name: str) -> bool:
        seen = 0
        while name and seen < 16:
            node = producers.get(name)
            if node is None:
                return False
            if node.op_type == "DequantizeLinear":
                return types.get(node.input[0], 3) in ONNX_8BIT   # type unknown: taken as 8-bit
            if node.op_type not in ONNX_VIEWS:
                return False
            name, seen = node.input[0], seen + 1
        return False

    readers: dict[str, list[str]] = {o.name: ["graph output"] for o in graph.output}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node.op_type)
        for attr in node.attribute:     # names a subgraph reads from this graph
            for sub in [attr.g] if attr.type == attr.GRAPH else list(attr.graphs) if attr.type == attr.GRAPHS else []:
                for g in _onnx_graphs(sub):
                    for n in g.node:
                        for i in n.input:
                            readers.setdefault(i, []).append("subgraph")

    def ort_fuses(node: Any) -> bool:
        """ONNX Runtime's QDQ fusion of a node whose inputs are DQ'd (QLinearConv/QGemm/MatMulIntegerToFloat)."""
        if node.op_type == "MatMul":
            return True
        if node.op_type == "ConvTranspose":
            return False
        out = readers.get(node.output[0], []) if node.output else []
        if out and all(r == "QuantizeLinear" for r in out):
            return True
        bias = node.input[2] if len(node.input) > 2 else ""
        return node.op_type == "Gemm" and not out.count("QuantizeLinear") and (
            not bias or getattr(producers.get(bias), "op_type", None) == "DequantizeLinear")

    for node in graph.node:
        spec = ONNX_WEIGHTED.get(node.op_type) or ONNX_INTEGER.get(node.op_type)
        if spec is not None and len(node.input) > spec[2]:
            kind, ai, wi = spec
            a_name, w_name = node.input[ai], node.input[wi]
            if node.op_type in ONNX_INTEGER:
                int8 = True
            else:
                int8 = from_dq(a_name) and from_dq(w_name) and (not ort or ort_fuses(node))
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            out = shapes.get(node.output[0]) if node.output else None
            macs, est = _macs(kind, shapes.get(a_name), shapes.get(w_name), out, trans_a)
            tally.add(node.name or f"{node.op_type}:{node.output[0]}", node.op_type, macs, est, int8, where)
        for attr in node.attribute:
            subs = [attr.g] if attr.type == attr.GRAPH else list(attr.graphs) if attr.type == attr.GRAPHS else []
            for sub in subs:
                tally.subgraphs += 1
                _walk_onnx(sub, producers, shapes, types, f"subgraph {node.name or node.op_type}", tally, ort)


# ------------------------------------------------------------------------------------------ OpenVINO

def _ov_shape(ps: Any) -> list[int | None] | None:
    if ps.rank.is_dynamic:
        return None
    return [d.get_length() if d.is_static else None for d in ps]


def _ov_bodies(op: Any) -> list[tuple[Any, list[Any]]]:
    """(body model, input descriptions) of an If/Loop/TensorIterator; empty for other ops."""
    if op.get_type_name() == "If":
        return [(op.get_function(i), op.get_input_descriptions(i)) for i in range(2)]
    if op.get_type_name() in ("Loop", "TensorIterator") and hasattr(op, "get_function"):
        return [(op.get_function(), op.get_input_descriptions())]
    return []


def openvino_coverage(xml: Path) -> dict[str, Any]:
    """INT8 coverage of an OpenVINO IR (FakeQuantize from NNCF, or compressed i8/u8 weights)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    tally = _Tally()
    _walk_ov(model, {}, "main graph", tally)
    return tally.result(
        "Convolution/GroupConvolution/ConvolutionBackpropData/MatMul ops of the IR and of If/Loop/TensorIterator "
        "bodies; one is INT8 when its activation (through views and MaxPool, which keep a tensor quantized) comes from an 8-bit "
        "FakeQuantize and its weights reach a FakeQuantize or an i8/u8 Constant; MACs from the static shapes, "
        "dynamic dims as 1.")


def _walk_ov(model: Any, outer: dict[int, Any], where: str, tally: _Tally) -> None:
    """``outer`` maps a body Parameter (instance id) to the value feeding it in the enclosing model."""

    def source(value: Any) -> Any:
        node = value.get_node()
        while node.get_type_name() == "Parameter" and node.get_instance_id() in outer:
            node = outer[node.get_instance_id()].get_node()
        return node

    def is_fq8(node: Any) -> bool:
        return node.get_type_name() == "FakeQuantize" and int(node.get_attributes().get("levels", 256)) <= 256

    def activation_int8(value: Any) -> bool:
        node = source(value)
        for _ in range(16):
            if node.get_type_name() not in OV_ACTIVATION_SKIP:
                break
            node = source(node.input_value(0))
        return is_fq8(node)

    def weight_int8(value: Any) -> bool:
        node = source(value)
        for _ in range(16):
            if is_fq8(node):
                return True
            if node.get_type_name() == "Constant":
                return node.get_element_type().get_type_name() in OV_8BIT
            if node.get_type_name() not in OV_WEIGHT_SKIP:
                return False
            node = source(node.input_value(0))      # decompression keeps the data on input 0
        return False

    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if t in OV_WEIGHTED and op.get_input_size() >= 2:
            int8 = activation_int8(op.input_value(0)) and weight_int8(op.input_value(1))
            kind = "MatMul" if t == "MatMul" else "ConvTranspose" if "Backprop" in t else "Conv"
            trans_a = bool(op.get_attributes().get("transpose_a", False)) if t == "MatMul" else False
            macs, est = _macs(kind, _ov_shape(op.get_input_partial_shape(0)), _ov_shape(op.get_input_partial_shape(1)),
                              _ov_shape(op.get_output_partial_shape(0)), trans_a)
            tally.add(op.get_friendly_name(), t, macs, est, int8, where)
        for body, descriptions in _ov_bodies(op):
            tally.subgraphs += 1
            params = body.get_parameters()
            inner = dict(outer)
            for d in descriptions:
                inner[params[d.body_parameter_index].get_instance_id()] = op.input_value(d.input_index)
            _walk_ov(body, inner, f"subgraph {op.get_friendly_name()}", tally)


# -------------------------------------------------------------------------------------------- common

def coverage_for(path: Path, runtime: str | None = None) -> dict[str, Any] | None:
    """Coverage of a compiled artifact by its suffix: ``.onnx`` or ``.xml`` (OpenVINO IR); else None.
    ``runtime`` is the backend that runs an ONNX file (``"onnxruntime"``, ``"tensorrt"``; see onnx_coverage)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return onnx_coverage(path, runtime)
    if suffix == ".xml":
        return openvino_coverage(path)
    return None


def describe(cov: dict[str, Any], names: int = 5) -> str:
    """One line for inspect and the build log."""
    if not cov["weighted_ops"]:
        return "no weighted ops (Conv/Gemm/MatMul) to quantize"
    approx = "~" if cov.get("macs_estimated") else ""
    share = cov["macs_share"]
    line = (f"int8 on {approx}{share:.0%} of MACs" if share is not None else "int8 on ? of MACs") + \
        f" ({cov['int8_ops']} of {cov['weighted_ops']} weighted ops)"
    floats = cov["float_ops"]
    if floats:
        shown = ", ".join(f"{f['name']} ({f['type']})" for f in floats[:names])
        more = cov.get("float_ops_total", len(floats)) - min(names, len(floats))
        line += f"; float: {shown}" + (f", ... (+{more} more)" if more > 0 else "")
    sub = cov["subgraphs"]
    if sub["count"]:
        line += (f"; {sub['count']} subgraph{'s' if sub['count'] != 1 else ''}: "
                 f"{sub['int8_ops']} of {sub['weighted_ops']} weighted ops int8")
    return line
