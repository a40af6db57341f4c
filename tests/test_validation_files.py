"""The bundle's validation files: sized to a budget by default, and shippable apart as <bundle>.validation."""

from __future__ import annotations

import shutil
import tarfile

import numpy as np
import pytest

from edgepack.artifact import TensorSpec
from edgepack.calibration.reader import SampleSet
from edgepack.errors import BundleError, ConfigError

SPEC = [TensorSpec("x", ("batch", 64), "float32")]


def _noise_set(n: int, labelled: bool = True) -> SampleSet:
    rng = np.random.default_rng(0)  # incompressible inputs, so sizes scale with the counts
    return SampleSet([{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(n)],
                     [i % 3 for i in range(n)] if labelled else None, "noise")


def _written(vdir) -> int:
    return sum(f.stat().st_size for f in vdir.iterdir())


@pytest.mark.parametrize("labelled", [True, False])
def test_default_counts_are_cut_to_the_budget(tmp_path, labelled):
    from edgepack.calibration.payload import MIN_GOLDEN, write_payload

    ev = _noise_set(600, labelled)
    outputs = [[np.zeros((1, 3), np.float32)]] * 600
    full = write_payload(tmp_path / "full", ev, outputs, SPEC, ["y"], None)
    assert full["samples"] == 200 and full["holdout_samples"] == (300 if labelled else 0)
    budget = _written(tmp_path / "full") // 3
    cut = write_payload(tmp_path / "cut", ev, outputs, SPEC, ["y"], None, budget=budget)
    assert _written(tmp_path / "cut") <= budget and cut["budget_bytes"] == budget
    assert MIN_GOLDEN <= cut["samples"] < 200
    if labelled:  # the golden set takes at most half, the holdout the rest
        assert 50 <= cut["holdout_samples"] < 300
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())


def test_counts_the_project_sets_are_kept_whatever_the_budget(tmp_path):
    from edgepack.calibration.payload import write_payload

    ev = _noise_set(600)
    fields = write_payload(tmp_path / "v", ev, [[np.zeros((1, 3), np.float32)]] * 600, SPEC, ["y"], None,
                           holdout_cap=120, golden_cap=150, budget=1000)
    assert fields["samples"] == 150 and fields["holdout_samples"] == 120
    # a budget never cuts below the minimums either
    fields = write_payload(tmp_path / "w", ev, [[np.zeros((1, 3), np.float32)]] * 600, SPEC, ["y"], None, budget=1000)
    assert fields["samples"] == 32 and fields["holdout_samples"] == 50


def test_golden_samples_is_a_validated_project_key(project):
    from edgepack.project import load_project
    from tests.conftest import edit_yaml

    edit_yaml(project, "  metric: top1\n", "  metric: top1\n  golden_samples: 40\n  separate_validation: true\n")
    ev = load_project(project / "edgepack.yaml").evaluation
    assert ev.golden_samples == 40 and ev.separate_validation
    edit_yaml(project, "golden_samples: 40", "golden_samples: 0")
    with pytest.raises(ConfigError, match="golden_samples"):
        load_project(project / "edgepack.yaml")


# --- <bundle>.validation ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def split(built, tmp_path_factory):
    """The digits cpu bundle rewritten with its validation files apart: (bundle, artifact, manifest)."""
    from edgepack.bundle import read_archive, write_bundle

    src = built[0] / "digits-1.2.3-cpu.edgepack"
    tmp = tmp_path_factory.mktemp("split")
    staging = tmp / "staging"
    m = read_archive(src, staging)
    (staging / "manifest.json").unlink()
    out = tmp / "dist" / src.name
    m2 = write_bundle(staging, m, out, separate_validation=True)
    return out, out.with_name(out.name + ".validation"), m2


def _names(path) -> set[str]:
    with tarfile.open(path) as tar:
        return {m.name for m in tar.getmembers()}


def test_split_bundle_holds_no_validation_files_and_the_manifest_keeps_their_digests(split, built):
    from edgepack.bundle import apart_files, sha256_file

    bundle, art, m = split
    inside, apart = _names(bundle), _names(art)
    assert not any(n.startswith("validation/") for n in inside) and "model/model.xml" in inside
    assert apart == {"validation/inputs.npz", "validation/outputs.npz", "validation/holdout.npz"}
    assert set(apart_files(m)) == apart and m.validation.artifact.file == bundle.name + ".validation"
    assert m.validation.artifact.sha256 == "sha256:" + sha256_file(art)
    # the same files, the same seal: the build id covers the files that ship apart
    assert m.build_id != built[1]["cpu"].manifest.build_id  # the manifest now records the artifact
    assert bundle.stat().st_size < (built[0] / bundle.name).stat().st_size


def test_split_bundle_validates_with_its_file_beside_it_or_named(split, tmp_path):
    from edgepack.validation import validate

    bundle, art, _ = split
    r = validate(bundle, runs=3, report=tmp_path / "r.json")
    assert r["passed"] and r["golden"]["samples"] == 200 and r["holdout"]["samples"] == 300
    alone = tmp_path / "elsewhere" / bundle.name
    alone.parent.mkdir()
    shutil.copy(bundle, alone)
    with pytest.raises(ConfigError, match=r"ship apart, in .*\.validation, which is not beside it") as e:
        validate(alone, runs=3, report=tmp_path / "r2.json")
    assert "--validation-file" in e.value.hint
    shutil.copy(art, tmp_path / "v.bin")
    assert validate(alone, runs=3, report=tmp_path / "r3.json", validation_file=tmp_path / "v.bin")["passed"]
    with pytest.raises(ConfigError, match="validation file not found"):
        validate(alone, runs=3, report=tmp_path / "r4.json", validation_file=tmp_path / "missing")


def test_split_bundle_opens_without_its_file_for_everything_but_validate(split, tmp_path):
    from edgepack.bundle import open_bundle

    bundle, _, m = split
    alone = tmp_path / bundle.name
    shutil.copy(bundle, alone)
    with open_bundle(alone, verify=True) as opened:  # verify, inspect, sign, install's checks
        assert not opened.validation_files and opened.manifest.build_id == m.build_id


def test_a_foreign_or_tampered_validation_file_is_refused(split, built, tmp_path):
    from edgepack.validation import validate

    bundle, art, _ = split
    other = tmp_path / "other.validation"
    with tarfile.open(other, "w") as tar:  # another bundle's files (the onnx one): other digests
        tar.add(str(art), arcname="validation/inputs.npz")
    with pytest.raises(BundleError, match="not this bundle's validation file"):
        validate(bundle, runs=3, report=tmp_path / "r.json", validation_file=other)
    bad = tmp_path / "bad.validation"
    data = bytearray(art.read_bytes())
    data[-2000] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="not this bundle's validation file"):
        validate(bundle, runs=3, report=tmp_path / "r.json", validation_file=bad)


def test_separate_validation_flag_builds_both_files_and_an_inline_rebuild_removes_the_stale_one(project, tmp_path):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    out = tmp_path / "dist"
    args = ["build", "-p", str(project), "-t", "onnx", "--out", str(out), "--no-tune", "--quiet"]
    r = CliRunner().invoke(app, args + ["--separate-validation"])
    assert r.exit_code == 0, r.output
    bundle = out / "digits-1.2.3-onnx.edgepack"
    assert bundle.is_file() and (out / (bundle.name + ".validation")).is_file()
    r = CliRunner().invoke(app, ["validate", str(bundle), "--runs", "3", "--format", "json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert not (out / (bundle.name + ".validation")).exists()
    assert "validation/inputs.npz" in _names(bundle)
