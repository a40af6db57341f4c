"""OpenVINO for x86 CPUs. INT8 through NNCF post-training quantization of the OpenVINO model
(quantizing the converted model avoids NNCF's torch C++ extension build)."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend
from edgepack.errors import ToolchainError


class OVRunner:
    def __init__(self, ov: Any, path: Path, threads: int):
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.n_outputs = len(self.compiled.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feeds, share_inputs=True)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_outputs)]


class OpenVINOBackend(Backend):
    name: ClassVar[str] = "openvino"
    produces: ClassVar[ModelFormat] = ModelFormat.OPENVINO_IR
    extra: ClassVar[str] = "openvino"
    runtime_package: ClassVar[str] = "openvino"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")

    class Options(Backend.Options):
        preset: Literal["performance", "mixed"] = "performance"
        fast_bias_correction: bool = True
        device: Literal["CPU"] = "CPU"

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        ov = self._import("openvino", "OpenVINO runtime")
        versions = {"openvino": ov.get_version()}
        if compile:
            versions["nncf"] = self._import("nncf", "NNCF quantization").__version__
        return versions

    def load(self, path: Path, threads: int) -> OVRunner:
        return OVRunner(self._import("openvino", "OpenVINO runtime"), path, threads)

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        started = time.perf_counter()
        ov = self._import("openvino", "OpenVINO")
        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / "model.xml"
        try:
            ov_model = ov.convert_model(str(model.path))
        except Exception as e:
            raise ToolchainError(f"OpenVINO could not convert {model.path.name}: {e}") from e
        cfg: dict[str, Any] = {"backend": self.name, "precision": target.precision,
                               "tool": "openvino.convert_model", "device": options.device}
        if target.precision == "int8":
            nncf = self._import("nncf", "NNCF quantization")
            qc = target.quantization
            log = io.StringIO()
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            estimator = getattr(RangeEstimatorParametersSet, RANGE_ESTIMATORS[qc.calibration_method])
            ignored, missing = _ignored_names(ov_model, qc.keep_float)
            transformer = model.details.get("model_type") == "transformer"
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _quiet_nncf():
                    ov_model = nncf.quantize(
                        ov_model,
                        nncf.Dataset(list(calibration)),
                        preset=(nncf.QuantizationPreset.PERFORMANCE if options.preset == "performance"
                                else nncf.QuantizationPreset.MIXED),
                        subset_size=len(calibration),
                        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                        fast_bias_correction=options.fast_bias_correction,
                        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
                        advanced_parameters=AdvancedQuantizationParameters(
                            activations_range_estimator_params=estimator),
                    )
            except Exception as e:
                (workdir / "nncf.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
                raise ToolchainError(f"NNCF quantization failed: {e}",
                                     hint=f"its log is kept in {workdir / 'nncf.log'}") from e
            cfg.update({"tool": "nncf.quantize", "nncf": nncf.__version__, "preset": options.preset,
                        "per_channel_weights": True, "calibration_method": qc.calibration_method,
                        "range_estimator": f"nncf RangeEstimatorParametersSet.{RANGE_ESTIMATORS[qc.calibration_method]}",
                        "kept_in_float": list(qc.keep_float), "kept_not_found": missing,
                        "model_type": "transformer" if transformer else "default",
                        "fast_bias_correction": options.fast_bias_correction,
                        "calibration_samples": len(calibration),
                        "calibration_fingerprint": calibration.fingerprint})
        ov.save_model(ov_model, str(xml), compress_to_fp16=target.precision == "fp16")
        files = (xml, xml.with_suffix(".bin"))
        return model.derive("compile", cfg, started, path=xml, files=files, format=self.produces,
                            precision=target.precision)


# edgepack's method names -> NNCF's activation range estimators (NNCF has no entropy calibrator;
# its histogram estimator is the closest)
RANGE_ESTIMATORS = {"minmax": "MINMAX", "entropy": "HISTOGRAM", "percentile": "MEAN_QUANTILE"}


def _ignored_names(ov_model: Any, onnx_nodes: list[str]) -> tuple[list[str], list[str]]:
    """OpenVINO op names for ONNX node names: the ONNX frontend keeps the node's name, or its name
    plus a suffix (``/0/Conv`` -> ``/0/Conv/WithoutBiases`` and the bias ``Add``)."""
    names = [op.get_friendly_name() for op in ov_model.get_ops()]
    found, missing = [], []
    for node in onnx_nodes:
        hits = [n for n in names if n == node or n.startswith(node + "/")]
        found += hits
        if not hits:
            missing.append(node)
    return found, missing


@contextlib.contextmanager
def _quiet_nncf():
    lg = logging.getLogger("nncf")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)
