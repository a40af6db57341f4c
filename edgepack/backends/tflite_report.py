"""The TFLite float-op report: which ops of a ``.tflite`` do not compute in integer, and their share
of the MACs; and the kernel check (does the model prepare on XNNPACK and on the builtin kernels)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.backends.tflite_runtime import captured, interpreter_module

# ops that move data between float and integer at the model's edges
EDGE_OPS = ("QUANTIZE", "DEQUANTIZE")
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
_INT = {"int8", "uint8", "int16", "int32", "int64", "bool"}


def _macs(op: str, ins: list[dict[str, Any]], outs: list[dict[str, Any]]) -> int:
    if not outs or op not in WEIGHTED_OPS or len(ins) < 2:
        return 0
    out = int(np.prod(outs[0]["shape"]))
    w = [int(v) for v in ins[1]["shape"]]
    if op == "CONV_2D" and len(w) == 4:
        return out * w[1] * w[2] * w[3]
    if op == "DEPTHWISE_CONV_2D" and len(w) == 4:
        return out * w[1] * w[2]
    if op == "FULLY_CONNECTED" and len(w) == 2:
        return out * w[1]
    if op == "BATCH_MATMUL":
        return out * int(ins[0]["shape"][-1])
    if op == "TRANSPOSE_CONV" and len(w) == 4:
        return int(np.prod(ins[2]["shape"])) * w[0] * w[1] * w[2] if len(ins) > 2 else 0
    return 0


def float_op_report(path: Path, level: str) -> dict[str, Any]:
    """Every op of the ``.tflite`` whose computation is not integer: op type, count, share of MACs.

    Read from the interpreter without delegates (XNNPACK would fold the graph into one DELEGATE op).
    An op is integer when all of its non-constant tensors (activations) are integer; QUANTIZE and
    DEQUANTIZE that only touch the model's inputs/outputs are edge conversions, listed apart.
    """
    mod = interpreter_module()
    interp = mod.Interpreter(model_path=str(path),
                             experimental_op_resolver_type=mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    tensors = {t["index"]: t for t in interp.get_tensor_details()}  # unnamed scratch tensors are not listed
    ops = interp._get_ops_details()  # the public API has no op listing
    produced = {o for op in ops for o in op["outputs"]}
    graph_io = {d["index"] for d in interp.get_input_details()} | {d["index"] for d in interp.get_output_details()}
    counts, float_counts, edge_counts, float_macs = Counter(), Counter(), Counter(), Counter()
    total_macs = 0
    for op in ops:
        name = op["op_name"]
        ins = [tensors[i] for i in op["inputs"] if i in tensors]
        outs = [tensors[i] for i in op["outputs"] if i in tensors]
        acts = [t for t in ins if t["index"] in produced or t["index"] in graph_io] + outs
        macs = _macs(name, ins, outs)
        total_macs += macs
        counts[name] += 1
        if name in EDGE_OPS and any(t["index"] in graph_io for t in ins + outs):
            edge_counts[name] += 1
        elif any(np.dtype(t["dtype"]).name not in _INT for t in acts):
            float_counts[name] += 1
            float_macs[name] += macs
    why = {"int8": "ai-edge-quantizer has no integer kernel policy for this op at this level; it runs in float",
           "int16x8": "no int16-activation kernel for this op; it runs in float",
           "dynamic-int8": "dynamic range: activations stay float, weights are int8 and quantized on the fly",
           "fp16": "float16 weights, float32 compute", "fp32": "float32 model"}[level]
    float_ops = [{"op": n, "count": c, "macs_share": round(float_macs[n] / total_macs, 4) if total_macs else 0.0,
                  "why": why} for n, c in sorted(float_counts.items(), key=lambda kv: (-float_macs[kv[0]], kv[0]))]
    return {
        "level": level,
        "ops_total": sum(counts.values()),
        "op_counts": dict(sorted(counts.items())),
        "float_ops": float_ops,
        "float_ops_total": sum(float_counts.values()),
        "float_macs_share": round(sum(float_macs.values()) / total_macs, 4) if total_macs else 0.0,
        "edge_conversions": dict(sorted(edge_counts.items())),
        "macs_total": total_macs,
        "how": "read from the .tflite with the LiteRT interpreter (no delegates); an op is integer when every "
               "activation tensor it reads or writes is integer; MACs counted from the weight and output shapes "
               "of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, BATCH_MATMUL and TRANSPOSE_CONV",
    }


def kernel_check(path: Path) -> dict[str, str]:
    """Does the model prepare on XNNPACK (LiteRT's default CPU path) and on the builtin kernels (the
    path a device takes for ops its delegate declines)? 'ok' or the runtime's own error."""
    mod = interpreter_module()
    out = {}
    for name, resolver in (("xnnpack", mod.OpResolverType.AUTO),
                           ("builtin_kernels", mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)):
        try:
            with captured(Path(os.devnull)):
                interp = mod.Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
                interp.allocate_tensors()
            out[name] = "ok"
        except Exception as e:  # the runtime raises RuntimeError/ValueError with the failing node
            out[name] = " ".join(str(e).split())[:300] or type(e).__name__
    return out


def describe_float_ops(report: dict[str, Any]) -> str:
    """One line for inspect and the build log."""
    if not report["float_ops"]:
        edges = ", ".join(f"{c} {n}" for n, c in report["edge_conversions"].items())
        return f"0 float ops of {report['ops_total']}" + (f" (edge conversions: {edges})" if edges else "")
    parts = ", ".join(f"{f['op']} x{f['count']} ({f['macs_share']:.0%} of MACs)" for f in report["float_ops"])
    return f"{report['float_ops_total']} float ops of {report['ops_total']}: {parts}"
