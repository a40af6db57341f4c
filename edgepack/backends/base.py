"""The Backend contract. A backend both compiles and runs its output, so loading, measuring and
validating never need a second dispatch switch. Backends import their toolchain lazily."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.errors import ConfigError, MissingDependencyError, did_you_mean

ENTRY_POINT_GROUP = "edgepack.backends"
# Used when edgepack runs from a source tree without installed metadata.
BUILTIN = {
    "onnxruntime": "edgepack.backends.onnxruntime:ONNXRuntimeBackend",
    "openvino": "edgepack.backends.openvino:OpenVINOBackend",
    "tensorrt": "edgepack.backends.tensorrt:TensorRTBackend",
    "tflite": "edgepack.backends.tflite:TFLiteBackend",
}


class Runner(Protocol):
    """A loaded model: feed it one sample, get its outputs in the model's output order."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(ABC):
    name: ClassVar[str]
    produces: ClassVar[ModelFormat]
    # what compile() reads: the exported ONNX (most backends) or a torch.export program (model.pt2)
    consumes: ClassVar[ModelFormat] = ModelFormat.ONNX
    extra: ClassVar[str]
    runtime_package: ClassVar[str]
    precisions: ClassVar[tuple[str, ...]]
    # activation range methods `quantization.calibration_method` may name (tried by accuracy tuning)
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax", "entropy", "percentile")
    # quantization levels, most integer first, that the build falls back along when one fails to
    # convert or misses the accuracy budget (options.level selects one); empty: the tuning search instead
    fallback_levels: ClassVar[tuple[str, ...]] = ()

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def options(self, raw: dict[str, Any], where: str) -> BaseModel:
        try:
            return self.Options.model_validate(raw)
        except PydanticValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                raise ConfigError(
                    f"{where}: unknown backend option '{key}' for backend '{self.name}'",
                    hint=did_you_mean(str(first["loc"][-1]), self.Options.model_fields),
                ) from e
            raise ConfigError(f"{where}: backend option '{key}': {first['msg']}") from e

    def _import(self, module: str, purpose: str) -> Any:
        try:
            return importlib.import_module(module)
        except ImportError as e:
            raise MissingDependencyError(module.split(".")[0], self.extra, purpose) from e

    @abstractmethod
    def check_environment(self, compile: bool = True) -> dict[str, str]:
        """Toolchain versions; raise MissingDependencyError when something needed is absent."""

    @abstractmethod
    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        """FP32 ONNX in, the target's native model out (in ``workdir``)."""

    @abstractmethod
    def load(self, path: Path, threads: int) -> Runner:
        """A runner for a compiled model file, on the runtime the target really uses."""

    def host_runner(self, path: Path, threads: int) -> tuple[Runner, str | None]:
        """A runner on the build machine, and a label when it is a stand-in for the device runtime
        (for example ONNX Runtime running a TensorRT-bound QDQ model). None means the real runtime."""
        return self.load(path, threads), None


def registered_backends() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found[ep.name] = ep.value
    return found


def get_backend(name: str, needed_by: str | None = None) -> Backend:
    """The backend registered as ``name``; ``needed_by`` (e.g. "target 'rpi5' (rpi5.yaml)") names who asked."""
    known = registered_backends()
    if name not in known:
        if needed_by is None:
            raise ConfigError(f"unknown backend '{name}'", hint=did_you_mean(name, known))
        raise ConfigError(f"{needed_by} needs backend '{name}', which is not available in this edgepack "
                          "(no backend of that name is registered)",
                          hint=f"installed backends: {', '.join(sorted(known))}; "
                               "`edgepack compare` can still estimate this target")
    module, _, attr = known[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls()
