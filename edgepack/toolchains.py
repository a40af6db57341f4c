"""Isolated toolchain environments: converters whose pins cannot live beside edgepack's own.

``onnx2tf`` (ONNX -> TFLite) pins TensorFlow 2.19 and numpy < 2, which the rest of edgepack (torch,
OpenVINO, ai-edge-litert) does not accept. It gets its own virtual environment, created by
``edgepack toolchain install onnx2tf`` under ``$EDGEPACK_CACHE/toolchains/onnx2tf`` (default
``~/.cache/edgepack``), and the tflite backend runs its ``onnx2tf`` command there. ``EDGEPACK_ONNX2TF``
may name another ``onnx2tf`` executable instead.
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
TOOLCHAINS: dict[str, dict] = {
    "onnx2tf": {
        "purpose": "ONNX -> TFLite conversion for the tflite targets",
        # onnx2tf 1.29 is the last line for Python 3.11; it needs TensorFlow 2.19 and numpy 1.26
        "requirements": ["onnx2tf==1.29.*", "tensorflow==2.19.*", "tf_keras==2.19.*", "numpy<2", "onnx>=1.16",
                         "onnxruntime>=1.18", "onnx_graphsurgeon", "sng4onnx", "psutil"],
        "command": "onnx2tf",
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
    if name == "onnx2tf" and os.environ.get(ONNX2TF_ENV):
        exe = Path(os.environ[ONNX2TF_ENV])
        return exe if exe.is_file() else None
    exe = root() / name / "bin" / TOOLCHAINS[name]["command"]
    return exe if exe.is_file() else None


def require(name: str) -> Path:
    exe = executable(name)
    if exe is None:
        raise MissingDependencyError(
            name, "tflite", TOOLCHAINS[name]["purpose"],
            hint=f"run `edgepack toolchain install {name}` once (an isolated environment under {root() / name}, "
                 f"about 1.5 GB), or set {ONNX2TF_ENV} to an onnx2tf executable")
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
                             hint="it needs the package index (PyPI) and about 1.5 GB of disk")
    exe = env / "bin" / spec["command"]
    check = subprocess.run([str(exe), "-h"], capture_output=True, text=True)
    if check.returncode != 0:
        raise ToolchainError(f"the {name} toolchain was installed but `{exe.name} -h` failed: "
                             f"{(check.stderr or check.stdout).strip().splitlines()[-1:]}")
    return exe
