"""The litert-torch conversion, run in its own process by the tflite backend.

litert-torch imports JAX and torchao (threads, CUDA probes, console noise) and its MLIR passes can
abort the process on a model they cannot handle; in a child process neither reaches the build.

    python -m edgepack.backends.tflite_convert PROGRAM.pt2 OUT.tflite LAYOUTS_JSON RESULT_JSON

LAYOUTS_JSON: one entry per input, a permutation (``[0, 2, 3, 1]``: NCHW in PyTorch, NHWC in the
.tflite) or null. RESULT_JSON gets ``{"ok": true}`` or ``{"ok": false, "error": "..."}``.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
import warnings
from pathlib import Path


def problem(e: BaseException) -> str:
    """The converter's own words, reduced to the line that names the op or layer."""
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    named = [ln for ln in lines if re.search(r"aten\.|tfl\.|node|op |operator|layer", ln, re.I)]
    return (named or lines or [type(e).__name__])[0][:400]


def convert(program: Path, dst: Path, layouts: list[list[int] | None]) -> None:
    import torch

    import litert_torch

    module = torch.export.load(str(program)).module()
    specs = [(tuple(p.shape), p.dtype) for p in _placeholders(program)]
    args = [torch.zeros(shape, dtype=dtype) for shape, dtype in specs]
    nhwc = [i for i, p in enumerate(layouts) if p]
    if nhwc:
        module = litert_torch.to_channel_last_io(module, args=nhwc)
        args = [a.permute(*p).contiguous() if p else a for a, p in zip(args, layouts)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        litert_torch.convert(module, tuple(args)).export(str(dst))


def _placeholders(program: Path):
    import torch

    ep = torch.export.load(str(program))
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [nodes[n].meta["val"] for n in names]


def layers_using(program: Path, message: str) -> list[str]:
    """The model's layers (module paths and types) whose graph nodes call the aten op a message names."""
    import torch

    m = re.search(r"aten\.(\w+)(?:\.(\w+))?", message)
    if not m:
        return []
    name = m.group(1)
    found = []
    for node in torch.export.load(str(program)).graph.nodes:
        target = str(node.target).split(".")
        # the exported graph may hold an alias the converter decomposed (special_erfinv -> erfinv)
        if node.op == "call_function" and len(target) > 1 and target[0] == "aten" and \
                (target[1] == name or target[1].endswith("_" + name)):
            stack = node.meta.get("nn_module_stack") or {}
            path, kind = list(stack.values())[-1] if stack else (node.name, "")
            name = getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))
            found.append(f"{path or '(top level)'} ({name})" if name else path)
    return list(dict.fromkeys(found))


def main(argv: list[str]) -> int:
    program, dst, layouts, result = Path(argv[0]), Path(argv[1]), json.loads(argv[2]), Path(argv[3])
    try:
        convert(program, dst, layouts)
        result.write_text(json.dumps({"ok": True}))
        return 0
    except BaseException as e:  # report every failure, including the converter's own exits
        traceback.print_exc()
        message = problem(e)
        try:
            layers = layers_using(program, message)
        except Exception:  # naming the layer is a courtesy; the converter's message stands alone
            layers = []
        if layers:
            message += f" in layer {', '.join(layers[:3])}" + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        result.write_text(json.dumps({"ok": False, "error": message}))
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
