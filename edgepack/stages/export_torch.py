"""PyTorch module -> a ``torch.export`` program (``model.pt2``), for backends whose converter reads
PyTorch rather than ONNX (LiteRT/TFLite through litert-torch). Shapes are static: converters for
phones compile one shape, so every symbolic dim other than ``batch`` must be given a size."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact, ModelFormat, StageRecord, TensorSpec
from edgepack.errors import ConfigError, ToolchainError
from edgepack.loaders.torch import example_inputs, require_torch


def static_specs(inputs: list[TensorSpec], batch: int = 1, dims: dict[str, int] | None = None,
                 who: str = "this target") -> list[TensorSpec]:
    """The inputs with every symbolic dim replaced by a size; a clear error for one without a size."""
    out = []
    for s in inputs:
        try:
            out.append(TensorSpec(s.name, s.concrete_shape(batch, dims), s.dtype))
        except KeyError as e:
            raise ConfigError(
                f"input '{s.name}' has the symbolic dim '{e.args[0]}' ({s.shape_str}), but {who} needs a static shape",
                hint=f"give '{e.args[0]}' a size: `dims: {{{e.args[0]}: {{max: N}}}}` in the project file, or "
                     f"`static_dims: {{{e.args[0]}: N}}` in the target profile's backend_options") from None
    return out


def export_program(module: Any, inputs: list[TensorSpec], output_names: list[str], out_dir: Path,
                   source_digest: str | None = None) -> ModelArtifact:
    """``torch.export`` the module at the given (static) input shapes and save it as ``model.pt2``."""
    torch = require_torch()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.pt2"
    batch = next((s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], int)), 1)
    args = example_inputs(inputs, batch=batch)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(module.eval(), tuple(args))
            torch.export.save(program, str(path))
            with torch.no_grad():
                outs = program.module()(*args)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolchainError(f"torch.export could not capture the model for conversion: {first}",
                             hint="the model must be traceable by torch.export (no data-dependent Python "
                                  "control flow); see the PyTorch export docs") from e
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    out_specs = tuple(TensorSpec(n, tuple(o.shape), str(o.dtype).replace("torch.", ""))
                      for n, o in zip(output_names, outs))
    art = ModelArtifact(ModelFormat.TORCH, path, tuple(inputs), out_specs, (path,), (), "fp32",
                        {"exporter": "torch.export", "torch": torch.__version__})
    record = StageRecord("export torch.export", {"inputs": [s.to_json() for s in inputs]}, source_digest,
                         art.digest, time.perf_counter() - started)
    return ModelArtifact(art.format, art.path, art.inputs, art.outputs, art.files, (record,), "fp32", art.details)
