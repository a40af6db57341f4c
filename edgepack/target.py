"""Target profiles: data files in ``edgepack/targets/*.yaml``, extended by user folders."""

from __future__ import annotations

import os
import re
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgepack.errors import ConfigError, did_you_mean
from edgepack.yamlio import load_model, read_yaml

TARGETS_PATH_ENV = "EDGEPACK_TARGETS_PATH"
# profile names and aliases are kebab-case: they name bundle files and registry tags
PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
# precisions and tensor types are open (a backend may offer "int16" or "w8a16"); the backend says which
# it supports (the build refuses others), the profile only that it is such a name
TYPE_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


def _type_name(what: str, examples: str):
    """A validator: ``v`` is a lowercase identifier (letters, digits, single '-' or '_' between)."""

    def check(cls, v: str) -> str:
        if not TYPE_NAME.match(v) or len(v) > 32:
            raise ValueError(f"{v!r} is not a {what} name: use lowercase letters and digits, with '-' or '_' "
                             f"between words (e.g. {examples}); the target's backend says which it supports")
        return v

    return check


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Figure(Frozen):
    """A spec-sheet number and where it came from."""

    value: float
    source: str


class Device(Frozen):
    kind: Literal["cpu", "gpu", "npu", "mobile-cpu"]
    name: str
    isa: list[str] = Field(default_factory=list, description="instruction-set features the profile assumes")
    sm: str | None = Field(default=None, description="CUDA compute capability, e.g. '8.7' for Orin")
    dla_cores: int = 0
    software: dict[str, str] = Field(default_factory=dict, description="e.g. jetpack, l4t, tensorrt versions")
    cores: int | None = None
    memory_gb: float | None = None
    peak_int8_tops: Figure | None = None
    peak_fp16_tflops: Figure | None = None
    peak_fp32_tflops: Figure | None = None
    memory_bandwidth_gbs: Figure | None = None
    gpu_cores: int | None = Field(default=None, description="GPU shader (CUDA) cores, where the device has a GPU")
    clock_ghz: Figure | None = Field(default=None, description="the CPU (or GPU) clock the peak figures assume")
    tdp_w: Figure | None = Field(default=None, description="typical or maximum module/SoC power")
    power_modes: list[str] = Field(default_factory=list, description="the vendor's power modes, e.g. '15W'")
    price_usd: Figure | None = Field(default=None, description="indicative price, for `compare --max-*` budgets")
    sources: dict[str, str] = Field(default_factory=dict,
                                    description="where plain figures (cores, memory_gb, gpu_cores...) come from")


class Quantization(Frozen):
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    activation_type: str = Field(default="int8", description="e.g. int8, uint8, int16: what the backend offers")
    weight_type: str = Field(default="int8", description="e.g. int8, int4: what the backend offers")
    symmetric_activations: bool = False
    samples: int = Field(default=300, gt=0, description="default calibration sample count")
    keep_float: list[str] = Field(default_factory=list,
                                  description="ONNX node names kept in higher precision (set by accuracy tuning)")
    recipe: str = Field(default="default", description="the INT8 recipe: 'default', or one of the backend's "
                        "recovery_methods (e.g. bias-correction), set by accuracy tuning")
    reason: str | None = Field(default=None, description="why these settings fit the hardware")

    _tensor_types = field_validator("activation_type", "weight_type")(
        classmethod(_type_name("tensor type", "int8, uint8, int16")))
    _recipe = field_validator("recipe")(classmethod(_type_name("recipe", "default, bias-correction")))


class Measurement(Frozen):
    warmup_runs: int = Field(default=10, ge=0)
    runs: int = Field(default=100, gt=0)
    max_seconds: float = Field(default=30.0, gt=0)
    threads: int = Field(default=2, gt=0)
    batch: int = Field(default=1, gt=0)


class Gates(Frozen):
    max_accuracy_drop: float | None = None
    max_relative_accuracy_drop: float | None = None
    max_latency_ms_p90: float | None = None
    max_size_mb: float | None = None


class TargetProfile(Frozen):
    name: str
    description: str
    aliases: list[str] = Field(default_factory=list)
    backend: str
    precision: str = Field(default="int8", description="one of the backend's precisions, e.g. fp32, fp16, int8, w8a16")
    select_precision: Literal["fastest", "fixed"] = Field(
        default="fixed", description="fastest: where the host measures the target's runtime, the build keeps "
        "`precision` only when it is at least as fast as FP32 there, else it builds INT8 on the weighted ops only and "
        "FP32 too and bundles the fastest that meets the accuracy budget; fixed: `precision` is forced")
    objective: Literal["latency", "size", "balanced"] = Field(
        default="latency", description="what breaks the choice between candidates (select_precision: fastest)")
    device: Device
    quantization: Quantization = Field(default_factory=Quantization)
    max_opset: int | None = None
    backend_options: dict[str, Any] = Field(default_factory=dict)
    measurement: Measurement = Field(default_factory=Measurement)
    acceptance: Gates = Field(default_factory=Gates)
    source: str = Field(default="", description="where the profile was read from")

    @field_validator("name")
    @classmethod
    def _kebab(cls, v: str) -> str:
        if not PROFILE_NAME.match(v):
            raise ValueError(f"{v!r} is not a profile name: use lowercase letters, digits and '-' (kebab-case, "
                             "at most 63 characters, no '/' or '.'); it names the bundle file")
        return v

    _precision = field_validator("precision")(classmethod(_type_name("precision", "fp32, fp16, int8, w8a16")))

    @field_validator("aliases")
    @classmethod
    def _kebab_aliases(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if not PROFILE_NAME.match(a)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a profile name: use lowercase letters, digits and '-' (kebab-case)")
        return v


def _builtin_files() -> list[Path]:
    root = resources.files("edgepack") / "targets"
    return [Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")]


def _user_dirs(extra: list[Path] | None) -> list[Path]:
    dirs = [Path(p) for p in os.environ.get(TARGETS_PATH_ENV, "").split(os.pathsep) if p]
    return dirs + list(extra or [])


@lru_cache(maxsize=64)
def _load_file(path: Path) -> TargetProfile:
    profile = load_model(path, TargetProfile, read_yaml(path))
    return profile.model_copy(update={"source": str(path)})


def discover(extra_dirs: list[Path] | None = None) -> dict[str, TargetProfile]:
    """Every known profile by name and alias. User folders override built-ins of the same name."""
    files = _builtin_files()
    for d in _user_dirs(extra_dirs):
        if not d.is_dir():
            raise ConfigError(f"targets folder {d} does not exist", hint=f"check ${TARGETS_PATH_ENV} or --targets-dir")
        files += sorted(d.glob("*.yaml"))
    found: dict[str, TargetProfile] = {}
    for f in files:
        p = _load_file(f)
        if p.name != f.stem:
            raise ConfigError(f"{f}: key 'name' is '{p.name}' but the file is named '{f.stem}.yaml'")
        found[p.name] = p
    for p in list(found.values()):
        for alias in p.aliases:
            found.setdefault(alias, p)
    return found


def load_target(name_or_path: str, extra_dirs: list[Path] | None = None) -> TargetProfile:
    """A profile by name or alias, or from a ``.yaml`` path."""
    if name_or_path.endswith((".yaml", ".yml")):
        return _load_file(Path(name_or_path).resolve())
    known = discover(extra_dirs)
    if name_or_path not in known:
        raise ConfigError(f"unknown target '{name_or_path}'", hint=did_you_mean(name_or_path, known))
    return known[name_or_path]
