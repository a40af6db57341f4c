"""Target builds as Ray tasks: one task per (project, target), the same :func:`edgepack.build.build`
that runs locally, on whichever node Ray picks.

- The project goes to the cluster once per run (:mod:`edgepack.cluster.ship`, one object in Ray's
  object store); each task unpacks it into a temporary folder it removes at its end.
- A task reserves ``num_cpus`` = the threads its build measures with (and passes that count to the
  build), so two timings never share cores on one node; the FP32 reference and the compiled model of
  one target are measured in the same task, so on the same node. The manifest's ``where`` names the
  node's host; each outcome also carries the Ray node and worker that built it.
- The bundle comes back as bytes and is written into ``--out`` on this machine atomically (a temporary
  name, then a rename), so the driver keeps bundles exactly as a local build does.
- A worker or node that dies mid-task: Ray runs the task again elsewhere (``MAX_RETRIES``), and the
  row is written once, from the one result that came back. A target whose build fails is one row with
  its error. Ctrl-C (or any error in this process) cancels every task still running.
- Progress: each task sends its build's stage events through a ``ray.util.queue.Queue`` labelled
  ``target @ node``; the caller gets them as local builds' events.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.build.parallel import BuildEvent, BuildOutcome
from edgepack.cluster.connect import connect, nodes
from edgepack.cluster.ship import Payload, pack

MAX_RETRIES = 2  # a task whose worker or node died is run again, at most this often


@dataclass(frozen=True)
class Job:
    """One task: a target of a project (``key`` tells the caller which)."""

    key: Any
    payload: int        # index into the run's payloads
    spec: str
    threads: int
    label: str


def build_task(payload: Payload, data: bytes, spec: str, threads: int, settings: dict[str, Any], events: Any,
               label: str) -> dict[str, Any]:
    """Runs on a worker: unpack the project, build one target into a temporary folder, return the bundle's bytes."""
    import socket
    import tempfile

    import ray

    from edgepack.build.context import TargetFailure
    from edgepack.build.pipeline import build
    from edgepack.cluster.ranking import ray_layer_map
    from edgepack.cluster.ship import unpack
    from edgepack.errors import EdgepackError
    from edgepack.tuning import layer_map

    where = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    label = f"{label} @ {where['host']}/{where['node'][:6]} pid {where['pid']}"

    def progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
        try:
            events.put((label, stage, status, seconds, detail), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort; the build goes on without it
            pass

    progress("task", "start", None, f"{threads} CPU(s) reserved")
    token = layer_map.set(ray_layer_map)
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-task-") as tmp:
            root = unpack(data, Path(tmp) / "in")
            spec_here = str(root / payload.specs[spec]) if spec in payload.specs else spec
            try:
                outcomes = build(root / payload.project_file, [spec_here], Path(tmp) / "out", threads, progress,
                                 [root / d for d in payload.targets_dirs], keep_going=True, **settings)
            except EdgepackError as e:
                return {"error": e.message, "hint": e.hint, "error_type": type(e).__name__,
                        "exit_code": e.exit_code, "where": where}
            except Exception as e:  # noqa: BLE001 - a step every target shares failed
                return {"error": f"{type(e).__name__}: {e}", "hint": "rerun without --cluster, with --debug, for the "
                        "traceback", "error_type": type(e).__name__, "exit_code": 1, "where": where}
            o = outcomes[0]
            if isinstance(o, TargetFailure):
                return {"target": o.target, "error": o.error, "hint": o.hint, "error_type": o.error_type,
                        "exit_code": o.exit_code, "where": where}
            side = o.bundle.with_name(o.bundle.name + ".validation")  # --separate-validation's file
            return {"target": o.target, "name": o.bundle.name, "bundle": o.bundle.read_bytes(), "where": where,
                    "validation": side.read_bytes() if side.is_file() else None}
    finally:
        layer_map.reset(token)


def reservations(ray: Any, profiles_threads: Iterable[int], threads: int | None) -> list[int]:
    """CPUs per task: the build's measurement threads, at most the largest node's CPUs (else it never runs)."""
    biggest = max((int(n["cpus"]) for n in nodes(ray)), default=1) or 1
    return [max(1, min(threads or t, biggest)) for t in profiles_threads]


def write_atomically(out: Path, name: str, data: bytes) -> Path:
    final = out / name
    part = out / f".{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        part.write_bytes(data)
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return final


def run_jobs(address: str, payloads: list[Payload], jobs: list[Job], outs: list[Path], settings: dict[str, Any],
             on_event: Callable[[BuildEvent], None] | None = None,
             on_result: Callable[[Job, dict[str, Any]], None] | None = None) -> list[tuple[Job, BuildOutcome]]:
    """Run ``jobs`` as Ray tasks; each payload is put in the object store once. Returns one outcome
    per job, its bundle written into ``outs[job.payload]``."""
    ray = connect(address)
    from ray.util.queue import Queue

    refs_data = [ray.put(p.data) for p in payloads]  # once per run; tasks get the bytes, not a copy each
    slim = [replace(p, data=b"") for p in payloads]
    events = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(build_task)
    pending: dict[Any, Job] = {}
    found: list[tuple[Job, BuildOutcome]] = []
    try:
        for job in jobs:
            ref = task.options(num_cpus=job.threads, max_retries=MAX_RETRIES, retry_exceptions=False,
                               scheduling_strategy="SPREAD").remote(
                slim[job.payload], refs_data[job.payload], job.spec, job.threads, settings, events, job.label)
            pending[ref] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            _drain(events, on_event)
            for ref in done:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - retries spent: the worker or node kept dying
                    result = {"error": f"the cluster task failed after {MAX_RETRIES} retries: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}", "hint": "see `ray status` and the "
                              "Ray logs of the node; rerun without --cluster to build here", "error_type": type(e).__name__}
                if on_result:
                    on_result(job, result)
                found.append((job, _outcome(job, result, outs[job.payload])))
        _drain(events, on_event)
    except BaseException:
        for ref in pending:  # Ctrl-C or an error here: nothing keeps running on the cluster
            ray.cancel(ref, force=True, recursive=True)
        raise
    finally:
        ray.kill(events.actor)
    return found


def _outcome(job: Job, result: dict[str, Any], out: Path) -> BuildOutcome:
    where = result.get("where")
    if result.get("bundle") is None:
        return BuildOutcome(result.get("target") or job.spec, None, result.get("error") or "build failed",
                            result.get("hint"), result.get("error_type"), where=where,
                            exit_code=result.get("exit_code", 1))
    if result.get("validation") is not None:
        write_atomically(out, result["name"] + ".validation", result["validation"])
    path = write_atomically(out, result["name"], result["bundle"])
    return BuildOutcome(result["target"], path, where=where)


def _drain(events: Any, on_event: Callable[[BuildEvent], None] | None) -> None:
    while True:
        try:
            batch = events.get_nowait_batch(max(1, events.qsize()))
        except Exception:  # noqa: BLE001 - empty, or the queue's actor went away
            return
        if not batch:
            return
        for e in batch:
            if on_event:
                on_event(tuple(e))


def cluster_builds(address: str, project_file: Path, targets: list[str], out: Path, targets_dirs: list[Path],
                   threads_of: list[int], settings: dict[str, Any] | None = None,
                   on_event: Callable[[BuildEvent], None] | None = None) -> list[BuildOutcome]:
    """One project's targets on the cluster: what :func:`edgepack.build.parallel.run_builds` does locally."""
    ray = connect(address)
    payload = pack(project_file, targets_dirs, out, targets)
    cpus = reservations(ray, threads_of, (settings or {}).get("threads"))
    jobs = [Job(t, 0, t, c, t) for t, c in zip(targets, cpus)]
    rest = {k: v for k, v in (settings or {}).items() if k != "threads"}
    return [o for _, o in run_jobs(address, [payload], jobs, [out], rest, on_event)]


def build_on_cluster(address: str, project_path: Path | None, targets: list[str], out: Path | None = None,
                     threads: int | None = None, progress: Callable[[str, str, float | None, str], None] | None = None,
                     targets_dirs: list[Path] | None = None, tune: bool = True, max_tuning_minutes: float = 10.0,
                     prune: dict[str, Any] | None = None, separate_validation: bool = False) -> list[Any]:
    """``edgepack build --cluster``: each target a task; returns :class:`BuildResult` per target, like
    :func:`edgepack.build.build`. A target that failed raises its error (with its exit code) after
    every other target's bundle was written."""
    from edgepack.build.context import BuildResult
    from edgepack.build.pipeline import check_out_dir
    from edgepack.build.plan import profile_for
    from edgepack.bundle import read_archive
    from edgepack.errors import ConfigError, EdgepackError
    from edgepack.project import find_project, load_project

    project_file = find_project(project_path)
    project = load_project(project_file)
    if max_tuning_minutes <= 0:
        raise ConfigError("--max-tuning-minutes must be > 0")
    profiles = [profile_for(t, targets_dirs, project.precision) for t in targets]
    out = check_out_dir(Path(out) if out else project.root / "dist")
    ray = connect(address)
    dirs = list(targets_dirs or [])
    cpus = reservations(ray, [p.measurement.threads for p in profiles], threads)
    jobs = [Job(t, 0, t, c, p.name) for t, p, c in zip(targets, profiles, cpus)]

    def on_event(e: BuildEvent) -> None:
        label, stage, status, seconds, detail = e
        if progress is not None:  # tasks interleave: a start is a line, not a spinner
            progress(f"[{label}] {stage}", "note" if status == "start" else status, seconds, detail)

    settings = {"tune": tune, "max_tuning_minutes": max_tuning_minutes, "prune": prune,
                "separate_validation": separate_validation}
    found = run_jobs(address, [pack(project_file, dirs, out, targets)], jobs, [out], settings, on_event)
    failed = [o for _, o in found if o.bundle is None]
    if failed:
        e = EdgepackError(f"{failed[0].target}: {failed[0].error}", failed[0].hint)
        e.exit_code = failed[0].exit_code
        raise e
    by_spec = {job.spec: o for job, o in found}
    return [BuildResult(by_spec[t].target, by_spec[t].bundle, read_archive(by_spec[t].bundle, None)) for t in targets]
