"""`compare`: one bundle per target (built, or reused by content digest), one row per target.

A row's figures come from the bundle's manifest where the host could measure them, and from a
roofline estimate (:mod:`edgepack.measure.estimate`) where it could not. Every cell says which:
``measured (host: <cpu>)``, ``host proxy (...)``, ``bundle`` or ``estimate``. The estimate's efficiency
and overhead are calibrated on the host in the same run, on generated reference models (not the
user's), so for every row measured here the estimate is shown beside the measurement with its error.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.build.data import read_data
from edgepack.build.parallel import BuildOutcome, default_workers, run_builds
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


@dataclass
class Prepared:
    """One project of a comparison after planning and reuse: what is left to build."""

    project_file: Path
    resolved: Resolved
    plans: list[Plan]
    out: Path
    work: Path

    @property
    def to_build(self) -> list[Plan]:
        return [p for p in self.plans if p.buildable and not p.reused]


def _check(targets: list[str], workers: int | None, suite: str) -> None:
    if not targets:
        raise ConfigError("no target given", hint="pass --targets cpu,onnx,... (see `edgepack targets list`)")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if suite not in SUITES:
        raise ConfigError(f"unknown calibration suite '{suite}'", hint=did_you_mean(suite, SUITES))


def prepare(project_file: Path, targets: list[str], out: Path | None, targets_dirs: list[Path] | None,
            progress: CompareProgress, stack: ExitStack) -> Prepared:
    """Plan the targets, resolve the project (its files kept until ``stack`` closes), reuse bundles."""
    project = load_project(project_file)
    plans = plan_targets(targets, targets_dirs, project.precision)
    out = check_out_dir(Path(out) if out else project.root / "dist")
    source = source_of(project, project_file)
    fps: dict[int, dict[str, str]] = {}
    scratch = stack.enter_context(locked_dir(out, ".edgepack-", ".build"))
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
    return Prepared(project_file, resolved, plans, out, out / WORK)


def _settle(plan: Plan, o: BuildOutcome | None, progress: CompareProgress) -> None:
    if o is None or o.bundle is None:
        plan.error = (o.error if o else "no result from the build process") or "build failed"
        progress(plan.profile.name, "failed", plan.error)
        return
    plan.bundle, plan.manifest = o.bundle, read_manifest(o.bundle)
    where = f" on {o.where['host']} (Ray node {o.where['node'][:8]})" if o.where else ""
    progress(plan.profile.name, "done", f"built {o.bundle.name}{where}")


def _build_here(prep: Prepared, targets_dirs: list[Path], workers: int | None, progress: CompareProgress,
                on_build_event: Callable[[Any], None] | None) -> None:
    to_build = prep.to_build
    n = workers or default_workers(len(to_build))
    progress("build", "start", f"{len(to_build)} target(s) in {n} process(es)")
    outcomes = run_builds(prep.project_file, [p.spec for p in to_build], prep.out, targets_dirs, n, on_build_event)
    by_name = {o.target: o for o in outcomes}
    for plan in to_build:
        _settle(plan, by_name.get(plan.profile.name) or by_name.get(plan.spec), progress)
    progress("build", "done", "")


def _build_on_cluster(preps: list[Prepared], targets_dirs: list[Path], cluster: str, progress: CompareProgress,
                      on_build_event: Callable[[Any], None] | None) -> None:
    """Every project x target pair left to build, as one set of Ray tasks."""
    from edgepack.cluster.builds import plan_jobs, run_jobs
    from edgepack.cluster.connect import connect
    from edgepack.cluster.ship import pack

    ray = connect(cluster)
    many = len(preps) > 1
    items = [(plan, i, plan.spec, plan.profile.measurement.threads,
              f"{prep.resolved.project.name}/{plan.profile.name}" if many else plan.profile.name)
             for i, prep in enumerate(preps) for plan in prep.to_build]
    jobs = plan_jobs(ray, items, None)
    progress("build", "start", f"{len(items)} build(s) in {len(jobs)} task(s) on the Ray cluster at {cluster}")
    payloads = [pack(prep.project_file, targets_dirs, prep.out, [p.spec for p in prep.to_build]) if prep.to_build
                else None for prep in preps]
    for plan, o in run_jobs(cluster, payloads, jobs, [p.out for p in preps], {}, on_build_event):
        _settle(plan, o, progress)
    progress("build", "done", "")


def cpu_note(comparisons: list[Comparison], plans: list[Plan]) -> None:
    """Rows measured on different CPU models cannot be read side by side as-is: say so."""
    cpus = {}
    for plan in plans:
        if plan.manifest is not None and plan.manifest.measurements.compiled.proxy is None:
            cpus.setdefault(str(plan.manifest.measurements.compiled.latency.where.get("cpu")), []).append(
                plan.profile.name)
    if len(cpus) > 1:
        note = "rows measured on different CPU models: " + "; ".join(f"{c}: {', '.join(t)}" for c, t in cpus.items())
        for c in comparisons:
            c.notes.append(note)


def compare_projects(projects: list[Path | None], targets: list[str], out: Path | None = None,
                     targets_dirs: list[Path] | None = None, budget: Budget | None = None, suite: str = "standard",
                     workers: int | None = None, progress: CompareProgress | None = None,
                     on_build_event: Callable[[Any], None] | None = None,
                     cluster: str | None = None) -> list[Comparison]:
    """:func:`compare` for several projects over the same targets: one comparison per project (models x
    targets). With ``out``, each project's bundles go to ``out/<project name>`` when there are several.
    With ``cluster`` (a Ray address) every project x target build is a task on that cluster."""
    progress = progress or quiet
    _check(targets, workers, suite)
    if cluster:  # before any work: an address where nothing answers fails in seconds
        from edgepack.cluster.connect import probe

        probe(cluster)
    files = [find_project(p) for p in projects]
    if len(set(files)) != len(files):
        raise ConfigError("the same project is given twice", hint="pass each --project once")
    with ExitStack() as stack:
        preps = []
        for f in files:
            where = out
            if out is not None and len(files) > 1:
                where = Path(out) / load_project(f).name
            preps.append(prepare(f, targets, where, targets_dirs, progress, stack))
        if any(p.to_build for p in preps):
            if cluster:
                _build_on_cluster(preps, list(targets_dirs or []), cluster, progress, on_build_event)
            else:
                for prep in preps:
                    if prep.to_build:
                        _build_here(prep, list(targets_dirs or []), workers, progress, on_build_event)
        found = [assemble(p.resolved, p.plans, p.out, p.work, suite, budget or Budget(), progress) for p in preps]
    cpu_note(found, [plan for p in preps for plan in p.plans])
    return found


def compare(project_path: Path | None, targets: list[str], out: Path | None = None,
            targets_dirs: list[Path] | None = None, budget: Budget | None = None, suite: str = "standard",
            workers: int | None = None, progress: CompareProgress | None = None,
            on_build_event: Callable[[Any], None] | None = None, cluster: str | None = None) -> Comparison:
    """Build or reuse one bundle per target, estimate what cannot be measured here, return the rows.

    Builds run in spawned worker processes (``workers``, default min(targets, cpu_count // 2 or 1)):
    a script that calls this needs the usual ``if __name__ == "__main__":`` guard. With ``cluster``
    (a Ray address, see :mod:`edgepack.cluster`) each target's build is a task on that cluster instead.
    ``progress`` gets ``(phase or target, status, detail)``; ``on_build_event`` gets the builds' stages.
    """
    return compare_projects([project_path], targets, out, targets_dirs, budget, suite, workers, progress,
                            on_build_event, cluster)[0]
