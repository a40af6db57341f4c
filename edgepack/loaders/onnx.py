"""ONNX sources, including files exported by other frameworks (Paddle, TensorFlow, ...): inputs,
dtypes and opset are read from the file; the project may fix sizes the file leaves dynamic.

The file is not fed to the backends as is: a normalised copy gets the resolved input shapes written
into its graph (a fixed size the project declares becomes static; a dynamic dim keeps a symbolic
name), and meaningless dims (Paddle's ``-1``, ``?``) are cleared, so that shape inference and the
quantizers see a well-formed graph. Operators outside the ONNX standard are refused by name.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from edgepack.artifact import ModelArtifact, ModelFormat, TensorSpec
from edgepack.errors import (
    ConfigError,
    MissingDependencyError,
    ModelError,
    did_you_mean,
)

ONNX_DTYPES = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 2: "uint8", 3: "int8", 9: "bool", 11: "float64"}
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
# ONNX Runtime's contrib ops: ORT runs them; other backends name them in their own error
PASSED_DOMAINS = ("com.microsoft",)
IDENT = re.compile(r"^[A-Za-z_]\w*$")
MIN_OPSET = 13


def require_onnx():
    try:
        import onnx
    except ImportError as e:
        raise MissingDependencyError("onnx", "onnx", "reading ONNX models") from e
    return onnx


def _dims(t) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim)


def tensor_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        return TensorSpec(v.name, _dims(t), ONNX_DTYPES.get(t.elem_type, str(t.elem_type)))

    ins = [spec(v) for v in model.graph.input if v.name not in inits]
    return ins, [spec(v) for v in model.graph.output]


def opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _read(path: Path):
    onnx = require_onnx()
    if not path.is_file():
        raise ModelError(f"model.path: {path} not found", hint="paths are relative to the project folder")
    if path.stat().st_size == 0:
        raise ModelError(f"model.path: {path.name} is empty (0 bytes)",
                         hint="the file was not written completely (an interrupted export, copy or download?); "
                              "export it again")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(f"model.path: {path.name} is not a readable ONNX file: {e}") from e


def unsupported_ops(model) -> list[str]:
    """Operators that are neither standard ONNX (for the file's opset) nor ONNX Runtime contrib ops."""
    onnx = require_onnx()
    versions = {o.domain or "": o.version for o in model.opset_import}
    bad: dict[tuple[str, str], list[str]] = {}
    for node in model.graph.node:
        dom = node.domain or ""
        if dom in PASSED_DOMAINS:
            continue
        known = False
        if dom in STANDARD_DOMAINS:
            try:
                onnx.defs.get_schema(node.op_type, versions.get(dom, versions.get("", 21)), dom)
                known = True
            except Exception:  # noqa: BLE001 - onnx raises SchemaError
                known = False
        if not known:
            bad.setdefault((node.op_type, dom), []).append(node.name or "(unnamed)")
    return [f"{op} (domain '{dom or 'ai.onnx'}', nodes: {', '.join(n[:3])}{', ...' if len(n) > 3 else ''})"
            for (op, dom), n in sorted(bad.items())]


def interface(path: Path, declared: list[TensorSpec] | None, dtypes_declared: dict[str, bool] | None = None
              ) -> list[TensorSpec]:
    """The model's inputs: the file's, checked against (and completed by) what the project declares.

    Without declared inputs, a dynamic first dim becomes ``batch`` and a dynamic dim with an identifier
    name keeps it; any other dynamic dim needs a size from the project (``inputs``)."""
    model = _read(path)
    ins, _ = tensor_specs(model)
    by_name = {s.name: s for s in ins}
    if declared is None:
        out = []
        for s in ins:
            shape = []
            for i, d in enumerate(s.shape):
                if isinstance(d, int) and d > 0:
                    shape.append(d)
                elif i == 0:
                    shape.append("batch")
                elif isinstance(d, str) and IDENT.match(d):
                    shape.append(d)
                else:
                    raise ModelError(
                        f"model.path: input '{s.name}' of {path.name} has a dynamic dim {i} ({d!r}) without a usable "
                        f"name, shape {s.shape_str}",
                        hint=f"declare it in `inputs`, e.g. {{name: {s.name}, shape: [batch, ...sizes...]}} with a "
                             "size or a symbolic name for each dim")
            out.append(TensorSpec(s.name, tuple(shape), s.dtype))
        return out
    names = [d.name for d in declared]
    missing = [n for n in by_name if n not in names]
    if missing:
        raise ModelError(f"inputs: {path.name} also takes {missing}; declare every input (or none: they are "
                         "read from the file)")
    out = []
    for d in declared:
        if d.name not in by_name:
            raise ModelError(f"inputs: '{d.name}' is not an input of {path.name} (it has {sorted(by_name)})")
        real = by_name[d.name]
        fixed_mismatch = len(real.shape) != len(d.shape) or any(
            isinstance(a, int) and a > 0 and isinstance(b, int) and a != b for a, b in zip(real.shape, d.shape)
        )
        if fixed_mismatch:
            raise ModelError(f"inputs: '{d.name}' declared {d.shape_str}, {path.name} has {real.shape_str}")
        dtype = d.dtype if (dtypes_declared or {}).get(d.name, True) else real.dtype
        if dtype != real.dtype:
            raise ModelError(f"inputs: '{d.name}' declared {dtype}, {path.name} has {real.dtype}",
                             hint="omit dtype to take the file's")
        out.append(TensorSpec(d.name, d.shape, dtype))
    return out


def check_outputs(path: Path, declared: list[str] | None, where: Path) -> None:
    """The project's ``outputs`` must be the file's outputs, in the file's order (a subset or another
    order would need the graph cut or rewired; it is refused rather than silently ignored)."""
    if declared is None:
        return
    _, outs = tensor_specs(_read(path))
    names = [o.name for o in outs]
    if list(declared) == names:
        return
    unknown = [n for n in declared if n not in names]
    if unknown:
        raise ConfigError(f"{where}: key 'outputs': {unknown[0]!r} is not an output of {path.name} "
                          f"(its outputs: {', '.join(names)})",
                          hint=f"{did_you_mean(unknown[0], names)}; or omit outputs: they are read from the file")
    raise ConfigError(f"{where}: key 'outputs' lists {declared}, but {path.name} has the outputs {names}: edgepack "
                      "keeps every output of an ONNX file, in the file's order",
                      hint=f"write outputs: [{', '.join(names)}], or omit outputs: they are read from the file")


def load_onnx(path: Path, declared: list[TensorSpec], workdir: Path) -> tuple[ModelArtifact, dict]:
    """A normalised copy of ``path`` in ``workdir`` with ``declared`` (resolved) input shapes, and what
    was read and changed (for the lineage)."""
    onnx = require_onnx()
    model = _read(path)
    file_opset = opset(model)
    bad = unsupported_ops(model)
    if bad:
        raise ModelError(f"model.path: {path.name} uses operators outside the ONNX standard that the backends "
                         f"cannot run: {'; '.join(bad)}",
                         hint="re-export without custom operators, or replace them with standard ONNX ops")
    _check_initializers(model, path)
    file_ins, file_outs = tensor_specs(model)
    by_name = {v.name: v for v in model.graph.input}
    changed = {}
    for spec in declared:
        dims = by_name[spec.name].type.tensor_type.shape.dim
        before = _dims(by_name[spec.name].type.tensor_type)
        for d, want in zip(dims, spec.shape):
            if isinstance(want, int):
                d.Clear()
                d.dim_value = want
            else:
                d.Clear()
                d.dim_param = want
        if before != tuple(spec.shape):
            changed[spec.name] = {"file": list(before), "now": list(spec.shape)}
    for i, v in enumerate(model.graph.output):
        for j, d in enumerate(v.type.tensor_type.shape.dim):
            if (d.HasField("dim_value") and d.dim_value <= 0) or (d.HasField("dim_param") and not IDENT.match(d.dim_param)):
                d.Clear()
                d.dim_param = "batch" if j == 0 else f"{_ident(v.name)}_dim{j}"
    if any(d.HasField("dim_value") and d.dim_value < 0 for v in model.graph.value_info
           for d in v.type.tensor_type.shape.dim):
        del model.graph.value_info[:]
    converted = None
    if opset(model) < MIN_OPSET and not any(t.external_data for t in model.graph.initializer):
        # per-channel Q/DQ (an ``axis`` on DequantizeLinear) needs opset 13: upgrade older files
        try:
            up = onnx.version_converter.convert_version(model, MIN_OPSET)
            onnx.checker.check_model(up)
            converted, model = {"from": opset(model), "to": MIN_OPSET, "tool": "onnx.version_converter"}, up
        except Exception as e:  # noqa: BLE001 - the converter raises many kinds
            converted = {"from": opset(model), "to": None, "failed": str(e).splitlines()[0] if str(e) else type(e).__name__}
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "model.onnx"
    onnx.save(model, str(out))
    files = [out]
    for loc in sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}):
        src = path.parent / loc
        if not src.is_file():
            raise ModelError(f"model.path: {path.name} keeps weights in '{loc}', which is not beside it",
                             hint="copy the external-data file next to the .onnx file")
        dst = workdir / loc
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        files.append(dst)
    _, outs = tensor_specs(model)
    info = {"opset": opset(model), "opset_in_file": file_opset, "producer": f"{model.producer_name} {model.producer_version}".strip(),
            "inputs_in_file": [s.to_json() for s in file_ins], "outputs_in_file": [s.to_json() for s in file_outs],
            "input_shapes_set": changed, "external_data": len(files) > 1, "opset_upgrade": converted}
    art = ModelArtifact(ModelFormat.ONNX, out, tuple(declared), tuple(outs), tuple(files),
                        details={"opset": opset(model)})
    return art, info


def _check_initializers(model, path: Path) -> None:
    """Refuse NaN in the file's (embedded) float weights. Inf is allowed: graphs carry -inf masks and
    clip bounds as constants."""
    import numpy as np
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.data_location == 1 or t.data_type not in (1, 10, 11, 16):  # external data; non-float
            continue
        if np.isnan(numpy_helper.to_array(t)).any():
            raise ModelError(f"model.path: the model's weights hold NaN (tensor {t.name} of {path.name})",
                             hint="the weights were saved from a diverged training run or corrupted; export the "
                                  "model again from a good checkpoint")


def _ident(name: str) -> str:
    s = re.sub(r"\W", "_", name)
    return s if IDENT.match(s) else f"out_{s}"
