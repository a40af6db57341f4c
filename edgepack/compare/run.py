"""`compare`: one bundle per target (built, or reused by content digest), one row per target.

A row's figures come from the bundle's manifest where the host could measure them, and from a
roofline estimate (:mod:`edgepack.measure.estimate`) where it could not. Every cell says which:
``measured (host: <cpu>)``, ``host proxy (...)``, ``bundle`` or ``estimate``. The estimate's efficiency
and overhead are calibrated on the host in the same run, on generated reference models (not the
user's), so for every row measured here the estimate is shown beside the measurement with its error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepack.build.data import read_data
from edgepack.build.parallel import default_workers, run_builds
from edgepack.build.pipeline import check_out_dir
from edgepack.build.plan import plan_targets as plan_builds
from edgepack.build.source import source_of
from edgepack.bundle import Manifest, Source, bundle_name, open_bundle, read_archive
from edgepack.compare.model import WORK, Budget, CompareProgress, Comparison, Plan, host_is_device_class, quiet
from edgepack.compare.rows import assemble
from edgepack.errors import ConfigError, EdgepackError, did_you_mean
from edgepack.loaders.resolve import Resolved, resolve
from edgepack.measure.calibrate import SUITES
from edgepack.measure.host import host_info
from edgepack.project import find_project, load_project
from edgepack.scratch import locked_dir
from edgepack.target import TargetProfile


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
    if manifest.measurements.data.evaluation.get("fingerprint") != fingerprints.get("evaluation"):
        return "the evaluation data changed"
    where, here = manifest.measurements.compiled.latency.where, host_info()
    if any(where.get(k) != here[k] for k in ("cpu", "isa", "logical_cpus")):
        return f"it was measured on another machine ({where.get('cpu')}, {where.get('logical_cpus')} CPUs)"
    return None


def _intact(bundle: Path) -> bool:
    """Every file matches the manifest's sha256 and the build id (the content digest)."""
    try:
        with open_bundle(bundle, verify=True):
            return True
    except EdgepackError:
        return False


def _fingerprints(resolved: Resolved, profile: TargetProfile, cache: dict[int, dict[str, str]]) -> dict[str, str]:
    """The data fingerprints a build of ``profile`` records, from the project resolved as the build
    resolves it (an ONNX file's inputs, a Hugging Face folder's tokenizer)."""
    project = resolved.project
    n = project.calibration.samples or profile.quantization.samples
    if n not in cache:
        def read(which: str) -> str:
            return read_data(resolved, profile, which).fingerprint

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


def plan_targets(targets: list[str], targets_dirs: list[Path] | None, precision: str | None = None) -> list[Plan]:
    """Resolve names (unknown names are a ConfigError) with the build's own plan step, and say which
    can be built on this machine (the others are estimated)."""
    return [Plan(tp.spec, tp.profile, buildable=tp.buildable, reason=tp.problem,
                 host_class=host_is_device_class(tp.profile))
            for tp in plan_builds(targets, targets_dirs, strict=False, precision=precision)]


def compare(project_path: Path | None, targets: list[str], out: Path | None = None,
            targets_dirs: list[Path] | None = None, budget: Budget | None = None, suite: str = "standard",
            workers: int | None = None, progress: CompareProgress | None = None,
            on_build_event: Callable[[Any], None] | None = None) -> Comparison:
    """Build or reuse one bundle per target, estimate what cannot be measured here, return the rows.

    Builds run in spawned worker processes (``workers``, default min(targets, cpu_count // 2 or 1)):
    a script that calls this needs the usual ``if __name__ == "__main__":`` guard. ``progress`` gets
    ``(phase or target, status, detail)``; ``on_build_event`` gets the workers' pipeline stages.
    """
    progress = progress or quiet
    project_file = find_project(project_path)
    project = load_project(project_file)
    if not targets:
        raise ConfigError("no target given", hint="pass --targets cpu,onnx,... (see `edgepack targets list`)")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if suite not in SUITES:
        raise ConfigError(f"unknown calibration suite '{suite}'", hint=did_you_mean(suite, SUITES))
    plans = plan_targets(targets, targets_dirs, project.precision)
    out = check_out_dir(Path(out) if out else project.root / "dist")
    work = out / WORK
    source = source_of(project, project_file)
    fps: dict[int, dict[str, str]] = {}
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
        return assemble(resolved, plans, out, work, suite, budget or Budget(), progress)
