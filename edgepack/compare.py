"""`compare`: one bundle per target (built, or reused by content digest), one row per target.

A row's figures come from the bundle's manifest where the host could measure them, and from a
roofline estimate (:mod:`edgepack.measure.estimate`) where it could not. Every cell says which:
``measured (host: <cpu>)``, ``host proxy (...)``, ``bundle`` or ``estimate``. The estimate's efficiency
and overhead are calibrated on the host in the same run, on generated reference models (not the
user's), so for every row measured here the estimate is shown beside the measurement with its error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.bundle import Manifest, Source, bundle_name, read_archive
from edgepack.errors import ConfigError, EdgepackError
from edgepack.measure.estimate import BYTES_PER_ELEMENT, GraphCounts, device_peaks, error_pct, estimate
from edgepack.measure.host import host_info
from edgepack.project import find_project, load_project
from edgepack.target import TargetProfile, load_target

WORK = ".edgepack-compare"
# (phase or target, status, detail): status is start | done | failed | info
CompareProgress = Callable[[str, str, str], None]


def _quiet(phase: str, status: str, detail: str) -> None:
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


def read_manifest(bundle: Path) -> Manifest | None:
    """The manifest of a bundle archive, without extracting the rest; None when unreadable."""
    try:
        return read_archive(bundle, None)
    except EdgepackError:
        return None


def _profile_dump(profile: TargetProfile) -> dict[str, Any]:
    return {k: v for k, v in profile.model_dump(mode="json").items() if k != "source"}


def reusable(manifest: Manifest, source: Source, profile: TargetProfile, fingerprints: dict[str, str]) -> str | None:
    """None when the bundle matches source, project file, resolved profile and data; else why not."""
    ms = manifest.source
    if (ms.digest, ms.weights_digest) != (source.digest, source.weights_digest):
        return "the model source or weights changed"
    if ms.project_digest is None or ms.project_digest != source.project_digest:
        return "the project file changed (or the bundle does not record it)"
    if {k: v for k, v in manifest.profile.items() if k != "source"} != _profile_dump(profile):
        return "the target profile changed"
    if manifest.calibration.get("fingerprint") != fingerprints.get("calibration"):
        return "the calibration data changed"
    if manifest.measurements.data.get("evaluation", {}).get("fingerprint") != fingerprints.get("evaluation"):
        return "the evaluation data changed"
    where, here = manifest.measurements.compiled.latency.get("where", {}), host_info()
    if any(where.get(k) != here[k] for k in ("cpu", "isa", "logical_cpus")):
        return f"it was measured on another machine ({where.get('cpu')}, {where.get('logical_cpus')} CPUs)"
    return None


def _intact(bundle: Path) -> bool:
    """Every file matches the manifest's sha256 and the build id (the content digest)."""
    from edgepack.bundle import open_bundle

    try:
        with open_bundle(bundle, verify=True):
            return True
    except EdgepackError:
        return False


def _fingerprints(resolved: Any, profile: TargetProfile, cache: dict[int, dict[str, str]]) -> dict[str, str]:
    """The data fingerprints a build of ``profile`` records, from the project resolved as the build
    resolves it (an ONNX file's inputs, a Hugging Face folder's tokenizer)."""
    from edgepack.pipeline import read_data

    project = resolved.project
    n = project.calibration.samples or profile.quantization.samples
    if n not in cache:
        def read(which: str) -> str:
            return read_data(project, profile, resolved.text, resolved.text_root, which).fingerprint

        fp = {"calibration": read("calibration")}
        fp["evaluation"] = read("evaluation") if project.evaluation else fp["calibration"]
        cache[n] = fp
    return cache[n]


def _reuse_or_not(plan: Plan, manifest: Manifest, why: str | None, progress: CompareProgress) -> None:
    if why is None and _intact(plan.bundle):
        plan.manifest, plan.reused = manifest, True
        progress(plan.profile.name, "done", f"reused {plan.bundle.name} ({manifest.build_id[:19]})")
    else:
        progress(plan.profile.name, "info", f"rebuilding {plan.bundle.name}: {why or 'its files do not match the manifest'}")


def plan_targets(targets: list[str], targets_dirs: list[Path] | None) -> list[Plan]:
    """Resolve names (unknown names are a ConfigError) and say which can be built on this machine."""
    from edgepack.backends import get_backend

    plans: list[Plan] = []
    seen: set[str] = set()
    for spec in targets:
        profile = load_target(spec, targets_dirs)
        if profile.name in seen:
            continue
        seen.add(profile.name)
        plan = Plan(spec, profile, buildable=True, host_class=host_is_device_class(profile))
        try:
            backend = get_backend(profile.backend, needed_by=f"target '{profile.name}'")
            if profile.precision not in backend.precisions:
                raise ConfigError(f"backend '{backend.name}' does not support precision '{profile.precision}'")
            backend.options(profile.backend_options, f"{profile.source}: backend_options")
            backend.check_environment(compile=True)
        except EdgepackError as e:
            plan.buildable, plan.reason = False, e.message
        plans.append(plan)
    return plans


def compare(project_path: Path | None, targets: list[str], out: Path | None = None,
            targets_dirs: list[Path] | None = None, budget: Budget | None = None, suite: str = "standard",
            workers: int | None = None, progress: CompareProgress | None = None,
            on_build_event: Callable[[Any], None] | None = None) -> Comparison:
    """Build or reuse one bundle per target, estimate what cannot be measured here, return the rows.

    Builds run in spawned worker processes (``workers``, default min(targets, cpu_count // 2 or 1)):
    a script that calls this needs the usual ``if __name__ == "__main__":`` guard. ``progress`` gets
    ``(phase or target, status, detail)``; ``on_build_event`` gets the workers' pipeline stages.
    """
    from edgepack.parallel import default_workers, run_builds
    from edgepack.pipeline import check_out_dir, source_of

    progress = progress or _quiet
    project_file = find_project(project_path)
    project = load_project(project_file)
    if not targets:
        raise ConfigError("no target given", hint="pass --targets cpu,onnx,... (see `edgepack targets list`)")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    from edgepack.measure.calibrate import SUITES

    if suite not in SUITES:
        from edgepack.errors import did_you_mean

        raise ConfigError(f"unknown calibration suite '{suite}'", hint=did_you_mean(suite, SUITES))
    plans = plan_targets(targets, targets_dirs)
    out = check_out_dir(Path(out) if out else project.root / "dist")
    work = out / WORK
    source = source_of(project, project_file)
    fps: dict[int, dict[str, str]] = {}
    from edgepack.loaders.resolve import resolve
    from edgepack.scratch import locked_dir

    # the project resolved as the build resolves it, its files kept for the whole comparison
    with locked_dir(out, ".edgepack-", ".build") as scratch:
        resolved = resolve(project, scratch / "source")
        for plan in plans:
            if not plan.buildable:
                continue
            plan.bundle = out / bundle_name(project.name, project.version, plan.profile.name)
            manifest = read_manifest(plan.bundle) if plan.bundle.is_file() else None
            if manifest is None:
                continue
            why = reusable(manifest, source, plan.profile, _fingerprints(resolved, plan.profile, fps))
            _reuse_or_not(plan, manifest, why, progress)
        to_build = [p for p in plans if p.buildable and not p.reused]
        if to_build:
            n = workers or default_workers(len(to_build))
            progress("build", "start", f"{len(to_build)} target(s) in {n} process(es)")
            outcomes = run_builds(project_file, [p.spec for p in to_build], out, list(targets_dirs or []), n,
                                  on_build_event)
            by_name = {o.target: o for o in outcomes}
            for plan in to_build:
                o = by_name.get(plan.profile.name) or by_name.get(plan.spec)
                if o is None or o.bundle is None:
                    plan.error = (o.error if o else "no result from the build process") or "build failed"
                    progress(plan.profile.name, "failed", plan.error)
                    continue
                plan.bundle, plan.manifest = o.bundle, read_manifest(o.bundle)
                progress(plan.profile.name, "done", f"built {o.bundle.name}")
            progress("build", "done", "")
        from edgepack.compare_rows import assemble

        return assemble(resolved, plans, out, work, suite, budget or Budget(), progress)


def bytes_mb(elements: int, precision: str) -> float:
    return round(elements * BYTES_PER_ELEMENT[precision] / 1e6, 4)


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


__all__ = ["Budget", "Cell", "Comparison", "Row", "compare", "error_pct", "estimate_for", "host_is_device_class"]
