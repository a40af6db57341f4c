"""The Backend contract. A backend both compiles and runs its output, so loading, measuring and
validating never need a second dispatch switch. Backends import their toolchain lazily.

Every backend, the built-in ones too, is found through the ``edgepack.backends`` entry point group:
a new backend is its module, its profiles, its contract test and one entry-point line. What shared
code needs to know about a backend (the format it writes, the packages whose versions the manifest
records, how it describes its conversion, whether a bundle fits this machine) it asks the class."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from contextlib import suppress
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict
from pydantic import ValidationError as PydanticValidationError

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.interrupts import check
from edgepack.errors import ConfigError, MissingDependencyError, did_you_mean

ENTRY_POINT_GROUP = "edgepack.backends"


class Runner(Protocol):
    """A loaded model: feed it one sample, get its outputs in the model's output order."""

    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class Backend(ABC):
    # the registry key (the entry point's name) and what profiles write as `backend:`
    name: ClassVar[str]
    # the format name of what compile() writes: a ModelFormat constant or the backend's own ("qnn-context")
    produces: ClassVar[str]
    # what compile() reads: the exported ONNX (most backends) or a torch.export program (model.pt2)
    consumes: ClassVar[str] = ModelFormat.ONNX
    # the pip extra that installs the toolchain: `pip install 'edgepack[<extra>]'`
    extra: ClassVar[str]
    # the distribution that runs the compiled model on the device
    runtime_package: ClassVar[str]
    # what a profile's `precision` may say for this backend (any lowercase names: "int8", "w8a16")
    precisions: ClassVar[tuple[str, ...]]
    # distributions whose installed versions go into the manifest's toolchain record (with runtime_package)
    packages: ClassVar[tuple[str, ...]] = ()
    # what a profile's quantization.activation_type / weight_type may say for this backend
    activation_types: ClassVar[tuple[str, ...]] = ("int8",)
    weight_types: ClassVar[tuple[str, ...]] = ("int8",)
    # activation range methods `quantization.calibration_method` may name (tried by accuracy tuning)
    calibration_methods: ClassVar[tuple[str, ...]] = ("minmax", "entropy", "percentile")
    # quantization levels, most integer first, that the build falls back along when one fails to
    # convert or misses the accuracy budget (options.level selects one); empty: the tuning search instead
    fallback_levels: ClassVar[tuple[str, ...]] = ()
    # what the bundle's model file is when it is not what runs on the device (compare prints it beside sizes)
    bundle_note: ClassVar[str | None] = None

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

    def check_profile(self, profile: Any) -> None:
        """Raise ConfigError when the profile asks for a precision or tensor type this backend does
        not offer (profiles only check that these are well-formed names)."""
        asked = (("precision", profile.precision, self.precisions),
                 ("quantization.activation_type", profile.quantization.activation_type, self.activation_types),
                 ("quantization.weight_type", profile.quantization.weight_type, self.weight_types))
        for key, value, offered in asked:
            if value not in offered:
                what = "precision" if key == "precision" else key.split(".")[1].replace("_", " ")
                raise ConfigError(f"{profile.source}: {what} '{value}' is not supported by backend "
                                  f"'{self.name}' (it supports {', '.join(offered)})",
                                  hint=f"key '{key}': {did_you_mean(value, offered)}")

    def _import(self, module: str, purpose: str) -> Any:
        try:
            found = importlib.import_module(module)
        except ImportError as e:
            check()  # an interrupted import is the interrupt, not a missing toolchain
            raise MissingDependencyError(module.split(".")[0], self.extra, purpose) from e
        check()
        return found

    @abstractmethod
    def check_environment(self, compile: bool = True) -> dict[str, str]:
        """Toolchain versions; raise MissingDependencyError when something needed is absent."""

    def versions(self, compile: bool = True) -> dict[str, str]:
        """What the manifest's toolchain record holds for this backend: the installed versions of
        ``runtime_package`` and ``packages``, then what :meth:`check_environment` reports."""
        from importlib.metadata import PackageNotFoundError, version

        found: dict[str, str] = {}
        for pkg in dict.fromkeys((self.runtime_package, *self.packages)):
            with suppress(PackageNotFoundError):
                found[pkg] = version(pkg)
        return found | self.check_environment(compile)

    def describe_conversion(self, manifest: Any) -> list[str]:
        """Lines `edgepack build` and `inspect` print about the bundle's conversion (what the
        converter left in float, for example); ``manifest`` is a Manifest or its JSON dict."""
        return []

    def check_host(self, manifest: Any, host: Any) -> list[str]:
        """Why this machine cannot run the bundle, as problem sentences (empty: nothing known
        against it). ``host`` is an :class:`edgepack.shipping.device.Host`; `install` refuses the
        bundle when a problem is returned (``--force`` overrides). The CPU architecture check is
        shared and done already."""
        return []

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


def manifest_field(manifest: Any, key: str, default: Any = None) -> Any:
    """A top-level manifest field, as JSON data (dicts, lists, str...), from a Manifest object or its
    JSON dict: backends read bundles made by any edgepack version the same way."""
    value = manifest.get(key, default) if isinstance(manifest, dict) else getattr(manifest, key, default)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def registered_backends() -> dict[str, str]:
    """Backend name -> "module:Class", from the installed entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_backend(name: str, needed_by: str | None = None) -> Backend:
    """The backend registered as ``name``; ``needed_by`` (e.g. "target 'rpi5' (rpi5.yaml)") names who asked."""
    known = registered_backends()
    if name not in known:
        if not known:
            raise ConfigError(f"unknown backend '{name}': no backend is registered at all",
                              hint="edgepack's entry points are missing: install it with `pip install -e .` "
                                   "(or pip install edgepack), not by putting the source on PYTHONPATH")
        if needed_by is None:
            raise ConfigError(f"unknown backend '{name}'", hint=did_you_mean(name, known))
        raise ConfigError(f"{needed_by} needs backend '{name}', which is not available in this edgepack "
                          "(no backend of that name is registered)",
                          hint=f"installed backends: {', '.join(sorted(known))}; "
                               "`edgepack compare` can still estimate this target")
    module, _, attr = known[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"backend '{name}' is registered as {known[name]}, which cannot be loaded: {e}",
                          hint="reinstall the package that provides it, or uninstall it") from e
    return cls()


def describe_conversion(manifest: Any) -> list[str]:
    """What the bundle's own backend says about its conversion; nothing when that backend is not
    installed here (a bundle made elsewhere can still be inspected)."""
    name = (manifest_field(manifest, "runtime") or {}).get("backend")
    try:
        backend = get_backend(str(name))
    except ConfigError:
        return []
    return backend.describe_conversion(manifest)
