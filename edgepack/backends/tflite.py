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
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.backends.base import Backend
from edgepack.backends.tflite_convert import problem
from edgepack.errors import ConfigError, MissingDependencyError, ToolchainError

IO_FILE = "io.json"
SIGNATURE = "serving_default"
LEVELS = {
    "int8": "full integer: int8 weights (per-channel, symmetric) and int8 activations (static, calibrated)",
    "int16x8": "int8 weights (per-channel) and int16 activations (static, calibrated)",
    "dynamic-int8": "dynamic range: int8 weights, float activations quantized at run time",
    "fp16": "float16 weights, float32 compute",
    "fp32": "float32",
}
LEVEL_PRECISION = {"int8": "int8", "int16x8": "int16x8", "dynamic-int8": "dynamic-int8", "fp16": "fp16", "fp32": "fp32"}
# ops that move data between float and integer at the model's edges
EDGE_OPS = ("QUANTIZE", "DEQUANTIZE")
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV", "CONV_3D")
_INT = {"int8", "uint8", "int16", "int32", "int64", "bool"}


def _interpreter_module() -> Any:
    """ai-edge-litert's interpreter, else tflite-runtime's (both have the same Interpreter API)."""
    import importlib

    for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("ai-edge-litert", "tflite", "the LiteRT interpreter",
                                 hint="pip install ai-edge-litert (or tflite-runtime) on the device; "
                                      "pip install 'edgepack[tflite]' to build")


def _quantize(x: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    info = np.iinfo(q["dtype"])
    return np.clip(np.round(x / q["scale"] + q["zero_point"]), info.min, info.max).astype(q["dtype"])


class TFLiteRunner:
    """Feeds the project's layout in float; quantizes, transposes and dequantizes as io.json says."""

    def __init__(self, interp_mod: Any, path: Path, threads: int, delegates: bool = True):
        io_file = path.parent / IO_FILE
        if not io_file.is_file():
            raise ConfigError(f"{path.name}: {IO_FILE} is missing beside it",
                              hint="the tensor layout and quantization of the model come from that file")
        self.io = json.loads(io_file.read_text())
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        if not delegates:
            kwargs["experimental_op_resolver_type"] = interp_mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with _captured(Path(os.devnull)):  # the runtime announces its XNNPACK delegate on stderr
            self.interpreter = interp_mod.Interpreter(**kwargs)
            self.runner = self.interpreter.get_signature_runner(self.io.get("signature", SIGNATURE))
        self.input_names = [i["name"] for i in self.io["inputs"]]
        self._ran = False

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The project's tensors in the model's own layout and dtype (what device code feeds)."""
        args = {}
        for spec in self.io["inputs"]:
            x = np.asarray(feeds[spec["name"]])
            if spec.get("permute"):
                x = np.transpose(x, spec["permute"])
            q = spec.get("quantization")
            args[spec["tflite_name"]] = _quantize(x, q) if q else np.ascontiguousarray(x, dtype=spec["dtype"])
        return args

    def invoke(self, prepared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._ran:  # the delegate is applied, and announced on stderr, at the first call
            self._ran = True
            with _captured(Path(os.devnull)):
                return self.runner(**prepared)
        return self.runner(**prepared)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = self.invoke(self.prepare(feeds))
        outs = []
        for spec in self.io["outputs"]:
            y = got[spec["tflite_name"]]
            q = spec.get("quantization")
            outs.append((y.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"]) if q else y)
        return outs


class TFLiteBackend(Backend):
    name: ClassVar[str] = "tflite"
    produces: ClassVar[ModelFormat] = ModelFormat.TFLITE
    consumes: ClassVar[ModelFormat] = ModelFormat.TORCH
    extra: ClassVar[str] = "tflite"
    runtime_package: ClassVar[str] = "ai-edge-litert"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
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

        mod = _interpreter_module()
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
        return TFLiteRunner(_interpreter_module(), path, threads)

    def level_for(self, target: Any, options: BaseModel) -> str:
        return options.level or target.precision

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        if model.format not in (ModelFormat.TORCH, ModelFormat.ONNX):
            raise ConfigError(f"backend 'tflite' converts a PyTorch program or an ONNX file, got "
                              f"{model.format.value} ({model.path.name})")
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
            with _captured(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q = quantizer.Quantizer(str(src), rm.get_quantization_recipe())
                ranges = None
                if q.need_calibration:
                    names = _signature_inputs(src, [spec.name for spec in model.inputs])
                    feeds = [{names[i]: (np.transpose(s[spec.name], p) if p else s[spec.name])
                              for i, (spec, p) in enumerate(zip(model.inputs, layouts))} for s in calibration]
                    ranges = q.calibrate({SIGNATURE: feeds}, num_threads=max(1, os.cpu_count() or 1))
                result = q.quantize(ranges, enable_progress_report=False)
                result.export_model(str(dst), overwrite=True)
        except Exception as e:
            raise ToolchainError(f"ai-edge-quantizer could not quantize the model at level '{level}': "
                                 f"{problem(e)}", hint="the full output is in the build log") from e

    def _io(self, path: Path, model: ModelArtifact, layouts: list[list[int] | None]) -> dict[str, Any]:
        interp = _interpreter_module().Interpreter(model_path=str(path))
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

        in_names = _matched(ins, [s.name for s in model.inputs])
        out_names = _matched(outs, [s.name for s in model.outputs])
        return {"signature": SIGNATURE, "format": "tflite",
                "inputs": [entry(s.name, t, ins[t], p) for s, t, p in zip(model.inputs, in_names, layouts)],
                "outputs": [entry(s.name, t, outs[t], None) for s, t in zip(model.outputs, out_names)],
                "how_to_feed": "transpose each input by `permute` (from the project's layout to `layout`); "
                               "when `quantization` is set, q = clip(round(x / scale + zero_point)) in `dtype`; "
                               "outputs with `quantization`: x = (q - zero_point) * scale"}


def _arg_index(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else 0


def _matched(details: dict[str, Any], names: list[str]) -> list[str]:
    """The signature's tensor names in the order of ``names``: by name when the converter kept the
    model's names (onnx2tf), else by position (litert-torch's args_0, args_1, ...)."""
    if all(n in details for n in names):
        return list(names)
    return sorted(details, key=_arg_index)


def _signature_inputs(path: Path, names: list[str]) -> list[str]:
    interp = _interpreter_module().Interpreter(model_path=str(path))
    return _matched(interp.get_signature_runner(SIGNATURE).get_input_details(), names)


@contextlib.contextmanager
def _captured(log: Path):
    """Send the converters' prints (Python and C++ level) to the build log instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "ab") as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


# -- float-op report ---------------------------------------------------------------------------
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
    mod = _interpreter_module()
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
    mod = _interpreter_module()
    out = {}
    for name, resolver in (("xnnpack", mod.OpResolverType.AUTO),
                           ("builtin_kernels", mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)):
        try:
            with _captured(Path(os.devnull)):
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
