"""The device side of the TensorRT backend: compatibility keys, engine build and cache, the runner.

An engine only loads on the GPU architecture (SM), TensorRT version and L4T/JetPack it was built
with, so every engine lives in a folder named by that key. A bundle may carry engines (built where
the build machine had TensorRT and a GPU); on the device the matching one is used, otherwise the
engine is built from the bundle's QDQ ONNX with the bundled timing cache and cached under its key.

The TensorRT calls follow NVIDIA's documented Python API (TensorRT 8.5+ named-tensor API, which
TensorRT 10 keeps). They run only where TensorRT and a GPU exist; tests marked ``gpu`` cover them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepack.errors import MissingDependencyError, ToolchainError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
CACHE_ENV = "EDGEPACK_CACHE"


@dataclass(frozen=True)
class CompatKey:
    """What an engine is tied to."""

    sm: str            # compute capability, e.g. "8.7"
    tensorrt: str      # e.g. "10.3.0"
    l4t: str | None    # e.g. "36.4.0" on Jetson, None elsewhere
    dla_core: int | None

    @property
    def folder(self) -> str:
        sm = "sm" + self.sm.replace(".", "")
        l4t = f"l4t{self.l4t}" if self.l4t else "dgpu"
        dev = f"dla{self.dla_core}" if self.dla_core is not None else "gpu"
        return f"{sm}-trt{self.tensorrt}-{l4t}-{dev}"

    @classmethod
    def parse(cls, folder: str) -> "CompatKey":
        m = re.fullmatch(r"sm(\d)(\d+)-trt([\d.]+)-(l4t([\d.]+)|dgpu)-(gpu|dla(\d+))", folder)
        if not m:
            raise ValueError(f"not an engine key folder: {folder}")
        return cls(f"{m.group(1)}.{m.group(2)}", m.group(3), m.group(5), int(m.group(7)) if m.group(7) else None)


def l4t_release(text: str | None = None) -> str | None:
    """'# R36 (release), REVISION: 4.0, ...' -> '36.4.0'."""
    if text is None:
        if not TEGRA_RELEASE.is_file():
            return None
        text = TEGRA_RELEASE.read_text()
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def choose_engine(model_dir: Path, device: CompatKey, cache_root: Path) -> tuple[Path | None, str]:
    """The engine to use for ``device`` (bundled first, then the local cache), and what happened."""
    bundled = sorted((model_dir / "engines").glob("*/model.engine"))
    for eng in bundled:
        if eng.parent.name == device.folder:
            return eng, f"bundled engine {device.folder} matches this device"
    cached = cache_root / device.folder / "model.engine"
    if cached.is_file():
        return cached, f"cached engine {device.folder} from an earlier run on this device"
    if bundled:
        others = ", ".join(e.parent.name for e in bundled)
        return None, f"bundled engine(s) {others} do not match this device ({device.folder}): rebuilt"
    return None, f"no engine for {device.folder} yet: built from the QDQ ONNX"


def cache_root_for(onnx_path: Path) -> Path:
    base = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "edgepack"))
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()[:16]
    return base / "engines" / digest


def ensure_engine(model_dir: Path, device: CompatKey,
                  build: Callable[[Path, Path, Path | None], None]) -> tuple[Path, list[str]]:
    """Return a usable engine path, building it with ``build(onnx, engine_out, timing_cache)`` when needed."""
    root = cache_root_for(model_dir / "model.onnx")
    engine, note = choose_engine(model_dir, device, root)
    if engine is not None:
        return engine, [note]
    out = root / device.folder / "model.engine"
    out.parent.mkdir(parents=True, exist_ok=True)
    timing = next(iter(sorted((model_dir / "engines").glob("*/timing.cache"))), None)
    tmp = out.with_suffix(".partial")
    build(model_dir / "model.onnx", tmp, timing)
    os.replace(tmp, out)
    return out, [note, f"engine stored in {out}"]


def copy_to_cache(engine: Path, model_dir: Path, device: CompatKey) -> Path:
    """A bundled engine, copied to the local cache so it outlives the extracted bundle."""
    import shutil

    dst = cache_root_for(model_dir / "model.onnx") / device.folder / "model.engine"
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(engine, dst)
    return dst


# --- everything below needs TensorRT (and a GPU) ------------------------------------------------

def available() -> bool:
    try:
        importlib.import_module("tensorrt")
    except ImportError:
        return False
    try:
        _cudart()
        return True
    except ImportError:
        return False


def _trt():
    try:
        return importlib.import_module("tensorrt")
    except ImportError as e:
        if TEGRA_RELEASE.is_file():
            raise MissingDependencyError(
                "tensorrt", "tensorrt", "this is a Jetson (L4T), but TensorRT's Python bindings are not importable",
                hint="JetPack ships them: apt-get install python3-libnvinfer, and make the venv with "
                     "--system-site-packages; then pip install 'edgepack[tensorrt]'",
            ) from e
        raise MissingDependencyError(
            "tensorrt", "tensorrt", "TensorRT runtime",
            hint="TensorRT bundles run on NVIDIA GPUs (a Jetson has TensorRT from JetPack); there, "
                 "pip install 'edgepack[tensorrt]'",
        ) from e


def _cudart():
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("cuda-python")


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise ToolchainError(f"CUDA call failed with error {err}")
    return rest[0] if len(rest) == 1 else rest


def runtime_versions() -> dict[str, str]:
    trt = _trt()
    try:
        _cudart()
    except ImportError as e:
        raise MissingDependencyError("cuda-python", "tensorrt", "CUDA memory for the TensorRT runner") from e
    out = {"tensorrt": trt.__version__}
    rel = l4t_release()
    if rel:
        out["l4t"] = rel
    return out


def device_key(dla_core: int | None) -> CompatKey:
    trt = _trt()
    cudart = _cudart()
    dev = _check(cudart.cudaGetDevice())
    props = _check(cudart.cudaGetDeviceProperties(dev))
    return CompatKey(f"{props.major}.{props.minor}", trt.__version__, l4t_release(), dla_core)


def build_engine(onnx_path: Path, engine_out: Path, timing_cache: Path | None, builder_cfg: dict) -> None:
    """Build a serialized engine the way trtexec does with the bundle's builder config."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if builder_cfg.get("strongly_typed") and major >= 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ToolchainError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, builder_cfg["workspace_mb"] << 20)
    precision = builder_cfg["precision"]
    if precision == "int8" and not builder_cfg.get("strongly_typed"):
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if builder_cfg.get("sparsity"):
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if builder_cfg.get("dla_core") is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(builder_cfg["dla_core"])
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    for prof_cfg in builder_cfg.get("optimization_profiles", []):
        profile = builder.create_optimization_profile()
        for name, shapes in prof_cfg.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ToolchainError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    engine_out.write_bytes(bytes(serialized))
    engine_out.with_name("timing.cache").write_bytes(bytes(config.get_timing_cache().serialize()))


def build_into_bundle(model_dir: Path) -> tuple[Path, Path]:
    """On a build machine with TensorRT and a GPU: build the engine into model/engines/<key>/."""
    cfg = json.loads((model_dir / "builder.json").read_text())
    key = device_key(cfg.get("dla_core"))
    folder = model_dir / "engines" / key.folder
    folder.mkdir(parents=True, exist_ok=True)
    build_engine(model_dir / "model.onnx", folder / "model.engine", None, cfg)
    return folder / "model.engine", folder / "timing.cache"


class TRTRunner:
    """Runs a deserialized engine on the GPU with one CUDA stream; inputs/outputs by tensor name."""

    def __init__(self, engine_path: Path, notes: list[str]):
        trt = _trt()
        self.cudart = _cudart()
        self.notes = notes
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise ToolchainError(f"TensorRT could not load {engine_path} (built for another device?)")
        self.context = self.engine.create_execution_context()
        self.stream = _check(self.cudart.cudaStreamCreate())
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.trt = trt
        self._buffers: dict[str, tuple[int, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self.cudart.cudaFree(ptr))
            ptr = _check(self.cudart.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        cudart = self.cudart
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name])
            self.context.set_input_shape(name, arr.shape)
            ptr = self._buffer(name, arr.nbytes)
            _check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self.stream))
            self.context.set_tensor_address(name, ptr)
        outs = []
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))
            out = np.empty(shape, dtype)
            self.context.set_tensor_address(name, self._buffer(name, out.nbytes))
            outs.append(out)
        if not self.context.execute_async_v3(self.stream):
            raise ToolchainError("TensorRT execution failed")
        for name, out in zip(self.output_names, outs):
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self.stream))
        _check(cudart.cudaStreamSynchronize(self.stream))
        return outs


def load_runner(onnx_path: Path) -> TRTRunner:
    """On the device: pick or build the engine for this device, then load it."""
    model_dir = onnx_path.parent
    cfg = json.loads((model_dir / "builder.json").read_text())
    key = device_key(cfg.get("dla_core"))
    engine, notes = ensure_engine(model_dir, key, lambda o, e, t: build_engine(o, e, t, cfg))
    return TRTRunner(engine, notes)
