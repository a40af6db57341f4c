"""The project file (edgepack.yaml): what to build, from what, and what "good enough" means."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgepack.artifact import TensorSpec
from edgepack.errors import ConfigError
from edgepack.yamlio import load_model

PROJECT_FILE = "edgepack.yaml"
SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
DTYPES = ("float32", "float16", "int64", "int32", "uint8", "int8", "bool")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(Strict):
    """``path`` is ``file.py:factory`` (returns an nn.Module), a ``.pt2`` (torch.export) or an ``.onnx`` file."""

    path: str
    weights: str | None = None

    @property
    def kind(self) -> Literal["callable", "pt2", "onnx"]:
        if self.path.endswith(".onnx"):
            return "onnx"
        if self.path.endswith(".pt2"):
            return "pt2"
        return "callable"

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not (v.endswith((".onnx", ".pt2")) or re.match(r"^.+\.py:[A-Za-z_]\w*$", v)):
            raise ValueError("expected 'file.py:factory', a '.pt2' file or an '.onnx' file")
        return v


class InputSpec(Strict):
    name: str
    shape: list[int | str]
    dtype: str = "float32"

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
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
        return TensorSpec(self.name, tuple(self.shape), self.dtype)


class Preprocess(Strict):
    """How a raw image (uint8, HxW or HxWxC, RGB) becomes the model's input tensor."""

    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = 1.0 / 255.0
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    color: Literal["rgb", "bgr", "gray"] = "rgb"

    @model_validator(mode="after")
    def _check(self) -> "Preprocess":
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std need one value per channel (same length)")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must not be zero")
        return self


class DataSource(Strict):
    """``source``: an ``.npz`` file, an image folder, or ``file.py:function`` yielding samples."""

    source: str
    samples: int | None = Field(default=None, gt=0)
    seed: int = 0


class Calibration(DataSource):
    min_samples: int = Field(default=100, gt=0, description="warn below this many calibration samples")


class Evaluation(DataSource):
    metric: Literal["top1", "fidelity"] | None = None


class Finetune(Strict):
    """Recovery training after pruning. ``data`` is labelled training data given like a calibration
    source (default: the calibration source); without labels the pruned model is distilled from the
    unpruned one."""

    epochs: int = Field(gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, gt=0)
    data: DataSource | None = None


class Prune(Strict):
    method: Literal["structured", "sparse-2of4"] = "structured"
    ratio: float | None = Field(default=None, gt=0, lt=1, description="share of channels removed per layer")
    target_macs: float | None = Field(default=None, gt=0, lt=1, description="share of MACs to remove")
    target_params: float | None = Field(default=None, gt=0, lt=1, description="share of parameters to remove")
    importance: Literal["l1", "l2"] = "l1"
    ignore: list[str] | None = Field(default=None, description="module names kept whole (default: the classifier)")
    finetune: Finetune | None = None
    seed: int = 0

    @model_validator(mode="after")
    def _amount(self) -> "Prune":
        given = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        if self.method == "structured" and len(given) != 1:
            raise ValueError("structured pruning needs exactly one of ratio, target_macs, target_params")
        if self.method == "sparse-2of4" and given:
            raise ValueError(f"sparse-2of4 fixes the amount at 50% of weights; remove {', '.join(given)}")
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
    inputs: list[InputSpec] = Field(min_length=1)
    outputs: list[str] | None = None
    preprocess: Preprocess | None = None
    labels: list[str] | str | None = None
    calibration: Calibration
    evaluation: Evaluation | None = None
    acceptance: Acceptance = Field(default_factory=Acceptance)
    prune: Prune | None = None

    # set by load_project, not part of the file
    root: Path = Field(default=Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._-]*$", v):
            raise ValueError("use lowercase letters, digits, '.', '_' and '-' (it names the bundle file)")
        return v

    @field_validator("version", mode="before")
    @classmethod
    def _semver(cls, v: object) -> str:
        if not SEMVER.match(str(v)):
            raise ValueError(f"'{v}' is not a semantic version such as 1.0.0")
        return str(v)

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v: object) -> object:
        return {"path": v} if isinstance(v, str) else v

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else (self.root / p)

    def input_specs(self) -> list[TensorSpec]:
        return [i.spec() for i in self.inputs]

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
