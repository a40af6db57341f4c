"""The LiteRT (TFLite) runtime side: the interpreter, the runner that applies ``io.json`` (layout and
quantization of every input and output), and helpers that read a ``.tflite``'s signature. What a
device needs to run a TFLite bundle; the converter side is :mod:`edgepack.backends.tflite`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgepack.errors import ConfigError, MissingDependencyError

IO_FILE = "io.json"
SIGNATURE = "serving_default"


def interpreter_module() -> Any:
    """ai-edge-litert's interpreter, else tflite-runtime's (both have the same Interpreter API)."""
    import importlib

    for name in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("ai-edge-litert", "tflite", "the LiteRT interpreter",
                                 hint="pip install ai-edge-litert (or tflite-runtime) on the device; "
                                      "pip install 'edgepack[tflite]' to build")


def _quantize(x: np.ndarray, q: dict[str, Any]) -> np.ndarray:
    info = np.iinfo(q["dtype"])
    return np.clip(np.round(x / q["scale"] + q["zero_point"]), info.min, info.max).astype(q["dtype"])


class TFLiteRunner:
    """Feeds the project's layout in float; quantizes, transposes and dequantizes as io.json says."""

    def __init__(self, interp_mod: Any, path: Path, threads: int, delegates: bool = True):
        io_file = path.parent / IO_FILE
        if not io_file.is_file():
            raise ConfigError(f"{path.name}: {IO_FILE} is missing beside it",
                              hint="the tensor layout and quantization of the model come from that file")
        self.io = json.loads(io_file.read_text())
        kwargs: dict[str, Any] = {"model_path": str(path), "num_threads": threads}
        if not delegates:
            kwargs["experimental_op_resolver_type"] = interp_mod.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        with captured(Path(os.devnull)):  # the runtime announces its XNNPACK delegate on stderr
            self.interpreter = interp_mod.Interpreter(**kwargs)
            self.runner = self.interpreter.get_signature_runner(self.io.get("signature", SIGNATURE))
        self.input_names = [i["name"] for i in self.io["inputs"]]
        self._ran = False

    def prepare(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The project's tensors in the model's own layout and dtype (what device code feeds)."""
        args = {}
        for spec in self.io["inputs"]:
            x = np.asarray(feeds[spec["name"]])
            if spec.get("permute"):
                x = np.transpose(x, spec["permute"])
            q = spec.get("quantization")
            args[spec["tflite_name"]] = _quantize(x, q) if q else np.ascontiguousarray(x, dtype=spec["dtype"])
        return args

    def invoke(self, prepared: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._ran:  # the delegate is applied, and announced on stderr, at the first call
            self._ran = True
            with captured(Path(os.devnull)):
                return self.runner(**prepared)
        return self.runner(**prepared)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        got = self.invoke(self.prepare(feeds))
        outs = []
        for spec in self.io["outputs"]:
            y = got[spec["tflite_name"]]
            q = spec.get("quantization")
            outs.append((y.astype(np.float32) - q["zero_point"]) * np.float32(q["scale"]) if q else y)
        return outs


def _arg_index(name: str) -> int:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else 0


def matched(details: dict[str, Any], names: list[str]) -> list[str]:
    """The signature's tensor names in the order of ``names``: by name when the converter kept the
    model's names (onnx2tf), else by position (litert-torch's args_0, args_1, ...)."""
    if all(n in details for n in names):
        return list(names)
    return sorted(details, key=_arg_index)


def signature_inputs(path: Path, names: list[str]) -> list[str]:
    interp = interpreter_module().Interpreter(model_path=str(path))
    return matched(interp.get_signature_runner(SIGNATURE).get_input_details(), names)


@contextlib.contextmanager
def captured(log: Path):
    """Send the converters' prints (Python and C++ level) to the build log instead of the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log, "ab") as f:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stdout(sys.__stdout__), contextlib.redirect_stderr(sys.__stderr__):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
