"""Text -> model inputs with the model's own tokenizer (``tokenizer.json``, the ``tokenizers``
library): the same code tokenizes calibration/evaluation text at build time and the bundle's
holdout on the device, so neither torch nor transformers is needed to validate a text bundle.

Each text becomes one sample of ``max_length`` tokens (special tokens included), padded with the
tokenizer's pad id; ``attention_mask`` marks the real tokens. A text longer than ``max_length`` is
an error, never silently truncated.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import CalibrationError, ConfigError, MissingDependencyError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl")
TOKENIZER_DIR = "tokenizer"


class TooLongError(CalibrationError):
    """A text has more tokens than the declared maximum sequence length."""


def require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError("tokenizers", "text", "tokenizing text with the bundled tokenizer.json") from e
    return tokenizers


@dataclass(frozen=True)
class TextSpec:
    """How text becomes inputs; written into the manifest (``text``) and ``preprocess.json``."""

    tokenizer_file: str          # relative to ``root``: tokenizer/tokenizer.json
    max_length: int
    pad_id: int
    input_names: tuple[str, ...]
    dim: str = "sequence"

    def to_json(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer_file, "max_length": self.max_length, "pad_id": self.pad_id,
                "inputs": list(self.input_names), "sequence_dim": self.dim, "padding": "max_length",
                "truncation": False, "library": "tokenizers (Tokenizer.from_file, special tokens added)",
                "note": f"each text is tokenized and padded to max_length = {self.max_length}; longer texts are "
                        "refused"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TextSpec":
        return cls(d["tokenizer"], int(d["max_length"]), int(d["pad_id"]), tuple(d["inputs"]),
                   d.get("sequence_dim", "sequence"))


class TextEncoder:
    def __init__(self, spec: TextSpec, root: Path):
        tk = require_tokenizers()
        path = root / spec.tokenizer_file
        if not path.is_file():
            raise ConfigError(f"{path}: tokenizer file not found")
        self.spec = spec
        self.tok = tk.Tokenizer.from_file(str(path))
        self.tok.no_truncation()
        self.tok.no_padding()

    def encode(self, text: str, where: str = "text") -> dict[str, np.ndarray]:
        enc = self.tok.encode(text)
        n, m = len(enc.ids), self.spec.max_length
        if n > m:
            raise TooLongError(
                f"{where}: {n} tokens, more than the declared maximum sequence length {m}",
                hint=f"raise dims.{self.spec.dim}.max in edgepack.yaml (within the model's position limit), "
                     "or shorten the text")
        ids = np.full((1, m), self.spec.pad_id, np.int64)
        ids[0, :n] = enc.ids
        out = {"input_ids": ids}
        if "attention_mask" in self.spec.input_names:
            mask = np.zeros((1, m), np.int64)
            mask[0, :n] = 1
            out["attention_mask"] = mask
        if "token_type_ids" in self.spec.input_names:
            types = np.zeros((1, m), np.int64)
            types[0, :n] = enc.type_ids
            out["token_type_ids"] = types
        return {k: out[k] for k in self.spec.input_names}


def read_table(path: Path, text_column: str, label_column: str | None, where: str
               ) -> tuple[list[str], list[Any] | None]:
    """Texts (and raw labels) from a .csv/.tsv (header row) or .jsonl file (one object per line)."""
    rows: list[dict[str, Any]] = []
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ConfigError(f"{where}: {path.name} line {i} is not JSON: {e.msg}") from e
            columns = sorted({k for r in rows for k in r}) if rows else []
        else:
            with open(path, encoding="utf-8", newline="") as f:
                reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
                columns = list(reader.fieldnames or [])
                rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{where}: cannot read {path}: {e}") from e
    key = where.rsplit(".", 1)[0]
    if text_column not in columns:
        raise ConfigError(f"{where}: {path.name} has no column '{text_column}' (columns: {', '.join(columns) or 'none'})",
                          hint=f"set {key}.text_column in edgepack.yaml to the column holding the text")
    if label_column is not None and label_column not in columns:
        raise ConfigError(f"{where}: {path.name} has no label column '{label_column}' (columns: "
                          f"{', '.join(columns) or 'none'})", hint=f"fix {key}.label_column, or remove it for unlabelled text")
    label_column = label_column or ("label" if "label" in columns else None)
    texts, labels = [], []
    for i, r in enumerate(rows, 1):
        t = r.get(text_column)
        if not isinstance(t, str):
            raise CalibrationError(f"{where}: {path.name} row {i}: '{text_column}' is not text ({t!r})")
        texts.append(t)
        if label_column:
            labels.append(r.get(label_column))
    return texts, (labels if label_column else None)


def label_ids(raw: list[Any], names: list[str] | None, where: str) -> list[int]:
    """Labels as class indices: integers as they are, names through the project's labels."""
    out = []
    for i, v in enumerate(raw, 1):
        if isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("-").isdigit()):
            out.append(int(v))
        elif isinstance(v, str) and names and v in names:
            out.append(names.index(v))
        else:
            known = f"labels: {', '.join(names)}" if names else "the project declares no labels"
            raise CalibrationError(f"{where}: row {i}: label {v!r} is neither a class index nor a known class ({known})",
                                   hint="use class indices, or list the class names under `labels`")
    return out
