"""ONNX Runtime: the portable reference runtime, and static INT8 QDQ quantization."""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend
from edgepack.errors import ToolchainError


class ORTRunner:
    def __init__(self, ort: Any, path: Path, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # no spinning: keeps timings of models measured one after another independent
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a SampleSet."""

    def __init__(self, samples: Any):
        self._it = iter(list(samples))

    def get_next(self) -> dict | None:
        return next(self._it, None)

    def rewind(self) -> None:  # pragma: no cover - called by some calibrators only
        pass


class ONNXRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    produces: ClassVar[ModelFormat] = ModelFormat.ONNX
    extra: ClassVar[str] = "onnx"
    runtime_package: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")

    class Options(Backend.Options):
        quant_format: Literal["qdq", "qoperator"] = "qdq"
        preprocess: bool = True
        reduce_range: bool = False

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        ort = self._import("onnxruntime", "ONNX Runtime")
        versions = {"onnxruntime": ort.__version__}
        if compile:
            versions["onnx"] = self._import("onnx", "ONNX").__version__
        return versions

    def load(self, path: Path, threads: int) -> ORTRunner:
        return ORTRunner(self._import("onnxruntime", "ONNX Runtime"), path, threads)

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        started = time.perf_counter()
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / "model.onnx"
        if target.precision == "fp32":
            shutil.copyfile(model.path, out)
            return model.derive("compile", {"backend": self.name, "precision": "fp32"}, started,
                                path=out, files=(out,), precision="fp32")
        q = self._import("onnxruntime.quantization", "ONNX Runtime quantization")
        src = model.path
        log = io.StringIO()
        qc = target.quantization
        try:
            with contextlib.redirect_stdout(log), _quiet():
                if options.preprocess:
                    pre = workdir / "preprocessed.onnx"
                    q.shape_inference.quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
                    src = pre
                q.quantize_static(
                    str(src), str(out), _Reader(calibration),
                    quant_format=q.QuantFormat.QDQ if options.quant_format == "qdq" else q.QuantFormat.QOperator,
                    activation_type=q.QuantType.QUInt8 if qc.activation_type == "uint8" else q.QuantType.QInt8,
                    weight_type=q.QuantType.QInt8,
                    per_channel=qc.per_channel,
                    reduce_range=options.reduce_range,
                    calibrate_method={"minmax": q.CalibrationMethod.MinMax,
                                      "entropy": q.CalibrationMethod.Entropy,
                                      "percentile": q.CalibrationMethod.Percentile}[qc.calibration_method],
                    extra_options={"ActivationSymmetric": qc.symmetric_activations},
                )
        except Exception as e:
            (workdir / "quantize.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
            raise ToolchainError(f"ONNX Runtime quantization failed: {e}",
                                 hint=f"its log is kept in {workdir / 'quantize.log'}") from e
        finally:
            (workdir / "preprocessed.onnx").unlink(missing_ok=True)
        cfg = {"backend": self.name, "precision": "int8", "tool": "onnxruntime.quantization.quantize_static",
               "format": options.quant_format, "activations": qc.activation_type, "weights": qc.weight_type,
               "per_channel": qc.per_channel, "symmetric_activations": qc.symmetric_activations,
               "calibration_method": qc.calibration_method, "calibration_samples": len(calibration),
               "calibration_fingerprint": calibration.fingerprint}
        return model.derive("compile", cfg, started, path=out, files=(out,), precision="int8")


@contextlib.contextmanager
def _quiet():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
