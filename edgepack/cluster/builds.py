"""Target builds as Ray tasks, each the same :func:`edgepack.build.build` that runs locally, on whichever
node Ray picks: a project's targets in as many tasks as the cluster runs at once (:func:`plan_jobs`), so
one target per task on a cluster with room for all of them.

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
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.build.parallel import BuildEvent, BuildOutcome, groups_of
from edgepack.cluster.connect import connect, nodes
from edgepack.cluster.ship import Payload, pack
from edgepack.interrupts import check, note_kept

MAX_RETRIES = 2  # a task whose worker or node died is run again, at most this often


@dataclass(frozen=True)
class Job:
    """One task: targets of one project built together (sharing its export, data and FP32 reference, as
    a local build's group does); ``keys`` tell the caller which row each is."""

    keys: tuple[Any, ...]
    payload: int        # index into the run's payloads
    specs: tuple[str, ...]
    threads: int
    label: str


def build_task(payload: Payload, data: bytes, spec: str | list[str], threads: int, settings: dict[str, Any],
               events: Any, label: str) -> dict[str, Any] | list[dict[str, Any]]:
    """Runs on a worker: unpack the project, build its targets (one, or a list: one result each) into a
    temporary folder, return the bundles' bytes."""
    import socket
    import tempfile

    import ray

    from edgepack.build.pipeline import build
    from edgepack.cluster.evaluation import ray_shard_outputs
    from edgepack.cluster.ranking import ray_layer_map
    from edgepack.cluster.ship import unpack
    from edgepack.cluster.trials import ray_trial_map
    from edgepack.errors import EdgepackError
    from edgepack.measure.accuracy import Sharding, sharding
    from edgepack.measure.host import RAY_NODE_ENV
    from edgepack.tuning import layer_map, trial_map

    where = {"host": socket.gethostname(), "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    label = f"{label} @ {where['host']}/{where['node'][:6]} pid {where['pid']}"

    def progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
        try:
            events.put((label, stage, status, seconds, detail), timeout=5)
        except Exception:  # noqa: BLE001 - progress is best effort; the build goes on without it
            pass

    progress("task", "start", None, f"{threads} CPU(s) reserved")
    token = layer_map.set(ray_layer_map)
    trial_token = trial_map.set(ray_trial_map)  # a tuning round's candidates are built as tasks
    shard_token = sharding.set(Sharding(ray_shard_outputs))  # a large evaluation set runs as shard tasks
    os.environ[RAY_NODE_ENV] = where["node"]  # each measurement's `where` names this node
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-task-") as tmp:
            root = unpack(data, Path(tmp) / "in")
            specs = [spec] if isinstance(spec, str) else list(spec)
            here = [str(root / payload.specs[t]) if t in payload.specs else t for t in specs]
            try:
                outcomes = build(root / payload.project_file, here, Path(tmp) / "out", threads, progress,
                                 [root / d for d in payload.targets_dirs], keep_going=True, **settings)
            except EdgepackError as e:
                failed = {"error": e.message, "hint": e.hint, "error_type": type(e).__name__,
                          "exit_code": e.exit_code, "where": where}
                outcomes = [failed] * len(specs)
            except Exception as e:  # noqa: BLE001 - a step every target shares failed
                outcomes = [{"error": f"{type(e).__name__}: {e}", "hint": "rerun without --cluster, with --debug, for "
                             "the traceback", "error_type": type(e).__name__, "exit_code": 1, "where": where}] * len(specs)
            found = [_result(o, where) for o in outcomes]
            return found[0] if isinstance(spec, str) else found
    finally:
        layer_map.reset(token)
        trial_map.reset(trial_token)
        sharding.reset(shard_token)
        os.environ.pop(RAY_NODE_ENV, None)


def _result(o: Any, where: dict[str, Any]) -> dict[str, Any]:
    from edgepack.build.context import TargetFailure

    if isinstance(o, dict):
        return o
    if isinstance(o, TargetFailure):
        return {"target": o.target, "error": o.error, "hint": o.hint, "error_type": o.error_type,
                "exit_code": o.exit_code, "where": where}
    side = o.bundle.with_name(o.bundle.name + ".validation")  # --separate-validation's file
    return {"target": o.target, "name": o.bundle.name, "bundle": o.bundle.read_bytes(), "where": where,
            "validation": side.read_bytes() if side.is_file() else None}


def plan_jobs(ray: Any, items: list[tuple[Any, int, str, int, str]], threads: int | None) -> list[Job]:
    """Tasks for ``items`` = (key, payload, target spec, measurement threads, name). Each task reserves its
    builds' threads (at most the largest node's CPUs, else it would never run). A project's targets are
    split into as many tasks as the cluster runs at once (every node's CPUs // those threads), so on a
    small cluster targets share their export, data and FP32 reference as a local build's group does, and
    on a large one each target is a task of its own."""
    cpus = [int(n["cpus"]) for n in nodes(ray)] or [1]
    need = [max(1, min(threads or it[3], max(cpus) or 1)) for it in items]
    slots = max(1, sum(c // max(need, default=1) for c in cpus))
    jobs = []
    for p in sorted({it[1] for it in items}):
        for g in groups_of([k for k, it in enumerate(items) if it[1] == p], slots):
            jobs.append(Job(tuple(items[k][0] for k in g), p, tuple(items[k][2] for k in g), max(need[k] for k in g),
                            ", ".join(items[k][4] for k in g)))
    return jobs


def write_atomically(out: Path, name: str, data: bytes) -> Path:
    final = out / name
    part = out / f".{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        part.write_bytes(data)
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return final


def run_jobs(address: str, payloads: list[Payload | None], jobs: list[Job], outs: list[Path], settings: dict[str, Any],
             on_event: Callable[[BuildEvent], None] | None = None) -> list[tuple[Any, BuildOutcome]]:
    """Run ``jobs`` as Ray tasks; each payload is put in the object store once. Returns (key, outcome)
    per target, its bundle written into ``outs[job.payload]``."""
    ray = connect(address)
    from ray.util.queue import Queue

    used = {job.payload for job in jobs}  # each project once per run; tasks get the bytes, not a copy each
    refs_data = {i: ray.put(payloads[i].data) for i in used}
    slim = {i: replace(payloads[i], data=b"") for i in used}
    events = Queue(actor_options={"num_cpus": 0})
    task = ray.remote(build_task)
    pending: dict[Any, Job] = {}
    found: list[tuple[Any, BuildOutcome]] = []
    try:
        for job in jobs:
            ref = task.options(num_cpus=job.threads, max_retries=MAX_RETRIES, retry_exceptions=False,
                               scheduling_strategy="SPREAD").remote(
                slim[job.payload], refs_data[job.payload], list(job.specs), job.threads, settings, events, job.label)
            pending[ref] = job
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
            check()  # a Ctrl-C noted during an import: raise it before any result is written
            _drain(events, on_event)
            for ref in done:
                job = pending.pop(ref)
                try:
                    results = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - retries spent: the worker or node kept dying
                    results = [{"error": f"the cluster task failed after {MAX_RETRIES} retries: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}", "hint": "see `ray status` and the "
                                "Ray logs of the node; rerun without --cluster to build here",
                                "error_type": type(e).__name__}] * len(job.specs)
                for key, spec, result in zip(job.keys, job.specs, results):
                    found.append((key, _outcome(spec, result, outs[job.payload])))
        _drain(events, on_event)
    except BaseException as e:
        for ref in pending:  # Ctrl-C or an error here: nothing keeps running on the cluster
            ray.cancel(ref, force=True, recursive=True)
        if isinstance(e, KeyboardInterrupt):  # bundles of tasks that finished before it stay: say so
            note_kept(e, [o.bundle for _, o in found if o.bundle is not None])
        raise
    finally:
        ray.kill(events.actor)
    return found


def _outcome(spec: str, result: dict[str, Any], out: Path) -> BuildOutcome:
    where = result.get("where")
    if result.get("bundle") is None:
        return BuildOutcome(result.get("target") or spec, None, result.get("error") or "build failed",
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


def build_on_cluster(address: str, project_path: Path | None, targets: list[str], out: Path | None = None,
                     threads: int | None = None, progress: Callable[[str, str, float | None, str], None] | None = None,
                     targets_dirs: list[Path] | None = None, tune: bool = True, max_tuning_minutes: float = 10.0,
                     prune: dict[str, Any] | None = None, separate_validation: bool = False) -> list[Any]:
    """``edgepack build --cluster``: the targets as tasks (:func:`plan_jobs`); returns :class:`BuildResult` per target, like
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
    jobs = plan_jobs(ray, [(t, 0, t, p.measurement.threads, p.name) for t, p in zip(targets, profiles)], threads)

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
    by_spec = dict(found)
    return [BuildResult(by_spec[t].target, by_spec[t].bundle, read_archive(by_spec[t].bundle, None)) for t in targets]
