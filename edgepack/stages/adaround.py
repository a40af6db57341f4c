"""Learned rounding (AdaRound) through AMD Quark in its own environment: the ``adaround`` INT8 recovery
method of the ``onnx`` and Jetson targets, and the rewrites its QDQ output needs (layers kept in float,
TensorRT's explicit-quantization form). Quark itself runs as a script (:mod:`edgepack.stages.quark_adaround`)
with the ``quark`` toolchain's Python."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from edgepack.errors import ToolchainError
from edgepack.stages.quantize_qdq import needs_external_data

# AdaRound (the ``adaround`` recovery method): samples it trains on, iterations per layer, and a time bound.
# EfficientNet-Lite0 (measured): the first 64 calibration crops (Quark's activation ranges and the rounding
# both from them) and 50 iterations gave 93.0% top-1 agreement in 113-120 s; all 300 crops 93.5% in 483-581 s
# and an 8.5 GB peak. With ranges from all 300 crops, rounding trained on 64: 90.0%; on 128: 89.0%.
ADAROUND_SAMPLES = 64
ADAROUND_ITERATIONS = 50
ADAROUND_TIMEOUT_S = 1200.0


class AdaRoundOptions(BaseModel):
    """The adaround recipe's backend options (the ``onnx`` and Jetson targets)."""

    adaround_samples: int = Field(default=ADAROUND_SAMPLES, ge=1, le=10_000)
    adaround_iterations: int = Field(default=ADAROUND_ITERATIONS, ge=1, le=100_000)
    adaround_timeout_s: float = Field(default=ADAROUND_TIMEOUT_S, gt=0, le=86_400)


def quantize_adaround(src: Path, out: Path, calibration: Any, workdir: Path, *, activation_type: str = "uint8",
                      symmetric_activations: bool = False, per_channel: bool = True, method: str = "minmax",
                      exclude: list[str] | None = None, samples: int = ADAROUND_SAMPLES,
                      iterations: int = ADAROUND_ITERATIONS, timeout_s: float = ADAROUND_TIMEOUT_S) -> dict[str, Any]:
    """INT8 QDQ ONNX with AdaRound's learned weight rounding, through AMD Quark in its own environment
    (the ``quark`` toolchain; :mod:`edgepack.stages.quark_adaround` is the script it runs). The first
    ``samples`` calibration samples train the rounding, ``iterations`` steps per layer; the run is stopped
    after ``timeout_s``. ``exclude`` names nodes kept in float. Returns what was set."""
    import json
    import subprocess
    import time

    import numpy as np

    from edgepack import toolchains

    python = toolchains.executable("quark")
    if python is None:  # a ToolchainError, not a missing dependency: the search goes on without this method
        raise ToolchainError("the adaround recipe needs the quark toolchain (AMD Quark), which is not installed",
                             hint=f"run `edgepack toolchain install quark` once (about {toolchains.TOOLCHAINS['quark']['size']}), "
                                  f"or set {toolchains.QUARK_ENV} to a Python with amd-quark and torch")
    if needs_external_data(src):
        raise ToolchainError("the adaround recipe does not take models over 2 GB (Quark loads the model into one "
                             "protobuf)")
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "adaround-calibration.npz"
    first = [s for _, s in zip(range(samples), calibration)]  # only the samples AdaRound trains on
    np.savez(data, **{k: np.concatenate([np.asarray(s[k]) for s in first]) for k in first[0]})
    cmd = [str(python), str(Path(__file__).with_name("quark_adaround.py")), str(src), str(data), str(out),
           "--iterations", str(iterations), "--samples", str(samples), "--activations", activation_type,
           "--method", method]
    cmd += ["--symmetric-activations"] * symmetric_activations + ["--per-tensor-weights"] * (not per_channel)
    if exclude:  # honoured, but the search does not combine adaround with float layers (tuning.ALL_INT8_ONLY)
        cmd += ["--exclude", *exclude]
    log = workdir / "quark.log"
    t0 = time.perf_counter()
    try:
        with log.open("w") as fh:  # Quark logs every layer: kept in a file, not on the build's console
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout_s,
                                  cwd=workdir, check=False)
    except subprocess.TimeoutExpired as e:
        out.unlink(missing_ok=True)
        raise ToolchainError(f"AdaRound (AMD Quark) did not finish within {timeout_s:g} s",
                             hint=f"fewer samples or iterations (backend option adaround_samples, "
                                  f"adaround_iterations); its log is kept in {log}") from e
    finally:
        data.unlink(missing_ok=True)
    with log.open("a") as fh:
        fh.write(proc.stdout)
    result = next((json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{")), None)
    if proc.returncode != 0 or result is None or not out.is_file():
        out.unlink(missing_ok=True)
        tail = (log.read_text().strip().splitlines() or ["no output"])[-1]
        raise ToolchainError(f"AdaRound (AMD Quark) failed: {tail}", hint=f"its log is kept in {log}")
    return {"tool": "AMD Quark AdaRound (quark.onnx, the quark toolchain)", "adaround_samples": result["samples"],
            "adaround_iterations": result["iterations"], "adaround_learning_rate": result["learning_rate"],
            "adaround_seed": result["seed"], "adaround_seconds": round(time.perf_counter() - t0, 1)}


def dedicate_qdq(path: Path) -> dict[str, int]:
    """Ready a QDQ model from another quantizer for TensorRT's explicit quantization: each
    DequantizeLinear feeds one consumer (TensorRT cannot share one Q/DQ pair between consumers, what
    ONNX Runtime's ``DedicatedQDQPair`` does for its own output: the extra consumers get a copy); int32
    biases behind a DequantizeLinear become float initializers again (TensorRT dequantizes 8-bit and
    narrower types only, and folds a float bias into its INT8 kernel, what ``QuantizeBias: False`` gives
    with ONNX Runtime); nodes whose outputs nothing reads are dropped. Rewrites ``path``; returns how many
    nodes were copied, folded and dropped."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    copied = dropped = folded = 0
    inits = {t.name: t for t in graph.initializer}
    for n in list(graph.node):  # int32 (bias) DequantizeLinear of a constant -> the float constant itself
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits or any(i not in inits for i in n.input[1:]):
            continue
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype != np.int32:
            continue
        scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[n.input[2]]).astype(np.int64) if len(n.input) > 2 else np.int64(0)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim and q.ndim:
            shape[axis % q.ndim] = -1
        value = ((q.astype(np.int64) - zp.reshape(shape if zp.ndim else ())) * scale.reshape(shape if scale.ndim else ()))
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), n.output[0]))
        graph.node.remove(n)
        folded += 1
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    nodes = []
    for n in graph.node:
        nodes.append(n)
        users = readers.get(n.output[0], []) if n.op_type == "DequantizeLinear" else []
        for k, user in enumerate(users[1:], start=1):
            twin = onnx.NodeProto()
            twin.CopyFrom(n)
            twin.name, twin.output[0] = f"{n.name}_{k}", f"{n.output[0]}_{k}"
            user.input[:] = [twin.output[0] if i == n.output[0] else i for i in user.input]
            nodes.append(twin)
            copied += 1
    outputs = {o.name for o in graph.output}
    while True:  # drop nodes nothing reads, until none is left (a dropped DQ may leave its Q unread)
        read = {i for n in nodes for i in n.input} | outputs
        keep = [n for n in nodes if any(o in read for o in n.output)]
        if len(keep) == len(nodes):
            break
        dropped += len(nodes) - len(keep)
        nodes = keep
    used = {i for n in nodes for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {"dq_copied": copied, "int32_biases_folded": folded, "unread_nodes_dropped": dropped}
