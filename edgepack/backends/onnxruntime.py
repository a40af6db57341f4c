"""ONNX Runtime: the portable reference runtime, and static INT8 QDQ quantization."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend
from edgepack.errors import ToolchainError
from edgepack.stages.adaround import AdaRoundOptions

TRANSFORMER_OPS = ["MatMul", "Gemm", "Conv"]


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
        try:
            return self.session.run(None, feeds)
        except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException: the model or its shapes
            from edgepack.errors import ModelError

            shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in feeds.items())
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"ONNX Runtime could not run the model on inputs {shapes}: {first[:300]}",
                             hint="check `inputs` and `dims` in edgepack.yaml: a fixed size the model's graph "
                                  "cannot take (a reshape or control flow built for another size) fails here") from e

    def prepare(self, feeds: dict[str, np.ndarray]) -> Any:
        """Inputs and outputs bound to the session once (IOBinding); ``invoke`` then only runs it."""
        binding = self.session.io_binding()
        arrays = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        for name, a in arrays.items():
            binding.bind_cpu_input(name, a)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        return binding, arrays  # the arrays stay referenced while the binding points at them

    def invoke(self, prepared: Any) -> list[Any]:
        self.session.run_with_iobinding(prepared[0])
        return prepared[0].get_outputs()  # OrtValues, not copied


class ONNXRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    produces: ClassVar[str] = ModelFormat.ONNX
    extra: ClassVar[str] = "onnx"
    runtime_package: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "int8")
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")
    # U8S8 (uint8 activations, int8 weights) is MLAS's fast path on AVX2 without VNNI
    activation_types: ClassVar[tuple[str, ...]] = ("int8", "uint8")
    # ONNX Runtime's percentile calibrator is not tried by the search (a profile may still name it): on
    # EfficientNet-Lite0 it ran for over 8 minutes of the 10-minute cap on a loaded 2-core host, blocking
    # the recovery methods behind it, for what was measured elsewhere as a marginal change
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax", "entropy")
    # INT8 recovery the accuracy search tries before it keeps any layer in float (quantization.recipe):
    # bias-correction: NNCF's ONNX backend with its full bias correction (quantize_qdq.quantize_nncf);
    # dynamic (transformers only): ONNX Runtime's dynamic quantization, activation scales from each call's
    # own range (quantize_qdq.quantize_dynamic), where one static range per tensor loses too much;
    # adaround (CNNs): AdaRound's learned weight rounding through AMD Quark in its own environment (the
    # quark toolchain; adaround.quantize_adaround), the costliest, so last. EfficientNet-Lite0: 89.5%
    # top-1 agreement with bias-correction, 93.0% with AdaRound on 64 samples, every layer in INT8
    recovery_methods: ClassVar[tuple[str, ...]] = ("bias-correction", "dynamic", "adaround")

    class Options(Backend.Options, AdaRoundOptions):  # adaround_samples/_iterations/_timeout_s
        quant_format: Literal["qdq"] = "qdq"
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
            files = []
            for f in model.all_files:  # the model and its external data, same relative names
                dst = workdir / f.relative_to(model.path.parent)
                dst.parent.mkdir(parents=True, exist_ok=True)
                files.append(Path(shutil.copyfile(f, dst)))
            out = workdir / model.path.name
            return model.derive("compile", {"backend": self.name, "precision": "fp32"}, started,
                                path=out, files=tuple(files), precision="fp32")
        self.check_profile(target)  # quantize_qdq knows int8 and uint8 activations only
        self._import("onnxruntime.quantization", "ONNX Runtime quantization")
        from edgepack.stages import adaround, quantize_qdq

        qc = target.quantization
        src = quantize_qdq.preprocess(model.path, workdir / "preprocessed.onnx") if options.preprocess else model.path
        # transformers: only the weighted ops; attention masks (finfo.min) and softmax stay in float
        transformer = model.details.get("model_type") == "transformer"
        op_types = TRANSFORMER_OPS if transformer else None
        recipe: dict[str, Any] = {"tool": "onnxruntime.quantization.quantize_static"}
        if qc.recipe == "bias-correction":
            recipe = quantize_qdq.quantize_nncf(src, out, calibration, workdir, activation_type=qc.activation_type,
                                                symmetric_activations=qc.symmetric_activations,
                                                exclude=qc.keep_float, transformer=transformer,
                                                method=qc.calibration_method)
        elif qc.recipe == "dynamic":
            if not transformer:  # CNNs would run ConvInteger, slower than static INT8 on ONNX Runtime's CPU kernels
                raise ToolchainError("the dynamic recipe is for transformer models (their MatMuls); this model's "
                                     "convolutions stay with static INT8", hint="the search goes on without it")
            recipe = quantize_qdq.quantize_dynamic(src, out, workdir, exclude=qc.keep_float)
        elif qc.recipe == "adaround":
            if transformer:  # not measured on transformers here; their INT8 goes through the dynamic recipe
                raise ToolchainError("the adaround recipe is for convolutional models; it is not tried on "
                                     "transformers", hint="the search goes on without it")
            recipe = adaround.quantize_adaround(
                src, out, calibration, workdir, activation_type=qc.activation_type,
                symmetric_activations=qc.symmetric_activations, per_channel=qc.per_channel,
                method=qc.calibration_method, exclude=qc.keep_float, samples=options.adaround_samples,
                iterations=options.adaround_iterations, timeout_s=options.adaround_timeout_s)
        elif qc.recipe != "default":
            raise ToolchainError(f"the onnxruntime backend has no INT8 recipe '{qc.recipe}'",
                                 hint=f"known: default, {', '.join(self.recovery_methods)}")
        else:
            quantize_qdq.quantize(src, out, calibration, qc.calibration_method, workdir,
                                  activation_type=qc.activation_type, symmetric_activations=qc.symmetric_activations,
                                  per_channel=qc.per_channel, exclude=qc.keep_float, op_types=op_types,
                                  reduce_range=options.reduce_range)
        (workdir / "preprocessed.onnx").unlink(missing_ok=True)
        cfg = {"backend": self.name, "precision": "int8", **recipe, "recipe": qc.recipe,
               "format": "qdq", "kept_in_float": list(qc.keep_float), "activations": qc.activation_type, "weights": qc.weight_type,
               "per_channel": qc.per_channel, "symmetric_activations": qc.symmetric_activations,
               "calibration_method": qc.calibration_method, "calibration_samples": len(calibration),
               "calibration_fingerprint": calibration.fingerprint,
               "quantized_op_types": op_types or "all ops ONNX Runtime quantizes"}
        if qc.recipe == "dynamic":  # no QDQ, no calibration: integer ops, activations quantized per call
            cfg = {k: v for k, v in cfg.items() if not k.startswith(("calibration", "symmetric", "per_channel"))}
            cfg.update(format="integer ops (dynamic)", activations=recipe["activations_at_run_time"],
                       quantized_op_types="all ops ONNX Runtime quantizes dynamically")
        return model.derive("compile", cfg, started, path=out, files=tuple(quantize_qdq.model_files(out)),
                            precision="int8")
