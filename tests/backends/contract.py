"""The contract every backend passes: compile a tiny model, load it, run it, match the ONNX Runtime
FP32 reference within the stated tolerance; reject bad options; missing toolchain -> MissingDependencyError.

A backend's test module subclasses :class:`BackendContract` and sets ``backend_name`` and ``target``
(a profile name, or the path of a profile the backend ships with its tests). Precisions the backend does
not offer are skipped.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from edgepack.artifact import FORMAT_NAME, ModelArtifact, TensorSpec
from edgepack.backends import get_backend
from edgepack.calibration.reader import SampleSet
from edgepack.errors import ConfigError, MissingDependencyError
from edgepack.target import load_target


def tiny_onnx(folder: Path) -> ModelArtifact:
    """A small conv net exported to ONNX, with its input spec."""
    import torch

    from edgepack.stages.export_onnx import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).eval()
    spec = TensorSpec("x", ("batch", 3, 16, 16), "float32")
    return export(net, [spec], ["y"], folder)


def samples(n: int, seed: int = 0) -> SampleSet:
    rng = np.random.default_rng(seed)
    return SampleSet([{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(n)], None, "random")


class BackendContract:
    backend_name: str
    target: str
    runtime_module: str
    int8_atol: float = 0.25  # relative to the output range
    bad_options: dict = {"no_such_option": 1}

    @pytest.fixture(scope="class")
    def exported(self, tmp_path_factory) -> ModelArtifact:
        return tiny_onnx(tmp_path_factory.mktemp("tiny"))

    def reference(self, art: ModelArtifact, data: SampleSet) -> list[np.ndarray]:
        ref = get_backend("onnxruntime").load(art.path, 1)
        return [ref.run(s)[0] for s in data]

    def _compile(self, art: ModelArtifact, tmp_path: Path, precision: str) -> ModelArtifact:
        backend = get_backend(self.backend_name)
        profile = load_target(self.target).model_copy(update={"precision": precision})
        options = backend.options(profile.backend_options, "test")
        return backend.compile(art, profile, options, samples(64), tmp_path / precision)

    def test_declares_itself(self):
        backend = get_backend(self.backend_name)
        assert backend.name == self.backend_name
        assert isinstance(backend.produces, str) and FORMAT_NAME.match(backend.produces), backend.produces
        assert backend.extra and backend.runtime_package and backend.precisions
        assert all(isinstance(p, str) for p in backend.packages)
        env = backend.check_environment(compile=True)
        assert env
        versions = backend.versions(compile=True)  # what the manifest's toolchain record gets
        assert set(env) <= set(versions) and all(isinstance(v, str) for v in versions.values())

    @pytest.mark.parametrize("precision", ["fp32", "int8"])
    def test_compiles_loads_runs_and_matches_the_fp32_reference(self, exported, tmp_path, precision):
        backend = get_backend(self.backend_name)
        if precision not in backend.precisions:
            pytest.skip(f"backend '{backend.name}' offers {', '.join(backend.precisions)}")
        compiled = self._compile(exported, tmp_path, precision)
        assert compiled.format == backend.produces and compiled.precision == precision
        assert all(p.is_file() for p in compiled.all_files)
        assert compiled.lineage[-1].name == "compile"
        runner = backend.load(compiled.path, 1)
        data = samples(20, seed=1)
        ref = self.reference(exported, data)
        got = [runner.run(s)[0] for s in data]
        span = max(float(np.abs(r).max()) for r in ref)
        err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
        tol = 1e-4 * max(1.0, span) if precision == "fp32" else self.int8_atol * span
        assert err <= tol, f"{precision}: max abs diff {err} > {tol}"
        if precision == "int8":
            assert err > 0, "an INT8 model that matches FP32 bit for bit was not quantized"

    def test_prepared_inputs_give_the_outputs_of_run(self, exported, tmp_path):
        """Latency times ``invoke`` on inputs ``prepare`` bound once: it must compute what ``run`` does."""
        backend = get_backend(self.backend_name)
        runner = backend.load(self._compile(exported, tmp_path, "fp32").path, 1)
        if not hasattr(runner, "prepare"):
            pytest.skip("this runner times run() itself")
        for s in samples(3, seed=2):
            want = runner.run(s)
            got = runner.invoke(runner.prepare(s))
            got = list(got.values()) if isinstance(got, dict) else got
            for g, w in zip(got, want):
                np.testing.assert_allclose(np.asarray(g.numpy() if hasattr(g, "numpy") else g), w, rtol=1e-5, atol=1e-6)

    def test_rejects_unknown_options(self):
        backend = get_backend(self.backend_name)
        with pytest.raises(ConfigError, match="unknown backend option"):
            backend.options(self.bad_options, "profile.yaml: backend_options")

    def test_missing_toolchain_raises_missing_dependency(self, monkeypatch):
        real = importlib.import_module
        root = self.runtime_module

        def fake(name, *args):
            if name == root or name.startswith(root + "."):
                raise ImportError(f"No module named '{name}'")
            return real(name, *args)

        monkeypatch.setattr(importlib, "import_module", fake)
        backend = get_backend(self.backend_name)
        with pytest.raises(MissingDependencyError) as info:
            backend.check_environment()
        assert f"edgepack[{backend.extra}]" in info.value.hint
