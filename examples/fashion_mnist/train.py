"""Train the example CNN on Fashion-MNIST and write weights.pt plus the calibration/evaluation sets.

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` package (no download at run time):
    apt-get install -y dataset-fashion-mnist
Runs in about a minute on two CPU cores. Skips training when weights.pt already exists.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DATA = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
LABELS = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    img, lab = DATA / f"{prefix}-images-idx3-ubyte.gz", DATA / f"{prefix}-labels-idx1-ubyte.gz"
    if not img.exists():
        sys.exit(f"error: {img} not found\nhint: apt-get install -y dataset-fashion-mnist")
    x = np.frombuffer(gzip.open(img).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    y = np.frombuffer(gzip.open(lab).read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="retrain even if weights.pt exists")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE))
    from model import build

    xtr, ytr = load("train")
    xte, yte = load("test")
    (HERE / "data").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    # calibration images come from the training split, never from the evaluation split
    cal = rng.choice(len(xtr), 1000, replace=False)
    np.savez_compressed(HERE / "data" / "calib.npz", images=xtr[cal], labels=ytr[cal])
    np.savez_compressed(HERE / "data" / "eval.npz", images=xte, labels=yte)
    # recovery fine-tuning data for the pruned variant (edgepack-pruned.yaml): another training subset
    tune = rng.choice(np.setdiff1d(np.arange(len(xtr)), cal), 30000, replace=False)
    np.savez_compressed(HERE / "data" / "finetune.npz", images=xtr[tune], labels=ytr[tune])
    (HERE / "labels.txt").write_text("\n".join(LABELS) + "\n")
    weights = HERE / "weights.pt"
    if weights.exists() and not args.force:
        print(f"{weights.name} exists; skipping training (--force to retrain)")
        return
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = build()
    x = (torch.from_numpy(xtr.copy()).float().div(255).sub(MEAN).div(STD)).unsqueeze(1)
    y = torch.from_numpy(ytr)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * (len(x) // 128 + 1))
    for epoch in range(args.epochs):
        t0, perm = time.time(), torch.randperm(len(x))
        model.train()
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            xt = (torch.from_numpy(xte.copy()).float().div(255).sub(MEAN).div(STD)).unsqueeze(1)
            acc = (model(xt).argmax(1).numpy() == yte).mean() * 100
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, test top1 {acc:.2f}% ({time.time() - t0:.0f}s)")
    torch.save(model.state_dict(), weights)
    print(f"wrote {weights}")


if __name__ == "__main__":
    main()
