"""The project file and target profiles: parsing, close matches, user folders."""

from __future__ import annotations

import pytest

from edgepack.errors import ConfigError
from edgepack.project import load_project
from edgepack.target import TARGETS_PATH_ENV, discover, load_target
from tests.conftest import PROJECT_YAML


def write(tmp_path, text):
    (tmp_path / "edgepack.yaml").write_text(text)
    return tmp_path


def test_loads_the_example_shape(tmp_path):
    p = load_project(write(tmp_path, PROJECT_YAML))
    assert p.name == "digits" and p.version == "1.2.3"
    assert p.model.kind == "callable" and p.inputs[0].shape == ["batch", 1, 8, 8]
    assert p.root == tmp_path.resolve()
    assert p.label_names()[9] == "nine"


@pytest.mark.parametrize("old,new,match", [
    ("version: 1.2.3", "version: 1.2", "not a semantic version"),
    ("name: digits", "name: Digits Model", "lowercase"),
    ("path: model.py:build", "path: model.py", "file.py:factory"),
    ("dtype: float32", "dtype: float", "unknown dtype 'float'"),
    ("shape: [batch, 1, 8, 8]", "shape: [batch, 0, 8, 8]", "positive integers"),
    ("mean: [0.5]", "mean: [0.5, 0.5]", "mean and std"),
    ("samples: 200", "samples: -3", "calibration.samples"),
    ("max_accuracy_drop: 2.0", "max_accuracy_dorp: 2.0", "did you mean 'max_accuracy_drop'"),
])
def test_bad_values_name_the_key(tmp_path, old, new, match):
    with pytest.raises(ConfigError) as info:
        load_project(write(tmp_path, PROJECT_YAML.replace(old, new)))
    assert match in info.value.message + info.value.hint
    assert "edgepack.yaml" in info.value.message


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"not valid YAML \(line"):
        load_project(write(tmp_path, "name: [unclosed\n"))


def test_missing_project_file(tmp_path):
    with pytest.raises(ConfigError, match="project file not found") as info:
        load_project(tmp_path)
    assert "edgepack init" in info.value.hint


def test_builtin_targets_and_aliases():
    known = discover()
    assert {"cpu", "onnx"} <= set(known)
    assert known["x86-avx2"] is known["cpu"]
    assert load_target("onnx").quantization.activation_type == "uint8"


def test_user_folder_adds_and_overrides_profiles(tmp_path, monkeypatch):
    (tmp_path / "edge-box.yaml").write_text(
        "name: edge-box\ndescription: my box\nbackend: onnxruntime\nprecision: fp32\n"
        "device: {kind: cpu, name: my box, cores: 4}\n")
    monkeypatch.setenv(TARGETS_PATH_ENV, str(tmp_path))
    p = load_target("edge-box")
    assert p.precision == "fp32" and p.device.cores == 4


def test_profile_name_must_match_its_file(tmp_path):
    (tmp_path / "a.yaml").write_text("name: b\ndescription: x\nbackend: onnxruntime\ndevice: {kind: cpu, name: x}\n")
    with pytest.raises(ConfigError, match="named 'a.yaml'"):
        discover([tmp_path])
