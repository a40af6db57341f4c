"""The project file's data blocks: where calibration and evaluation samples come from, how the
evaluation is scored, and how much of it a bundle ships (``holdout_samples``, ``golden_samples``)."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic import ValidationError as PydanticValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(Strict):
    """``source``: an ``.npz`` file, an image folder, ``file.py:function`` yielding samples, or (for
    text models) a ``.csv`` / ``.jsonl`` file with a text column and an optional label column."""

    source: str
    samples: int | None = Field(default=None, gt=0)
    seed: int = 0
    text_column: str = Field(default="text", description="for .csv/.jsonl sources: the column holding the text")
    label_column: str | None = Field(default=None, description="for .csv/.jsonl sources: the label column (default: 'label' if present)")


class Calibration(DataSource):
    min_samples: int = Field(default=100, gt=0, description="warn below this many calibration samples")


METRIC_NAMES = ("top1", "fidelity", "iou", "mae", "rmse")


def _check_metric_name(v: str) -> str:
    if v in METRIC_NAMES or re.fullmatch(r"[\w./-]+\.py:\w+", v):
        return v
    raise ValueError(f"unknown metric '{v}': use {', '.join(METRIC_NAMES)} or file.py:function")


class MetricSpec(Strict):
    """One metric on one output (see edgepack/measure/accuracy.py)."""

    output: str | None = Field(default=None, description="the output it scores (default: the first)")
    metric: str = Field(default="fidelity", description="top1 | fidelity | iou | mae | rmse | file.py:function")
    threshold: float = Field(default=0.5, description="iou: an element is in the mask when it is above this")
    gate: bool = Field(default=False, description="this metric is the one the accuracy budget gates on "
                                                  "(default: the first listed)")

    _known = field_validator("metric")(classmethod(lambda cls, v: _check_metric_name(v)))


class Evaluation(DataSource):
    metric: str | list[MetricSpec] | None = Field(
        default=None, description="a metric name (on the first output; fidelity on the others), or a list "
                                  "of {output, metric, threshold, gate}")
    holdout_samples: int | None = Field(default=None, ge=0, description="labelled samples the bundle ships for validate "
                                         "(default: up to 300, within the validation budget)")
    golden_samples: int | None = Field(default=None, gt=0, le=10_000,
                                       description="samples whose compiled outputs the bundle ships for validate "
                                                   "(default: up to 200, within the validation budget)")
    separate_validation: bool = Field(default=False,
                                      description="ship the validation files as <bundle>.validation beside the "
                                                  "bundle, not inside it (also: edgepack build --separate-validation)")

    @field_validator("metric", mode="before")
    @classmethod
    def _metrics(cls, v):
        if v is None:
            return v
        if isinstance(v, str):
            return _check_metric_name(v)
        if not isinstance(v, list) or not v:
            raise ValueError("a metric name, or a non-empty list of {output, metric, threshold, gate}")
        specs = []
        for i, item in enumerate(v):
            item = {"metric": item} if isinstance(item, str) else item
            try:
                specs.append(MetricSpec.model_validate(item))
            except PydanticValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"item {i}{' ' + where if where else ''}: "
                                 f"{first['msg'].removeprefix('Value error, ')}") from None
        if sum(m.gate for m in specs) > 1:
            raise ValueError("more than one metric has gate: true; the budget gates on one")
        return specs
