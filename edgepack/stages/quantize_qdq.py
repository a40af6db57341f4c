"""Static INT8 QDQ quantization of an ONNX model with ONNX Runtime's quantizer, from ranges fitted
once (:func:`edgepack.calibration.table.fit_ranges`). Used by the ONNX Runtime and TensorRT backends
and by the layer-sensitivity ranking, so each calibration method really yields its own ranges and
"keep these layers in higher precision" means the same thing everywhere (nodes left unquantized)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from typing import Any

from edgepack.calibration.table import CalibrationTable, fit_ranges
from edgepack.errors import ToolchainError


def preprocess(src: Path, dst: Path) -> Path:
    """Shape inference and graph optimisation ONNX Runtime recommends before quantizing.

    ONNX Runtime's symbolic shape inference asserts on some graphs exported by other frameworks
    (Paddle's Concat of shapes); ONNX's own shape inference is used for those instead. Models over
    2 GB keep their weights in an external-data file."""
    import os

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = needs_external_data(src)
    src, dst = src.resolve(), dst.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    # ONNX Runtime writes scratch files (sym_shape_infer_temp.onnx, <uuid>.data for models with external
    # data) into the current directory: run it from a scratch folder of its own, removed afterwards
    scratch = dst.parent / f".{dst.stem}-preprocess"
    scratch.mkdir(exist_ok=True)
    cwd = os.getcwd()
    os.chdir(scratch)
    try:
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=False, save_as_external_data=external)
        except Exception:  # noqa: BLE001 - the symbolic pass raises AssertionError and others
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True, save_as_external_data=external)
    finally:
        os.chdir(cwd)
    kept = {e.value for t in onnx.load(str(dst), load_external_data=False).graph.initializer
            for e in t.external_data if e.key == "location"}
    if not any((scratch / k).exists() for k in kept):  # the model's own data lives beside dst
        shutil.rmtree(scratch, ignore_errors=True)
    return dst


TWO_GB = 2 * 1024**3


def needs_external_data(path: Path) -> bool:
    """True when the model and its external data together reach protobuf's 2 GB limit."""
    return sum(p.stat().st_size for p in model_files(path)) >= TWO_GB


def model_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files its initializers point to."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locs = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    return [path] + [path.parent / loc for loc in locs if (path.parent / loc).is_file()]


def quantize(src: Path, out: Path, calibration: Any, method: str, workdir: Path, *, activation_type: str = "int8",
             symmetric_activations: bool = True, per_channel: bool = True, op_types: list[str] | None = None,
             exclude: list[str] | None = None, extra: dict[str, Any] | None = None, reduce_range: bool = False,
             ranges: tuple[CalibrationTable, Path] | None = None) -> CalibrationTable:
    """Quantize ``src`` (already pre-processed) into ``out``. ``exclude`` names nodes kept in float.

    ``ranges`` reuses a table fitted earlier on the same model (for repeated compiles while tuning).
    """
    from onnxruntime import quantization as q

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            table, ort_file = ranges or fit_ranges(src, calibration, method, workdir / f"calib-{method}")
            q.quantize_static(
                str(src), str(out), None, quant_format=q.QuantFormat.QDQ, op_types_to_quantize=op_types,
                per_channel=per_channel, reduce_range=reduce_range,
                activation_type=q.QuantType.QUInt8 if activation_type == "uint8" else q.QuantType.QInt8,
                weight_type=q.QuantType.QInt8, nodes_to_exclude=list(exclude or []),
                calibrate_method=_ort_method(q, method), calibration_cache_path=ort_file,
                extra_options={"ActivationSymmetric": symmetric_activations, **(extra or {})},
                use_external_data_format=needs_external_data(src),
            )
    except Exception as e:
        (workdir / "quantize.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
        raise ToolchainError(f"ONNX Runtime quantization failed: {e}",
                             hint=f"its log is kept in {workdir / 'quantize.log'}") from e
    return table


def quantize_dynamic(src: Path, out: Path, workdir: Path, *, exclude: list[str] | None = None) -> dict[str, Any]:
    """ONNX Runtime's dynamic quantization of ``src`` into ``out``: INT8 weights (one scale per tensor), and
    each call's activations quantized to UINT8 from their own range at run time, so the weighted ops run
    as integer MatMuls (MatMulInteger / DynamicQuantizeMatMul) with no calibration ranges at all. ONNX
    Runtime's documented route for transformers, whose activation ranges vary too much per input for one
    static scale. ``exclude`` names nodes kept in float."""
    from onnxruntime import quantization as q

    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            q.quantize_dynamic(str(src), str(out), weight_type=q.QuantType.QInt8,
                               nodes_to_exclude=list(exclude or []), use_external_data_format=needs_external_data(src))
    except Exception as e:
        (workdir / "quantize.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
        raise ToolchainError(f"ONNX Runtime dynamic quantization failed: {e}",
                             hint=f"its log is kept in {workdir / 'quantize.log'}") from e
    return {"tool": "onnxruntime.quantization.quantize_dynamic", "activations_at_run_time": "uint8, each call's own range",
            "weights": "int8, per tensor"}


def quantize_nncf(src: Path, out: Path, calibration: Any, workdir: Path, *, activation_type: str = "int8",
                  symmetric_activations: bool = True, exclude: list[str] | None = None, transformer: bool = False,
                  method: str = "minmax") -> dict[str, Any]:
    """INT8 QDQ ONNX through NNCF's ONNX backend with its full bias correction (each layer's bias corrected
    for the output shift quantization causes, layer by layer on the calibration data; Nagel et al. 2019)
    and 8-bit weights on the first layer too (no 7-bit overflow fix). ``exclude`` names nodes kept in float.
    Asymmetric uint8 activations (the ``onnx`` profile) map to NNCF's mixed preset (asymmetric activations,
    symmetric per-channel int8 weights), symmetric ones to its performance preset. Returns what was set."""
    from edgepack.backends.openvino import quiet_usage_telemetry

    quiet_usage_telemetry()
    try:
        import nncf
        import onnx
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            OverflowFix,
            QuantizationParameters,
        )
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    except ImportError as e:
        raise ToolchainError(f"the bias-correction recipe needs NNCF, which is not installed ({e})",
                             hint="pip install 'edgepack[openvino]' (NNCF quantizes ONNX models too)") from e
    if needs_external_data(src):
        raise ToolchainError("the bias-correction recipe does not take models over 2 GB (NNCF's ONNX backend "
                             "loads the model into one protobuf)")
    mixed = activation_type == "uint8" and not symmetric_activations
    estimator = {"minmax": "MINMAX", "entropy": "HISTOGRAM", "percentile": "MEAN_QUANTILE"}[method]
    log = io.StringIO()
    try:
        model = onnx.load(str(src))
        quantize_outputs = _output_views(model)
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            model = nncf.quantize(
                model, nncf.Dataset(calibration.samples),
                preset=nncf.QuantizationPreset.MIXED if mixed else nncf.QuantizationPreset.PERFORMANCE,
                subset_size=len(calibration), fast_bias_correction=False,
                model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                ignored_scope=nncf.IgnoredScope(names=list(exclude), validate=False) if exclude else None,
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix.DISABLE, quantize_outputs=quantize_outputs,
                    # per-tensor activations: ONNX Runtime runs a Conv in INT8 only with one input scale
                    # (NNCF would give depthwise convs per-channel input scales, which run them in float)
                    activations_quantization_params=QuantizationParameters(per_channel=False),
                    activations_range_estimator_params=getattr(RangeEstimatorParametersSet, estimator)))
            if activation_type == "uint8":
                _activations_to_uint8(model)
            onnx.save(model, str(out))
    except Exception as e:  # noqa: BLE001 - NNCF raises its own errors and internal ones alike
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "nncf.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
        raise ToolchainError(f"NNCF quantization of the ONNX model failed: {e}",
                             hint=f"its log is kept in {workdir / 'nncf.log'}") from e
    return {"tool": "nncf.quantize (ONNX backend)", "nncf": nncf.__version__,
            "preset": "mixed" if mixed else "performance", "fast_bias_correction": False, "overflow_fix": "disable",
            "range_estimator": f"nncf RangeEstimatorParametersSet.{estimator}", "quantize_outputs": quantize_outputs}


def _output_views(model: Any) -> bool:
    """Ready ``model`` for NNCF's ``quantize_outputs`` when a Gemm/MatMul writes a graph output (a classifier);
    True when it did. NNCF quantizes op inputs, not a model's output, so a classifier Gemm ends without a
    QuantizeLinear, and ONNX Runtime (1.32, CPU) then leaves it in float although its input and weight are
    quantized; with a QuantizeLinear after it the Gemm becomes a QGemm (EfficientNet-Lite0, measured). NNCF
    3.4's ONNX backend refuses a quantizer on an edge that ends in a graph output ("does not have end node"):
    each graph output gets an Identity in front (ONNX Runtime drops it)."""
    import onnx

    producers = {o: n for n in model.graph.node for o in n.output}
    outputs = list(model.graph.output)
    if not any(o.name in producers and producers[o.name].op_type in ("Gemm", "MatMul") for o in outputs) or any(
            o.type.tensor_type.elem_type != onnx.TensorProto.FLOAT or o.name not in producers for o in outputs):
        return False  # nothing ONNX Runtime would leave in float, or outputs NNCF should not quantize
    for o in outputs:
        node = producers[o.name]
        inner = f"{o.name}_before_output"
        node.output[list(node.output).index(o.name)] = inner
        for n in model.graph.node:  # other readers of the tensor read it from its new name
            n.input[:] = [inner if i == o.name else i for i in n.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [o.name], name=f"{o.name}_output"))
    return True


def _activations_to_uint8(model: Any) -> int:
    """NNCF writes asymmetric activations as int8 with a zero point; the same grid in uint8 is the zero point
    plus 128 (q + 128 for every value: exactly the same dequantized numbers). ONNX Runtime's fast x86 kernels
    take uint8 activations (U8S8). Weights (constant inputs) stay int8. Returns how many pairs were changed."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    users: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    changed, outs = 0, set()
    for n in model.graph.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3 or n.input[0] in inits or n.input[2] not in inits:
            continue
        dqs = users.get(n.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or len(d.input) < 3 for d in dqs):
            continue
        group = [n, *dqs]
        zps = {d.input[2] for d in group}
        # each zero point int8 and read by this Q/DQ group alone, so changing it changes nothing else
        if any(z not in inits or numpy_helper.to_array(inits[z]).dtype != np.int8
               or any(u not in group for u in users[z]) for z in zps):
            continue
        for z in zps:
            shifted = (numpy_helper.to_array(inits[z]).astype(np.int16) + 128).astype(np.uint8)
            inits[z].CopyFrom(numpy_helper.from_array(shifted, z))
        outs.add(n.output[0])
        changed += 1
    for vi in model.graph.value_info:  # the quantized tensors' declared type follows
        if vi.name in outs:
            vi.type.tensor_type.elem_type = onnx.TensorProto.UINT8
    return changed


def _ort_method(q: Any, method: str) -> Any:
    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]
