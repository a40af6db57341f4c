"""Handles on model files. An artifact never holds a live model object."""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

# a format name: lowercase, e.g. "onnx", "openvino-ir", "qnn-context", "coreml.mlpackage"
FORMAT_NAME = re.compile(r"^[a-z0-9][a-z0-9._+-]{0,62}$")


class ModelFormat(str):
    """A model format's name. The set is open: a backend declares its own (``produces = "qnn-context"``).
    The formats edgepack itself makes are constants here (``ModelFormat.ONNX``). A ModelFormat is a
    str: it equals, hashes and serialises as its name, so ``art.format == "onnx"`` and
    ``art.format == ModelFormat.ONNX`` say the same thing."""

    __slots__ = ()
    TORCH: ClassVar[ModelFormat]
    ONNX: ClassVar[ModelFormat]
    OPENVINO_IR: ClassVar[ModelFormat]
    TFLITE: ClassVar[ModelFormat]
    TENSORRT_ENGINE: ClassVar[ModelFormat]

    def __new__(cls, name: str) -> ModelFormat:
        if isinstance(name, ModelFormat):
            return name
        if not isinstance(name, str) or not FORMAT_NAME.match(name):
            raise ValueError(f"{name!r} is not a model format name: use lowercase letters, digits and "
                             "'-', '.', '_' or '+' (e.g. 'onnx', 'qnn-context')")
        return super().__new__(cls, name)

    @property
    def value(self) -> str:
        """The name as a plain str (the spelling from when formats were an Enum)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"ModelFormat({str.__repr__(self)})"


ModelFormat.TORCH = ModelFormat("torch")
ModelFormat.ONNX = ModelFormat("onnx")
ModelFormat.OPENVINO_IR = ModelFormat("openvino-ir")
ModelFormat.TFLITE = ModelFormat("tflite")
ModelFormat.TENSORRT_ENGINE = ModelFormat("tensorrt-engine")


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
    """A model on disk: its format, its main file, its companion files and their digest.

    ``format`` is any format name (a str); it is kept as a :class:`ModelFormat`."""

    format: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: tuple[Path, ...] = ()
    lineage: tuple[StageRecord, ...] = ()
    precision: str = "fp32"
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", ModelFormat(self.format))

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
