"""Isolated toolchain environments: converters whose pins cannot live beside edgepack's own.

``onnx2tf`` (ONNX -> TFLite) pins TensorFlow 2.19 and numpy < 2, which the rest of edgepack (torch,
OpenVINO, ai-edge-litert) does not accept. It gets its own virtual environment, created by
``edgepack toolchain install onnx2tf`` under ``$EDGEPACK_CACHE/toolchains/onnx2tf`` (default
``~/.cache/edgepack``), and the tflite backend runs its ``onnx2tf`` command there. ``EDGEPACK_ONNX2TF``
may name another ``onnx2tf`` executable instead.

``quark`` (AMD Quark for ONNX: AdaRound learned rounding, the ``adaround`` INT8 recovery method of the
``onnx`` target) pins onnx <= 1.22, and its typing_extensions breaks litert-converter's xdsl; AdaRound
needs PyTorch. Its environment's Python runs :mod:`edgepack.stages.quark_adaround` as a script (that file
imports nothing from edgepack). ``EDGEPACK_QUARK_PYTHON`` may name another interpreter with amd-quark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

from edgepack.errors import ConfigError, MissingDependencyError, ToolchainError

CACHE_ENV = "EDGEPACK_CACHE"
ONNX2TF_ENV = "EDGEPACK_ONNX2TF"
QUARK_ENV = "EDGEPACK_QUARK_PYTHON"
TOOLCHAINS: dict[str, dict] = {
    "onnx2tf": {
        "purpose": "ONNX -> TFLite conversion for the tflite targets",
        # onnx2tf 1.29 is the last line for Python 3.11; it needs TensorFlow 2.19 and numpy 1.26
        "requirements": ["onnx2tf==1.29.*", "tensorflow==2.19.*", "tf_keras==2.19.*", "numpy<2", "onnx>=1.16",
                         "onnxruntime>=1.18", "onnx_graphsurgeon", "sng4onnx", "psutil"],
        "command": "onnx2tf", "check": ["-h"], "env": ONNX2TF_ENV, "backend": "tflite", "size": "1.5 GB",
    },
    "quark": {
        "purpose": "AMD Quark's AdaRound (learned INT8 rounding) for the onnx target's adaround recovery method",
        # amd-quark does not declare torch, but AdaRound trains with it; the CPU build, pinned like edgepack's
        "requirements": ["torch==2.13.0", "amd-quark==0.13", "onnxruntime>=1.20"],
        "command": "python", "check": ["-c", "import quark.onnx, torch"], "env": QUARK_ENV, "backend": "onnxruntime",
        "size": "1.8 GB",
    },
}


def root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "edgepack")) / "toolchains"


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown toolchain '{name}'", hint=f"known: {', '.join(TOOLCHAINS)}")


def executable(name: str) -> Path | None:
    """The toolchain's command, or None when it is not installed."""
    if name not in TOOLCHAINS:
        raise _unknown(name)
    if os.environ.get(TOOLCHAINS[name]["env"]):
        exe = Path(os.environ[TOOLCHAINS[name]["env"]])
        return exe if exe.is_file() else None
    exe = root() / name / "bin" / TOOLCHAINS[name]["command"]
    return exe if exe.is_file() else None


def require(name: str) -> Path:
    exe = executable(name)
    if exe is None:
        spec = TOOLCHAINS[name]
        raise MissingDependencyError(
            name, spec["backend"], spec["purpose"],
            hint=f"run `edgepack toolchain install {name}` once (an isolated environment under {root() / name}, "
                 f"about {spec['size']}), or set {spec['env']} to its {spec['command']} executable")
    return exe


def install(name: str, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Create (or re-create) the toolchain's environment and install its pinned requirements."""
    if name not in TOOLCHAINS:
        raise _unknown(name)
    spec = TOOLCHAINS[name]
    env = root() / name
    shutil.rmtree(env, ignore_errors=True)  # a half-made environment from an interrupted install
    env.parent.mkdir(parents=True, exist_ok=True)
    progress(f"creating {env} with {sys.executable}")
    venv.EnvBuilder(with_pip=True).create(env)
    pip = [str(env / "bin" / "python"), "-m", "pip", "install", "--quiet", *spec["requirements"]]
    progress("pip install " + " ".join(spec["requirements"]))
    proc = subprocess.run(pip, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(env, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolchainError(f"installing the {name} toolchain failed: {tail[0]}",
                             hint=f"it needs the package index (PyPI) and about {spec['size']} of disk")
    exe = env / "bin" / spec["command"]
    check = subprocess.run([str(exe), *spec["check"]], capture_output=True, text=True)
    if check.returncode != 0:
        raise ToolchainError(f"the {name} toolchain was installed but `{exe.name} {' '.join(spec['check'])}` failed: "
                             f"{(check.stderr or check.stdout).strip().splitlines()[-1:]}")
    return exe
