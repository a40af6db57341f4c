"""The build's data: calibration and evaluation sets, read once, checked, shared by every target."""

from __future__ import annotations

from edgepack.artifact import StageRecord
from edgepack.build.context import BuildContext, Data, Stage
from edgepack.calibration.reader import SampleSet, load_samples
from edgepack.errors import CalibrationError, ConfigError
from edgepack.loaders.resolve import Resolved
from edgepack.project import DataSource
from edgepack.target import TargetProfile
from edgepack.text import TextEncoder


def read_data(resolved: Resolved, profile: TargetProfile, which: str) -> SampleSet:
    """The calibration or evaluation set of a resolved project, read as the build reads it (``compare``
    uses it to fingerprint the data a bundle was built from)."""
    project = resolved.project
    text = TextEncoder(resolved.text, resolved.text_root) if resolved.text is not None else None
    src = project.calibration if which == "calibration" else project.evaluation
    n = (src.samples or profile.quantization.samples) if which == "calibration" else src.samples
    pre = project.preprocess.model_dump() if project.preprocess else None
    return load_samples(src.source, project.root, project.input_specs(), pre, n, src.seed, project.label_names(),
                        which, text, src.text_column, src.label_column)


def prepare_data(ctx: BuildContext, profile: TargetProfile) -> Data:
    """Read both sets (the first target's profile sets the calibration count), pick the gating metric."""
    project = ctx.project
    with Stage(ctx.progress, "calibration data") as st:
        calibration = read_data(ctx.resolved, profile, "calibration")
        st.detail = f"{len(calibration)} samples"
    with Stage(ctx.progress, "evaluation data") as st:
        ev = project.evaluation
        if ev is None:
            evaluation, metric = calibration, "fidelity"
            st.detail = "no evaluation block: fidelity on the calibration samples"
        else:
            evaluation = read_data(ctx.resolved, profile, "evaluation")
            has_labels = evaluation.labels is not None
            names = [ev.metric] if isinstance(ev.metric, str) else [m.metric for m in ev.metric or []]
            if "top1" in names and not has_labels:
                raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'evaluation.metric': top1 needs labels, "
                                  f"but {ev.source} has none", hint="add labels to the data, or use metric: fidelity")
            if isinstance(ev.metric, list):
                metric = next((m.metric for m in ev.metric if m.gate), ev.metric[0].metric)
            else:
                metric = ev.metric or ("top1" if has_labels else "fidelity")
            st.detail = f"{len(evaluation)} samples, metric {metric}"
    data = Data(calibration, evaluation, metric)
    for note in check_data(data, project.calibration.min_samples, project.label_names()):
        ctx.warn(note)
    ctx.stages.append(StageRecord("data", {"calibration": calibration.describe(),
                                           "evaluation": evaluation.describe()}, None, None, 0.0))
    return data


def check_data(data: Data, min_samples: int, labels: list[str] | None) -> list[str]:
    """Refuse overlapping calibration/evaluation sets; the warnings for few samples or missing classes."""
    cal, ev = data.calibration, data.evaluation
    if ev is not cal:
        overlap = set(cal.sample_digests()) & set(ev.sample_digests())
        if overlap:
            raise CalibrationError(
                f"the calibration and evaluation sets share {len(overlap)} identical sample(s): accuracy "
                "measured on them would be optimistic",
                hint="draw calibration data from the training split and evaluation data from a held-out split",
            )
    notes = []
    if len(cal) < min_samples:
        notes.append(f"only {len(cal)} calibration samples (fewer than calibration.min_samples = "
                     f"{min_samples}): INT8 ranges may not represent real inputs")
    if cal.labels is not None and labels:
        missing = sorted(set(range(len(labels))) - set(cal.labels))
        if missing:
            names = ", ".join(labels[i] for i in missing[:10])
            notes.append(f"calibration samples cover {len(labels) - len(missing)} of {len(labels)} classes "
                         f"(missing: {names})")
    return notes


def finetune_data(ctx: BuildContext, data_cfg: DataSource | None) -> SampleSet:
    """The pruning recovery's training set: its own data block, or the calibration set."""
    if data_cfg is None:
        return ctx.calibration
    project = ctx.project
    return load_samples(data_cfg.source, project.root, project.input_specs(),
                        project.preprocess.model_dump() if project.preprocess else None,
                        data_cfg.samples, data_cfg.seed, project.label_names(),
                        "prune.finetune.data")


__all__ = ["check_data", "finetune_data", "prepare_data", "read_data"]
