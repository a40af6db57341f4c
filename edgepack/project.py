"""The project file (edgepack.yaml): what to build, from what, and what "good enough" means."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edgepack.artifact import TensorSpec
from edgepack.errors import ConfigError
from edgepack.project_data import (METRIC_NAMES, Calibration, DataSource, Evaluation, MetricSpec,  # noqa: F401
                                   Strict)
from edgepack.prune_spec import Finetune, Prune, with_prune_flags  # noqa: F401
from edgepack.yamlio import load_model

PROJECT_FILE = "edgepack.yaml"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
DTYPES = ("float32", "float16", "int64", "int32", "uint8", "int8", "bool")


HF_TASKS = ("text-classification", "feature-extraction", "image-classification")


class ModelSource(Strict):
    """``path`` is ``file.py:factory`` (returns an nn.Module), a ``.pt2`` (torch.export) or an ``.onnx``
    file; or ``hf`` is a local Hugging Face folder (config + weights) loaded with transformers for ``task``."""

    path: str | None = None
    weights: str | None = None
    hf: str | None = Field(default=None, description="local Hugging Face model folder (never downloaded)")
    task: Literal["text-classification", "feature-extraction", "image-classification"] | None = None
    state_inputs: list[str] = Field(default_factory=list,
                                    description="recurrent state inputs (e.g. h0), fed from the data sources")

    @property
    def kind(self) -> Literal["callable", "pt2", "onnx", "hf"]:
        if self.hf is not None:
            return "hf"
        if self.path.endswith(".onnx"):
            return "onnx"
        if self.path.endswith(".pt2"):
            return "pt2"
        return "callable"

    @property
    def location(self) -> str:
        """The source as written in the project file."""
        return self.hf if self.hf is not None else self.path

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str | None) -> str | None:
        if v is not None and not (v.endswith((".onnx", ".pt2")) or re.match(r"^.+\.py:[A-Za-z_]\w*$", v)):
            raise ValueError("expected 'file.py:factory', a '.pt2' file or an '.onnx' file")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' (file.py:factory, .pt2, .onnx) and 'hf' (a local folder)")
        if self.hf is not None:
            if self.task is None:
                raise ValueError(f"'hf' needs 'task', one of: {', '.join(HF_TASKS)}")
            if self.weights is not None:
                raise ValueError("'weights' is for file.py:factory models; an 'hf' folder holds its own weights")
        elif self.task is not None:
            raise ValueError("'task' goes with 'hf' (a Hugging Face folder)")
        if self.state_inputs and self.kind not in ("onnx", "callable", "pt2"):
            raise ValueError("state_inputs is for recurrent ONNX or PyTorch models")
        return self


class InputSpec(Strict):
    name: str
    shape: list[int | str]
    dtype: str | None = Field(default=None, description="default: read from an ONNX file, else float32")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}' (known: {', '.join(DTYPES)})")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int | str]) -> list[int | str]:
        for d in v:
            if isinstance(d, int) and d <= 0:
                raise ValueError("dimensions must be positive integers or symbolic names such as 'batch'")
            if isinstance(d, str) and not re.match(r"^[A-Za-z_]\w*$", d):
                raise ValueError(f"symbolic dimension '{d}' must be an identifier such as 'batch'")
        return v

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, tuple(self.shape), self.dtype or "float32")


class DimSpec(Strict):
    """A symbolic dimension other than ``batch`` (e.g. ``sequence``): its range, and the sizes at
    which latency is measured. Backends that need static shapes (TensorRT profiles) read min/opt/max."""

    min: int = Field(default=1, gt=0)
    opt: int | None = Field(default=None, gt=0, description="default: max")
    max: int | None = Field(default=None, gt=0, description="for text models: the longest token sequence accepted")
    measure: list[int] = Field(default_factory=list, description="representative sizes latency is reported at")

    @model_validator(mode="after")
    def _order(self) -> DimSpec:
        if self.max is not None:
            if self.min > self.max or (self.opt is not None and not self.min <= self.opt <= self.max):
                raise ValueError("need min <= opt <= max")
            bad = [m for m in self.measure if not self.min <= m <= self.max]
            if bad:
                raise ValueError(f"measure sizes {bad} are outside min..max ({self.min}..{self.max})")
        if any(m <= 0 for m in self.measure):
            raise ValueError("measure sizes must be positive")
        return self

    def range(self) -> dict[str, int] | None:
        """``{min, opt, max}`` when a max is declared."""
        if self.max is None:
            return None
        return {"min": self.min, "opt": self.opt or self.max, "max": self.max}


class Preprocess(Strict):
    """How a raw image (uint8, HxW or HxWxC, RGB) becomes the model's input tensor."""

    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    color: Literal["rgb", "bgr", "gray"] = "rgb"

    @model_validator(mode="after")
    def _check(self) -> Preprocess:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel (same length)")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must not be zero")
        return self


class Acceptance(Strict):
    max_accuracy_drop: float | None = Field(default=None, ge=0, description="points (percent) of accuracy")
    max_relative_accuracy_drop: float | None = Field(default=None, ge=0, le=1,
                                                     description="fraction of the FP32 accuracy, e.g. 0.01")
    max_latency_ms_p90: float | None = Field(default=None, gt=0)
    max_size_mb: float | None = Field(default=None, gt=0)


class Project(Strict):
    name: str
    version: str
    model: ModelSource
    inputs: list[InputSpec] | None = Field(default=None, min_length=1,
                                           description="required for PyTorch sources; read from ONNX and hf sources")
    dims: dict[str, DimSpec] = Field(default_factory=dict, description="symbolic dims other than batch")
    outputs: list[str] | None = None
    preprocess: Preprocess | None = None
    labels: list[str] | str | None = None
    calibration: Calibration
    evaluation: Evaluation | None = None
    acceptance: Acceptance = Field(default_factory=Acceptance)
    prune: Prune | None = None
    precision: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9_-]{0,31}$",
                                  description="forces this precision on every target (e.g. int8 for size or an "
                                              "NPU); the target's backend must offer it")

    # set by load_project, not part of the file
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._-]{0,63}$", v) or ".." in v:
            raise ValueError(f"{v[:80]!r} is not a project name: use lowercase letters, digits, '.', '_' and '-' "
                             "(at most 64 characters, no '..'; it names the bundle file)")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, v: object) -> str:
        if not SEMVER.match(str(v)) or len(str(v)) > 64 or ".." in str(v):
            raise ValueError(f"'{str(v)[:80]}' is not a semantic version such as 1.0.0 (at most 64 characters)")
        return str(v)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: object) -> object:
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _inputs_needed(self) -> Project:
        if self.inputs is None and self.model.kind in ("callable", "pt2"):
            raise ValueError("'inputs' is required for a PyTorch model (name, shape, dtype of each input); "
                             "it is read from the file only for .onnx and hf sources")
        if self.inputs is not None and self.model.state_inputs:
            missing = sorted(set(self.model.state_inputs) - {i.name for i in self.inputs})
            if missing:
                raise ValueError(f"model.state_inputs {missing} are not among 'inputs'")
        return self

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def input_specs(self) -> list[TensorSpec]:
        if not self.inputs:
            raise ConfigError(f"{self.root / PROJECT_FILE}: key 'inputs' is required for model.path {self.model.path}",
                              hint="list each input: {name: image, shape: [batch, 3, 224, 224], dtype: float32}")
        return [i.spec() for i in self.inputs]

    def dim_ranges(self) -> dict[str, dict[str, int]]:
        """min/opt/max of each symbolic dim that declares a max (for static-shape backends)."""
        return {k: r for k, d in self.dims.items() if (r := d.range()) is not None}

    def label_names(self) -> list[str] | None:
        if self.labels is None or isinstance(self.labels, list):
            return self.labels
        path = self.resolve(self.labels)
        if not path.is_file():
            raise ConfigError(f"{self.root / PROJECT_FILE}: key 'labels': file {path} not found")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def find_project(path: Path | None) -> Path:
    """The project file: ``path`` itself, ``path/edgepack.yaml``, or ``./edgepack.yaml``."""
    p = Path(path) if path else Path.cwd()
    if p.is_dir():
        p = p / PROJECT_FILE
    if not p.is_file():
        raise ConfigError(
            f"{p}: project file not found",
            hint="run inside a project folder, pass --project PATH, or create one with `edgepack init`",
        )
    return p


def load_project(path: Path | None = None) -> Project:
    file = find_project(path)
    project = load_model(file, Project)
    return project.model_copy(update={"root": file.parent.resolve()})
