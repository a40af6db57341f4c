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
from pydantic import BaseModel, Field

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend
from edgepack.errors import native_write_error, ToolchainError


_CORE: list[Any] = []


TELEMETRY_METHODS = ("send_event", "start_session", "end_session", "send_error", "send_stack_trace")


def quiet_usage_telemetry() -> None:
    """Turn off OpenVINO's and NNCF's usage telemetry in this process unless the user opted in.

    ``openvino.convert_model`` and ``nncf.quantize`` send usage events through ``openvino_telemetry``
    whenever its consent file is absent (they do not ask), and each event forks the calling process to
    post it: about 15 forks of a build holding more than 1 GB per conversion, 1.3-1.5 s of a
    ResNet-50-sized build's wall time on 2 CPUs. A user who opted in with OpenVINO's ``opt_in_out
    --opt_in`` (the consent file says so) keeps sending them; nothing on disk is changed."""
    try:
        from openvino_telemetry import Telemetry
    except ImportError:
        return
    for name in TELEMETRY_METHODS:
        sent = getattr(Telemetry, name, None)
        if sent is None or getattr(sent, "edgepack_quiet", False):
            continue

        def call(self: Any, *args: Any, _sent: Any = sent, **kwargs: Any) -> Any:
            return _sent(self, *args, **kwargs) if _opted_in() else None

        call.edgepack_quiet = True  # type: ignore[attr-defined]
        call.__wrapped__ = sent  # type: ignore[attr-defined]
        setattr(Telemetry, name, call)


def _opted_in() -> bool:
    try:
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        return OptInChecker().check(enable_opt_in_dialog=False) == ConsentCheckResult.ACCEPTED
    except Exception:  # noqa: BLE001  an unreadable or unknown consent record: no consent
        return False


def _core(ov: Any) -> Any:
    """One OpenVINO Core per process, as OpenVINO intends: every Core keeps its own CPU thread pool, and
    two models compiled on two Cores and run in turn contend for the cores (measured on a 2-core host:
    0.18 ms per call against 0.11 ms for the same model when both share one Core)."""
    if not _CORE:
        _CORE.append(ov.Core())
    return _CORE[0]


# INT8 recovery methods (quantization.recipe), cheapest first: what each changes in NNCF's post-training
# pipeline. "bias-correction": NNCF's full BiasCorrection (Nagel et al., 2019: each layer's bias corrected for
# the output shift its quantized inputs and weights cause, layer by layer on the calibration data) instead of
# the fast one; the first layer's weights in 8 bits instead of NNCF's 7-bit overflow fix (which guards u8 x s8
# pair sums on CPUs without VNNI: the search keeps the recipe only for its accuracy measured on the target's
# runtime); and one activation scale per tensor (NNCF gives depthwise convs' inputs one per channel, which
# its bias correction then works against). Measured on EfficientNet-Lite0 (the example; 2-core AVX2 host
# without VNNI; top-1 agreement with FP32 on 200 crops): plain 77.0%; full bias correction and 8-bit first
# layer 86.0%; with per-tensor activations too 89.5%; every layer in INT8 each time. With the minmax method
# the recipe takes NNCF's own range estimators (the mean of each sample's min and max for a per-tensor
# activation, global min/max per channel): global min/max on every activation gave 86.5% there.
# "bias-correction-all-samples": the same, with the bias correction measured on every calibration sample
# (NNCF's full BiasCorrection takes a fifth of subset_size: 60 of 300 samples otherwise): 91.0% (cosine
# 0.9935 against 0.9929), every layer in INT8. "bias-correction-median-ranges": that, with each per-tensor
# activation range the median over the samples of their min and max (NNCF's MEDIAN_MINMAX, tighter than the
# mean where a few crops reach far): 90.5% at the best cosine measured (0.9957). Tried and not kept, same
# data (benchmarks/results-int8_recovery.md): asymmetric activations (MIXED) 87.5%, HISTOGRAM ranges 89.0%,
# SmoothQuant on convs 77.5%, per-channel activations 87.0%; NNCF 3.4's channel alignment fails on it.
RECIPES: dict[str, dict[str, Any]] = {
    "bias-correction": {"fast_bias_correction": False, "overflow_fix": "disable", "per_tensor_activations": True,
                        "activation_ranges": "nncf", "bias_correction_all_samples": False},
    "bias-correction-all-samples": {"fast_bias_correction": False, "overflow_fix": "disable",
                                    "per_tensor_activations": True, "activation_ranges": "nncf",
                                    "bias_correction_all_samples": True},
    "bias-correction-median-ranges": {"fast_bias_correction": False, "overflow_fix": "disable",
                                      "per_tensor_activations": True, "activation_ranges": "MEDIAN_MINMAX",
                                      "bias_correction_all_samples": True},
}


def recipe_settings(recipe: str, fast_bias_correction: bool) -> dict[str, Any]:
    """NNCF settings for ``quantization.recipe`` ("default": the profile's backend options).
    ``activation_ranges`` (used with the minmax method; other methods keep their own estimator): "method"
    (NNCF's MINMAX set), "nncf" (NNCF's defaults) or a ``RangeEstimatorParametersSet`` name."""
    if recipe == "default":
        return {"fast_bias_correction": fast_bias_correction, "overflow_fix": "first_layer",
                "per_tensor_activations": False, "activation_ranges": "method",
                "bias_correction_all_samples": False}
    if recipe not in RECIPES:
        raise ToolchainError(f"the openvino backend has no INT8 recipe '{recipe}'",
                             hint=f"known: default, {', '.join(RECIPES)}")
    return dict(RECIPES[recipe])


def nncf_ranges(recipe: dict[str, Any], calibration_method: str) -> str | None:
    """The RangeEstimatorParametersSet name for activations (None: NNCF's own defaults)."""
    ranges = recipe["activation_ranges"] if calibration_method == "minmax" else "method"
    if ranges == "nncf":
        return None
    return RANGE_ESTIMATORS[calibration_method] if ranges == "method" else ranges


def nncf_subset_size(recipe: dict[str, Any], samples: int) -> int:
    """``subset_size`` for nncf.quantize: the calibration set, or five times it so that the full
    BiasCorrection (which takes a fifth of it) sees every sample (the range statistics take at most the set)."""
    return 5 * samples if recipe["bias_correction_all_samples"] and not recipe["fast_bias_correction"] else samples


class OVRunner:
    def __init__(self, ov: Any, path: Path, threads: int):
        self.ov = ov
        core = _core(ov)
        # f32: on CPUs with bf16 kernels (AVX-512 BF16, AMX) OpenVINO otherwise runs every float layer in
        # bf16, so an "fp32" bundle's outputs (and its float layers' accuracy) would depend on the host
        # (4e-4 off the ONNX reference on a Zen 4 host against 1e-6 with this hint)
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                  "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = core.compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.n_outputs = len(self.compiled.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer(feeds, share_inputs=True)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_outputs)]

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bind the inputs to the request once (as device code does); ``invoke`` then only runs it."""
        bound = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        for name, a in bound.items():
            self.request.set_tensor(name, self.ov.Tensor(a, shared_memory=True))
        return bound

    def invoke(self, prepared: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.request.infer()
        return [self.request.get_output_tensor(i).data for i in range(self.n_outputs)]  # views, no copy


class OpenVINOBackend(Backend):
    name: ClassVar[str] = "openvino"
    produces: ClassVar[str] = ModelFormat.OPENVINO_IR
    extra: ClassVar[str] = "openvino"
    runtime_package: ClassVar[str] = "openvino"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    packages: ClassVar[tuple[str, ...]] = ("openvino", "nncf")
    # NNCF's percentile estimator (MEAN_QUANTILE) is not tried by the search: on EfficientNet-Lite0 it took
    # 3x the time of minmax and agreed with FP32 on 37% of the crops against minmax's 77%
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax", "entropy")
    # INT8 recovery the accuracy search tries before it keeps any layer in float (cheapest first)
    recovery_methods: ClassVar[tuple[str, ...]] = tuple(RECIPES)

    class Options(Backend.Options):
        preset: Literal["performance", "mixed"] = "performance"
        fast_bias_correction: bool = True
        device: Literal["CPU"] = "CPU"
        # OpenVINO's CPU plugin runs a static shape without shape inference and with its static
        # kernels (the input's quantization fuses into a subgraph): measured 0.118 against 0.138 ms per
        # call for the example CNN at batch 1 (2 threads). Other symbolic dims (a text's length) stay.
        static_batch: bool = Field(default=True, description="fix the batch dim of the shipped IR to the "
                                   "profile's measurement batch (false: keep it dynamic for batched serving)")

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
        quiet_usage_telemetry()
        workdir.mkdir(parents=True, exist_ok=True)
        xml = workdir / "model.xml"
        try:
            ov_model = ov.convert_model(str(model.path))
        except Exception as e:
            raise ToolchainError(f"OpenVINO could not convert {model.path.name}: {e}") from e
        cfg: dict[str, Any] = {"backend": self.name, "precision": target.precision,
                               "tool": "openvino.convert_model", "device": options.device}
        if options.static_batch:
            fixed = _fix_batch(ov, ov_model, model.inputs, target.measurement.batch)
            if fixed:
                cfg["batch_fixed"] = {"batch": target.measurement.batch, "inputs": fixed}
        if target.precision == "int8":
            nncf = self._import("nncf", "NNCF quantization")
            qc = target.quantization
            log = io.StringIO()
            from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
            from nncf.quantization.range_estimator import RangeEstimatorParametersSet

            ignored, missing = _ignored_names(ov_model, qc.keep_float)
            transformer = model.details.get("model_type") == "transformer"
            recipe = recipe_settings(qc.recipe, options.fast_bias_correction)
            ranges = nncf_ranges(recipe, qc.calibration_method)
            advanced: dict[str, Any] = {} if ranges is None else {
                "activations_range_estimator_params": getattr(RangeEstimatorParametersSet, ranges)}
            if recipe["overflow_fix"] != "first_layer":
                from nncf.quantization.advanced_parameters import OverflowFix

                advanced["overflow_fix"] = OverflowFix(recipe["overflow_fix"])
            if recipe["per_tensor_activations"]:
                from nncf.quantization.advanced_parameters import QuantizationParameters

                advanced["activations_quantization_params"] = QuantizationParameters(per_channel=False)
            try:
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), _quiet_nncf():
                    ov_model = nncf.quantize(
                        ov_model,
                        nncf.Dataset(calibration.samples),
                        preset=(nncf.QuantizationPreset.PERFORMANCE if options.preset == "performance"
                                else nncf.QuantizationPreset.MIXED),
                        subset_size=nncf_subset_size(recipe, len(calibration)),
                        model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                        fast_bias_correction=recipe["fast_bias_correction"],
                        ignored_scope=nncf.IgnoredScope(names=ignored, validate=False) if ignored else None,
                        advanced_parameters=AdvancedQuantizationParameters(**advanced),
                    )
            except Exception as e:
                (workdir / "nncf.log").write_text(log.getvalue() + f"\n{type(e).__name__}: {e}\n")
                raise ToolchainError(f"NNCF quantization failed: {e}",
                                     hint=f"its log is kept in {workdir / 'nncf.log'}") from e
            cfg.update({"tool": "nncf.quantize", "nncf": nncf.__version__, "preset": options.preset,
                        "per_channel_weights": True, "calibration_method": qc.calibration_method,
                        "range_estimator": "nncf's defaults (MEAN_MINMAX per-tensor, MINMAX per-channel)"
                        if ranges is None else f"nncf RangeEstimatorParametersSet.{ranges}",
                        "kept_in_float": list(qc.keep_float), "kept_not_found": missing,
                        "model_type": "transformer" if transformer else "default",
                        "fast_bias_correction": recipe["fast_bias_correction"], "recipe": qc.recipe,
                        "overflow_fix": recipe["overflow_fix"], "per_tensor_activations": recipe["per_tensor_activations"],
                        "calibration_samples": len(calibration),
                        "bias_correction_samples": _bias_correction_samples(recipe, len(calibration)),
                        "calibration_fingerprint": calibration.fingerprint})
        try:
            ov.save_model(ov_model, str(xml), compress_to_fp16=target.precision == "fp16")
        except RuntimeError as e:
            raise native_write_error(e, xml, "saving the OpenVINO model") from e
        files = (xml, xml.with_suffix(".bin"))
        return model.derive("compile", cfg, started, path=xml, files=files, format=self.produces,
                            precision=target.precision)


def _bias_correction_samples(recipe: dict[str, Any], samples: int) -> int:
    """How many calibration samples NNCF's bias correction uses (the full one: a fifth of subset_size)."""
    if recipe["fast_bias_correction"]:
        return samples
    return min(samples, max(nncf_subset_size(recipe, samples) // 5, 1))


def _fix_batch(ov: Any, ov_model: Any, specs: tuple, batch: int) -> list[str]:
    """Reshape every input whose spec has a ``batch`` dim to that batch; returns their names."""
    shapes = {}
    for spec in specs:
        if "batch" not in spec.shape:
            continue
        ps = ov_model.input(spec.name).get_partial_shape()
        shapes[spec.name] = ov.PartialShape([ov.Dimension(batch) if d == "batch" else ps[i]
                                             for i, d in enumerate(spec.shape)])
    if shapes:
        try:
            ov_model.reshape(shapes)
        except Exception as e:
            raise ToolchainError(f"OpenVINO could not fix the batch dim to {batch}: {e}",
                                 hint="set backend_options.static_batch: false in the target profile") from e
    return sorted(shapes)


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
