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

    external = _needs_external_data(src)
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


def _needs_external_data(path: Path) -> bool:
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
                use_external_data_format=_needs_external_data(src),
            )
    except Exception as e:
        (workdir / "quantize.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
        raise ToolchainError(f"ONNX Runtime quantization failed: {e}",
                             hint=f"its log is kept in {workdir / 'quantize.log'}") from e
    return table


def _ort_method(q: Any, method: str) -> Any:
    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]
