"""A test-only edgepack backend, made the way a third party makes one: its own package, its own
format name, its own profile (``targets/fake-box.yaml`` beside this package) and one entry point (in
``edgepack_fake-0.1.dist-info/entry_points.txt``, what ``pip install`` would write). Nothing in
edgepack names it.

It wraps ONNX Runtime at FP32: ``compile`` copies the exported ONNX under its own format name
(``fake-onnx``), ``load`` runs it in an ONNX Runtime session. Put ``tests/fake_backend`` on
``sys.path`` (or ``PYTHONPATH``) and ``edgepack build --target fake-box --targets-dir
tests/fake_backend/targets`` uses it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, Field

from edgepack.artifact import ModelArtifact
from edgepack.backends.base import Backend, manifest_field

FORMAT = "fake-onnx"
# set by tests: a problem check_host reports, to see `install` refuse the bundle because of it
HOST_PROBLEM_ENV = "EDGEPACK_FAKE_HOST_PROBLEM"


class FakeRunner:
    """The Runner protocol at its smallest: ``input_names`` and ``run``."""

    def __init__(self, ort: Any, path: Path, threads: int):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class FakeBackend(Backend):
    name: ClassVar[str] = "fake"
    produces: ClassVar[str] = FORMAT
    extra: ClassVar[str] = "onnx"
    runtime_package: ClassVar[str] = "onnxruntime"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    packages: ClassVar[tuple[str, ...]] = ("edgepack-fake", "onnxruntime")

    class Options(Backend.Options):
        file_name: str = Field(default="model.fake.onnx", pattern=r"^[a-z0-9_.-]+\.onnx$",
                               description="the compiled file's name")

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        ort = self._import("onnxruntime", "ONNX Runtime (the fake backend's runtime)")
        return {"onnxruntime": ort.__version__}

    def compile(self, model: ModelArtifact, target: Any, options: BaseModel, calibration: Any,
                workdir: Path) -> ModelArtifact:
        started = time.perf_counter()
        workdir.mkdir(parents=True, exist_ok=True)
        out = workdir / options.file_name
        shutil.copyfile(model.path, out)  # the tests' models keep their weights inside the graph
        return model.derive("compile", {"backend": self.name, "precision": "fp32", "format": FORMAT}, started,
                            format=FORMAT, path=out, files=(out,), precision="fp32")

    def load(self, path: Path, threads: int) -> FakeRunner:
        return FakeRunner(self._import("onnxruntime", "ONNX Runtime"), path, threads)

    def describe_conversion(self, manifest: Any) -> list[str]:
        return [f"copied as {manifest_field(manifest, 'runtime')['format']}, no conversion"]

    def check_host(self, manifest: Any, host: Any) -> list[str]:
        problem = os.environ.get(HOST_PROBLEM_ENV)
        return [problem] if problem else []
