"""Builds for several targets in parallel processes, with progress events sent back to the parent.

Targets are split into ``workers`` groups; each group is one :func:`edgepack.pipeline.build` call in a
worker process, so targets of a group share the export, the data and the FP32 reference. A target
that fails is isolated (its group is retried one target at a time) and reported as an error for that
target only: one bad target never stops the others.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# (group label, stage, status, seconds, detail); status is start | done | failed
BuildEvent = tuple[str, str, str, float | None, str]


@dataclass
class BuildOutcome:
    target: str
    bundle: Path | None = None
    error: str | None = None
    hint: str | None = None
    error_type: str | None = None


def default_workers(n_targets: int) -> int:
    """min(targets, cpu_count // 2 or 1): each build measures with several threads of its own."""
    return max(1, min(n_targets, (os.cpu_count() or 1) // 2 or 1))


def groups_of(targets: list[str], workers: int) -> list[list[str]]:
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(targets))))]
    for i, t in enumerate(targets):
        groups[i % len(groups)].append(t)
    return [g for g in groups if g]


def _build_group(project_file: str, targets: list[str], out: str, targets_dirs: list[str], events: Any,
                 label: str) -> list[dict[str, Any]]:
    """Runs in a worker process. Returns one dict per target: its bundle, or its error."""
    import time

    from edgepack.errors import EdgepackError
    from edgepack.pipeline import build

    def progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
        events.put((label, stage, status, seconds, detail))

    started = time.time()
    try:
        results = build(Path(project_file), targets, Path(out), None, progress, [Path(d) for d in targets_dirs])
        return [{"target": r.target, "bundle": str(r.bundle)} for r in results]
    except Exception as e:  # noqa: BLE001 - every failure becomes a row's reason, never a crash
        if len(targets) > 1:
            # keep what this call finished; build the rest one at a time to isolate the failure
            found: list[dict[str, Any]] = []
            for t in targets:
                done = _written_since(project_file, t, out, targets_dirs, started)
                found += [{"target": t, "bundle": str(done)}] if done else \
                    _build_group(project_file, [t], out, targets_dirs, events, label)
            return found
        if isinstance(e, EdgepackError):
            return [{"target": targets[0], "error": e.message, "hint": e.hint, "error_type": type(e).__name__}]
        return [{"target": targets[0], "error": f"{type(e).__name__}: {e}", "hint": "rerun `edgepack build` "
                 f"--target {targets[0]} --debug for the traceback", "error_type": type(e).__name__}]


def _written_since(project_file: str, target: str, out: str, targets_dirs: list[str], since: float) -> Path | None:
    """The bundle for ``target`` when this worker wrote it after ``since`` (bundles are renamed into place)."""
    from edgepack.bundle import bundle_name
    from edgepack.project import load_project
    from edgepack.target import load_target

    project = load_project(Path(project_file))
    name = load_target(target, [Path(d) for d in targets_dirs]).name
    path = Path(out) / bundle_name(project.name, project.version, name)
    return path if path.is_file() and path.stat().st_mtime >= since else None


def run_builds(project_file: Path, targets: list[str], out: Path, targets_dirs: list[Path], workers: int,
               on_event: Callable[[BuildEvent], None] | None = None) -> list[BuildOutcome]:
    """Build ``targets`` in ``workers`` processes (spawned, so no torch/OpenMP state is forked)."""
    if not targets:
        return []
    ctx = multiprocessing.get_context("spawn")
    groups = groups_of(targets, workers)
    outcomes: list[BuildOutcome] = []
    with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=len(groups), mp_context=ctx) as pool:
        events = manager.Queue()
        futures = {pool.submit(_build_group, str(project_file), g, str(out), [str(d) for d in targets_dirs],
                               events, ", ".join(g)): g for g in groups}
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(events, on_event)
        _drain(events, on_event)
        for fut, group in futures.items():
            try:
                found = fut.result()
            except Exception as e:  # noqa: BLE001 - a worker that died (killed, out of memory)
                found = [{"target": t, "error": f"the build process failed: {type(e).__name__}: {e}",
                          "hint": f"run `edgepack build --target {t}` on its own to see why",
                          "error_type": type(e).__name__} for t in group]
            for d in found:
                outcomes.append(BuildOutcome(d["target"], Path(d["bundle"]) if d.get("bundle") else None,
                                             d.get("error"), d.get("hint"), d.get("error_type")))
    return outcomes


def _drain(events: Any, on_event: Callable[[BuildEvent], None] | None) -> None:
    while True:
        try:
            event = events.get_nowait()
        except (queue_mod.Empty, EOFError, OSError):
            return
        if on_event:
            on_event(event)
