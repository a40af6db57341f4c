"""The project file's ``prune`` block (and its recovery ``finetune`` block), and the build command's
``--prune*`` flags laid over it. Kept apart from project.py, which stays under the module size limit."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic import ValidationError as PydanticValidationError

from edgepack.errors import ConfigError
from edgepack.project_data import DataSource, Strict


class Finetune(Strict):
    """Recovery training after pruning. ``data`` is labelled training data given like a calibration
    source (default: the calibration source); without labels the pruned model is distilled from the
    unpruned one."""

    epochs: int = Field(gt=0)
    lr: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=64, gt=0)
    data: DataSource | None = None


AMOUNT_KEYS = ("ratio", "target_macs", "target_params", "target_latency", "target_latency_ms")


class Prune(Strict):
    method: Literal["structured", "sparse-2of4"] = "structured"
    ratio: float | None = Field(default=None, gt=0, lt=1, description="share of channels removed per layer")
    target_macs: float | None = Field(default=None, gt=0, lt=1, description="share of MACs to remove")
    target_params: float | None = Field(default=None, gt=0, lt=1, description="share of parameters to remove")
    target_latency: float | None = Field(default=None, gt=0, lt=1,
                                         description="latency to reach, as a share of the unpruned INT8 model's p50 "
                                                     "on the target's runtime (e.g. 0.5: twice as fast)")
    target_latency_ms: float | None = Field(default=None, gt=0, description="latency to reach, p50 in milliseconds")
    importance: Literal["l1", "l2"] = "l1"
    ignore: list[str] | None = Field(default=None, description="module names kept whole (default: the classifier)")
    layers: dict[str, float] = Field(default_factory=dict,
                                     description="share of output channels removed from named layers; the amount "
                                                 "above (ratio, the searched one, or the latency search) applies to "
                                                 "the others")
    round_to: int | None = Field(default=None, ge=2, description="keep pruned channel counts a multiple of N")
    finetune: Finetune | None = None
    seed: int = 0

    @property
    def latency_goal(self) -> bool:
        """The amount is a latency to reach: the per-layer allocation is searched on the target's timings."""
        return self.target_latency is not None or self.target_latency_ms is not None

    @model_validator(mode="after")
    def _amount(self) -> Prune:
        given = [k for k in AMOUNT_KEYS if getattr(self, k) is not None]
        if self.method == "structured" and (len(given) > 1 or not (given or self.layers)):
            raise ValueError("structured pruning needs exactly one of ratio, target_macs, target_params, "
                             "target_latency, target_latency_ms (or layers)"
                             + (f"; got {' and '.join(given)}" if len(given) > 1 else ""))
        if self.method == "sparse-2of4" and (given or self.layers or self.round_to):
            extra = given + [k for k in ("layers", "round_to") if getattr(self, k)]
            raise ValueError(f"sparse-2of4 fixes the amount at 50% of weights; remove {', '.join(extra)}")
        bad = {k: v for k, v in self.layers.items() if not 0 < v < 1}
        if bad:
            raise ValueError(f"layers: ratios must be between 0 and 1 (exclusive), got {bad}")
        return self


FLAG_NAMES = {"ratio": "--prune-ratio", "target_macs": "--prune-macs", "target_params": "--prune-params",
              "target_latency": "--prune-latency"}


def with_prune_flags(project: Any, flags: dict[str, Any]) -> Any:
    """``project`` with the build command's ``--prune*`` flags laid over its ``prune`` block.

    ``flags`` holds ``method`` (structured, sparse-2of4 or off), ``ratio``, ``target_macs``,
    ``target_params``, ``target_latency`` and ``finetune_epochs``; None means not given. An amount flag
    replaces the block's amount (``--prune-latency`` also its ``layers``: the search chooses them);
    ``off`` drops the block."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return project
    if given.get("method") == "off":
        if len(given) > 1:
            raise ConfigError("--prune off cannot be combined with other --prune-* flags",
                              hint="drop --prune off to prune, or the other --prune-* flags to build unpruned")
        return project.model_copy(update={"prune": None})
    if "target_latency" in given and not 0 < given["target_latency"] < 1:
        raise ConfigError(f"--prune-latency {given['target_latency']}: the latency to reach is a share of the "
                          "unpruned INT8 p50, between 0 and 1 (exclusive)",
                          hint="e.g. --prune-latency 0.5 for half the unpruned latency")
    base = project.prune.model_dump(exclude_none=True, exclude_defaults=True) if project.prune else {}
    if "finetune" in base and project.prune and project.prune.finetune:
        base["finetune"] = project.prune.finetune.model_dump(exclude_none=True)
    if any(k in given for k in FLAG_NAMES) or given.get("method") == "sparse-2of4":
        for k in AMOUNT_KEYS:
            base.pop(k, None)
    if given.get("method") == "sparse-2of4" or "target_latency" in given:
        base.pop("layers", None)
    if given.get("method") == "sparse-2of4":
        base.pop("round_to", None)
    for k in ("method", *FLAG_NAMES):
        if k in given:
            base[k] = given[k]
    if "method" not in given and any(k in given for k in FLAG_NAMES):
        base["method"] = "structured"  # an amount means channel pruning
    if "finetune_epochs" in given:
        if given["finetune_epochs"] == 0:
            base.pop("finetune", None)
        else:
            base["finetune"] = {**base.get("finetune", {}), "epochs": given["finetune_epochs"]}
    used = ", ".join(FLAG_NAMES.get(k, f"--prune{'' if k == 'method' else '-' + k.replace('_', '-')}") for k in given)
    try:
        prune = Prune.model_validate(base)
    except PydanticValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = first.get("msg", "invalid value").removeprefix("Value error, ")
        raise ConfigError(f"{used}: {'prune.' + where + ': ' if where else ''}{msg}",
                          hint="e.g. --prune structured --prune-macs 0.4 (shares are between 0 and 1)") from e
    return project.model_copy(update={"prune": prune})
