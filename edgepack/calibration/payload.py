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


# by default the validation files may take this share of the compiled model's size (or MIN_BUDGET_BYTES,
# whichever is larger), so a bundle stays under twice its model; golden_samples / holdout_samples set
# in the project file are honoured as given, and a separate validation artifact has no budget
BUDGET_SHARE = 0.8
MIN_BUDGET_BYTES = 1 << 20
MIN_GOLDEN, MIN_HOLDOUT = 32, 50


def default_budget(model_bytes: int) -> int:
    return max(int(BUDGET_SHARE * model_bytes), MIN_BUDGET_BYTES)


def write_payload(vdir: Path, ev: SampleSet, outputs: Any, specs: list[TensorSpec], out_names: list[str],
                  pre: dict | None, holdout_cap: int | None = None, texts: bool = False,
                  golden_cap: int | None = None, budget: int | None = None) -> dict[str, Any]:
    """Write inputs.npz, outputs.npz and the holdout into ``vdir``; the manifest's ``validation`` fields
    (all but the tolerance). ``outputs[i][j]`` is the compiled model's output j on evaluation sample i.

    With a ``budget`` (bytes), counts the project did not set are cut so the files fit in it: the golden
    set first (at least MIN_GOLDEN), the labelled holdout in what is left (at least MIN_HOLDOUT)."""
    vdir.mkdir(parents=True, exist_ok=True)
    n = min(VALIDATION_SAMPLES if golden_cap is None else golden_cap, len(ev))
    text_holdout = texts and ev.texts is not None
    hold = holdout_indices(ev, holdout_cap, text_holdout)
    fields = _write(vdir, ev, outputs, specs, out_names, pre, n, hold, text_holdout)
    fixed_golden = golden_cap is not None
    fixed_hold = holdout_cap is not None or text_holdout or not hold
    for _ in range(4):  # compressed sizes are nearly linear in the counts: one or two rewrites suffice
        used = _bytes(vdir)
        if budget is None or used <= budget or (fixed_golden and fixed_hold):
            break
        # per-sample cost of what was written, then the counts that fit (a little under, for the files' headers)
        per_golden = (_size(vdir / "inputs.npz") + _size(vdir / "outputs.npz")) / max(n, 1)
        per_hold = _size(vdir / "holdout.npz") / len(hold) if hold and not fixed_hold else 0.0
        adjustable = (0.0 if fixed_golden else per_golden * n) + per_hold * len(hold)
        room = max(0.97 * budget - (used - adjustable), 0.0)
        new_n, new_hold = n, hold
        if not fixed_golden:
            share = room / 2 if per_hold else room
            new_n = max(min(n, int(share // per_golden)), min(MIN_GOLDEN, n))
        if per_hold:
            left = room - (0.0 if fixed_golden else new_n * per_golden)
            k = max(min(len(hold), int(left // per_hold)), min(MIN_HOLDOUT, len(hold)))
            new_hold = hold[len(hold) - k:]
        if (new_n, len(new_hold)) == (n, len(hold)):
            break  # at the minimums
        n, hold = new_n, new_hold
        for f in vdir.iterdir():
            f.unlink()
        fields = _write(vdir, ev, outputs, specs, out_names, pre, n, hold, text_holdout)
    return fields | ({"budget_bytes": budget} if budget is not None else {})


def _size(p: Path) -> int:
    return p.stat().st_size if p.is_file() else 0


def _bytes(vdir: Path) -> int:
    return sum(_size(f) for f in vdir.iterdir())


def _write(vdir: Path, ev: SampleSet, outputs: Any, specs: list[TensorSpec], out_names: list[str], pre: dict | None,
           n: int, hold: list[int], text_holdout: bool) -> dict[str, Any]:
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
