"""Raw image -> model input, in numpy only (it also runs on devices without torch)."""

from __future__ import annotations

import numpy as np

from edgepack.errors import CalibrationError


def apply(pre: dict, image: np.ndarray, hw: tuple[int, int] | None, dtype: str = "float32") -> np.ndarray:
    """One raw image (HxW or HxWxC uint8, RGB) -> one tensor without batch dim.

    ``pre`` is the project's ``preprocess`` block as a dict (the same one ``preprocess.json`` holds).
    """
    return normalize(pre, geometry(pre, image, hw), dtype)


def geometry(pre: dict, image: np.ndarray, hw: tuple[int, int] | None) -> np.ndarray:
    """The first half of :func:`apply`: channels and size (HxWxC, still uint8 for uint8 RGB input), the
    compact form a data set can hold until each sample is read (:func:`normalize` does the rest)."""
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3:
        raise CalibrationError(f"expected an image of shape HxW or HxWxC, got shape {tuple(image.shape)}")
    color = pre.get("color", "rgb")
    if color == "gray" and img.shape[2] == 3:
        img = (img[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    elif color in ("rgb", "bgr") and img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    elif img.shape[2] == 4:
        img = img[..., :3]
    if color == "bgr":
        img = img[..., ::-1]
    if hw is not None and tuple(img.shape[:2]) != tuple(hw):
        img = _resize(img, hw)
    return img


def normalize(pre: dict, img: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """The second half of :func:`apply`: scale, mean/std and layout of a :func:`geometry` output."""
    x = img.astype(np.float32)  # a copy (also of a float image): the steps below work in place on it
    x *= np.float32(float(pre.get("scale", 1.0)))  # the same float32 product as x * scale, without a new array
    mean = np.asarray(pre.get("mean", [0.0]), np.float32)
    std = np.asarray(pre.get("std", [1.0]), np.float32)
    if mean.size not in (1, x.shape[2]):
        raise CalibrationError(f"preprocess has {mean.size} mean values but the image has {x.shape[2]} channels")
    x -= mean
    if std.size in (1, x.shape[2]):
        x /= std
    else:  # numpy broadcasts (or refuses) as it always did; in place it could not
        x = x / std
    if pre.get("layout", "NCHW") == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x).astype(dtype, copy=False)


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a base dependency
        raise CalibrationError("resizing images needs Pillow", hint="pip install pillow") from e
    chans = img.shape[2]
    pil = Image.fromarray(img[..., 0] if chans == 1 else img.astype(np.uint8))
    out = np.asarray(pil.resize((hw[1], hw[0]), Image.BILINEAR))
    return out[..., None] if out.ndim == 2 else out


def spatial_size(shape: tuple, layout: str) -> tuple[int, int] | None:
    """(H, W) of an image input shape with batch dim, when both are fixed integers."""
    if len(shape) != 4:
        return None
    h, w = (shape[2], shape[3]) if layout == "NCHW" else (shape[1], shape[2])
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None
