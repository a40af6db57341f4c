"""Shared fixtures: a tiny CNN trained in seconds on scikit-learn's digits, written as a project."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

MODEL_PY = '''
import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x):
        return self.body(x)


def build():
    return DigitsCNN()


def broken():
    raise RuntimeError("cannot build this model")


def not_a_module():
    return 42
'''

PROJECT_YAML = """\
name: digits
version: 1.2.3
# INT8 forced: these tests check the INT8 path (select_precision would pick by this host's timing)
precision: int8
model:
  path: model.py:build
  weights: weights.pt
inputs:
  - name: image
    shape: [batch, 1, 8, 8]
    dtype: float32
outputs: [logits]
preprocess:
  layout: NCHW
  scale: 0.00392156862745098
  mean: [0.5]
  std: [0.5]
  color: gray
labels: [zero, one, two, three, four, five, six, seven, eight, nine]
calibration:
  source: data/calib.npz
  samples: 200
  seed: 0
evaluation:
  source: data/eval.npz
  metric: top1
acceptance:
  max_accuracy_drop: 2.0
"""


def train_digits(root: Path, model_py: str = MODEL_PY, epochs: int = 15) -> None:
    """Write the digits project (data, model.py, edgepack.yaml) into ``root`` and train ``model_py``'s model."""
    import sys

    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(images))
    train, test = perm[:1297], perm[1297:]
    (root / "data").mkdir()
    np.savez(root / "data" / "calib.npz", images=images[train[:400]], labels=labels[train[:400]])
    np.savez(root / "data" / "eval.npz", images=images[test], labels=labels[test])
    (root / "model.py").write_text(model_py)
    (root / "edgepack.yaml").write_text(PROJECT_YAML)
    sys.path.insert(0, str(root))
    try:
        import importlib

        mod = importlib.import_module("model")
        importlib.reload(mod)
        torch.manual_seed(0)
        model = mod.build()
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("model", None)
    x = torch.from_numpy(images[train]).float().div(255).sub(0.5).div(0.5).unsqueeze(1)
    y = torch.from_numpy(labels[train])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        model.train()
        for i in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.save(model.eval().state_dict(), root / "weights.pt")


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory) -> Path:
    """A trained digits project (read-only: copy it with `project` to change it)."""
    root = tmp_path_factory.mktemp("digits-trained")
    train_digits(root)
    return root


@pytest.fixture
def project(trained_project, tmp_path) -> Path:
    """A private copy of the digits project that a test may edit."""
    dst = tmp_path / "proj"
    shutil.copytree(trained_project, dst)
    return dst


def edit_yaml(root: Path, old: str, new: str) -> None:
    p = root / "edgepack.yaml"
    text = p.read_text()
    assert old in text, f"{old!r} not in project file"
    p.write_text(text.replace(old, new))


@pytest.fixture(scope="session")
def sensitive_project(trained_project, tmp_path_factory) -> Path:
    """The digits CNN with one activation channel scaled x1000 and the next conv scaled back:
    the same function in FP32, but per-tensor INT8 ranges of that activation are ruined by it."""
    import torch

    root = tmp_path_factory.mktemp("sensitive") / "proj"
    shutil.copytree(trained_project, root)
    state = torch.load(root / "weights.pt", weights_only=True)
    state["body.1.weight"][0] *= 1000.0   # BatchNorm after conv1: gamma and beta of channel 0
    state["body.1.bias"][0] *= 1000.0
    state["body.3.weight"][:, 0] /= 1000.0  # conv2 reads channel 0 scaled back down
    torch.save(state, root / "weights.pt")
    edit_yaml(root, "max_accuracy_drop: 2.0", "max_accuracy_drop: 1.0")
    return root


@pytest.fixture(scope="session")
def built(trained_project, tmp_path_factory):
    """The digits project built once for `cpu` and `onnx`: (out folder, results)."""
    from edgepack.api import build

    out = tmp_path_factory.mktemp("dist")
    results = build(trained_project, ["cpu", "onnx"], out)
    return out, {r.target: r for r in results}


def dedent(s: str) -> str:
    return textwrap.dedent(s)
