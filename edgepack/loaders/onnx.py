"""ONNX sources: read inputs, outputs and opset from the file; check them against the project."""

from __future__ import annotations

from pathlib import Path

from edgepack.artifact import ModelArtifact, ModelFormat, TensorSpec
from edgepack.errors import MissingDependencyError, ModelError

ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool", 11: "float64"}


def require_onnx():
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("onnx", "onnx", "reading ONNX models") from e
    return onnx


def tensor_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)
        return TensorSpec(v.name, dims, ONNX_DTYPES.get(t.elem_type, str(t.elem_type)))

    ins = [spec(v) for v in model.graph.input if v.name not in inits]
    return ins, [spec(v) for v in model.graph.output]


def opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def load_onnx(path: Path, declared: list[TensorSpec]) -> ModelArtifact:
    onnx = require_onnx()
    if not path.is_file():
        raise ModelError(f"model.path: {path} not found", hint="paths are relative to the project folder")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"model.path: {path.name} is not a readable ONNX file: {e}") from e
    ins, outs = tensor_specs(model)
    by_name = {s.name: s for s in ins}
    for d in declared:
        if d.name not in by_name:
            raise ModelError(f"inputs: '{d.name}' is not an input of {path.name} (it has {sorted(by_name)})")
        real = by_name[d.name]
        fixed_mismatch = len(real.shape) != len(d.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(real.shape, d.shape)
        )
        if fixed_mismatch:
            raise ModelError(f"inputs: '{d.name}' declared {d.shape_str}, {path.name} has {real.shape_str}")
        if real.dtype != d.dtype:
            raise ModelError(f"inputs: '{d.name}' declared {d.dtype}, {path.name} has {real.dtype}")
    files = [path] + [p for p in path.parent.glob(path.name + ".data")]
    return ModelArtifact(ModelFormat.ONNX, path, tuple(declared), tuple(outs), tuple(files),
                         details={"opset": opset(model)})
