"""`edgepack init`: write a commented edgepack.yaml."""

from __future__ import annotations

from pathlib import Path

import typer

from edgepack.cli.common import out
from edgepack.errors import ConfigError

TEMPLATE = """\
# edgepack project file. Paths are relative to this file's folder.
name: {name}                 # lowercase; names the bundle file
version: 0.1.0               # semantic version of the model you ship

model:
  # a PyTorch factory `file.py:function` returning an nn.Module (plus optional weights),
  # a torch.export `.pt2` file, or an `.onnx` file (its inputs are then read from the file);
  # or instead of path: `hf: folder` + `task: text-classification|feature-extraction|image-classification`
  # for a local Hugging Face folder (inputs, labels, tokenizer or preprocessing read from it)
  path: model.py:build
  weights: weights.pt        # optional state_dict for the factory's module

inputs:                      # one entry per model input; symbolic dims such as `batch` stay dynamic
  - name: image
    shape: [batch, 3, 224, 224]
    dtype: float32

# how raw images (HxWxC uint8, RGB) become the input tensor; remove the block for raw tensors
preprocess:
  layout: NCHW               # NCHW or NHWC
  scale: 0.00392156862745098 # 1/255
  mean: [0.485, 0.456, 0.406]
  std: [0.229, 0.224, 0.225]
  color: rgb                 # rgb, bgr or gray

labels: labels.txt           # class names: a list, or a text file with one per line

calibration:                 # data for INT8 ranges: .npz, an image folder, or file.py:function
  source: data/calib.npz     # .npz: one array per input (N x shape), or `images` (raw, preprocessed)
  samples: 300
  seed: 0

evaluation:                  # labelled data for accuracy: same sources; labels in `labels` / class folders
  source: data/eval.npz
  samples: 2000
  metric: top1               # top1 (needs labels) or fidelity (agreement with the FP32 model)

acceptance:                  # a failed gate keeps the bundle and exits with code 3
  max_accuracy_drop: 1.0     # points of accuracy lost vs FP32
  # max_latency_ms_p90: 20
  # max_size_mb: 10
"""


def init(
    folder: Path = typer.Argument(Path("."), help="Project folder."),
    name: str = typer.Option(None, "--name", help="Project name (default: the folder's name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing edgepack.yaml."),
) -> None:
    """Write a commented edgepack.yaml to start from."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "edgepack.yaml"
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", hint="pass --force to overwrite it")
    proj = (name or folder.resolve().name).lower().replace(" ", "-") or "model"
    path.write_text(TEMPLATE.format(name=proj))
    out.print(f"wrote {path}")
