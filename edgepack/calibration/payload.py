"""The bundle's validation payload, in its smallest faithful form: golden inputs and outputs and the labelled
holdout, compressed (``np.savez_compressed``). Inputs preprocessed from raw uint8 images are stored as
those images, which ``validate`` preprocesses again with the bundled ``preprocess`` block, but only when
that gives back, bit for bit, the very tensors the build measured; otherwise the tensors are stored in
the dtype the model takes. Text models ship their labelled texts (``holdout.jsonl``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifact import TensorSpec
from edgepack.calibration.reader import SampleSet
from edgepack.validation import FORM_IMAGES, FORM_TENSORS, HOLDOUT_SAMPLES, VALIDATION_SAMPLES, image_input


def holdout_indices(ev: SampleSet, cap: int | None, text: bool) -> list[int]:
    """Which evaluation samples the bundle ships as its labelled holdout: for tensors and images the last
    ``cap`` (default HOLDOUT_SAMPLES; the golden vectors come from the start), for text the first ``cap``
    (default all: raw texts are small), so the golden inputs are the holdout's first texts."""
    if ev.labels is None:
        return []
    n = len(ev)
    if text:
        return list(range(n if cap is None else min(cap, n)))
    k = min(HOLDOUT_SAMPLES if cap is None else cap, n)
    return list(range(n - k, n))


def raw_images(ev: SampleSet, idx: list[int], specs: list[TensorSpec], pre: dict | None) -> np.ndarray | None:
    """The raw images of samples ``idx`` stacked, when each gives back its exact sample through ``pre``."""
    if pre is None or ev.raw is None or len(specs) != 1 or not idx:
        return None
    imgs = [ev.raw[i] for i in idx]
    if any(im is None for im in imgs) or len({(im.shape, im.dtype.str) for im in imgs}) != 1:
        return None
    spec, name = specs[0].to_json(), specs[0].name
    if not all(np.array_equal(image_input(pre, im, spec), ev.samples[i][name]) for i, im in zip(idx, imgs)):
        return None
    return np.stack(imgs)


def write_payload(vdir: Path, ev: SampleSet, outputs: Any, specs: list[TensorSpec], out_names: list[str],
                  pre: dict | None, holdout_cap: int | None = None, texts: bool = False) -> dict[str, Any]:
    """Write inputs.npz, outputs.npz and the holdout into ``vdir``; the manifest's ``validation`` fields
    (all but the tolerance). ``outputs[i][j]`` is the compiled model's output j on evaluation sample i."""
    vdir.mkdir(parents=True, exist_ok=True)
    n = min(VALIDATION_SAMPLES, len(ev))
    text_holdout = texts and ev.texts is not None
    hold = holdout_indices(ev, holdout_cap, text_holdout)
    # one form for both files: raw images when every shipped sample comes back exactly from its image
    images = raw_images(ev, list(range(n)) + ([] if text_holdout else hold), specs, pre)
    form = FORM_IMAGES if images is not None else FORM_TENSORS
    names = [s.name for s in specs]

    def inputs(idx: list[int]) -> dict[str, np.ndarray]:
        # samples stacked on a new first axis: each entry is one sample as the model takes it (batch 1
        # wherever the batch dim is, e.g. a recurrent state [layers, batch, hidden]), or its raw image
        if form == FORM_IMAGES:
            return {"images": np.stack([ev.raw[i] for i in idx])}
        return {k: np.stack([ev.samples[i][k] for i in idx]) for k in names}

    np.savez_compressed(vdir / "inputs.npz", **inputs(list(range(n))))
    np.savez_compressed(vdir / "outputs.npz", **{k: np.stack([outputs[i][j] for i in range(n)])
                                                 for j, k in enumerate(out_names)})
    holdout_file = None
    if hold and text_holdout:
        # the labelled texts, tokenized on the device with the bundled tokenizer
        with open(vdir / "holdout.jsonl", "w", encoding="utf-8") as f:
            for i in hold:
                f.write(json.dumps({"text": ev.texts[i], "label": int(ev.labels[i])}) + "\n")  # ASCII: one per line
        holdout_file = "validation/holdout.jsonl"
    elif hold:
        np.savez_compressed(vdir / "holdout.npz", labels=np.asarray([ev.labels[i] for i in hold], np.int64),
                            **inputs(hold))
        holdout_file = "validation/holdout.npz"
    return {"inputs_file": "validation/inputs.npz", "outputs_file": "validation/outputs.npz",
            "holdout_file": holdout_file, "samples": n, "holdout_samples": len(hold) if holdout_file else 0,
            "inputs_form": form}
