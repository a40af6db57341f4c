"""LiteRT (TFLite) for phones and small Arm boards.

Conversion: the PyTorch program (``model.pt2``) -> float32 ``.tflite`` with ``litert-torch``, image
inputs turned channel-last (NHWC) on the way; then ``ai-edge-quantizer`` with the project's own
calibration samples for the INT8 levels. Runs on the LiteRT interpreter (``ai-edge-litert``, XNNPACK),
or ``tflite-runtime`` where only that is installed.

Quantization levels, from most to least integer (the build falls back along this ladder when a level
fails to convert or misses the accuracy budget):

- ``int8``: full integer, int8 weights (per-channel, symmetric) and int8 activations (static, calibrated)
- ``int16x8``: int8 weights, int16 activations (static, calibrated)
- ``dynamic-int8``: int8 weights, float activations quantized at run time by the kernels
- ``fp16``: float16 weights, float32 compute

Next to ``model.tflite`` the backend writes ``io.json``: for every input and output, the tensor name in
the ``.tflite`` signature, the layout the model expects (NHWC after conversion), the dtype and the
quantization (scale, zero point). The runner applies it, so callers feed the project's own layout in
float and get float outputs back; device code reads the same file.
"""


from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend, manifest_field
from edgepack.backends.tflite_convert import problem
from edgepack.backends.tflite_report import describe_float_ops, float_op_report, kernel_check
from edgepack.backends.tflite_runtime import (IO_FILE, SIGNATURE, TFLiteRunner, captured, interpreter_module,
                                              matched, signature_inputs)
from edgepack.errors import ConfigError, MissingDependencyError, ToolchainError

__all__ = ["IO_FILE", "LEVELS", "SIGNATURE", "TFLiteBackend", "TFLiteRunner", "describe_float_ops",
           "float_op_report", "kernel_check"]

LEVELS = {
    "int8": "full integer: int8 weights (per-channel, symmetric) and int8 activations (static, calibrated)",
    "int16x8": "int8 weights (per-channel) and int16 activations (static, calibrated)",
    "dynamic-int8": "dynamic range: int8 weights, float activations quantized at run time",
    "fp16": "float16 weights, float32 compute",
    "fp32": "float32",
}
LEVEL_PRECISION = {"int8": "int8", "int16x8": "int16x8", "dynamic-int8": "dynamic-int8", "fp16": "fp16", "fp32": "fp32"}


class TFLiteBackend(Backend):
    name: ClassVar[str] = "tflite"
    produces: ClassVar[str] = ModelFormat.TFLITE
    consumes: ClassVar[str] = ModelFormat.TORCH
    extra: ClassVar[str] = "tflite"
    runtime_package: ClassVar[str] = "ai-edge-litert"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    packages: ClassVar[tuple[str, ...]] = ("ai-edge-litert", "tflite-runtime", "litert-torch", "ai-edge-quantizer")
    # ai-edge-quantizer's static recipes calibrate min/max ranges only
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax",)
    fallback_levels: ClassVar[tuple[str, ...]] = ("int8", "int16x8", "dynamic-int8", "fp16")

    class Options(Backend.Options):
        io_dtype: Literal["int8", "float32"] = "int8"
        channel_last: bool = True
        level: Literal["int8", "int16x8", "dynamic-int8", "fp16", "fp32"] | None = None
        static_dims: dict[str, int] = {}
        # refuse (and fall back from) a level whose model prepares only under XNNPACK
        require_builtin_kernels: bool = False

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        mod = interpreter_module()
        versions = {}
        for pkg in ("ai-edge-litert", "tflite-runtime"):
            with contextlib.suppress(PackageNotFoundError):
                versions[pkg] = version(pkg)
        if compile:
            import importlib.util

            # found, not imported: litert-torch (JAX, torchao) only ever runs in the converter process
            for module, pkg, purpose in (("litert_torch", "litert-torch", "PyTorch -> TFLite conversion"),
                                         ("ai_edge_quantizer", "ai-edge-quantizer", "TFLite INT8 quantization"),
                                         ("torch", "torch", "loading the exported PyTorch program")):
                if importlib.util.find_spec(module) is None:
                    raise MissingDependencyError(pkg, self.extra, purpose)
                versions[pkg] = version(pkg)
        versions.setdefault("interpreter", mod.__name__)
        return versions

    def load(self, path: Path, threads: int) -> TFLiteRunner:
        return TFLiteRunner(interpreter_module(), path, threads)

    def describe_conversion(self, manifest: Any) -> list[str]:
        """The float-op report in one line (see :func:`describe_float_ops`)."""
        report = (manifest_field(manifest, "conversion") or {}).get("float_op_report")
        return [describe_float_ops(report)] if report else []

    def level_for(self, target: Any, options: BaseModel) -> str:
        return options.level or target.precision

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        if model.format not in (ModelFormat.TORCH, ModelFormat.ONNX):
            raise ConfigError(f"backend 'tflite' converts a PyTorch program or an ONNX file, got "
                              f"{model.format} ({model.path.name})")
        started = time.perf_counter()
        level = self.level_for(target, options)
        workdir.mkdir(parents=True, exist_ok=True)
        log = workdir / "litert.log"
        float_file = workdir / "float32.tflite"
        if model.format == ModelFormat.ONNX:
            layouts = self._convert_onnx(model, options, float_file, log)
        else:
            layouts = self._convert(model, options, float_file, log)
        out = workdir / "model" / "model.tflite"
        out.parent.mkdir(parents=True, exist_ok=True)
        if level == "fp32":
            shutil.copyfile(float_file, out)
        else:
            self._quantize(float_file, out, level, options, calibration, layouts, model, log)
        io = self._io(out, model, layouts)
        (out.parent / IO_FILE).write_text(json.dumps(io, indent=2) + "\n")
        kernels = kernel_check(out)
        if kernels["xnnpack"] != "ok":
            raise ToolchainError(f"the {level} .tflite does not load in the LiteRT interpreter: {kernels['xnnpack']}")
        warnings_ = []
        if kernels["builtin_kernels"] != "ok":
            msg = (f"the {level} .tflite runs on XNNPACK but not on LiteRT's builtin kernels "
                   f"({kernels['builtin_kernels']}): a device whose delegate declines an op cannot run it")
            if options.require_builtin_kernels:
                raise ToolchainError(msg, hint="set backend_options.require_builtin_kernels: false to accept it")
            warnings_.append(msg)
        report = float_op_report(out, level)
        cfg = {"backend": self.name, "precision": LEVEL_PRECISION[level], "level": level,
               "level_means": LEVELS[level], "quantizer": "ai-edge-quantizer",
               "converter": "onnx2tf (isolated toolchain)" if model.format == ModelFormat.ONNX else "litert-torch",
               "io_dtype": options.io_dtype if level in ("int8", "int16x8") else "float32",
               "calibration_samples": len(calibration) if level in ("int8", "int16x8") else 0}
        return model.derive("compile", cfg, started, format=ModelFormat.TFLITE, path=out,
                            files=(out, out.parent / IO_FILE), precision=LEVEL_PRECISION[level],
                            details={"io": io, "warnings": warnings_,
                                     "conversion": {"level": level, "level_means": LEVELS[level],
                                                    "float_op_report": report, "kernels": kernels}})

    # -- steps ---------------------------------------------------------------------------------
    def _convert(self, model: ModelArtifact, options: BaseModel, dst: Path, log: Path) -> list[list[int] | None]:
        """Float .tflite from the torch.export program, in a child process (see tflite_convert). The
        result is kept beside the program, so every quantization level of one build converts once."""
        import subprocess

        specs = list(model.inputs)
        for s in specs:
            if any(not isinstance(d, int) for d in s.shape):
                raise ConfigError(f"input '{s.name}' has no static shape ({s.shape_str}); TFLite needs one",
                                  hint="set every dim in the project's inputs, or static_dims in backend_options")
        # rank-4 float inputs are PyTorch images (NCHW): the .tflite takes them channel-last (NHWC)
        layouts = [[0, 2, 3, 1] if options.channel_last and len(s.shape) == 4 and s.dtype.startswith("float")
                   else None for s in specs]
        cached = model.path.parent / f"float32-{'nhwc' if any(layouts) else 'as-is'}.tflite"
        if not cached.is_file():
            result = dst.parent / "convert-result.json"
            cmd = [sys.executable, "-m", "edgepack.backends.tflite_convert", str(model.path), str(cached) + ".part",
                   json.dumps(layouts), str(result)]
            with open(log, "ab") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
            outcome = json.loads(result.read_text()) if result.is_file() else {
                "ok": False, "error": f"the converter process ended with status {proc.returncode} and no result"}
            if not outcome["ok"]:
                raise ToolchainError(f"litert-torch could not convert the model: {outcome['error']}",
                                     hint="the full converter output is in the build log")
            Path(str(cached) + ".part").replace(cached)
        shutil.copyfile(cached, dst)
        return layouts

    def _convert_onnx(self, model: ModelArtifact, options: BaseModel, dst: Path, log: Path) -> list[list[int] | None]:
        """Float .tflite from an ONNX file with onnx2tf, which runs in its own environment (it pins
        TensorFlow 2.19 and numpy < 2; see edgepack.toolchains). onnx2tf makes every rank-4 input NHWC."""
        import subprocess

        from edgepack.stages.export_torch import static_specs
        from edgepack.toolchains import require

        exe = require("onnx2tf")
        specs = static_specs(list(model.inputs), 1, dict(options.static_dims), "backend 'tflite' (onnx2tf)")
        layouts = [[0, 2, 3, 1] if len(s.shape) == 4 else None for s in specs]
        # kept in the target's scratch folder (never beside the user's ONNX file): one conversion per build
        cached = dst.parent.parent / f"onnx2tf-{model.digest[:16]}-float32.tflite"
        if not cached.is_file():
            work = dst.parent / "onnx2tf"
            shapes = [f"{s.name}:{','.join(str(d) for d in s.shape)}" for s in specs]
            # -coion keeps the ONNX input/output names in the signature; no -oiqt: edgepack quantizes itself
            # (onnx2tf's own INT8 path would fetch a calibration sample from the internet)
            cmd = [str(exe), "-i", str(model.path), "-o", str(work), "-coion", "-n", "-ois", *shapes]
            with open(log, "ab") as f:
                f.write(("$ " + " ".join(cmd) + "\n").encode())
                f.flush()
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=dst.parent)
            made = work / f"{model.path.stem}_float32.tflite"
            if proc.returncode != 0 or not made.is_file():
                text = log.read_text(errors="replace")
                named = [ln.strip() for ln in text.splitlines() if re.search(r"(ERROR|Error|error).*", ln)]
                raise ToolchainError(f"onnx2tf could not convert {model.path.name}: "
                                     f"{(named[-1] if named else f'exit status {proc.returncode}')[:300]}",
                                     hint="the full converter output is in the build log")
            shutil.copyfile(made, cached)
        shutil.copyfile(cached, dst)
        return layouts

    def _quantize(self, src: Path, dst: Path, level: str, options: BaseModel, calibration: Any,
                  layouts: list[list[int] | None], model: ModelArtifact, log: Path) -> None:
        self._import("ai_edge_quantizer", "TFLite quantization")
        from ai_edge_quantizer import qtyping, quantizer, recipe_manager
        from ai_edge_quantizer.algorithm_manager import AlgorithmName

        op = qtyping.TFLOperationName
        rm = recipe_manager.RecipeManager()
        if level in ("int8", "int16x8"):
            rm.add_static_config(".*", op.ALL_SUPPORTED, activation_num_bits=8 if level == "int8" else 16,
                                 weight_num_bits=8)
            if options.io_dtype == "float32":
                for edge in (op.INPUT, op.OUTPUT):
                    rm.add_quantization_config(".*", edge, algorithm_key=AlgorithmName.NO_QUANTIZE)
        elif level == "dynamic-int8":
            rm.add_dynamic_config(".*", op.ALL_SUPPORTED, num_bits=8)
        elif level == "fp16":
            rm.add_weight_only_config(".*", op.ALL_SUPPORTED, num_bits=16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        try:
            with captured(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantizer.Quantizer(str(src), rm.get_quantization_recipe())
                ranges = None
                if q.need_calibration:
                    names = signature_inputs(src, [spec.name for spec in model.inputs])
                    feeds = [{names[i]: (np.transpose(s[spec.name], p) if p else s[spec.name])
                              for i, (spec, p) in enumerate(zip(model.inputs, layouts))} for s in calibration]
                    ranges = q.calibrate({SIGNATURE: feeds}, num_threads=max(1, os.cpu_count() or 1))
                result = q.quantize(ranges, enable_progress_report=False)
                result.export_model(str(dst), overwrite=True)
        except Exception as e:
            raise ToolchainError(f"ai-edge-quantizer could not quantize the model at level '{level}': "
                                 f"{problem(e)}", hint="the full output is in the build log") from e

    def _io(self, path: Path, model: ModelArtifact, layouts: list[list[int] | None]) -> dict[str, Any]:
        interp = interpreter_module().Interpreter(model_path=str(path))
        runner = interp.get_signature_runner(SIGNATURE)
        ins, outs = runner.get_input_details(), runner.get_output_details()

        def entry(name: str, tname: str, d: dict[str, Any], perm: list[int] | None) -> dict[str, Any]:
            scale, zp = d["quantization"]
            e: dict[str, Any] = {"name": name, "tflite_name": tname, "shape": [int(v) for v in d["shape"]],
                                 "dtype": np.dtype(d["dtype"]).name,
                                 "layout": ("NHWC" if perm else None) if len(d["shape"]) == 4 else None,
                                 "permute": perm,
                                 "quantization": {"scale": float(scale), "zero_point": int(zp),
                                                  "dtype": np.dtype(d["dtype"]).name} if scale else None}
            return e

        in_names = matched(ins, [s.name for s in model.inputs])
        out_names = matched(outs, [s.name for s in model.outputs])
        return {"signature": SIGNATURE, "format": "tflite",
                "inputs": [entry(s.name, t, ins[t], p) for s, t, p in zip(model.inputs, in_names, layouts)],
                "outputs": [entry(s.name, t, outs[t], None) for s, t in zip(model.outputs, out_names)],
                "how_to_feed": "transpose each input by `permute` (from the project's layout to `layout`); "
                               "when `quantization` is set, q = clip(round(x / scale + zero_point)) in `dtype`; "
                               "outputs with `quantization`: x = (q - zero_point) * scale"}
