"""The values a comparison is made of: budgets, cells (a figure and where it came from), rows, the result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.bundle import Manifest
from edgepack.errors import ConfigError
from edgepack.measure.estimate import BYTES_PER_ELEMENT, GraphCounts, device_peaks, estimate
from edgepack.measure.host import host_info
from edgepack.target import TargetProfile

WORK = ".edgepack-compare"
# (phase or target, status, detail): status is start | done | failed | info
CompareProgress = Callable[[str, str, str], None]


def quiet(phase: str, status: str, detail: str) -> None:
    pass


@dataclass(frozen=True)
class Budget:
    max_latency_ms: float | None = None     # against p50 (measured, or estimated: an estimate has no p90)
    max_drop: float | None = None           # accuracy points lost vs FP32
    max_size_mb: float | None = None

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.max_latency_ms, self.max_drop, self.max_size_mb))


@dataclass(frozen=True)
class Cell:
    value: float | None
    source: str                 # measured (host: CPU) | host proxy (...) | bundle | estimate | n/a
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "note": self.note}


NA = Cell(None, "n/a")


@dataclass
class Plan:
    spec: str
    profile: TargetProfile
    buildable: bool
    reason: str | None = None
    host_class: bool = False
    bundle: Path | None = None
    manifest: Manifest | None = None
    reused: bool = False
    error: str | None = None


@dataclass
class Row:
    target: str
    device: str
    backend: str
    precision: str
    status: str                 # measured | estimated | estimate only | failed
    reason: str | None
    metric: str | None = None
    accuracy: Cell = NA
    fp32_accuracy: Cell = NA
    accuracy_delta: Cell = NA
    p50_ms: Cell = NA
    p90_ms: Cell = NA
    throughput_per_s: Cell = NA
    size_mb: Cell = NA
    peak_memory_mb: Cell = NA
    estimate: dict[str, Any] | None = None
    estimate_error_pct: float | None = None
    bundle: str | None = None
    reused: bool = False
    price_usd: float | None = None
    tdp_w: float | None = None
    budget: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = v.to_json() if isinstance(v, Cell) else v
        return out


@dataclass
class Comparison:
    project: str
    version: str
    out: Path
    host: dict[str, Any]
    rows: list[Row]
    model: dict[str, Any] | None
    calibrations: list[dict[str, Any]]
    budget: dict[str, Any] | None = None
    cheapest: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"project": self.project, "version": self.version, "out": str(self.out), "host": self.host,
                "model": self.model, "rows": [r.to_json() for r in self.rows], "calibrations": self.calibrations,
                "budget": self.budget, "cheapest": self.cheapest, "notes": self.notes}


def host_is_device_class(profile: TargetProfile) -> bool:
    """True when this machine is an instance of the profile's device: an x86 CPU with every ISA flag it lists."""
    dev = profile.device
    return dev.kind == "cpu" and bool(dev.isa) and set(dev.isa) <= set(host_info()["isa"])


def bytes_mb(elements: int, precision: str) -> float | None:
    """MB for ``elements`` at ``precision``; None for a precision whose element size is not known here."""
    size = BYTES_PER_ELEMENT.get(precision)
    return round(elements * size / 1e6, 4) if size is not None else None


def estimate_for(counts: GraphCounts | None, profile: TargetProfile, calibration: Any,
                 host_peaks: Any | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The estimate for a profile (on the host's peaks when ``host_peaks`` is given), or why there is none."""
    if counts is None:
        return None, "no graph counts (the FP32 ONNX export failed)"
    try:
        peaks = host_peaks or device_peaks(profile.device, profile.precision)
    except ConfigError as e:
        return None, e.message
    return estimate(counts, peaks, calibration), None
