"""Builds for several targets in parallel processes, with progress events sent back to the parent.

Targets are split into ``workers`` groups; each group is one :func:`edgepack.build.build` call in a
worker process, so targets of a group share the export, the data and the FP32 reference. The build
returns one outcome per target, so a target that fails is reported as an error for that target only:
one bad target never stops the others.
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
    where: dict[str, Any] | None = None  # on a cluster: the host, Ray node and worker pid that built it
    exit_code: int = 1


def default_workers(n_targets: int) -> int:
    """min(targets, cpu_count // 2 or 1): each build measures with several threads of its own."""
    return max(1, min(n_targets, (os.cpu_count() or 1) // 2 or 1))


def groups_of(targets: list[Any], workers: int) -> list[list[Any]]:
    groups: list[list[Any]] = [[] for _ in range(max(1, min(workers, len(targets))))]
    for i, t in enumerate(targets):
        groups[i % len(groups)].append(t)
    return [g for g in groups if g]


def _build_group(project_file: str, targets: list[str], out: str, targets_dirs: list[str], events: Any,
                 label: str) -> list[dict[str, Any]]:
    """Runs in a worker process. Returns one dict per target: its bundle, or its error (the build
    reports each target's outcome, so one failing target never hides the others' bundles)."""
    from edgepack.build.context import TargetFailure
    from edgepack.build.pipeline import build
    from edgepack.errors import EdgepackError

    def progress(stage: str, status: str, seconds: float | None, detail: str) -> None:
        events.put((label, stage, status, seconds, detail))

    try:
        outcomes = build(Path(project_file), targets, Path(out), None, progress, [Path(d) for d in targets_dirs],
                         keep_going=True)
    except Exception as e:  # noqa: BLE001 - a step every target shares failed: each target reports it
        if isinstance(e, EdgepackError):
            return [{"target": t, "error": e.message, "hint": e.hint, "error_type": type(e).__name__} for t in targets]
        return [{"target": t, "error": f"{type(e).__name__}: {e}", "hint": "rerun `edgepack build` "
                 f"--target {t} --debug for the traceback", "error_type": type(e).__name__} for t in targets]
    return [{"target": o.target, "error": o.error, "hint": o.hint, "error_type": o.error_type}
            if isinstance(o, TargetFailure) else {"target": o.target, "bundle": str(o.bundle)} for o in outcomes]


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
