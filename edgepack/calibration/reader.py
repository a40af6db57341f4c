"""Data sources -> a list of samples ``{input_name: ndarray with batch 1}`` plus optional labels.

Adapters normalise at the boundary (``.npz``, image folder + preprocessing, ``file.py:function``);
everything downstream sees :class:`SampleSet` only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack import preprocess as pp
from edgepack.artifact import TensorSpec
from edgepack.calibration.images import PreprocessedImages
from edgepack.calibration.npz import MemberError, read_members
from edgepack.errors import CalibrationError, ConfigError, ModelError
from edgepack.text import TEXT_SUFFIXES, label_ids, read_table

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class SampleSet:
    """Samples fed to a model, one at a time, with labels when the source has them. ``samples`` is a list,
    or for image sources a :class:`PreprocessedImages` that makes each input when it is read."""

    samples: Sequence[dict[str, np.ndarray]]
    labels: list[int] | None
    source: str
    texts: list[str] | None = None  # the raw texts, for text sources (shipped as the bundle's holdout)
    indices: list[int] | None = None  # each sample's index in its source (None: 0, 1, 2, ...), for messages
    # for image sources: the raw uint8 image each sample was preprocessed from, where no resize was needed
    # (None for that sample otherwise), so a bundle can ship the smaller raw image and preprocess on the device
    raw: list[np.ndarray | None] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.samples)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.samples:
            for name in sorted(s):
                h.update(name.encode())
                h.update(str(s[name].dtype).encode())
                h.update(str(s[name].shape).encode())
                h.update(np.ascontiguousarray(s[name]).tobytes())
        if self.labels is not None:
            h.update(np.asarray(self.labels, np.int64).tobytes())
        return "sha256:" + h.hexdigest()

    def sample_digests(self) -> list[str]:
        """One content digest per sample (inputs only), to find samples two sets share."""
        out = []
        for s in self.samples:
            h = hashlib.sha256()
            for name in sorted(s):
                h.update(name.encode())
                h.update(np.ascontiguousarray(s[name]).tobytes())
            out.append(h.hexdigest())
        return out

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "samples": len(self), "fingerprint": self.fingerprint,
                "labelled": self.labels is not None}

    def stacked(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate([s[k] for s in self.samples]) for k in self.samples[0]} if self.samples else {}


def load_samples(
    source: str,
    root: Path,
    inputs: list[TensorSpec],
    preprocess: dict | None,
    samples: int | None,
    seed: int,
    labels: list[str] | None = None,
    role: str = "calibration",
    text: Any = None,
    text_column: str = "text",
    label_column: str | None = None,
) -> SampleSet:
    """Read ``source`` (relative to ``root``), pick ``samples`` of them with ``seed``, check each.

    ``text`` (a :class:`edgepack.text.TextEncoder`) tokenizes ``.csv``/``.jsonl`` text sources."""
    where = f"{role}.source"
    texts, raw = None, None
    if ":" in source and source.split(":")[0].endswith(".py"):
        xs, ys = _from_callable(source, root, inputs, where)
    else:
        path = Path(source) if Path(source).is_absolute() else root / source
        if not path.exists():
            raise ConfigError(f"{where}: {path} not found", hint="paths are relative to the project folder")
        if path.is_dir():
            xs, ys, raw = _from_image_folder(path, inputs, preprocess, labels, where)
        elif path.suffix == ".npz":
            xs, ys, raw = _from_npz(path, inputs, preprocess, where)
        elif path.suffix in TEXT_SUFFIXES:
            if text is None:
                raise ConfigError(f"{where}: {path.name} is a text file, but the model takes no text",
                                  hint="text sources need a text model (model.hf with task text-classification "
                                       "or feature-extraction)")
            texts, raw_labels = read_table(path, text_column, label_column, where)
            ys = label_ids(raw_labels, labels, f"{where} {path.name}") if raw_labels is not None else None
            xs = None
        else:
            raise ConfigError(f"{where}: {path.name} is not an .npz file, an image folder, a .csv/.jsonl text "
                              "file or file.py:function")
    n_all = len(texts) if texts is not None else len(xs)
    if not n_all:
        raise CalibrationError(f"{role} data from {source} is empty", hint="give at least one sample")
    if ys is not None and len(ys) != n_all:
        raise CalibrationError(f"{role} data from {source}: {n_all} samples but {len(ys)} labels")
    idx = list(range(n_all))
    if samples is not None and samples < n_all:
        idx = [int(i) for i in np.sort(np.random.default_rng(seed).choice(n_all, size=samples, replace=False))]
        if texts is not None:
            texts = [texts[i] for i in idx]
        else:
            xs = xs.subset(idx) if isinstance(xs, PreprocessedImages) else [xs[i] for i in idx]
            raw = [raw[i] for i in idx] if raw is not None else None
        ys = [ys[i] for i in idx] if ys is not None else None
    if ys is not None:
        ys = check_labels(ys, idx, source, len(labels) if labels else None,
                          "the project's `labels`" if labels else None)
    if texts is not None:
        xs = [text.encode(t, f"{where}: {source} text {i + 1}") for i, t in enumerate(texts)]
    for i, x in enumerate(xs):
        check_sample(x, inputs, f"{role} sample {i} from {source}")
    for i, x in zip(idx, xs):
        check_finite(x, source, i)
    return SampleSet(xs, ys, source, texts, idx, raw)


def check_finite(sample: dict[str, np.ndarray], source: str, index: int) -> None:
    """Refuse NaN/Inf in a float input: they would make calibration ranges and accuracy meaningless."""
    for name, a in sample.items():
        if a.dtype.kind not in "fc" or bool(np.isfinite(a).all()):
            continue
        what = "NaN" if bool(np.isnan(a).any()) else "Inf"
        raise CalibrationError(f"{source}: input '{name}' sample {index} holds {what}",
                               hint="clean or drop such samples (np.isfinite(x).all()) before building; NaN/Inf "
                                    "would corrupt the INT8 ranges and the measured accuracy")


def check_labels(raw: list[Any], indices: list[int], source: str, n_classes: int | None,
                 classes_from: str | None = None) -> list[int]:
    """Labels as class indices: whole numbers, >= 0 and, given ``n_classes``, below it.

    ``indices`` are the samples' indices in ``source`` (for the message)."""
    out = []
    hint = "labels are class indices 0..N-1, one per sample"
    for i, v in zip(indices, raw):
        a = np.asarray(v)
        if a.size != 1 or a.dtype.kind not in "iubf":
            raise CalibrationError(f"{source}: label of sample {i} is {v!r}, not a class index", hint=hint)
        x = a.reshape(()).item()
        if isinstance(x, float) and not (np.isfinite(x) and x == int(x)):
            raise CalibrationError(f"{source}: label {x!r} of sample {i} is not a whole class index", hint=hint)
        x = int(x)
        if x < 0:
            raise CalibrationError(f"{source}: label {x} of sample {i} is negative; class indices start at 0"
                                   + (f" (the model has {n_classes} classes)" if n_classes is not None else ""),
                                   hint=hint)
        if n_classes is not None and x >= n_classes:
            of = f" of {classes_from}" if classes_from else ""
            raise CalibrationError(f"{source}: label {x} of sample {i} is outside the {n_classes} classes{of} "
                                   f"(0..{n_classes - 1})", hint=hint)
        out.append(x)
    return out


def batch_axis(t: TensorSpec) -> int | None:
    """Where the batch dim of an input is: the dim named `batch`, else the first; None for a scalar."""
    if not t.shape:
        return None
    return t.shape.index("batch") if "batch" in t.shape else 0


def check_sample(sample: dict[str, np.ndarray], inputs: list[TensorSpec], what: str) -> None:
    names = {t.name for t in inputs}
    if set(sample) != names:
        missing = sorted(names - set(sample))
        hint = (f"store an array for each input, named after it ({', '.join(missing)} missing); recurrent state "
                "inputs (model.state_inputs) are fed from the data like any other input") if missing else None
        raise CalibrationError(f"{what} has inputs {sorted(sample)}, the model takes {sorted(names)}", hint=hint)
    for t in inputs:
        a = sample[t.name]
        if str(a.dtype) != t.dtype:
            raise CalibrationError(
                f"{what}: input '{t.name}' has dtype {a.dtype}, the project declares {t.dtype}",
                hint=f"convert the data (array.astype('{t.dtype}')) or fix `inputs` in edgepack.yaml",
            )
        ok = len(a.shape) == len(t.shape) and all(
            (isinstance(d, str) or d == s) for d, s in zip(t.shape, a.shape)
        )
        ax = batch_axis(t)
        if not ok or (ax is not None and a.shape[ax] != 1):
            if len(a.shape) == 4 == len(t.shape):
                nchw = (a.shape[0], a.shape[3], a.shape[1], a.shape[2])
                if all(isinstance(d, str) or d == s for d, s in zip(t.shape, nchw)):
                    raise CalibrationError(
                        f"{what}: input '{t.name}' is channels-last (NHWC) {tuple(a.shape)}, the model expects "
                        f"{t.shape_str} (NCHW)",
                        hint="store np.transpose(x, (0, 3, 1, 2)), or store raw HxWxC images and let `preprocess` "
                             "(layout: NCHW) convert them; the tflite backend makes the device's NHWC itself")
            raise CalibrationError(
                f"{what}: input '{t.name}' has shape {tuple(a.shape)}, expected {t.shape_str}"
                + ("" if ax is None else f" with batch 1 (axis {ax})"),
                hint="in an .npz, each array holds one entry per sample on its first axis; each entry has the "
                     "declared shape without its batch dim")


def _from_npz(path: Path, inputs: list[TensorSpec], pre: dict | None, where: str):
    """Samples as views of the file's arrays, each member read (or memory-mapped) once: see npz.py."""
    hint = "the file is damaged (an interrupted copy or download?); write it again with np.savez"
    names = [t.name for t in inputs]
    try:  # each member read once, here, where a corrupt one is caught
        keys_list, data = read_members(path, lambda keys: [*names, "labels"] + (
            [] if all(n in keys for n in names) else ["images"]))
    except MemberError as e:
        k = e.member
        if e.kind == "pickle":
            raise CalibrationError(f"{where}: {path}: array '{k}' holds Python objects, which are not "
                                   "loaded (pickle)", hint="store numeric arrays only") from e
        raise CalibrationError(f"{where}: {path} is corrupt: cannot read its array '{k}' ({e})", hint=hint) from e
    except Exception as e:  # noqa: BLE001 - numpy raises many kinds
        raise CalibrationError(f"{where}: cannot read {path}: {e}", hint=hint) from e
    keys = set(keys_list)
    labels = list(data["labels"]) if "labels" in keys else None  # checked by load_samples
    if all(n in keys for n in names):
        n = len(data[names[0]])
        if any(len(data[k]) != n for k in names):
            raise CalibrationError(f"{where}: arrays in {path.name} have different lengths")
        # one sample per entry of the first axis, given the batch dim (size 1) where the input declares it
        axes = {t.name: batch_axis(t) for t in inputs}
        return [{k: np.asarray(data[k][i]) if axes[k] is None else np.expand_dims(data[k][i], axes[k]) for k in names}
                for i in range(n)], labels, None
    present = [n for n in names if n in keys]
    if present:
        missing = [n for n in names if n not in keys]
        raise CalibrationError(
            f"{where}: {path.name} has arrays for {present} but none for input(s) {missing}",
            hint="save one array per input, named after it; recurrent state inputs (model.state_inputs, e.g. an "
                 "initial hidden state) come from the data like any other input")
    if "images" in keys:
        if pre is None:
            raise ConfigError(
                f"{where}: {path.name} holds raw 'images' but the project has no `preprocess` block",
                hint="add preprocess (layout, scale, mean, std, color), or store arrays named after the inputs",
            )
        xs, raw = _images_to_samples(list(data["images"]), inputs, pre, where)
        return xs, labels, raw
    raise CalibrationError(
        f"{where}: {path.name} has arrays {sorted(keys)}; expected one per input ({', '.join(names)}) or 'images'",
        hint="save with np.savez(path, **{input_name: array_NxShape}, labels=...)",
    )


def _images_to_samples(images: list[np.ndarray], inputs: list[TensorSpec], pre: dict, where: str):
    if len(inputs) != 1:
        raise ConfigError(f"{where}: raw images need a model with one input, this one has {len(inputs)}")
    t = inputs[0]
    hw = pp.spatial_size(t.shape, pre.get("layout", "NCHW"))
    raw = [img if img.dtype == np.uint8 and (hw is None or tuple(img.shape[:2]) == tuple(hw)) else None
           for img in images]  # kept where it is the smaller form (no resize): a view or the decoded image
    # each image resized now (a photo is larger than its crop), normalized when read
    return PreprocessedImages([pp.geometry(pre, img, hw) for img in images], t.name, pre, t.dtype), raw


def _from_image_folder(path: Path, inputs, pre: dict | None, labels: list[str] | None, where: str):
    if pre is None:
        raise ConfigError(f"{where}: {path} is an image folder but the project has no `preprocess` block")
    try:
        from PIL import Image
    except ImportError as e:
        raise ConfigError("reading image folders needs Pillow", hint="pip install pillow") from e
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = {p.parent for p in files}
    ys: list[int] | None = None
    if subdirs and all(p.parent.parent == path for p in files) and path not in subdirs:
        classes = labels or sorted(d.name for d in subdirs)
        unknown = sorted({p.parent.name for p in files} - set(classes))
        if unknown:
            raise CalibrationError(f"{where}: folders {unknown} in {path} are not among the project's labels")
        ys = [classes.index(p.parent.name) for p in files]
    mode = "L" if pre.get("color") == "gray" else "RGB"
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert(mode)))
        except OSError as e:
            raise CalibrationError(f"{where}: cannot read image {f}: {e}") from e
    xs, raw = _images_to_samples(images, inputs, pre, where)
    return xs, ys, raw


def import_callable(spec: str, root: Path, where: str):
    """``file.py:name`` -> the object, importing the file as a module."""
    file_part, _, attr = spec.rpartition(":")
    file = Path(file_part) if Path(file_part).is_absolute() else root / file_part
    if not file.is_file():
        raise ModelError(f"{where}: {file} not found", hint="paths are relative to the project folder")
    if file.stat().st_size == 0:
        raise ModelError(f"{where}: {file.name} is empty (0 bytes)",
                         hint="the file was not written completely (an interrupted save or copy?); write it again")
    mod_name = f"edgepack_user_{abs(hash(str(file.resolve())))}"
    module = sys.modules.get(mod_name)
    if module is None:
        mspec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        try:
            mspec.loader.exec_module(module)
        except SystemExit as e:  # a script's exit code is not edgepack's (3 would read as "gate failed")
            del sys.modules[mod_name]
            raise ModelError(f"{where}: importing {file.name} called sys.exit({e.code!r})",
                             hint="move script code under `if __name__ == '__main__':`") from e
        except Exception as e:
            del sys.modules[mod_name]
            raise ModelError(f"{where}: importing {file.name} failed: {type(e).__name__}: {e}") from e
    if not hasattr(module, attr):
        found = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelError(f"{where}: {file.name} has no '{attr}'", hint=f"callables there: {', '.join(found) or 'none'}")
    return getattr(module, attr)


def _from_callable(spec: str, root: Path, inputs: list[TensorSpec], where: str):
    fn = import_callable(spec, root, where)
    try:
        items = list(fn())
    except SystemExit as e:
        raise CalibrationError(f"{where}: {spec} called sys.exit({e.code!r})",
                               hint="the function must return or yield samples, not exit the process") from e
    except Exception as e:
        raise CalibrationError(f"{where}: {spec} raised {type(e).__name__}: {e}") from e
    xs, ys = [], []
    for item in items:
        label = None
        if isinstance(item, tuple) and len(item) == 2:
            item, label = item
        if isinstance(item, np.ndarray):
            if len(inputs) != 1:
                raise CalibrationError(f"{where}: {spec} yields bare arrays but the model has {len(inputs)} inputs")
            item = {inputs[0].name: item}
        if not isinstance(item, dict):
            raise CalibrationError(f"{where}: {spec} must yield dicts of arrays (or (inputs, label) pairs)")
        xs.append({k: np.asarray(v) for k, v in item.items()})
        ys.append(label)
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise CalibrationError(f"{where}: {spec} yields labels for some samples only")
    return xs, (ys if ys and all(labelled) else None)  # checked by load_samples


def check_label_classes(data: SampleSet, n_classes: int, classes_from: str) -> None:
    """The labels of ``data`` against ``n_classes`` (known only once the model has run, when the
    project lists no `labels`)."""
    if data.labels is not None:
        check_labels(data.labels, data.indices or list(range(len(data))), data.source, n_classes, classes_from)
