"""Hugging Face sources: a local folder (config.json + weights + tokenizer or preprocessor config),
loaded with transformers from disk only (``local_files_only``: never a hub download).

:func:`describe` reads what the pipeline needs before any weights are loaded (inputs, labels,
preprocessing, the tokenizer for the bundle); :func:`load_module` loads the model for ``task`` and
wraps it so that it takes positional tensors and returns one tensor (logits or hidden states).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.artifact import TensorSpec
from edgepack.errors import ConfigError, MissingDependencyError, ModelError
from edgepack.text import TOKENIZER_DIR, TextSpec

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# task -> (auto-model mapping in transformers.models.auto.modeling_auto, head class-name suffix, output)
TASKS = {
    "text-classification": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING", "ForSequenceClassification", "logits"),
    "image-classification": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING", "ForImageClassification", "logits"),
    "feature-extraction": ("MODEL_MAPPING", None, "last_hidden_state"),
}
TEXT_TASKS = ("text-classification", "feature-extraction")
DEFAULT_MAX_LENGTH = 128
SEQUENCE = "sequence"


def require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", "hf", "loading Hugging Face models") from e
    return transformers


@dataclass
class HFModel:
    """What the pipeline needs to know about a Hugging Face folder, before loading weights."""

    folder: Path
    task: str
    model_class: Any
    inputs: list[TensorSpec]
    output: str
    labels: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    text: TextSpec | None = None
    max_positions: int | None = None
    model_type: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)


def folder_of(project) -> Path:
    """The folder, checked: it exists, and holds config.json and weights."""
    folder = project.resolve(project.model.hf)
    if not folder.is_dir():
        raise ModelError(f"model.hf: {folder} is not a folder",
                         hint="point model.hf at a local folder saved with save_pretrained (no hub names: "
                              "nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model.hf: {folder} has no config.json",
                         hint="save the model with model.save_pretrained(folder), which writes config.json")
    if not any((folder / w).is_file() for w in WEIGHT_FILES):
        raise ModelError(f"model.hf: {folder} has no weights ({' or '.join(WEIGHT_FILES[::2])})",
                         hint="save the model with model.save_pretrained(folder), which writes model.safetensors")
    return folder


def describe(project, workdir: Path) -> HFModel:
    """Read the folder's config, tokenizer or image preprocessing; save the tokenizer (as tokenizer.json)
    into ``workdir/tokenizer`` for the bundle."""
    tf = require_transformers()
    from transformers.models.auto import modeling_auto

    folder = folder_of(project)
    task = project.model.task
    try:
        config = tf.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelError(f"model.hf: {folder / 'config.json'} cannot be read by transformers: {_first(e)}") from e
    mapping_name, suffix, output = TASKS[task]
    mapping = getattr(modeling_auto, mapping_name)
    try:
        cls = mapping[type(config)]
    except KeyError:
        raise ModelError(f"model.task: '{task}' does not fit {folder.name}: transformers has no {task} model for "
                         f"its model_type '{config.model_type}'",
                         hint=f"use one of {', '.join(t for t in TASKS if _has(modeling_auto, t, config))}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if suffix and archs and not any(a.endswith(suffix) for a in archs):
        raise ModelError(f"model.task: '{task}' does not match the checkpoint in {folder.name}: its head is "
                         f"{', '.join(archs)} (config.json 'architectures'), not *{suffix}",
                         hint="use task: feature-extraction for an encoder without a classification head, or save a "
                              f"model with a {suffix[3:]} head")
    hf = HFModel(folder, task, cls, [], output, max_positions=getattr(config, "max_position_embeddings", None))
    # attention models get the quantizers' transformer treatment (masks and softmax kept in float)
    hf.model_type = "transformer" if getattr(config, "num_attention_heads", None) else None
    id2label = getattr(config, "id2label", None) or {}
    if task != "feature-extraction" and id2label:
        hf.labels = [str(id2label[i]) for i in sorted(id2label, key=int)]
    params = list(inspect.signature(cls.forward).parameters)
    if task in TEXT_TASKS:
        _text(project, hf, workdir, params, tf)
    else:
        _image(project, hf, config, params)
    return hf


def _has(modeling_auto, task: str, config) -> bool:
    return type(config) in getattr(modeling_auto, TASKS[task][0])


def _text(project, hf: HFModel, workdir: Path, params: list[str], tf) -> None:
    try:
        tok = tf.AutoTokenizer.from_pretrained(str(hf.folder), local_files_only=True)
    except Exception as e:
        raise ModelError(f"model.hf: no usable tokenizer in {hf.folder}: {_first(e)}",
                         hint="save the tokenizer into the folder too (tokenizer.save_pretrained(folder))") from e
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"model.hf: the tokenizer in {hf.folder} has no fast (tokenizer.json) form",
                         hint="the bundle carries tokenizer.json for the device; save a fast tokenizer")
    names = [n for n in params if n in tok.model_input_names and n in ("input_ids", "attention_mask", "token_type_ids")]
    if "input_ids" not in names:
        raise ModelError(f"model.hf: {hf.model_class.__name__} takes no input_ids")
    dim = project.dims.get(SEQUENCE)
    limit = min(v for v in (hf.max_positions, getattr(tok, "model_max_length", None), 10**6) if v)
    max_length = (dim.max if dim and dim.max else min(DEFAULT_MAX_LENGTH, limit))
    if max_length > limit:
        raise ConfigError(f"{project.root / 'edgepack.yaml'}: key 'dims.{SEQUENCE}.max': {max_length} is more than the "
                          f"model accepts ({limit} positions)", hint=f"use at most {limit}")
    if tok.pad_token_id is None:
        raise ModelError(f"model.hf: the tokenizer in {hf.folder} has no pad token",
                         hint="set tokenizer.pad_token and save it again")
    out = workdir / TOKENIZER_DIR
    tok.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise ModelError(f"model.hf: saving the tokenizer of {hf.folder} wrote no tokenizer.json")
    hf.inputs = [TensorSpec(n, ("batch", SEQUENCE), "int64") for n in names]
    hf.text = TextSpec(f"{TOKENIZER_DIR}/tokenizer.json", int(max_length), int(tok.pad_token_id), tuple(names))
    hf.notes["tokenizer"] = type(tok).__name__


def _image(project, hf: HFModel, config, params: list[str]) -> None:
    if "pixel_values" not in params:
        raise ModelError(f"model.hf: {hf.model_class.__name__} takes no pixel_values")
    pre_file = hf.folder / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    size = getattr(config, "image_size", None)
    crop = pre.get("crop_size") or pre.get("size") or {}
    if isinstance(crop, dict):
        crop = crop.get("height") or crop.get("shortest_edge")
    size = size if isinstance(size, int) else crop
    channels = getattr(config, "num_channels", 3)
    if isinstance(size, int):
        hf.inputs = [TensorSpec("pixel_values", ("batch", channels, size, size), "float32")]
    if pre:
        mean = pre.get("image_mean", [0.0]) if pre.get("do_normalize", True) else [0.0]
        std = pre.get("image_std", [1.0]) if pre.get("do_normalize", True) else [1.0]
        hf.preprocess = {"layout": "NCHW", "scale": float(pre.get("rescale_factor", 1 / 255)) if pre.get("do_rescale", True)
                         else 1.0, "mean": [float(v) for v in mean], "std": [float(v) for v in std], "color": "rgb"}


def load_module(project, hf: HFModel) -> Any:
    """The model for the task, in eval mode, wrapped to take the inputs positionally."""
    import torch

    try:
        model, info = hf.model_class.from_pretrained(str(hf.folder), local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise ModelError(f"model.hf: transformers could not load {hf.folder}: {_first(e)}") from e
    missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
    if missing:
        raise ModelError(f"model.task: '{hf.task}' does not match the checkpoint in {hf.folder.name}: it has no weights "
                         f"for {', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}",
                         hint="use the task the model was trained for (feature-extraction for a bare encoder)")
    names = [s.name for s in project.input_specs()]
    # named positional parameters (not *args): torch.export maps dynamic shapes onto them one by one
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {', '.join(names)}):\n"
         f"    return getattr(self.model({', '.join(f'{n}={n}' for n in names)}, return_dict=True), {hf.output!r})",
         namespace)
    wrapped = type("HFWrapped", (torch.nn.Module,), {"forward": namespace["forward"]})()
    wrapped.model = model
    return wrapped.eval()


def _first(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
