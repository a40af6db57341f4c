"""Handles on model files. An artifact never holds a live model object."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any


class ModelFormat(str, Enum):
    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO_IR = "openvino-ir"
    TFLITE = "tflite"
    TENSORRT_ENGINE = "tensorrt-engine"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"

    def concrete_shape(self, batch: int = 1, dims: dict[str, int] | None = None) -> tuple[int, ...]:
        """Replace symbolic dims: ``batch`` by ``batch``, others from ``dims``."""
        dims = {"batch": batch, **(dims or {})}
        out = []
        for d in self.shape:
            if isinstance(d, int):
                out.append(d)
            elif d in dims:
                out.append(int(dims[d]))
            else:
                raise KeyError(d)
        return tuple(out)

    @property
    def shape_str(self) -> str:
        return "[" + ", ".join(str(d) for d in self.shape) + "]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class StageRecord:
    """What one pipeline stage did: carried into the manifest as lineage."""

    name: str
    config: dict[str, Any]
    input_digest: str | None
    output_digest: str | None
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": self.config,
            "input_digest": self.input_digest,
            "output_digest": self.output_digest,
            "seconds": round(self.seconds, 3),
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def digest_paths(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, content digest) of each file: a folder's content digest."""
    h = hashlib.sha256()
    for p in sorted(paths):
        rel = p.relative_to(root).as_posix() if root else p.name
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class ModelArtifact:
    """A model on disk: its format, its main file, its companion files and their digest."""

    format: ModelFormat
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[Path, ...] = ()
    lineage: tuple[StageRecord, ...] = ()
    precision: str = "fp32"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def all_files(self) -> tuple[Path, ...]:
        return self.files or (self.path,)

    @property
    def digest(self) -> str:
        return digest_paths(list(self.all_files), self.path.parent)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.all_files)

    def derive(self, stage: str, config: dict[str, Any], started: float, **changes: Any) -> "ModelArtifact":
        """The next artifact, with this stage appended to the lineage."""
        nxt = replace(self, **changes)
        record = StageRecord(stage, config, self.digest, nxt.digest, time.perf_counter() - started)
        return replace(nxt, lineage=self.lineage + (record,))
