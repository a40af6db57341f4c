"""The LiteRT (TFLite) backend: litert-torch conversion, ai-edge-quantizer levels, the I/O contract in
io.json, the float-op report, and the build's fallback ladder. Every model here is really converted
and run on the LiteRT interpreter."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_quantizer")

from edgepack.artifact import ModelFormat, TensorSpec  # noqa: E402
from edgepack.backends import get_backend  # noqa: E402
from edgepack.backends.tflite import float_op_report  # noqa: E402
from edgepack.errors import ConfigError, MissingDependencyError, ToolchainError  # noqa: E402
from edgepack.stages.export_torch import export_program, static_specs  # noqa: E402
from edgepack.target import load_target  # noqa: E402
from tests.backends.contract import samples  # noqa: E402
from tests.conftest import edit_yaml  # noqa: E402


def _net():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8),
        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).eval()


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    net = _net()
    spec = TensorSpec("x", (1, 3, 16, 16), "float32")
    return net, export_program(net, [spec], ["y"], tmp_path_factory.mktemp("pt2"))


def _compile(art, tmp_path, precision="int8", **opts):
    backend = get_backend("tflite")
    profile = load_target("android-arm64").model_copy(update={"precision": precision})
    options = backend.options({**profile.backend_options, **opts}, "test")
    return backend, backend.compile(art, profile, options, samples(64), tmp_path / precision)


def _torch_out(net, data):
    import torch

    with torch.no_grad():
        return [net(torch.from_numpy(s["x"])).numpy() for s in data]


def test_declares_itself():
    backend = get_backend("tflite")
    assert backend.produces == ModelFormat.TFLITE and backend.consumes == ModelFormat.TORCH
    assert backend.fallback_levels[0] == "int8" and backend.fallback_levels[-1] == "fp16"
    versions = backend.check_environment(compile=True)
    assert {"ai-edge-litert", "litert-torch", "ai-edge-quantizer"} <= set(versions)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-4), ("fp16", 1e-2), ("int8", 0.1)])
def test_converts_runs_and_matches_pytorch(program, tmp_path, precision, tol):
    net, art = program
    backend, compiled = _compile(art, tmp_path, precision)
    assert compiled.format == ModelFormat.TFLITE and compiled.precision == precision
    assert compiled.lineage[-1].name == "compile" and all(p.is_file() for p in compiled.all_files)
    runner = backend.load(compiled.path, 1)
    data = samples(20, seed=1)
    ref = _torch_out(net, data)
    got = [runner.run(s)[0] for s in data]  # NCHW float in, float out: the runner applies io.json
    span = max(float(np.abs(r).max()) for r in ref)
    err = max(float(np.abs(g - r).max()) for g, r in zip(got, ref))
    assert err <= tol * max(1.0, span), f"{precision}: max abs diff {err}"
    if precision == "int8":
        assert err > 0, "an INT8 model that matches FP32 bit for bit was not quantized"


def test_full_integer_model_records_layout_and_quantization(program, tmp_path):
    _, art = program
    _, compiled = _compile(art, tmp_path, "int8")
    io = json.loads((compiled.path.parent / "io.json").read_text())
    assert io == compiled.details["io"]
    (x,), (y,) = io["inputs"], io["outputs"]
    assert x["layout"] == "NHWC" and x["permute"] == [0, 2, 3, 1] and x["shape"] == [1, 16, 16, 3]
    assert x["dtype"] == "int8" and x["quantization"]["scale"] > 0
    assert y["dtype"] == "int8" and y["quantization"]["scale"] > 0
    # the interpreter itself agrees: int8 tensors in and out, weights int8 per channel
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(compiled.path))
    interp.allocate_tensors()
    assert interp.get_input_details()[0]["dtype"] == np.int8
    conv_w = [t for t in interp.get_tensor_details() if len(t["shape"]) == 4 and t["dtype"] == np.int8
              and t["quantization_parameters"]["scales"].size > 1]
    assert conv_w, "no per-channel int8 weight tensor in the model"
    report = compiled.details["conversion"]["float_op_report"]
    assert report["float_ops"] == [] and report["float_macs_share"] == 0.0
    assert report["op_counts"]["CONV_2D"] == 1 and report["op_counts"]["DEPTHWISE_CONV_2D"] == 1
    # 16x16x8 outputs x 3x3x3 (conv) + 16x16x8 x 3x3 (depthwise) + 8x5 (linear)
    assert report["macs_total"] == 16 * 16 * 8 * 27 + 16 * 16 * 8 * 9 + 40


def test_float_io_puts_quantize_and_dequantize_at_the_edges(program, tmp_path):
    _, art = program
    backend, compiled = _compile(art, tmp_path, "int8", io_dtype="float32")
    (x,), (y,) = compiled.details["io"]["inputs"], compiled.details["io"]["outputs"]
    assert x["dtype"] == "float32" and x["quantization"] is None and y["dtype"] == "float32"
    report = compiled.details["conversion"]["float_op_report"]
    assert report["float_ops"] == []
    assert report["edge_conversions"] == {"DEQUANTIZE": 1, "QUANTIZE": 1}
    assert backend.load(compiled.path, 1).run(samples(1).samples[0])[0].shape == (1, 5)


def test_dynamic_range_level_reports_its_float_ops(program, tmp_path):
    _, art = program
    _, compiled = _compile(art, tmp_path, "int8", level="dynamic-int8")
    report = float_op_report(compiled.path, "dynamic-int8")
    assert compiled.precision == "dynamic-int8"
    ops = {f["op"]: f for f in report["float_ops"]}
    assert {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"} <= set(ops)
    assert report["float_macs_share"] == pytest.approx(1.0)
    assert "dynamic range" in ops["CONV_2D"]["why"]


def test_bad_options_are_refused():
    backend = get_backend("tflite")
    with pytest.raises(ConfigError, match="unknown backend option 'io_type'"):
        backend.options({"io_type": "int8"}, "android-arm64.yaml: backend_options")
    with pytest.raises(ConfigError, match="io_dtype"):
        backend.options({"io_dtype": "uint8"}, "android-arm64.yaml: backend_options")


def test_symbolic_dims_need_a_static_size():
    specs = [TensorSpec("tokens", ("batch", "seq"), "int64")]
    with pytest.raises(ConfigError, match="symbolic dim 'seq'.*static shape") as info:
        static_specs(specs, 1, None, "target 'android-arm64' (tflite)")
    assert "static_dims" in info.value.hint
    assert static_specs(specs, 1, {"seq": 32})[0].shape == (1, 32)


def test_missing_toolchain_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "litert_torch" else real(name, *a))
    with pytest.raises(MissingDependencyError) as info:
        get_backend("tflite").check_environment(compile=True)
    assert "'litert-torch'" in info.value.message and "edgepack[tflite]" in info.value.hint
    assert get_backend("tflite").check_environment(compile=False)  # running needs the interpreter only


def test_a_converter_failure_names_the_problem_and_keeps_the_log(tmp_path):
    """A model torch.export captures but litert-torch cannot lower (erfinv has no TFLite lowering)."""
    import torch

    class Gauss(torch.nn.Module):
        def forward(self, x):
            return torch.special.erfinv(x.clamp(-0.5, 0.5))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(16, 16)
            self.warp = Gauss()

        def forward(self, x):
            return self.warp(self.fc(x))

    art = export_program(Net().eval(), [TensorSpec("x", (1, 16), "float32")], ["y"], tmp_path / "pt2")
    with pytest.raises(ToolchainError, match=r"could not convert the model: .*aten\.erfinv.* in layer warp \(Gauss\)") as info:
        _compile(art, tmp_path, "fp32")
    assert "build log" in info.value.hint
    log = (tmp_path / "fp32" / "litert.log").read_text()
    assert "Traceback" in log


def test_mobilenetv2_converts_to_full_integer(tmp_path):
    """A MobileNetV2 (transformers, random weights, 0.35 width at 96x96 to keep it quick): full integer."""
    import torch
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            cfg = MobileNetV2Config(num_labels=10, depth_multiplier=0.35, image_size=96)
            self.m = MobileNetV2ForImageClassification(cfg).eval()

        def forward(self, x):
            return self.m(pixel_values=x).logits

    net = Logits().eval()
    art = export_program(net, [TensorSpec("x", (1, 3, 96, 96), "float32")], ["logits"], tmp_path / "pt2")
    backend = get_backend("tflite")
    profile = load_target("android-arm64")
    rng = np.random.default_rng(0)
    from edgepack.calibration.reader import SampleSet

    cal = SampleSet([{"x": rng.standard_normal((1, 3, 96, 96)).astype(np.float32)} for _ in range(16)], None, "random")
    compiled = backend.compile(art, profile, backend.options(profile.backend_options, "t"), cal, tmp_path / "c")
    report = compiled.details["conversion"]["float_op_report"]
    assert compiled.precision == "int8"
    assert report["float_ops"] == [], report["float_ops"]
    assert report["op_counts"]["CONV_2D"] >= 30 and report["op_counts"]["DEPTHWISE_CONV_2D"] == 17
    kernels = compiled.details["conversion"]["kernels"]
    assert kernels["xnnpack"] == "ok"
    # ai-edge-quantizer's per-channel scales can overflow the builtin kernels' multiplier check: say so
    if kernels["builtin_kernels"] != "ok":
        assert "failed to prepare" in kernels["builtin_kernels"]
        assert any("not on LiteRT's builtin kernels" in w for w in compiled.details["warnings"])
        strict = backend.options({**profile.backend_options, "require_builtin_kernels": True}, "t")
        with pytest.raises(ToolchainError, match="builtin kernels"):
            backend.compile(art, profile, strict, cal, tmp_path / "strict")
    got = backend.load(compiled.path, 2).run(cal.samples[0])[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(cal.samples[0]["x"])).numpy()
    assert got.shape == ref.shape == (1, 10) and np.isfinite(got).all()


# -- through the build ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tflite_build(trained_project, tmp_path_factory):
    from edgepack.api import build

    out = tmp_path_factory.mktemp("tfl")
    (result,) = build(trained_project, ["mobile"], out)
    return result


def test_build_for_mobile_is_full_integer_and_measured(tflite_build):
    m = tflite_build.manifest
    assert m.target == "android-arm64" and m.runtime.backend == "tflite" and m.runtime.format == "tflite"
    assert m.conversion["reached"] == "int8" and m.conversion["float_op_report"]["float_ops"] == []
    assert m.runtime.io["inputs"][0]["layout"] == "NHWC"
    got, ref = m.measurements.compiled, m.measurements.reference
    assert got.proxy is None and got.runtime.startswith("ai-edge-litert")
    assert ref.accuracy["value"] - got.accuracy["value"] <= 2.0
    assert got.latency["p50_ms"] > 0 and "cpu" in got.latency["where"]
    assert m.measurements.device["measured_on_device"] is False and "validate" in m.measurements.device["latency"]
    assert m.toolchain["litert-torch"] and m.toolchain["ai-edge-quantizer"]
    with tarfile.open(tflite_build.bundle) as tar:
        names = tar.getnames()
    assert "model/model.tflite" in names and "model/io.json" in names


def test_validate_and_inspect_a_tflite_bundle(tflite_build):
    from typer.testing import CliRunner

    from edgepack.api import validate
    from edgepack.cli.app import app

    report = validate(tflite_build.bundle)
    assert report["passed"], report
    res = CliRunner().invoke(app, ["inspect", str(tflite_build.bundle)])
    assert res.exit_code == 0, res.output
    assert "quantization level int8" in res.output and "float-op report: 0 float ops" in res.output
    assert "NHWC" in res.output


SENSITIVE = """

class Sensitive(DigitsCNN):
    def forward(self, x):
        # an 11th logit of -5000 never wins, but shares the output tensor's one quantization scale
        floor = x.flatten(1)[:, :1] * 0.0 - 5000.0
        return torch.cat([self.body(x), floor], dim=1)


def sensitive():
    return Sensitive()
"""


def test_tight_budget_falls_back_along_the_ladder(project, tmp_path):
    """When plain INT8 misses the budget, the build walks down the ladder and says where it stopped."""
    from edgepack.api import build

    # int8 steps of ~20 over [-5000, 15] crush the ten real logits together; int16 steps of ~0.15 do not
    (project / "model.py").write_text((project / "model.py").read_text() + SENSITIVE)
    edit_yaml(project, "path: model.py:build", "path: model.py:sensitive")
    edit_yaml(project, "max_accuracy_drop: 2.0", "max_accuracy_drop: 0.5")
    (result,) = build(project, ["rpi5"], tmp_path)
    conv = result.manifest.conversion
    ladder = conv["ladder"]
    assert ladder[0]["level"] == "int8" and ladder[0]["outcome"] == "misses the accuracy budget", (ladder, result.manifest.measurements.reference.accuracy)
    assert [s["level"] for s in ladder] == list(get_backend("tflite").fallback_levels[:len(ladder)])
    assert conv["reached"] == ladder[-1]["level"] != "int8"
    assert result.manifest.runtime.precision == conv["reached"]
    assert result.manifest.measurements.compiled.model.startswith(f"compiled: {conv['reached']} (fallback from int8)")
    assert result.manifest.validation.tolerance["rtol"] == (0.05 if "int" in conv["reached"] else 0.01)
    from edgepack.api import validate

    assert validate(result.bundle)["passed"]
    if result.passed:
        assert ladder[-1]["outcome"] == "meets the accuracy budget"
    else:
        assert "no level met" in conv["why"]


def _onnx_project(project):
    """The digits project with its trained model exported to ONNX and the project pointed at it."""
    import sys

    import torch

    sys.path.insert(0, str(project))
    try:
        import model as digits

        net = digits.build()
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("model", None)
    net.load_state_dict(torch.load(project / "weights.pt"))
    torch.onnx.export(net.eval(), (torch.zeros(2, 1, 8, 8),), str(project / "digits.onnx"), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    edit_yaml(project, "path: model.py:build\n  weights: weights.pt", "path: digits.onnx")
    return project


def test_onnx_source_without_the_onnx2tf_toolchain_says_how_to_install_it(project, tmp_path, monkeypatch):
    from edgepack.api import build

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEPACK_ONNX2TF", raising=False)
    _onnx_project(project)
    with pytest.raises(MissingDependencyError, match="onnx2tf") as info:
        build(project, ["rpi5"], tmp_path / "out")
    assert "edgepack toolchain install onnx2tf" in info.value.hint
    assert not list((tmp_path / "out").glob("*.edgepack"))


def test_onnx_source_converts_with_onnx2tf(project, tmp_path):
    from edgepack.api import build
    from edgepack.toolchains import executable

    if executable("onnx2tf") is None:
        pytest.skip("the onnx2tf toolchain is not installed (`edgepack toolchain install onnx2tf`)")
    _onnx_project(project)
    (result,) = build(project, ["rpi5"], tmp_path)
    m = result.manifest
    assert m.source.kind == "onnx" and m.conversion["reached"] == "int8"
    assert m.conversion["float_op_report"]["float_ops"] == []
    compile_stage = next(s for s in m.stages if s["name"] == "compile")
    assert compile_stage["config"]["converter"].startswith("onnx2tf")
    assert m.runtime.io["inputs"][0]["tflite_name"] == "image" and m.runtime.io["inputs"][0]["layout"] == "NHWC"
    ref, got = m.measurements.reference.accuracy["value"], m.measurements.compiled.accuracy["value"]
    assert ref - got <= 2.0
    assert not [p for p in project.iterdir() if "tflite" in p.name]  # nothing written beside the user's model
