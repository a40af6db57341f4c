"""MobileNetV2 from transformers' classes with random weights (no pretrained weights load offline).

The batch-norm running statistics are re-estimated on 64 calibration crops (a forward pass in training
mode, no gradient, no weight changed), so each layer's activations have the ranges a trained network's
would roughly have, rather than those of the initial mean 0 / variance 1 statistics; the classifier's bias
is set so that its logits average zero over those crops (else one class or a few win on every image)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CROPS = Path(__file__).resolve().parents[2] / "examples" / "efficientnet_lite0" / "data" / "calib"


class Logits(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net(pixel_values=image).logits


def _crops(n: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(CROPS.glob("*.png"))[:n]
    if not files:
        raise FileNotFoundError(f"no crops in {CROPS}: run `make example-efficientnet` first")
    x = np.stack([np.asarray(Image.open(f).convert("RGB").resize((224, 224)), np.float32) for f in files])
    return torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def build() -> torch.nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(0)
    net = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=1000))
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
    crops = _crops(64)
    net.train()
    with torch.no_grad():
        for batch in crops.split(16):
            net(pixel_values=batch)
        net.eval()
        # the pooled features are all positive (after ReLU6), so with a random head their common mean would
        # decide the class for almost every image; centre the head on that mean (bias only, weights kept)
        features = net.mobilenet_v2(pixel_values=crops).pooler_output
        net.classifier.bias.copy_(-net.classifier(features).mean(0) + net.classifier.bias)
    return Logits(net).eval()
