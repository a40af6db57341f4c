"""End to end: build the digits project for cpu and onnx, then check the bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from edgepack.bundle import manifest_schema
from edgepack.calibration.reader import load_samples
from edgepack.project import load_project


def _manifest(bundle: Path) -> dict:
    with tarfile.open(bundle) as tar:
        return json.load(tar.extractfile("manifest.json"))


def test_bundles_are_named_tar_archives_with_the_documented_layout(built):
    out, results = built
    for target in ("cpu", "onnx"):
        bundle = out / f"digits-1.2.3-{target}.edgepack"
        assert results[target].bundle == bundle
        with tarfile.open(bundle) as tar:
            names = set(tar.getnames())
        assert {"manifest.json", "preprocess.json", "labels.json", "validation/inputs.npz",
                "validation/outputs.npz", "validation/holdout.npz"} <= names
    assert {"model/model.xml", "model/model.bin"} <= set(tarfile.open(out / "digits-1.2.3-cpu.edgepack").getnames())
    assert "model/model.onnx" in tarfile.open(out / "digits-1.2.3-onnx.edgepack").getnames()
    # nothing else left in the output folder: no scratch folders, no partial files
    assert sorted(p.name for p in out.iterdir()) == ["digits-1.2.3-cpu.edgepack", "digits-1.2.3-onnx.edgepack"]


def test_manifest_has_every_field_and_matches_the_shipped_schema(built):
    out, _ = built
    m = _manifest(out / "digits-1.2.3-cpu.edgepack")
    jsonschema.validate(m, manifest_schema())
    assert m["schema_version"] == 2 and m["name"] == "digits" and m["version"] == "1.2.3"
    assert m["build_id"].startswith("sha256:") and m["source"]["digest"].startswith("sha256:")
    assert {"torch", "onnx", "onnxruntime", "openvino", "nncf"} <= set(m["toolchain"])
    assert m["profile"]["name"] == "cpu" and m["profile"]["backend"] == "openvino"
    assert [s["name"] for s in m["stages"]] == ["data", "export_onnx", "compile"]
    assert all(f["sha256"] and f["bytes"] > 0 for f in m["files"])
    meas = m["measurements"]
    for key in ("reference", "compiled"):
        r = meas[key]
        assert r["accuracy"]["metric"] == "top1" and r["accuracy"]["samples"] == 500
        lat = r["latency"]
        assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["how"]["threads"] == 2 and lat["how"]["batch"] == 1 and lat["how"]["runs"] >= 10
        assert lat["where"]["cpu"]
        assert r["size"]["bytes"] > 0
        assert r["peak_memory"]["measured"] is True and r["peak_memory"]["peak_mb"] >= 0
    c = meas["comparison"]
    # the speed-up comes from the models timed in turn in one window, with that window's noise record
    it = c["in_turn"]
    assert c["speedup_p50"] == pytest.approx(it["p50_ms"]["fp32 reference"] / it["p50_ms"]["compiled"], rel=1e-2)
    assert c["speedup_p50_vs_target_fp32"] == pytest.approx(
        it["p50_ms"]["fp32 on the target's runtime"] / it["p50_ms"]["compiled"], rel=1e-2)
    assert c["noisy"] == it["noise"]["noisy"] and 1 <= it["noise"]["tries"] <= 3
    assert min(it["runs"].values()) >= 200 and "in turn with" in it["how"]
    assert c["accuracy_delta_points"] == pytest.approx(
        meas["compiled"]["accuracy"]["value"] - meas["reference"]["accuracy"]["value"], abs=1e-6)
    assert meas["data"]["evaluation"]["fingerprint"].startswith("sha256:")
    assert m["calibration"]["samples"] == 200
    assert m["acceptance"]["passed"] is True and m["acceptance"]["gates"] == {"max_accuracy_drop": 2.0}
    assert m["validation"]["samples"] == 200 and m["validation"]["holdout_samples"] == 300
    assert m["preprocess"]["color"] == "gray" and m["labels"][3] == "three"


def test_int8_bundles_are_accurate_and_small(built):
    _, results = built
    for r in results.values():
        m = r.manifest.measurements
        assert r.manifest.runtime.precision == "int8"
        assert m.compiled.accuracy["value"] > 90.0  # the FP32 model scores ~97 on digits
        assert m.reference.accuracy["value"] - m.compiled.accuracy["value"] <= 2.0
        assert m.comparison["size_ratio"] < 0.5


def test_openvino_model_scored_directly_matches_the_manifest(built, trained_project):
    import openvino as ov

    out, results = built
    m = results["cpu"].manifest
    project = load_project(trained_project)
    ev = load_samples(project.evaluation.source, project.root, project.input_specs(),
                      project.preprocess.model_dump(), None, 0, None, "evaluation")
    extract = out.parent / "cpu-extract"
    with tarfile.open(results["cpu"].bundle) as tar:
        tar.extractall(extract, filter="data")
    compiled = ov.Core().compile_model(str(extract / "model" / "model.xml"), "CPU")
    pred = [int(np.argmax(compiled(s)[0])) for s in ev]
    acc = 100.0 * np.mean(np.asarray(pred) == np.asarray(ev.labels))
    assert abs(acc - m.measurements.compiled.accuracy["value"]) <= 0.5


def test_onnx_bundle_is_a_qdq_model_with_uint8_activations(built, tmp_path):
    import onnx

    _, results = built
    with tarfile.open(results["onnx"].bundle) as tar:
        tar.extractall(tmp_path, filter="data")
    model = onnx.load(str(tmp_path / "model" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    zero_points = {i.name: i for i in model.graph.initializer}
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert any(zero_points[n.input[2]].data_type == onnx.TensorProto.UINT8 for n in act_q if len(n.input) > 2)


def test_validate_passes_on_the_bundle(built, tmp_path):
    from edgepack.validation import validate

    out, _ = built
    report = tmp_path / "report.json"
    res = validate(out / "digits-1.2.3-cpu.edgepack", report=report, runs=20)
    assert res["passed"] and res["golden"]["within_tolerance"] == 1.0
    assert res["holdout"]["samples"] == 300 and res["holdout"]["value"] > 85
    assert json.loads(report.read_text())["build_id"] == res["build_id"]


def test_validate_never_imports_torch(built, tmp_path):
    out, _ = built
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "from edgepack.validation import validate\n"
        f"r = validate(__import__('pathlib').Path({str(out / 'digits-1.2.3-onnx.edgepack')!r}), "
        f"report=__import__('pathlib').Path({str(tmp_path / 'r.json')!r}), runs=5)\n"
        "assert r['passed']\n"
        "print('ok', [m for m in sys.modules if m.startswith(('torch', 'nncf'))])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok ['torch']"  # only the blocked placeholder


def _tamper(src: Path, dst: Path, member: str) -> None:
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == member:
                data = bytearray(data)
                data[len(data) // 2] ^= 0x01
                data = bytes(data)
            import io

            tout.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("target,member", [("cpu", "model/model.bin"), ("onnx", "model/model.onnx")])
def test_validate_refuses_a_bundle_with_one_byte_changed(built, tmp_path, target, member):
    from edgepack.errors import BundleError
    from edgepack.validation import validate

    out, _ = built
    bad = tmp_path / f"bad-{target}.edgepack"
    _tamper(out / f"digits-1.2.3-{target}.edgepack", bad, member)
    with pytest.raises(BundleError, match=f"'{member}' does not match its sha256"):
        validate(bad, report=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_validate_refuses_a_truncated_bundle(built, tmp_path):
    from edgepack.errors import BundleError
    from edgepack.validation import validate

    out, _ = built
    data = (out / "digits-1.2.3-cpu.edgepack").read_bytes()
    bad = tmp_path / "short.edgepack"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError):
        validate(bad)


def test_manifests_report_quantization_coverage(built):
    """What really runs in INT8, counted in the compiled file itself (subgraphs included)."""
    _, results = built
    for target in ("cpu", "onnx"):
        cov = results[target].manifest.coverage
        # every layer runs in INT8 (OpenVINO: through the MaxPool that feeds a Conv and the classifier)
        assert cov["weighted_ops"] == 4 and cov["int8_ops"] == 4, (target, cov)
        assert cov["macs_share"] >= 0.8 and cov["summary"].startswith("int8 on"), (target, cov)


def test_a_toolchain_failure_without_a_log_keeps_its_full_message(tmp_path):
    """OpenVINO and NNCF raise exceptions instead of writing logs: the whole text and traceback are
    kept next to the output, and the error line is its first line."""
    from edgepack.errors import ToolchainError
    from edgepack.build.pipeline import keep_logs

    (tmp_path / "work").mkdir()
    try:
        try:
            raise RuntimeError("Check 'x' failed at convert.cpp:42\nframe 1\nframe 2")
        except RuntimeError as cause:
            raise ToolchainError("OpenVINO could not convert model.onnx: Check 'x' failed\nframe 1") from cause
    except ToolchainError as e:
        kept = keep_logs(e, tmp_path / "work", tmp_path, "m-1.0-cpu.edgepack")
    log = (tmp_path / "m-1.0-cpu.edgepack.log").read_text()
    assert "convert.cpp:42" in log and "frame 2" in log and "Traceback" in log
    assert kept.message == "OpenVINO could not convert model.onnx: Check 'x' failed"
    assert str(tmp_path / "m-1.0-cpu.edgepack.log") in kept.hint


def test_validate_reports_its_latency_against_the_build_and_says_what_fp32_figure_it_has(built, tmp_path):
    from edgepack.validation import validate

    out, results = built
    r = validate(out / "digits-1.2.3-cpu.edgepack", report=tmp_path / "r.json", runs=20)
    lat, fp = r["latency"], r["fp32_comparison"]
    assert lat["ratio_to_build"] == pytest.approx(lat["p50_ms"] / lat["build_p50_ms"], rel=1e-2)
    assert fp["measured_here"] is False and "not shipped" in fp["why"]
    assert fp["build_speedup_p50"] == results["cpu"].manifest.measurements.comparison["speedup_p50"]
