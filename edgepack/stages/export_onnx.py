"""PyTorch module -> ONNX, the one IR every backend reads. The export is checked against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.artifact import ModelArtifact, ModelFormat, StageRecord, TensorSpec
from edgepack.errors import ModelError, ToolchainError
from edgepack.loaders.onnx import opset as read_opset
from edgepack.loaders.onnx import require_onnx, tensor_specs
from edgepack.loaders.torch import example_inputs, require_torch

DEFAULT_OPSET = 18
TWO_GB = 2 * 1024**3


def export(module: Any, inputs: list[TensorSpec], output_names: list[str], out_dir: Path,
           max_opset: int | None = None, source_digest: str | None = None, dims: dict[str, Any] | None = None,
           external_threshold: int | None = None) -> ModelArtifact:
    """Export with the dynamo exporter (opset 18+), or TorchScript when the target caps opset below 18.

    Symbolic dims (``batch`` ...) become dynamic axes; ``dims`` (the project's ``DimSpec`` per name)
    gives their range and the size traced with. Weights are kept inside the file unless the model is
    over 2 GB (protobuf's limit; ``external_threshold`` overrides it), where ``model.onnx.data`` is
    written beside it.
    """
    torch = require_torch()
    onnx = require_onnx()
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    use_dynamo = max_opset is None or max_opset >= DEFAULT_OPSET
    target_opset = DEFAULT_OPSET if max_opset is None else min(max_opset, DEFAULT_OPSET)
    n_params = sum(p.numel() * p.element_size() for p in module.parameters())
    external = n_params >= (TWO_GB if external_threshold is None else external_threshold)
    dims = dims or {}
    sizes = {k: d.opt or d.max or (max(d.measure) if d.measure else None) for k, d in dims.items()}
    sizes = {k: v for k, v in sizes.items() if v is not None}
    # batch 2 for tracing, so that the exporter does not specialise a dynamic batch of 1
    args = example_inputs(inputs, batch=2, dims=sizes)
    in_names = [s.name for s in inputs]
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            if use_dynamo:
                made: dict[str, Any] = {}

                def dim(name: str) -> Any:
                    if name not in made:
                        spec = dims.get(name)
                        made[name] = torch.export.Dim(name, min=1, max=spec.max if spec and spec.max else None)
                    return made[name]

                dyn = tuple(
                    {i: dim(str(d)) for i, d in enumerate(s.shape) if isinstance(d, str)} or None
                    for s in inputs
                )
                torch.onnx.export(
                    module, args, str(path), input_names=in_names, output_names=output_names,
                    dynamic_shapes=dyn, dynamo=True, external_data=external, opset_version=target_opset,
                    verbose=False,
                )
            else:
                axes = {s.name: {i: str(d) for i, d in enumerate(s.shape) if isinstance(d, str)} for s in inputs}
                axes.update({n: {0: "batch"} for n in output_names})
                torch.onnx.export(
                    module, args, str(path), input_names=in_names, output_names=output_names,
                    dynamic_axes=axes, opset_version=target_opset, dynamo=False,
                )
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolchainError(f"ONNX export failed: {detail}",
                             hint="rerun with --debug; unsupported ops are named in torch's message") from e
    model = onnx.load(str(path), load_external_data=False)
    _, outs = tensor_specs(model)
    files = tuple([path] + sorted(out_dir.glob("model.onnx*.data")) + sorted(out_dir.glob("*.onnx.data")))
    files = tuple(dict.fromkeys(files))
    max_err = _check_against_torch(module, path, inputs, sizes)
    art = ModelArtifact(ModelFormat.ONNX, path, tuple(inputs), tuple(outs), files, precision="fp32",
                        details={"opset": read_opset(model)})
    record = StageRecord(
        "export_onnx",
        {"exporter": "dynamo" if use_dynamo else "torchscript", "opset": read_opset(model),
         "external_data": len(files) > 1, "dynamic_dims": sorted({str(d) for s in inputs for d in s.shape
                                                                   if isinstance(d, str)}), "torch": torch.__version__, "max_abs_diff_vs_torch": max_err},
        source_digest, art.digest, time.perf_counter() - started,
    )
    return ModelArtifact(art.format, art.path, art.inputs, art.outputs, art.files, (record,), art.precision,
                         art.details)


def _check_against_torch(module: Any, path: Path, inputs: list[TensorSpec], dims: dict[str, int]) -> float:
    """Largest absolute difference between torch and ONNX Runtime outputs on one random batch."""
    torch = require_torch()
    try:
        import onnxruntime as ort
    except ImportError:
        return float("nan")
    args = example_inputs(inputs, batch=1, dims=dims)
    with torch.no_grad():
        ref = module(*args)
    ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
    bad = next((i for i, r in enumerate(ref) if r.dtype.kind in "fc" and not np.isfinite(r).all()), None)
    if bad is not None:  # torch itself: not an export problem
        what = "NaN" if np.isnan(ref[bad]).any() else "Inf"
        raise ModelError(f"the model's outputs hold {what} (output {bad}, in PyTorch itself, on a random input of "
                         "the declared shape)",
                         hint="check the weights (torch.isfinite) and forward() for log/sqrt/division of values "
                              "that can be zero or negative")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {s.name: a.numpy() for s, a in zip(inputs, args)})
    err = max(float(np.max(np.abs(r - g))) if r.size else 0.0 for r, g in zip(ref, got))
    if not np.isfinite(err) or err > 1e-2 * max(1.0, max(float(np.max(np.abs(r))) for r in ref)):
        raise ToolchainError(f"the exported ONNX model does not reproduce torch's outputs (max abs diff {err:.3g})",
                             hint="the model may use data-dependent control flow the exporter cannot capture")
    return err


@contextlib.contextmanager
def _quiet_torch_logs():
    names = ["torch.onnx", "torch._dynamo", "torch.export", "torch._export", "torch.fx"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
