"""Calibration/evaluation readers: npz tensors, raw images, image folders, callables."""

from __future__ import annotations

import numpy as np
import pytest

from edgepack.artifact import TensorSpec
from edgepack.calibration.reader import load_samples
from edgepack.errors import CalibrationError, ConfigError

SPEC = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
PRE = {"layout": "NCHW", "scale": 1 / 255, "mean": [0.5], "std": [0.5], "color": "gray"}


def test_npz_tensors_sampled_with_seed(tmp_path):
    np.savez(tmp_path / "d.npz", image=np.arange(10 * 64, dtype=np.float32).reshape(10, 1, 8, 8),
             labels=np.arange(10))
    a = load_samples("d.npz", tmp_path, SPEC, None, 4, seed=1)
    b = load_samples("d.npz", tmp_path, SPEC, None, 4, seed=1)
    c = load_samples("d.npz", tmp_path, SPEC, None, 4, seed=2)
    assert len(a) == 4 and a.fingerprint == b.fingerprint != c.fingerprint
    assert [int(s["image"][0, 0, 0, 0]) // 64 for s in a] == a.labels


def test_npz_raw_images_are_preprocessed(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.full((3, 8, 8), 255, np.uint8))
    s = load_samples("d.npz", tmp_path, SPEC, PRE, None, 0)
    assert s.samples[0]["image"].shape == (1, 1, 8, 8) and np.allclose(s.samples[0]["image"], 1.0)


def test_raw_images_without_preprocess_block_is_a_config_error(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="no `preprocess` block"):
        load_samples("d.npz", tmp_path, SPEC, None, None, 0)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    for cls, value in (("cat", 0), ("dog", 255)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    s = load_samples("imgs", tmp_path, SPEC, PRE, None, 0, labels=["cat", "dog"])
    assert s.labels == [0, 0, 1, 1]
    assert s.samples[0]["image"].shape == (1, 1, 8, 8)  # resized to the declared input size
    assert np.allclose(s.samples[3]["image"], 1.0, atol=1e-2)


def test_callable_source_with_labels(tmp_path):
    (tmp_path / "data.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for i in range(3):\n"
        "        yield {'image': np.zeros((1, 1, 8, 8), np.float32)}, i\n")
    s = load_samples("data.py:samples", tmp_path, SPEC, None, None, 0)
    assert len(s) == 3 and s.labels == [0, 1, 2]


def test_wrong_input_name(tmp_path):
    np.savez(tmp_path / "d.npz", pixels=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(CalibrationError, match="expected one per input"):
        load_samples("d.npz", tmp_path, SPEC, None, None, 0)


def test_missing_source(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_samples("nope.npz", tmp_path, SPEC, None, None, 0)


def test_channels_last_tensors_are_named_as_such(tmp_path):
    spec = [TensorSpec("image", ("batch", 3, 8, 8), "float32")]
    np.savez(tmp_path / "d.npz", image=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(CalibrationError, match=r"channels-last \(NHWC\) \(1, 8, 8, 3\).*expects \[batch, 3, 8, 8\]") as e:
        load_samples("d.npz", tmp_path, spec, None, None, 0)
    assert "np.transpose(x, (0, 3, 1, 2))" in e.value.hint
    np.savez(tmp_path / "d.npz", image=np.zeros((3, 8, 8, 5), np.float32))   # not a layout swap: plain message
    with pytest.raises(CalibrationError, match="has shape"):
        load_samples("d.npz", tmp_path, spec, None, None, 0)
