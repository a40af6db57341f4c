"""The CLI through typer's CliRunner: happy paths and every documented error path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from edgepack.cli.app import app
from tests.conftest import edit_yaml

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def error_lines(result) -> tuple[str, str]:
    text = result.output
    lines = [ln for ln in text.splitlines() if ln.startswith(("error:", "hint:"))]
    assert lines, text
    err = next(ln for ln in lines if ln.startswith("error:"))
    hint = next((ln for ln in lines if ln.startswith("hint:")), "")
    return err, hint


def build(project: Path, *extra: str, target: str = "onnx"):
    return run("build", "--project", str(project), "--target", target, "--out", str(project / "dist"),
               "--quiet", *extra)


def assert_no_bundle(project: Path) -> None:
    dist = project / "dist"
    assert not dist.exists() or list(dist.iterdir()) == [], list(dist.iterdir())


def test_help_lists_the_commands():
    res = run("--help")
    assert res.exit_code == 0
    for cmd in ("build", "validate", "inspect", "init", "targets"):
        assert cmd in res.output


def test_targets_list_and_show():
    res = run("targets", "list", "--format", "json")
    names = {t["name"] for t in json.loads(res.output)}
    assert {"cpu", "onnx"} <= names
    res = run("targets", "show", "onnx", "--format", "json")
    assert json.loads(res.output)["quantization"]["activation_type"] == "uint8"


def test_build_json_then_inspect_and_validate(project):
    res = build(project, "--format", "json")
    assert res.exit_code == 0, res.output
    head = json.loads(res.stdout)[0]
    bundle = Path(head["bundle"])
    assert bundle.name == "digits-1.2.3-onnx.edgepack" and bundle.is_file()
    assert head["compiled"]["accuracy"] > 90 and head["acceptance_passed"] is True
    res = run("inspect", str(bundle))
    assert res.exit_code == 0 and "acceptance" in res.output and "top1" in res.output
    res = run("inspect", str(bundle), "--format", "json")
    assert json.loads(res.stdout)["build_id"] == head["build_id"]
    res = run("validate", str(bundle), "--runs", "5", "--report", str(project / "v.json"))
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output and json.loads((project / "v.json").read_text())["passed"] is True


def test_failed_gate_exits_3_keeps_the_bundle_and_records_why(project):
    edit_yaml(project, "max_accuracy_drop: 2.0", "max_accuracy_drop: 2.0\n  max_size_mb: 0.001")
    res = build(project)
    assert res.exit_code == 3, res.output
    err, _ = error_lines(res)
    assert "max_size_mb" in err
    bundle = project / "dist" / "digits-1.2.3-onnx.edgepack"
    assert bundle.is_file()
    m = json.loads(run("inspect", str(bundle), "--format", "json").stdout)
    assert m["acceptance"]["passed"] is False
    assert any("max_size_mb" in r for r in m["acceptance"]["reasons"])


# --- errors: one line `error:` + `hint:`, exit code by class, no partial bundle ---------------

def test_model_file_missing(project):
    (project / "model.py").unlink()
    res = build(project)
    assert res.exit_code == 9
    err, _ = error_lines(res)
    assert "model.py" in err and "not found" in err
    assert_no_bundle(project)


def test_weights_file_missing(project):
    (project / "weights.pt").unlink()
    res = build(project)
    assert res.exit_code == 9 and "weights.pt" in error_lines(res)[0]


def test_factory_raises(project):
    edit_yaml(project, "model.py:build", "model.py:broken")
    res = build(project)
    assert res.exit_code == 9
    err, hint = error_lines(res)
    assert "RuntimeError: cannot build this model" in err and "nn.Module" in hint
    assert_no_bundle(project)


def test_factory_returns_something_else(project):
    edit_yaml(project, "model.py:build", "model.py:not_a_module")
    res = build(project)
    assert res.exit_code == 9 and "not a torch.nn.Module" in error_lines(res)[0]


def test_declared_input_shape_disagrees_with_the_model(project):
    edit_yaml(project, "shape: [batch, 1, 8, 8]", "shape: [batch, 3, 8, 8]")
    # the data then no longer matches either: give raw tensors of the declared shape
    rng = np.random.default_rng(0)
    np.savez(project / "data" / "calib.npz", image=rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    np.savez(project / "data" / "eval.npz", image=rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    edit_yaml(project, "  metric: top1\n", "")
    res = build(project)
    assert res.exit_code == 9, res.output
    err, hint = error_lines(res)
    assert "does not accept the declared inputs" in err and "image[batch, 3, 8, 8]" in err
    assert_no_bundle(project)


def test_calibration_data_empty(project):
    np.savez(project / "data" / "calib.npz", images=np.zeros((0, 8, 8), np.uint8))
    res = build(project)
    assert res.exit_code == 6 and "empty" in error_lines(res)[0]
    assert_no_bundle(project)


def test_calibration_data_wrong_shape(project):
    np.savez(project / "data" / "calib.npz", image=np.zeros((5, 1, 9, 9), np.float32))
    res = build(project)
    assert res.exit_code == 6
    assert "shape (1, 1, 9, 9), expected [batch, 1, 8, 8]" in error_lines(res)[0]


def test_calibration_data_wrong_dtype(project):
    np.savez(project / "data" / "calib.npz", image=np.zeros((5, 1, 8, 8), np.float64))
    res = build(project)
    assert res.exit_code == 6
    err, hint = error_lines(res)
    assert "dtype float64" in err and "astype('float32')" in hint


def test_unknown_target_suggests_a_close_match(project):
    res = build(project, target="onnxx")
    assert res.exit_code == 2
    err, hint = error_lines(res)
    assert "unknown target 'onnxx'" in err and "did you mean 'onnx'" in hint


def test_unknown_key_in_project_file(project):
    edit_yaml(project, "calibration:\n  source", "calibraton:\n  source")
    res = build(project)
    assert res.exit_code == 2
    err, hint = error_lines(res)
    assert "edgepack.yaml" in err and "unknown key 'calibraton'" in err and "did you mean 'calibration'" in hint


def test_unknown_nested_key_in_project_file(project):
    edit_yaml(project, "  samples: 200", "  sample: 200")
    res = build(project)
    err, hint = error_lines(res)
    assert res.exit_code == 2 and "calibration.sample" in err and "did you mean 'samples'" in hint


def test_unknown_key_in_a_target_profile(project, tmp_path):
    (tmp_path / "mybox.yaml").write_text(
        "name: mybox\ndescription: x\nbackend: onnxruntime\ndevice: {kind: cpu, name: box}\nprecison: int8\n")
    res = build(project, "--targets-dir", str(tmp_path), target="mybox")
    assert res.exit_code == 2
    err, hint = error_lines(res)
    assert "mybox.yaml" in err and "'precison'" in err and "did you mean 'precision'" in hint


def test_bad_backend_option_in_a_profile(project, tmp_path):
    (tmp_path / "mybox.yaml").write_text(
        "name: mybox\ndescription: x\nbackend: onnxruntime\ndevice: {kind: cpu, name: box}\n"
        "backend_options: {quant_fromat: qdq}\n")
    res = build(project, "--targets-dir", str(tmp_path), target="mybox")
    err, hint = error_lines(res)
    assert res.exit_code == 2 and "quant_fromat" in err and "did you mean 'quant_format'" in hint


def test_toolchain_not_installed_names_the_extra(project, monkeypatch):
    import importlib

    real = importlib.import_module

    def no_openvino(name, *args):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_openvino)
    res = build(project, target="cpu")
    assert res.exit_code == 4
    err, hint = error_lines(res)
    assert "'openvino' is not installed" in err and "pip install 'edgepack[openvino]'" in hint
    assert_no_bundle(project)


def test_output_folder_not_writable(project):
    blocker = project / "a-file"
    blocker.write_text("not a folder")
    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(blocker / "sub"), "--quiet")
    assert res.exit_code == 2
    err, _ = error_lines(res)
    assert "--out" in err and "a-file" in err


def test_ctrl_c_mid_build_leaves_nothing_behind(project, monkeypatch):
    from edgepack.backends.onnxruntime import ONNXRuntimeBackend

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXRuntimeBackend, "compile", interrupted)
    res = build(project)
    assert res.exit_code == 130
    assert "interrupted" in error_lines(res)[0]
    assert_no_bundle(project)


def test_ctrl_c_in_the_second_target_keeps_the_first_bundle_and_names_it(project, monkeypatch):
    """The cpu bundle was complete before Ctrl-C reached the onnx target: it stays, and the hint says so
    (rather than "nothing was written"); the onnx target leaves nothing."""
    from edgepack.backends.onnxruntime import ONNXRuntimeBackend

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ONNXRuntimeBackend, "compile", interrupted)
    res = build(project, "--target", "onnx", target="cpu")
    assert res.exit_code == 130, res.output
    assert sorted(p.name for p in (project / "dist").iterdir()) == ["digits-1.2.3-cpu.edgepack"]
    text = " ".join(res.output.split())  # the hint may wrap at the terminal's width
    assert "kept: " in text and "digits-1.2.3-cpu.edgepack" in text and "nothing was written" not in text


def test_traceback_only_with_debug(project):
    edit_yaml(project, "model.py:build", "model.py:broken")
    res = run("build", "--project", str(project), "--target", "onnx", "--quiet")
    assert "Traceback" not in res.output
    res = run("--debug", "build", "--project", str(project), "--target", "onnx", "--quiet")
    assert "Traceback" in res.output and res.exit_code == 9


def test_init_writes_a_project_file_that_parses(tmp_path):
    from edgepack.project import load_project

    res = run("init", str(tmp_path / "new"))
    assert res.exit_code == 0
    p = load_project(tmp_path / "new")
    assert p.name == "new" and p.inputs[0].shape == ["batch", 3, 224, 224]
    res = run("init", str(tmp_path / "new"))
    assert res.exit_code == 2 and "already exists" in error_lines(res)[0]


def test_validate_a_missing_bundle(tmp_path):
    res = run("validate", str(tmp_path / "nope.edgepack"))
    assert res.exit_code == 2 and "bundle not found" in error_lines(res)[0]


def test_doctor_reports_each_backend():
    res = run("doctor", "--format", "json")
    assert res.exit_code == 0
    rows = {(r["backend"], r["role"]): r for r in json.loads(res.stdout)}
    assert rows[("onnxruntime", "run")]["ok"] and rows[("openvino", "build")]["ok"]
    trt = rows[("tensorrt", "run")]
    assert trt["ok"] is False and "TensorRT" in trt["hint"]
