"""Tiny Hugging Face models made offline in seconds: a 2-layer BERT text classifier with a WordLevel
tokenizer over a small vocabulary (trained on a synthetic sentiment task), and a tiny ViT image
classifier with a preprocessor_config.json. Saved with save_pretrained like any local checkpoint."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np

POSITIVE = "good great fine superb lovely nice".split()
NEGATIVE = "bad awful poor dull boring ugly".split()
FILLER = "the movie film plot was is a an and very quite really story acting".split()
LABELS = ["negative", "positive"]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + POSITIVE + NEGATIVE + FILLER
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """Filler words with one or two sentiment words; the label says which kind. Some texts hold a word
    of the other kind too, so the task is not trivially separable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        y = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 12))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if y else NEGATIVE))
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), rng.choice(NEGATIVE if y else POSITIVE))
        out.append((" ".join(words), y))
    return out


def write_csv(path: Path, rows, label_names: bool = True, text_column: str = "text") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([text_column, "label"])
        w.writerows([(t, LABELS[y] if label_names else y) for t, y in rows])
    return path


def tiny_bert(root: Path, head: bool = True) -> Path:
    """A trained 2-layer BERT (hidden 32) sentiment classifier in ``root/model``, data in ``root/data``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    data = sentences(1100, 0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_csv(root / "data" / "calib.csv", data[600:800])
    write_csv(root / "data" / "eval.csv", data[800:])
    if not head:
        model = BertModel(cfg)
    else:
        model = BertForSequenceClassification(cfg)
        train = data[:600]
        enc = tok([t for t, _ in train], padding=True, return_tensors="pt")
        y = torch.tensor([label for _, label in train])
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(4):
            for i in range(0, len(train), 32):
                out = model(input_ids=enc["input_ids"][i : i + 32], attention_mask=enc["attention_mask"][i : i + 32],
                            token_type_ids=enc["token_type_ids"][i : i + 32], labels=y[i : i + 32])
                opt.zero_grad()
                out.loss.backward()
                opt.step()
    model.eval().save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root / "model"


def tiny_vit(root: Path) -> Path:
    """A tiny ViT image classifier (random weights: fidelity only) with its preprocessing config, and
    calibration/evaluation image folders cut from scikit-image's photos."""
    import json

    import torch
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=4,
                    id2label={i: f"class-{i}" for i in range(4)}, label2id={f"class-{i}": i for i in range(4)})
    ViTForImageClassification(cfg).eval().save_pretrained(root / "model")
    (root / "model" / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    for split, n, seed in (("calib", 60, 0), ("eval", 40, 1)):
        folder = root / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, crop in enumerate(photo_crops(n, seed, 64)):
            Image.fromarray(crop).save(folder / f"{i:03d}.png")
    return root / "model"


def photo_crops(n: int, seed: int, size: int, photos: list[str] | None = None) -> list[np.ndarray]:
    """``n`` random square RGB crops (``size`` px) of scikit-image's sample photos."""
    import skimage.data as sd
    from PIL import Image

    names = photos or ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "page", "text"]
    images = []
    for name in names:
        im = getattr(sd, name)()
        images.append(np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3])
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = images[i % len(images)]
        h, w = im.shape[:2]
        s = int(rng.integers(min(h, w) // 4, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        out.append(np.asarray(Image.fromarray(im[y : y + s, x : x + s]).resize((size, size))))
    return out
