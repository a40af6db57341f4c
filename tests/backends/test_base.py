"""What shared code asks a backend, and nothing else: open format names, the registry from entry points
alone, the default and overridden hooks (versions, describe_conversion, check_host, check_profile).
No toolchain is run here."""

from __future__ import annotations

import pickle
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgepack.artifact import ModelArtifact, ModelFormat, TensorSpec
from edgepack.backends import describe_conversion, get_backend, registered_backends
from edgepack.backends.base import ENTRY_POINT_GROUP, Backend
from edgepack.errors import ConfigError, WrongTargetError
from edgepack.target import load_target

BUILTIN = ("onnxruntime", "openvino", "tensorrt", "tflite")


def test_formats_are_open_names_and_the_builtin_constants_still_compare():
    assert ModelFormat.ONNX == "onnx" and ModelFormat("onnx") == ModelFormat.ONNX
    assert {"onnx": 1}[ModelFormat.ONNX] == 1 and str(ModelFormat.TFLITE) == "tflite"
    assert ModelFormat.OPENVINO_IR.value == "openvino-ir" and type(ModelFormat.OPENVINO_IR.value) is str
    qnn = ModelFormat("qnn-context")
    assert qnn == "qnn-context" and pickle.loads(pickle.dumps(qnn)) == qnn
    for bad in ("", "QNN", "qnn context", "-onnx", "a/b"):
        with pytest.raises(ValueError, match="not a model format name"):
            ModelFormat(bad)


def test_an_artifact_takes_any_format_name(tmp_path):
    f = tmp_path / "m.bin"
    f.write_bytes(b"x")
    art = ModelArtifact("coreml-package", f, (TensorSpec("x", (1,)),), ())
    assert art.format == "coreml-package" and isinstance(art.format, ModelFormat)
    assert art.format.value == "coreml-package"  # what manifest writers read
    nxt = art.derive("compile", {}, 0.0, format="qnn-context")
    assert nxt.format == "qnn-context" and art.format == "coreml-package"
    with pytest.raises(ValueError):
        ModelArtifact("Not A Format", f, (), ())


def test_backends_come_from_entry_points_alone():
    from edgepack.backends import base

    assert not hasattr(base, "BUILTIN")
    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert registered_backends() == eps
    assert set(BUILTIN) <= set(eps)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_backends_declare_what_shared_code_asks(name):
    backend = get_backend(name)
    assert isinstance(backend.produces, str) and isinstance(backend.consumes, str)
    assert backend.packages and all(isinstance(p, str) for p in backend.packages)
    assert backend.precisions and all(p == p.lower() for p in backend.precisions)
    assert backend.check_host(SimpleNamespace(target="t", profile={}, runtime=SimpleNamespace(backend=name)),
                              SimpleNamespace(machine="x86_64", tensorrt=True, l4t=True)) == []


class _Minimal(Backend):
    name = "minimal"
    produces = "minimal-blob"
    extra = "minimal"
    runtime_package = "numpy"  # installed: versions() finds it
    precisions = ("fp32", "w8a16")

    def check_environment(self, compile: bool = True) -> dict[str, str]:
        return {"minimal-sdk": "1.0"}

    def compile(self, model, target, options, calibration, workdir):
        raise NotImplementedError

    def load(self, path, threads):
        raise NotImplementedError


def test_hook_defaults_for_a_new_backend():
    b = _Minimal()
    versions = b.versions(compile=True)
    assert versions["minimal-sdk"] == "1.0" and "numpy" in versions
    assert b.describe_conversion({"conversion": None}) == []
    assert b.check_host(SimpleNamespace(), SimpleNamespace(machine="aarch64")) == []
    assert b.packages == () and b.activation_types == ("int8",)


def test_a_precision_beyond_the_builtin_three_is_the_backends_to_accept_or_refuse():
    profile = load_target("cpu").model_copy(update={"precision": "w8a16", "source": "box.yaml"})
    _Minimal().check_profile(profile)
    with pytest.raises(ConfigError, match=r"box.yaml: precision 'w8a16' is not supported by backend 'openvino' "
                                          r"\(it supports fp32, fp16, int8\)"):
        get_backend("openvino").check_profile(profile)
    uint8 = load_target("onnx")
    get_backend("onnxruntime").check_profile(uint8)
    with pytest.raises(ConfigError, match="activation type 'uint8' is not supported by backend 'openvino'") as e:
        get_backend("openvino").check_profile(uint8.model_copy(update={"precision": "int8"}))
    assert "quantization.activation_type" in e.value.hint


@pytest.mark.parametrize(("key", "value", "message"), [
    ("precision", "INT8", "'INT8' is not a precision name"),
    ("precision", "int 8", "'int 8' is not a precision name"),
    ("precision", "8bit", "'8bit' is not a precision name"),
    ("precision", 8, "precision"),
    ("activation_type", "Int16", "'Int16' is not a tensor type name"),
])
def test_profiles_refuse_badly_formed_precisions_at_load(tmp_path, key, value, message):
    src = Path(load_target("cpu").source).read_text()
    if key == "precision":
        text = src.replace("precision: int8", f"precision: {value}", 1)
    else:
        text = src.replace("activation_type: int8", f"activation_type: {value}", 1)
    assert text != src
    f = tmp_path / "cpu-bad.yaml"
    f.write_text(text.replace("name: cpu\n", "name: cpu-bad\n", 1))
    with pytest.raises(ConfigError, match=message) as e:
        load_target(str(f))
    assert str(f) in e.value.message


def test_a_new_precision_name_loads_and_unknown_keys_are_still_refused(tmp_path):
    src = Path(load_target("cpu").source).read_text().replace("name: cpu\n", "name: cpu-w8\n", 1)
    f = tmp_path / "cpu-w8.yaml"
    f.write_text(src.replace("precision: int8", "precision: w8a16", 1))
    assert load_target(str(f)).precision == "w8a16"
    g = tmp_path / "cpu-x.yaml"
    g.write_text(src.replace("name: cpu-w8\n", "name: cpu-x\nprecison: int8\n", 1))
    with pytest.raises(ConfigError, match="precison"):
        load_target(str(g))


def test_tflite_describes_its_conversion_from_the_manifest():
    report = {"float_ops": [{"op": "SOFTMAX", "count": 1, "macs_share": 0.0, "why": "x"}], "float_ops_total": 1,
              "ops_total": 7, "edge_conversions": {}}
    tflite = get_backend("tflite")
    assert tflite.describe_conversion({"conversion": {"float_op_report": report}}) == \
        ["1 float ops of 7: SOFTMAX x1 (0% of MACs)"]
    assert tflite.describe_conversion(SimpleNamespace(conversion=None)) == []
    manifest = {"runtime": {"backend": "tflite"}, "conversion": {"float_op_report": report}}
    assert describe_conversion(manifest) == ["1 float ops of 7: SOFTMAX x1 (0% of MACs)"]
    assert describe_conversion({"runtime": {"backend": "not-installed"}, "conversion": {}}) == []


def _manifest(target, backend, device):
    return SimpleNamespace(target=target, runtime=SimpleNamespace(backend=backend), profile={"device": device})


def test_install_asks_the_bundles_backend_about_this_host():
    from edgepack.shipping.device import Host, check_target

    orin = _manifest("jetson-orin-nano", "tensorrt", {"name": "Orin", "software": {"l4t": "36.4"}})
    assert get_backend("tensorrt").check_host(orin, Host("aarch64", l4t=False))[0].startswith(
        "the bundle is for 'jetson-orin-nano' (Orin), a Jetson")
    dgpu = _manifest("rtx", "tensorrt", {"name": "RTX"})
    assert get_backend("tensorrt").check_host(dgpu, Host("x86_64", tensorrt=True)) == []
    with pytest.raises(WrongTargetError, match="runs on TensorRT, which is not installed"):
        check_target(dgpu, host=Host("x86_64"))


def test_a_bundle_for_a_backend_not_installed_here_is_a_problem_not_a_crash():
    from edgepack.shipping.device import Host, check_target

    qnn = _manifest("snapdragon", "qnn", {"name": "Snapdragon 8 Gen 3"})
    with pytest.raises(WrongTargetError, match=r"backend 'qnn', which is not installed here \(installed backends: "):
        check_target(qnn, host=Host("aarch64"))
    assert "backend 'qnn'" in check_target(qnn, force=True, host=Host("aarch64"))[0]
