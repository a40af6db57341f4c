"""TensorRT for Jetson GPUs, through explicit quantization.

On any machine the backend writes what the device needs to build its own engine: an INT8 QDQ ONNX
(symmetric INT8 activations and weights, per-channel weights, Q/DQ at the inputs of Conv/Gemm/MatMul
where TensorRT fuses them), the calibration ranges as a TensorRT calibration cache, and a builder
config with the matching ``trtexec`` command. An op TensorRT's parser would reject for the profile's
TensorRT version is named at build time. Engines are not portable across GPU, TensorRT version or
JetPack, so they are built on the device (``edgepack validate`` / ``edgepack build-engine``) and
cached under a compatibility key; see :mod:`edgepack.backends.tensorrt_device`.
Where TensorRT is absent (any non-NVIDIA build host), accuracy is measured with ONNX Runtime on the
QDQ model and labelled as a host proxy.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field

from edgepack.artifact import ModelArtifact, ModelFormat, TensorSpec
from edgepack.backends.base import Backend
from edgepack.errors import ConfigError, ModelError, ToolchainError
from edgepack.stages.adaround import AdaRoundOptions

PROXY_LABEL = "host proxy (onnxruntime, QDQ)"
WEIGHTED_OPS = ["Conv", "ConvTranspose", "Gemm", "MatMul"]
ENGINE_DIR = "engines"


class DimRange(BaseModel):
    min: int = Field(gt=0)
    opt: int = Field(gt=0)
    max: int = Field(gt=0)


@lru_cache(maxsize=1)
def supported_ops() -> dict[str, Any]:
    return yaml.safe_load((resources.files("edgepack.backends") / "tensorrt_ops.yaml").read_text())


def op_table(version: str) -> dict[str, Any]:
    table = supported_ops()
    major_minor = ".".join(version.split(".")[:2])
    if major_minor in table:
        return table[major_minor]
    same_major = sorted((k for k in table if k.split(".")[0] == version.split(".")[0]),
                        key=lambda k: [int(x) for x in k.split(".")])
    if not same_major:
        raise ConfigError(f"no ONNX operator list for TensorRT {version}",
                          hint=f"known versions: {', '.join(sorted(table))}")
    return table[same_major[-1]]


def check_ops(model, version: str) -> list[str]:
    """Names of standard-domain ops in ``model`` that TensorRT ``version``'s ONNX parser does not support."""
    table = op_table(version)
    ok = set(table["supported"])
    bad: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type not in ok:
            bad.setdefault(node.op_type, []).append(node.name or "(unnamed)")
    return [f"{op} (nodes: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" for op, names in sorted(bad.items())]


def optimization_profile(inputs: tuple[TensorSpec, ...], max_batch: int,
                         dims: dict[str, DimRange]) -> dict[str, dict[str, list[int]]]:
    """min/opt/max shapes per input; ``batch`` runs 1..max_batch (opt 1), other symbolic dims need a range."""
    prof = {}
    ranges = {"batch": DimRange(min=1, opt=1, max=max_batch), **dims}
    for spec in inputs:
        missing = [d for d in spec.shape if isinstance(d, str) and d not in ranges]
        if missing:
            raise ConfigError(
                f"input '{spec.name}' has dynamic dim(s) {missing} but neither the target profile nor the project "
                "gives their range (TensorRT builds engines for static shape ranges)",
                hint=f"declare dims: {{{missing[0]}: {{min: 1, opt: 128, max: 128}}}} in edgepack.yaml, or "
                     "backend_options.dynamic_dims in the target profile",
            )
        prof[spec.name] = {k: [getattr(ranges[d], k) if isinstance(d, str) else d for d in spec.shape]
                           for k in ("min", "opt", "max")}
    return prof


def trtexec_command(cfg: dict[str, Any]) -> str:
    parts = ["trtexec", f"--onnx={cfg['onnx']}", "--saveEngine=model.engine", "--timingCacheFile=timing.cache",
             f"--memPoolSize=workspace:{cfg['workspace_mb']}M"]
    major = int(cfg["target"]["tensorrt"].split(".")[0])
    if cfg["precision"] == "int8":
        parts += ["--stronglyTyped"] if major >= 10 else ["--int8", "--fp16"]
    elif cfg["precision"] == "fp16":
        parts += ["--fp16"]
    if cfg["dla_core"] is not None:
        parts += [f"--useDLACore={cfg['dla_core']}", "--allowGPUFallback"]
    if cfg["sparsity"]:
        parts += ["--sparsity=enable"]
    prof = cfg["optimization_profiles"][0] if cfg["optimization_profiles"] else {}
    for key, flag in (("min", "--minShapes"), ("opt", "--optShapes"), ("max", "--maxShapes")):
        if prof:
            parts.append(flag + "=" + ",".join(f"{n}:{'x'.join(map(str, s[key]))}" for n, s in prof.items()))
    return " ".join(parts)


class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"
    produces: ClassVar[str] = ModelFormat.ONNX
    extra: ClassVar[str] = "tensorrt"
    runtime_package: ClassVar[str] = "tensorrt"
    bundle_note: ClassVar[str | None] = "QDQ ONNX in the bundle; the TensorRT engine is built on the device"
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "fp16", "int8")
    # the build quantizes with ONNX Runtime; the engine is built on the device
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime", "onnx")
    # INT8 recovery the accuracy search tries before it keeps any layer in float: AdaRound's learned weight
    # rounding through AMD Quark (the quark toolchain), written as TensorRT's QDQ (int8 symmetric activations
    # and per-channel weights, zero points 0, one consumer per DequantizeLinear)
    recovery_methods: ClassVar[tuple[str, ...]] = ("adaround",)

    class Options(Backend.Options, AdaRoundOptions):  # adaround_samples/_iterations/_timeout_s
        workspace_mb: int = Field(default=1024, gt=0)
        dla_core: int | None = Field(default=None, ge=0)
        max_batch: int = Field(default=8, gt=0)
        dynamic_dims: dict[str, DimRange] = Field(default_factory=dict)
        sparsity: bool = False
        quantize_op_types: list[str] = Field(default_factory=lambda: list(WEIGHTED_OPS))
        build_engine: Literal["auto", "never"] = "auto"

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        if compile:
            ort = self._import("onnxruntime", "ONNX Runtime (QDQ quantization and host proxy)")
            onnx = self._import("onnx", "ONNX")
            return {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
        from edgepack.backends import tensorrt_device

        return tensorrt_device.runtime_versions()

    def load(self, path: Path, threads: int):
        from edgepack.backends import tensorrt_device

        return tensorrt_device.load_runner(path)

    def host_runner(self, path: Path, threads: int):
        from edgepack.backends import tensorrt_device

        if tensorrt_device.available():
            return tensorrt_device.load_runner(path), None
        from edgepack.backends.onnxruntime import ORTRunner

        ort = self._import("onnxruntime", "ONNX Runtime host proxy")
        return ORTRunner(ort, path, threads), PROXY_LABEL

    def check_host(self, manifest: Any, host: Any) -> list[str]:
        """A Jetson bundle needs an L4T system; any TensorRT bundle needs TensorRT installed."""
        from edgepack.backends.base import manifest_field
        from edgepack.backends.tensorrt_device import TEGRA_RELEASE

        target = str(manifest_field(manifest, "target", ""))
        device = (manifest_field(manifest, "profile") or {}).get("device", {})
        name = f"'{target}' ({device.get('name', 'unknown device')})"
        if ("l4t" in (device.get("software") or {}) or "jetson" in target) and not getattr(host, "l4t", False):
            return [f"the bundle is for {name}, a Jetson, and this machine ({host.machine}) is not one "
                    f"(no {TEGRA_RELEASE})"]
        if not getattr(host, "tensorrt", False):
            return [f"the bundle is for {name} and runs on TensorRT, which is not installed here"]
        return []

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        started = time.perf_counter()
        onnx = self._import("onnx", "ONNX")
        workdir.mkdir(parents=True, exist_ok=True)
        out_dir = workdir / "out"
        out_dir.mkdir()
        out = out_dir / "model.onnx"
        trt_version = target.device.software.get("tensorrt")
        if not trt_version:
            raise ConfigError(f"{target.source}: key 'device.software.tensorrt' is required for backend tensorrt")
        if options.dla_core is not None and options.dla_core >= target.device.dla_cores:
            raise ConfigError(f"{target.source}: backend_options.dla_core {options.dla_core} but the device has "
                              f"{target.device.dla_cores} DLA core(s)")
        # ranges from the project file (dims.NAME min/opt/max); the target profile's own override them
        project_dims = {k: DimRange(**v) for k, v in model.details.get("dim_ranges", {}).items()}
        prof = optimization_profile(model.inputs, options.max_batch, {**project_dims, **options.dynamic_dims})
        # fail fast on the FP32 graph, before calibration; the output is checked again below
        self._check_model(onnx.load(str(model.path), load_external_data=False), trt_version, target)
        files = [out]
        cfg: dict[str, Any] = {"backend": self.name, "precision": target.precision,
                               "tensorrt_target": trt_version}
        if target.precision == "int8":
            (table, ort_ranges), tool = self._quantize(model, target, options, calibration, workdir, out)
            files += [table.write_json(out_dir / "calibration.json"),
                      table.write_tensorrt_cache(out_dir / "calibration.cache", trt_version)]
            cfg.update({**tool, "recipe": target.quantization.recipe,
                        "activations": "int8 symmetric", "weights": "int8 symmetric per-channel",
                        "quantized_op_types": options.quantize_op_types, "kept_in_float": list(target.quantization.keep_float),
                        "calibration_method": target.quantization.calibration_method,
                        "calibration_samples": len(calibration), "calibration_fingerprint": calibration.fingerprint,
                        "calibration_cache": "calibration.cache"})
        else:
            shutil.copyfile(model.path, out)
            cfg["tool"] = "copy (TensorRT converts FP32 ONNX to the builder's precision)"
        opset = self._check_model(onnx.load(str(out), load_external_data=False), trt_version, target)
        builder = {
            "onnx": "model.onnx", "precision": target.precision, "workspace_mb": options.workspace_mb,
            "dla_core": options.dla_core, "gpu_fallback": options.dla_core is not None,
            "sparsity": options.sparsity or model.details.get("sparsity") == "2:4", "strongly_typed": target.precision == "int8" and int(trt_version.split(".")[0]) >= 10,
            "optimization_profiles": [prof] if prof else [],
            "calibration_cache": "calibration.cache" if target.precision == "int8" else None,
            "target": {"sm": target.device.sm, **target.device.software, "dla_cores": target.device.dla_cores},
            "engines_folder": ENGINE_DIR + "/<sm>-trt<version>-l4t<release>-<gpu|dlaN>",
        }
        builder["trtexec"] = trtexec_command(builder)
        (out_dir / "builder.json").write_text(json.dumps(builder, indent=2) + "\n")
        files.append(out_dir / "builder.json")
        files += self._maybe_build_engine(out_dir, options)
        cfg.update({"opset": opset, "op_check": f"passed against TensorRT {trt_version}'s ONNX operator list",
                    "engine_built_on_host": any(ENGINE_DIR in p.parts for p in files)})
        return model.derive("compile", cfg, started, path=out, files=tuple(files), precision=target.precision,
                            details={"opset": opset})

    @staticmethod
    def _check_model(model, trt_version: str, target: Any) -> int:
        """Op support and opset against the profile's TensorRT version; returns the opset."""
        bad = check_ops(model, trt_version)
        if bad:
            raise ModelError(f"the model uses ONNX ops TensorRT {trt_version}'s parser does not support: "
                             f"{'; '.join(bad)}",
                             hint="pick a target with a newer TensorRT, or replace these ops in the model")
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        limits = [v for v in (op_table(trt_version).get("max_opset"), target.max_opset) if v]
        if limits and opset > min(limits):
            raise ModelError(f"the ONNX model has opset {opset}; TensorRT {trt_version} accepts opset <= {min(limits)}",
                             hint="set max_opset in the target profile so the export honours it")
        return opset

    def _quantize(self, model, target, options, calibration, workdir: Path, out: Path):
        from edgepack.calibration.table import fit_ranges
        from edgepack.stages import adaround, quantize_qdq

        self._import("onnxruntime.quantization", "ONNX Runtime quantization")
        qc = target.quantization
        pre = quantize_qdq.preprocess(model.path, workdir / "preprocessed.onnx")
        with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime's calibrators print progress lines
            ranges = fit_ranges(pre, calibration, qc.calibration_method, workdir / "calib")
        ops = options.quantize_op_types
        if qc.recipe == "adaround":
            tool = adaround.quantize_adaround(
                pre, out, calibration, workdir, activation_type="int8", symmetric_activations=True, per_channel=True,
                method=qc.calibration_method, exclude=qc.keep_float, samples=options.adaround_samples,
                iterations=options.adaround_iterations, timeout_s=options.adaround_timeout_s)
            tool.update(adaround.dedicate_qdq(out))
            pre.unlink(missing_ok=True)
            return ranges, tool
        if qc.recipe != "default":
            raise ToolchainError(f"the tensorrt backend has no INT8 recipe '{qc.recipe}'",
                                 hint=f"known: default, {', '.join(self.recovery_methods)}")
        quantize_qdq.quantize(pre, out, calibration, qc.calibration_method, workdir, activation_type="int8",
                              symmetric_activations=True, per_channel=True, op_types=ops, exclude=qc.keep_float,
                              ranges=ranges, extra={
                                  "WeightSymmetric": True,          # zero points 0: TensorRT needs them
                                  "AddQDQPairToWeight": True,       # Q->DQ on float weights, the pattern TensorRT fuses
                                  "QuantizeBias": False,            # TensorRT folds float bias into the INT8 kernel
                                  "DedicatedQDQPair": True,         # TensorRT cannot share one Q/DQ pair between consumers
                                  "OpTypesToExcludeOutputQuantization": ops,
                                  "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                              })
        pre.unlink(missing_ok=True)
        return ranges, {"tool": "onnxruntime.quantization.quantize_static (TensorRT QDQ settings)"}

    def _maybe_build_engine(self, out_dir: Path, options) -> list[Path]:
        """When this machine has TensorRT and a GPU, build the engine now, under its compatibility key."""
        from edgepack.backends import tensorrt_device

        if options.build_engine == "never" or not tensorrt_device.available():
            return []
        engine, cache = tensorrt_device.build_into_bundle(out_dir)
        return [engine, cache]
