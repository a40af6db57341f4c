"""The build: resolve -> data -> (per target) export -> reference -> compile to the budget -> measure -> bundle.

Work shared by all targets of one build (resolving, data, export, FP32 reference) is done once. Each
target is compiled in a scratch folder inside the output folder and renamed into place at the end, so a
failed or interrupted build leaves no partial bundle.
"""

from __future__ import annotations

import os
import shutil
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact, ModelFormat
from edgepack.build.context import (BuildContext, BuildResult, Outcome, Progress, Reference, Settings, Stage,
                                    TargetFailure, Timings, no_progress, thaw)
from edgepack.build.data import prepare_data
from edgepack.build.manifest import Built, assemble
from edgepack.build.measuring import (REFERENCE_RUNTIME, cancel_probes, in_turn, measure, noisy_note, reference,
                                      settle_probes, target_fp32, unpruned_latency)
from edgepack.build.plan import TargetPlan, plan_targets, toolchain_versions
from edgepack.build import choice
from edgepack.build.search import Trials, accuracy_budget, compile_to_budget, precision_label
from edgepack.build.source import compile_source, exported, source_of
from edgepack.bundle import bundle_name, write_bundle
from edgepack.errors import AcceptanceError, ConfigError, DiskFullError, EdgepackError, ToolchainError, no_space
from edgepack.interrupts import note_kept
from edgepack.loaders.resolve import resolve
from edgepack.project import find_project, load_project, with_prune_flags
from edgepack.scratch import locked_dir
from edgepack.toolchains import require
from edgepack.tuning import Trial


def check_out_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the output folder: {e.strerror}",
                          hint="choose a folder you can write to") from e
    if not out.is_dir() or not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: the output folder is not writable", hint="choose a folder you can write to")
    return out


def build(project_path: Path | None, targets: list[str], out: Path | None = None, threads: int | None = None,
          progress: Progress | None = None, targets_dirs: list[Path] | None = None, tune: bool = True,
          max_tuning_minutes: float = 10.0, max_tuning_steps: int = 12,
          prune: dict[str, Any] | None = None, *, keep_going: bool = False,
          separate_validation: bool = False) -> list[Any]:
    """Build one bundle per target. Returns one :class:`BuildResult` per target (failed gates are in its
    manifest: :func:`raise_for_acceptance` turns them into an AcceptanceError). With ``keep_going`` a
    target that cannot be built becomes a :class:`TargetFailure` and the others still build; otherwise
    its error is raised.

    ``prune`` overrides the project's ``prune`` block (see :func:`edgepack.project.with_prune_flags`).
    When INT8 misses the accuracy budget and ``tune`` is on, :mod:`edgepack.tuning` searches for a
    build that meets it within ``max_tuning_minutes`` / ``max_tuning_steps`` per target."""
    progress = progress or no_progress
    project = with_prune_flags(load_project(project_path), prune or {})
    plans = plan_targets(targets, targets_dirs, strict=True, precision=project.precision)
    out = check_out_dir(Path(out) if out else project.root / "dist")
    if project.model.kind == "onnx" and any(p.backend.consumes == ModelFormat.TORCH for p in plans):
        require("onnx2tf")  # ONNX sources reach PyTorch-reading converters through the isolated onnx2tf toolchain
    if project.prune and project.model.kind in ("onnx", "hf"):
        raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'prune': pruning needs the PyTorch model (file.py:factory), "
                          f"but the model is {'an ONNX file' if project.model.kind == 'onnx' else 'an hf folder'}",
                          hint="point model.path at file.py:factory, or remove prune")
    if max_tuning_minutes <= 0 or max_tuning_steps < 1:
        raise ConfigError("--max-tuning-minutes must be > 0 and the step cap >= 1")
    settings = Settings(tune, max_tuning_minutes, max_tuning_steps, threads,
                        {k: v for k, v in (prune or {}).items() if v is not None},
                        separate_validation or bool(project.evaluation and project.evaluation.separate_validation))
    # inside --out (bundles are renamed from it); a killed build's folder is removed by the next one
    try:
        with locked_dir(out, ".edgepack-", ".build") as scratch:
            timings = Timings(progress)
            ctx = BuildContext(resolve(project, scratch / "source"), source_of(project, find_project(project_path)),
                               toolchain_versions(plans), settings, out, scratch, timings, timings=timings)
            ctx.data = prepare_data(ctx, plans[0].profile)
            ctx.shared_stages = len(timings.stages)
            done: list[Outcome] = []
            try:
                for plan in plans:
                    done.append(_one(ctx, plan, keep_going))
                return done
            except KeyboardInterrupt as e:  # the targets finished before it keep their bundles: say so
                note_kept(e, [o.bundle for o in done if isinstance(o, BuildResult)])
                raise
            finally:
                cancel_probes(ctx)  # a failed or interrupted build's memory probes (a finished one has none left)
                ctx.runners.clear()
                thaw()
    except (OSError, EdgepackError) as e:
        if isinstance(e, DiskFullError) or not no_space(e):
            raise
        raise DiskFullError(f"--out {out}: no space left on its file system while building; nothing partial "
                            "was kept") from e


def _one(ctx: BuildContext, plan: TargetPlan, keep_going: bool) -> Outcome:
    if not keep_going:
        return build_target(ctx, plan)
    try:
        return build_target(ctx, plan)
    except EdgepackError as e:
        if no_space(e):
            raise
        return TargetFailure(plan.profile.name, e.message, e.hint, type(e).__name__, e.exit_code)
    except Exception as e:  # noqa: BLE001 - a toolchain's own bug fails its target, not the others
        if no_space(e):
            raise
        return TargetFailure(plan.profile.name, f"{type(e).__name__}: {e}", f"rerun `edgepack build --target "
                             f"{plan.spec} --debug` for the traceback", type(e).__name__)


def raise_for_acceptance(results: list[BuildResult]) -> None:
    failed = [r for r in results if not r.passed]
    if failed:
        parts = [f"{r.target}: {'; '.join(r.manifest.acceptance.reasons)}" for r in failed]
        raise AcceptanceError("acceptance gate failed: " + " | ".join(parts),
                              hint=f"bundle kept at {failed[0].bundle}; its manifest records the failed gates",
                              bundle=str(failed[0].bundle))


def build_target(ctx: BuildContext, plan: TargetPlan) -> BuildResult:
    profile, backend, options = plan.profile, plan.backend, plan.options
    project, progress = ctx.project, ctx.progress
    # a phone profile's 4 threads on a 2-core build host would measure contention, not the model
    threads = ctx.settings.threads or min(profile.measurement.threads, os.cpu_count() or 1)
    final = ctx.out / bundle_name(project.name, project.version, profile.name)
    since = len(ctx.timings.stages) if ctx.timings else 0
    art = exported(ctx, profile)
    ref = reference(ctx, art, threads, profile)
    src = compile_source(ctx, profile, backend, options, art)
    workdir = ctx.scratch / profile.name
    staging = workdir / "bundle"
    trials = Trials(ctx, plan, src, ref, workdir, threads,
                    lambda e, where: keep_logs(e, where, ctx.out, final.name),
                    accuracy_budget(project, profile, ref.accuracy))
    chosen, tuning = compile_to_budget(ctx, plan, trials, art.path)
    job = Job(ctx, plan, art, src, ref, trials, workdir, staging, threads)
    built = settle_precision(job, chosen, job.measure(chosen, tuning))
    if ctx.timings is not None:
        built = replace(built, timings=ctx.timings.record(ctx.shared_stages, since))
    with Stage(progress, f"bundle {profile.name}") as st:
        manifest = write_bundle(staging, assemble(ctx, plan, built, staging), final, ctx.settings.separate_validation)
        st.detail = str(final)
    return BuildResult(profile.name, final, manifest)


@dataclass
class Job:
    """One target's build after its compile: measuring a candidate build into the bundle's folder."""

    ctx: BuildContext
    plan: TargetPlan
    exported: ModelArtifact
    src: ModelArtifact
    ref: Reference
    trials: Trials
    workdir: Path
    staging: Path
    threads: int
    prune: dict[str, Any] | None = None
    unpruned: ModelArtifact | None = None  # the unpruned model compiled for the target (plain), once

    def measure(self, chosen: Trial, tuning: dict[str, Any] | None, why: str | None = None) -> Built:
        ctx, threads = self.ctx, self.threads
        profile, backend, options = self.plan.profile, self.plan.backend, self.plan.options
        progress, art = ctx.progress, self.exported
        compiled = move_into(chosen.compiled, self.staging / "model")
        with Stage(progress, f"measure {profile.name}") as st:
            measured, outputs = measure(ctx, backend, compiled.path, list(compiled.all_files), self.staging, threads,
                                        profile, f"compiled: {why or precision_label(compiled, profile)} on {backend.name}",
                                        chosen.outputs)
            measured.accuracy = self.trials.score(outputs)
            st.detail = f"{ctx.metric} {measured.accuracy.value:.2f}" + (
                f", p50 {measured.latency.p50_ms:.3f} ms" if measured.proxy else ", timed next in turn with fp32")
        if ctx.prune is not None:  # again for another precision: the effect is the bundled model's
            settle_probes(ctx)  # no memory probe runs while the two are timed
            with Stage(progress, f"measure unpruned {profile.name}") as st:
                if self.unpruned is None:
                    unpruned_src = compile_source(ctx, profile, backend, options, art, "unpruned")
                    self.unpruned = backend.compile(unpruned_src, profile, options, ctx.calibration,
                                                    self.workdir / "unpruned")
                effect = unpruned_latency(ctx, backend, profile, self.unpruned.path, threads, compiled.path,
                                          compiled.precision)
                st.detail = f"p50 {effect['unpruned_p50_ms']:.3f} ms -> pruned {effect['pruned_p50_ms']:.3f} ms"
            self.prune = {**ctx.prune, "latency_effect": effect}
        fp32_target = None
        # FP32 on the target's own runtime, unless that runtime is the reference's (then the reference is it)
        if backend.runtime_package != REFERENCE_RUNTIME and measured.proxy is None and compiled.precision != "fp32":
            with Stage(progress, f"measure fp32 on {backend.name}") as st:
                fp32_target = target_fp32(ctx, backend, options, profile, self.src, self.workdir / "fp32", threads)
                st.detail = f"{fp32_target['size_bytes'] / 1e6:.2f} MB, timed next in turn"
        timed = None
        if measured.proxy is None:
            with Stage(progress, f"time {profile.name} in turn with fp32") as st:
                timed, ref_latency, measured.latency = in_turn(ctx, backend, profile, art, compiled, fp32_target, threads)
                st.detail = (f"p50 {measured.latency.p50_ms:.3f} ms, speed-up {timed['speedup_p50']:.2f}x"
                             + (" [noisy host: figures flagged]" if timed["noise"]["noisy"] else ""))
            if timed["noise"]["noisy"]:
                ctx.warn(noisy_note(profile, timed))
            reference = self.ref.with_latency(ref_latency)
        else:  # the compiled model ran on a proxy: the reference is timed alone, once per build
            reference = self.ref.measured
        settle_probes(ctx)  # (done already before any timing above; here for a build that timed nothing)
        return Built(compiled, art, reference, measured, outputs, tuning, fp32_target, self.prune, timed)


def settle_precision(job: Job, chosen: Trial, built: Built) -> Built:
    """Keep the build, or (select_precision: fastest, and slower than FP32 on its runtime) measure the
    candidates and bundle the fastest that meets the budget; the record goes into the manifest."""
    ctx, profile, backend = job.ctx, job.plan.profile, job.plan.backend
    g = choice.gain(built.in_turn)
    where = f"{backend.name} ({backend.runtime_package})"
    if built.in_turn is None:
        return replace(built, precision_choice={
            "policy": choice.policy(profile), "chosen": built.compiled.precision, "candidates": [],
            "why": "the target's runtime cannot be timed on this host: the profile's precision is kept; `edgepack "
                   "validate` on the device reports its speed there"})
    if built.compiled.precision == "fp32" or choice.policy(profile) == "fixed" or (g is not None and g >= choice.MIN_GAIN):
        if g is not None and g < 1.0 and profile.device.kind == "cpu":  # a phone's host figure is not its own
            ctx.warn(f"{profile.name}: {built.compiled.precision} is forced (select_precision: fixed) and runs "
                     f"{g:.2f}x FP32's speed on {where}, timed in turn: slower than FP32")
        return replace(built, precision_choice=choice.kept_note(profile, g, where))
    with Stage(ctx.progress, f"choose {profile.name}'s precision (int8 runs {g:.2f}x fp32 on {backend.name})") as st:
        pick, record = choice.choose(ctx, job.plan, job.trials, chosen, built.compiled, job.exported.path, job.threads)
        st.detail = record["why"]
    if pick is chosen:
        return replace(built, precision_choice=record)
    shutil.rmtree(job.staging / "model")
    label = f"{pick.compiled.precision} (chosen over {profile.precision} by measurement)"
    return replace(job.measure(pick, built.tuning, label), precision_choice=record)


def move_into(art: ModelArtifact, folder: Path) -> ModelArtifact:
    """Move a compiled model's files into the bundle's model/ folder, keeping their paths relative
    to the main file (so names, and so digests, are unchanged)."""
    base = art.path.parent
    moved = []
    for f in art.all_files:
        dst = folder / f.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), dst)
        moved.append(dst)
    return replace(art, path=folder / art.path.relative_to(base), files=tuple(moved))


def keep_logs(err: ToolchainError, workdir: Path, out: Path, name: str) -> ToolchainError:
    """Copy a failed toolchain's logs out of the scratch folder before it is removed; a toolchain that
    wrote none (OpenVINO, NNCF raise exceptions) gets its full error text and traceback kept instead."""
    logs = sorted(workdir.glob("*.log"))
    kept = out / f"{name}.log"
    if logs:
        kept.write_text("".join(f"== {p.name}\n{p.read_text(errors='replace')}\n" for p in logs))
    else:
        cause = err.__cause__ or err
        kept.write_text(f"== {err.message}\n" + "".join(traceback.format_exception(cause)))
    first = err.message.strip().splitlines()[0] if err.message.strip() else err.message
    return ToolchainError(first[:500], hint=f"the toolchain's full message and log are kept in {kept}")
