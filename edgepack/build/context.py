"""The typed state of one build: what every target shares, and the progress reporting.

A :class:`BuildContext` is made once per ``build()`` call. Its inputs (the resolved project, the source
record, the settings, the data) are frozen values; the caches that fill as targets are built (exports,
FP32 references, the live torch modules backends that convert from PyTorch read) are typed dicts on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifact import ModelArtifact, StageRecord
from edgepack.bundle import Manifest, Measured, Source
from edgepack.calibration.reader import SampleSet
from edgepack.interrupts import check
from edgepack.loaders.resolve import Resolved
from edgepack.measure.accuracy import MetricPlan
from edgepack.project import Project

# (stage, status, seconds, detail); status is start | done | failed | warn | note
Progress = Callable[[str, str, float | None, str], None]
Outputs = list[list[np.ndarray]]   # per sample, per model output


def no_progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
    pass


class Stage:
    """``with Stage(progress, name) as st:`` reports start/done/failed with the seconds; set ``st.detail``."""

    def __init__(self, progress: Progress, name: str):
        self.progress, self.name, self.detail = progress, name, ""
        self.t0 = time.perf_counter()

    def __enter__(self) -> "Stage":
        check()  # Ctrl-C or SIGTERM that arrived during an import is raised here, between stages
        self.t0 = time.perf_counter()
        self.progress(self.name, "start", None, "")
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        if exc_type is None:
            check()
        self.progress(self.name, "done" if exc_type is None else "failed", self.seconds,
                      self.detail if exc_type is None else "")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


@dataclass
class Timings:
    """Wraps the progress callback and keeps each finished stage's seconds, in order: the manifest's
    ``timings`` (so a build's cost is visible in its bundle)."""

    forward: Progress
    stages: list[tuple[str, float, dict[str, float]]] = field(default_factory=list)

    def __call__(self, stage: str, status: str, seconds: float | None, detail: str) -> None:
        if status == "done" and seconds is not None:
            if seconds > 1.0:
                release_memory()
            self.stages.append((stage, round(seconds, 3), memory_mb()))
        self.forward(stage, status, seconds, detail)

    def record(self, shared: int, since: int) -> dict[str, Any]:
        """The stages before index ``shared`` (the build's shared work) and those from ``since`` on."""
        rows = self.stages[:shared] + self.stages[max(since, shared):]
        return {"stages": [{"stage": n, "seconds": s, **mem} for n, s, mem in rows],
                "total_seconds": round(sum(s for _, s, _ in rows), 3),
                "note": "wall seconds of each finished stage: reading the data is listed with every target of the build, "
                        "the export and the FP32 reference with the first target that needed them; bundling is not "
                        "counted. rss_mb: the build process's resident memory when the stage ended, peak_rss_mb: "
                        "its peak so far (Linux /proc; memory probes and toolchains in child processes not included)"}


def release_memory() -> None:
    """Hand memory freed by a finished stage (an export's graphs, a toolchain's copies) back to the OS,
    so the next stage's peak does not stack on the last one's leftovers (glibc keeps freed heap)."""
    import ctypes
    import gc

    gc.collect()
    # what survives (imported toolchains, the model, the data: a million objects once torch's exporter is
    # loaded) is not scanned again by the next stages' collections, which then cost milliseconds, not
    # a second each; reference counting still frees it. build() unfreezes it at its end (:func:`thaw`).
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def thaw() -> None:
    """Hand the objects :func:`release_memory` froze back to the garbage collector (a build's end)."""
    import gc

    gc.unfreeze()


def memory_mb() -> dict[str, float]:
    """This process's resident and peak resident memory (MB), from /proc/self/status; {} elsewhere."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return {}
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1)} if len(fields) == 2 else {}


@dataclass(frozen=True)
class Settings:
    """The build command's knobs (not in the project file)."""

    tune: bool = True
    max_tuning_minutes: float = 10.0
    max_tuning_steps: int = 12
    threads: int | None = None
    prune_flags: Mapping[str, Any] = field(default_factory=dict)  # --prune* flags that overrode the project's block
    separate_validation: bool = False  # --separate-validation: validation files in <bundle>.validation

    def tuning_record(self) -> dict[str, Any]:
        return {"enabled": self.tune, "max_minutes": self.max_tuning_minutes, "max_steps": self.max_tuning_steps}


@dataclass(frozen=True)
class Data:
    """The calibration and evaluation sets, read once per build, and the gating metric's name."""

    calibration: SampleSet
    evaluation: SampleSet
    metric: str


@dataclass
class Reference:
    """The FP32 reference (exported ONNX on ONNX Runtime): its figures and its outputs on the evaluation set.

    Its latency is not taken when the reference is made: each target times it in turn with its compiled
    model (:meth:`with_latency`), and only a target that cannot be timed on this host has it timed alone
    (``time_alone``, once, then kept)."""

    untimed: Measured                   # every figure but latency (that one is a zero placeholder)
    outputs: Outputs
    time_alone: Callable[[], tuple[Any, Any]]
    _alone: Measured | None = None

    @property
    def accuracy(self) -> Any:
        return self.untimed.accuracy

    @property
    def measured(self) -> Measured:
        """The reference with its latency timed alone (measured on first use)."""
        if self._alone is None:
            latency, by_shape = self.time_alone()
            self._alone = self.with_latency(latency, by_shape)
        return self._alone

    def with_latency(self, latency: Any, by_shape: Any = None) -> Measured:
        timed = self.untimed.model_copy(deep=True)
        timed.latency = latency  # validated on assignment
        if by_shape is not None:
            timed.latency_by_shape = by_shape
        return timed


# exports are keyed by the profile's max opset; ("unpruned", opset) and ("torch", which, shapes) for the rest
ExportKey = Any


@dataclass
class BuildContext:
    resolved: Resolved
    source: Source
    toolchain: Mapping[str, str]
    settings: Settings
    out: Path
    scratch: Path
    progress: Progress = no_progress
    data: Data | None = None
    metric_plan: MetricPlan | None = None   # once the model's outputs are known (first reference)
    exports: dict[ExportKey, ModelArtifact] = field(default_factory=dict)
    references: dict[tuple[int, int], Reference] = field(default_factory=dict)
    modules: dict[str, Any] = field(default_factory=dict)  # torch modules "model" (and "unpruned") for PyTorch converters
    stages: list[StageRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    prune: dict[str, Any] | None = None     # the prune record, when the project prunes
    timings: Timings | None = None          # the stage clock (build() sets it; progress is its wrapper)
    shared_stages: int = 0                  # how many of its stages every target shares (reading the data)
    probes: list[Any] = field(default_factory=list)  # memory probes running in the background (build.measuring)
    runners: dict[tuple[str, str, int], Any] = field(default_factory=dict)  # loaded models kept for the in-turn window

    @property
    def project(self) -> Project:
        return self.resolved.project

    @property
    def calibration(self) -> SampleSet:
        return self._data.calibration

    @property
    def evaluation(self) -> SampleSet:
        return self._data.evaluation

    @property
    def metric(self) -> str:
        return self._data.metric

    @property
    def _data(self) -> Data:
        if self.data is None:
            raise RuntimeError("the build's data is read before any target is built")
        return self.data

    def warn(self, note: str) -> None:
        if note in self.warnings:
            return
        self.warnings.append(note)
        self.progress(note, "warn", None, "")


@dataclass(frozen=True)
class BuildResult:
    """A target that was built: its bundle (kept even when a gate failed) and its manifest."""

    target: str
    bundle: Path
    manifest: Manifest

    @property
    def passed(self) -> bool:
        return self.manifest.acceptance.passed


@dataclass(frozen=True)
class TargetFailure:
    """A target that could not be built (``build(..., keep_going=True)``); nothing of it was written."""

    target: str
    error: str
    hint: str | None
    error_type: str
    exit_code: int = 1


Outcome = BuildResult | TargetFailure
