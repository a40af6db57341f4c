"""A backend from outside edgepack: ``tests/fake_backend`` holds its package (``edgepack_fake``), its
profile (``targets/fake-box.yaml``) and the record pip would write (``edgepack_fake-0.1.dist-info``
with its one entry point). Put on PYTHONPATH, it builds, validates, compares and installs through the
real CLI, and nothing in ``edgepack/`` names it: a new backend is its module, its profiles, its
contract test and an entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tests.backends.contract import BackendContract

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fake_backend"
TARGETS = FAKE / "targets"


def fake_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE), env.get("PYTHONPATH")) if p)
    env.pop("EDGEPACK_TARGETS_PATH", None)
    return env


def edgepack(*args, **extra_env: str) -> subprocess.CompletedProcess:
    """The real CLI in its own process, with the fake backend importable (bounded work on a tiny model)."""
    return subprocess.run([sys.executable, "-m", "edgepack.cli.main", *map(str, args)], cwd=REPO,
                          env=fake_env(**extra_env), capture_output=True, text=True)


@pytest.fixture
def on_path(monkeypatch):
    """The fake backend importable and registered in this process, for one test."""
    monkeypatch.syspath_prepend(str(FAKE))


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory) -> Path:
    """An ONNX file made in code (MatMul, Relu, MatMul) with npz calibration and evaluation data."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    root = tmp_path_factory.mktemp("fake-project")
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(root / "tiny.onnx"))
    (root / "data").mkdir()
    for name, n in (("calib", 120), ("eval", 40)):
        np.savez(root / "data" / f"{name}.npz", x=rng.normal(size=(n, 8)).astype(np.float32))
    (root / "edgepack.yaml").write_text("name: tiny\nversion: 0.1.0\nmodel: {path: tiny.onnx}\n"
                                        "calibration: {source: data/calib.npz}\nevaluation: {source: data/eval.npz}\n")
    return root


@pytest.fixture(scope="module")
def built(tiny_project) -> tuple[Path, dict]:
    """`edgepack build --target fake-box --targets-dir tests/fake_backend/targets`: (bundle, manifest)."""
    proc = edgepack("build", "--project", tiny_project, "--target", "fake-box", "--targets-dir", TARGETS,
                    "--out", tiny_project / "dist", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    (head,) = json.loads(proc.stdout)
    assert head["target"] == "fake-box" and head["backend"] == "fake" and head["acceptance_passed"]
    bundle = Path(head["bundle"])
    with tarfile.open(bundle) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    return bundle, manifest


# --- the fake backend is a backend: the shared contract ------------------------------------------

@pytest.mark.usefixtures("on_path")
class TestFakeBackendContract(BackendContract):
    backend_name = "fake"
    target = str(TARGETS / "fake-box.yaml")
    runtime_module = "onnxruntime"
    bad_options = {"file_nmae": "x.onnx"}


def test_registered_by_its_entry_point_alone(on_path):
    from importlib.metadata import version

    from edgepack.backends import get_backend, registered_backends

    assert registered_backends()["fake"] == "edgepack_fake:FakeBackend"
    backend = get_backend("fake")
    assert backend.produces == "fake-onnx" and backend.precisions == ("fp32",)
    assert version("edgepack-fake") == "0.1" and backend.versions()["edgepack-fake"] == "0.1"


def test_not_registered_without_its_distribution():
    from edgepack.backends import registered_backends

    assert "fake" not in registered_backends()


# --- through the real CLI -------------------------------------------------------------------------

def test_build_records_the_backend_and_its_own_format(built):
    bundle, m = built
    assert bundle.name == "tiny-0.1.0-fake-box.edgepack"
    assert m["runtime"]["backend"] == "fake" and m["runtime"]["format"] == "fake-onnx"
    assert m["runtime"]["precision"] == "fp32" and m["runtime"]["model_file"] == "model/model.fake.onnx"
    compile_stage = next(s for s in m["stages"] if s["name"] == "compile")
    assert compile_stage["config"] == {"backend": "fake", "precision": "fp32", "format": "fake-onnx"}
    assert m["measurements"]["compiled"]["accuracy"]["value"] == pytest.approx(100.0)


def test_build_records_the_fake_package_version_in_the_toolchain(built):
    _, m = built
    assert m["toolchain"]["edgepack-fake"] == "0.1"  # FakeBackend.packages, through Backend.versions()
    assert m["toolchain"]["onnxruntime"]


def test_validate_runs_the_bundle_on_the_fake_runtime(built, tmp_path):
    bundle, _ = built
    proc = edgepack("validate", bundle, "--runs", "3", "--report", tmp_path / "report.json", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["target"] == "fake-box"
    assert report["golden"]["within_tolerance"] == 1.0


def test_inspect_shows_the_format(built):
    bundle, _ = built
    proc = edgepack("inspect", bundle)
    assert proc.returncode == 0, proc.stderr
    assert "fake fp32 fake-onnx" in proc.stdout


def test_compare_reuses_the_bundle_and_measures_accuracy(built, tiny_project):
    bundle, _ = built
    proc = edgepack("compare", "--project", tiny_project, "--targets", "fake-box", "--targets-dir", TARGETS,
                    "--out", bundle.parent, "--format", "json", "--quiet", "--calibration-suite", "quick")
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)["rows"]
    assert row["target"] == "fake-box" and row["backend"] == "fake" and row["precision"] == "fp32"
    assert row["accuracy"]["value"] == pytest.approx(100.0) and row["accuracy"]["source"].startswith("measured")


def test_install_validates_on_this_host_and_asks_the_backend_first(built, tmp_path):
    bundle, _ = built
    root = tmp_path / "device"
    proc = edgepack("install", bundle, "--root", root, "--allow-unsigned", "--runs", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = edgepack("status", "--root", root, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    active = json.loads(proc.stdout)["active"]
    assert active["target"] == "fake-box" and active["validation"]["passed"] is True
    assert (root / "current" / "bundle" / "model" / "model.fake.onnx").is_file()
    # the backend's check_host decides: its problem refuses the install (exit 16), --force overrides
    other = tmp_path / "other"
    proc = edgepack("install", bundle, "--root", other, "--allow-unsigned", "--runs", "3",
                    EDGEPACK_FAKE_HOST_PROBLEM="no fake accelerator on this machine")
    assert proc.returncode == 16, proc.stdout + proc.stderr
    assert "error: no fake accelerator on this machine" in proc.stdout + proc.stderr
    proc = edgepack("install", bundle, "--root", other, "--allow-unsigned", "--runs", "3", "--force",
                    EDGEPACK_FAKE_HOST_PROBLEM="no fake accelerator on this machine")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_without_the_distribution_the_bundle_is_refused_with_a_message(built, tmp_path):
    bundle, _ = built
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-m", "edgepack.cli.main", "install", str(bundle), "--root",
                           str(tmp_path / "root"), "--allow-unsigned"], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 16, proc.stdout + proc.stderr
    assert "backend 'fake', which is not installed here" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


# --- and edgepack itself never names it ---------------------------------------------------------

def test_edgepack_never_names_the_fake_backend():
    """The 'no edit to shared code' proof: no file in the package or its metadata mentions the fake
    (OpenVINO's FakeQuantize op is another thing)."""
    mention = re.compile(r"fake(?!quantize)", re.IGNORECASE)
    files = [p for p in (REPO / "edgepack").rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".json", ".md")]
    assert len(files) > 20
    named = [f"{p.relative_to(REPO)}:{n}" for p in files
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if mention.search(line)]
    assert named == []
    assert not mention.search((REPO / "pyproject.toml").read_text())
