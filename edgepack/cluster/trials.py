"""The tuning search's candidates of one round as Ray tasks: one task per candidate build.

:func:`edgepack.tuning.search` hands a round's calls (the other calibration methods, the recovery
recipes, the 1, 2, 4, ... layer counts, a short bisection's counts) and the build's
:class:`~edgepack.build.search.Trials` to a ``map``; here the Trials' portable part (the source model's
files as bytes, the target's profile and backend, the calibration and evaluation sets, the FP32
reference's outputs, the accuracy budget) goes to the object store once per build, and each candidate is
compiled, scored and timed by a task with the very code the serial search runs (``Trials.__call__``).

- A task reserves ``num_cpus`` = the build's measurement threads (it times its candidate's host p50),
  so it never shares cores with another timing on its node.
- What comes back is the Trial (accuracy, outputs, p50, the node) and the compiled model's files as
  bytes, written into this build's scratch folder (:func:`adopt`), so the search's final choice among
  the builds that meet the budget is timed in turn here, in one window, as in a local build.
- A candidate the toolchain cannot build comes back as its ToolchainError (the search skips it, or
  fails, as it does serially); a worker that dies is retried by Ray (``MAX_RETRIES``); any other error,
  or Ctrl-C, cancels the round's tasks.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.cluster.connect import gather
from edgepack.cluster.evaluation import relative_to_root
from edgepack.errors import ToolchainError

MAX_RETRIES = 2


@dataclass(frozen=True)
class TrialData:
    """What a candidate's build reads of the build context: the sets and the metric plan."""

    calibration: Any
    evaluation: Any
    metric_plan: Any


@dataclass(frozen=True)
class RefOutputs:
    """What a candidate's score reads of the FP32 reference: its outputs on the evaluation set."""

    outputs: Any


def _keep(err: ToolchainError, _where: Path) -> ToolchainError:
    return err


def portable(trials: Any) -> tuple[Any, dict[str, bytes], list[str], str]:
    """A copy of ``trials`` that pickles without this build's context, and the source model's files."""
    src = trials.src
    root = src.path.parent
    files = {relative_to_root(p, root): Path(p).read_bytes() for p in src.all_files}
    kit = replace(trials, ctx=TrialData(trials.ctx.calibration, trials.ctx.evaluation, trials.ctx.metric_plan),
                  ref=RefOutputs(trials.ref.outputs), on_error=_keep, trials=[],
                  outputs_by_digest=dict(trials.outputs_by_digest))
    return kit, files, [relative_to_root(p, root) for p in src.files], relative_to_root(src.path, root)


def build_trial(shared: tuple[Any, dict[str, bytes], list[str], str], call: tuple) -> dict[str, Any]:
    """Runs on a worker: the source model into a temporary folder, one candidate compiled and scored
    there; returns the Trial and its compiled files' bytes, or the ToolchainError's message and hint."""
    import socket
    import tempfile

    import ray

    kit, files, listed, key = shared
    node = f"{socket.gethostname()}/{ray.get_runtime_context().get_node_id()[:6]}"
    with tempfile.TemporaryDirectory(prefix="edgepack-trial-") as tmp:
        src_root = Path(tmp) / "src"
        for rel, data in files.items():
            (src_root / rel).parent.mkdir(parents=True, exist_ok=True)
            (src_root / rel).write_bytes(data)
        src = replace(kit.src, path=src_root / key, files=tuple(src_root / r for r in listed))
        data = replace(kit.ctx, calibration=_writable(kit.ctx.calibration), evaluation=_writable(kit.ctx.evaluation))
        here = replace(kit, ctx=data, src=src, workdir=Path(tmp) / "work", trials=[])
        step, method, kept, extra = call
        try:
            trial = here(step, method, list(kept), **extra)
        except ToolchainError as e:
            return {"error": e.message, "hint": e.hint, "node": node}
        compiled = trial.compiled
        croot = compiled.path.parent
        out = {relative_to_root(p, croot): Path(p).read_bytes() for p in compiled.all_files}
        return {"trial": replace(trial, compiled=None, node=node), "compiled": compiled, "files": out,
                "listed": [relative_to_root(p, croot) for p in compiled.files], "key": relative_to_root(compiled.path, croot)}


def _writable(samples: Any) -> Any:
    """The set with plain arrays: those from the object store are read-only views, which runtimes that
    share input memory (OpenVINO's tensors) refuse."""
    import numpy as np

    from edgepack.calibration.reader import PreprocessedImages

    if isinstance(samples.samples, PreprocessedImages):  # inputs made when read are new, writable arrays
        return samples
    return replace(samples, samples=[{k: np.array(v) for k, v in s.items()} for s in samples.samples])


def adopt(trials: Any, found: dict[str, Any]) -> Any:
    """A task's result as this build's own: a Trial whose compiled files are in ``trials.workdir`` (and in
    its list and output cache, as a local candidate is), or the ToolchainError it raised."""
    if "error" in found:
        return ToolchainError(f"{found['error']} (built on {found['node']})", hint=found["hint"])
    where = trials.workdir / f"try-{len(trials.trials)}"
    for rel, data in found["files"].items():
        (where / rel).parent.mkdir(parents=True, exist_ok=True)
        (where / rel).write_bytes(data)
    compiled = replace(found["compiled"], path=where / found["key"], files=tuple(where / r for r in found["listed"]))
    trial = replace(found["trial"], compiled=compiled)
    trials.trials.append(trial)
    if trial.scored_on is None:
        trials.outputs_by_digest.setdefault(compiled.digest, trial.outputs)
    return trial


_shared: dict[int, tuple[Any, Any]] = {}  # id(Trials) -> (weak reference, object ref of its portable copy)


def ray_trial_map(try_build: Any, calls: list[tuple]) -> list[Any]:
    """Build ``calls`` as parallel tasks on the Ray cluster this process is connected to: one Trial or
    ToolchainError per call, in order. A ``try_build`` that is not a Trials builds them here, in order."""
    import ray

    from edgepack.build.search import Trials

    if not isinstance(try_build, Trials):
        return [_serially(try_build, c) for c in calls]
    known = _shared.get(id(try_build))
    if known is None or known[0]() is not try_build:
        known = (weakref.ref(try_build), ray.put(portable(try_build)))
        _shared[id(try_build)] = known
    task = ray.remote(build_trial).options(num_cpus=max(1, int(try_build.threads)), max_retries=MAX_RETRIES,
                                           scheduling_strategy="SPREAD")
    refs = [task.remote(known[1], c) for c in calls]
    return [adopt(try_build, f) for f in gather(refs)]


def _serially(try_build: Any, call: tuple) -> Any:
    step, method, kept, extra = call
    try:
        return try_build(step, method, kept, **extra)
    except ToolchainError as e:
        return e
