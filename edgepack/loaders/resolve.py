"""The model's interface, resolved before any data is read: the project as written, completed by
what the source itself says (an ONNX file's inputs and dtypes; a Hugging Face folder's inputs,
labels, image preprocessing and tokenizer). Downstream stages see one complete :class:`Project`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepack.artifact import TensorSpec
from edgepack.errors import ConfigError, ModelError
from edgepack.project import DimSpec, InputSpec, Preprocess, Project
from edgepack.text import TextSpec

TEXT_MEASURE = 32  # the short sequence length text latency is also reported at


@dataclass
class Resolved:
    project: Project
    text: TextSpec | None = None
    text_root: Path | None = None  # the folder holding text.tokenizer_file
    hf: Any = None                 # loaders.hf.HFModel for hf sources


def resolve(project: Project, workdir: Path) -> Resolved:
    kind = project.model.kind
    where = project.root / "edgepack.yaml"
    if kind == "onnx":
        from edgepack.loaders.onnx import check_outputs, interface

        declared = project.input_specs() if project.inputs else None
        dtypes = {i.name: i.dtype is not None for i in project.inputs} if project.inputs else None
        specs = interface(project.resolve(project.model.path), declared, dtypes)
        check_outputs(project.resolve(project.model.path), project.outputs, where)
        out = Resolved(_with(project, inputs=specs))
    elif kind == "hf":
        from edgepack.loaders.hf import SEQUENCE, describe

        hf = describe(project, workdir)
        specs = project.input_specs() if project.inputs else hf.inputs
        if not specs:
            raise ModelError(f"model.hf: cannot tell the input size of {hf.folder.name} (no image_size in config.json, "
                             "no preprocessor_config.json)",
                             hint="declare inputs: [{name: pixel_values, shape: [batch, 3, 224, 224]}]")
        if hf.inputs and {s.name for s in specs} != {s.name for s in hf.inputs}:
            raise ConfigError(f"{where}: key 'inputs' names {[s.name for s in specs]}, the model takes "
                              f"{[s.name for s in hf.inputs]}", hint="omit inputs: they are read from the folder")
        update: dict[str, Any] = {"inputs": specs}
        if project.preprocess is None and hf.preprocess is not None:
            update["preprocess"] = Preprocess(**hf.preprocess)
        if project.labels is None and hf.labels:
            update["labels"] = hf.labels
        if hf.text is not None:
            declared = project.dims.get(SEQUENCE)
            m = hf.text.max_length
            measure = declared.measure if declared and declared.measure else sorted({min(TEXT_MEASURE, m), m})
            update["dims"] = {**project.dims, SEQUENCE: DimSpec(min=declared.min if declared else 1,
                                                                opt=declared.opt if declared else None,
                                                                max=m, measure=measure)}
        out = Resolved(_with(project, **update), hf.text, workdir if hf.text else None, hf)
    else:
        out = Resolved(project)
    states = out.project.model.state_inputs
    names = [i.name for i in out.project.inputs or []]
    missing = [s for s in states if s not in names]
    if missing:
        raise ConfigError(f"{where}: key 'model.state_inputs': {missing} are not inputs of the model (it takes {names})")
    return out


def _with(project: Project, inputs: list[TensorSpec] | None = None, **update: Any) -> Project:
    if inputs is not None:
        update["inputs"] = [InputSpec(name=s.name, shape=list(s.shape), dtype=s.dtype) for s in inputs]
    return project.model_copy(update=update)


def representative_dims(project: Project) -> dict[str, int]:
    """One size per symbolic dim other than batch, for tracing and shape checks."""
    out = {}
    for name, d in project.dims.items():
        size = d.opt or d.max or (max(d.measure) if d.measure else None)
        if size is not None:
            out[name] = size
    return out
