"""The README's example end to end: train on Fashion-MNIST, build for `cpu`, check the headline
figures the foundation promises (accuracy drop <= 1 point, size <= 30% of FP32), validate."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(not FASHION.is_dir(),
                                reason="needs Debian's dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")


def test_example_trains_builds_and_validates(tmp_path):
    from edgepack.api import build
    from edgepack.validation import validate

    proj = tmp_path / "fashion"
    shutil.copytree(EXAMPLE, proj, ignore=shutil.ignore_patterns("dist", "data", "weights.pt", "__pycache__"))
    subprocess.run([sys.executable, "train.py"], cwd=proj, check=True)
    [res] = build(proj, ["cpu"], tmp_path / "dist")
    m = res.manifest.measurements
    assert m.reference.accuracy["samples"] == 10000
    assert m.reference.accuracy["value"] > 88.0
    drop = m.reference.accuracy["value"] - m.compiled.accuracy["value"]
    assert drop <= 1.0, f"INT8 lost {drop:.2f} points"
    assert m.comparison["size_ratio"] <= 0.30
    assert res.passed
    assert validate(res.bundle, report=tmp_path / "report.json", runs=20)["passed"]
