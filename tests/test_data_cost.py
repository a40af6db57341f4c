"""What reading data and shipping it costs, checked by counting (member reads, traced bytes, bundle
bytes), never by timing: npz members read or memory-mapped once, samples as views, arrays shared
between readers of one file; lean validation payloads that still validate."""

from __future__ import annotations

import tracemalloc
import zipfile

import numpy as np
import pytest

from edgepack.artifact import TensorSpec
from edgepack.calibration import npz
from edgepack.calibration.reader import load_samples
from edgepack.errors import CalibrationError

N = 10_000
SPEC = [TensorSpec("x", ("batch", 1, 28, 28), "float32")]


def _write(path, compressed: bool, n: int = N) -> int:
    x = np.random.default_rng(0).random((n, 1, 28, 28), dtype=np.float32)
    (np.savez_compressed if compressed else np.savez)(path, x=x, labels=np.arange(n) % 10)
    return x.nbytes


@pytest.fixture
def member_opens(monkeypatch):
    """How many times a member of a zip is opened for reading (the old reader opened one per sample)."""
    count = {"n": 0}
    real = zipfile.ZipFile.open

    def spy(self, name, mode="r", *a, **k):
        if mode == "r":
            count["n"] += 1
        return real(self, name, mode, *a, **k)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    return count


@pytest.mark.parametrize("compressed", [False, True], ids=["stored", "compressed"])
def test_10000_sample_npz_reads_each_member_once(tmp_path, member_opens, compressed):
    nbytes = _write(tmp_path / "d.npz", compressed)
    tracemalloc.start()
    try:
        s = load_samples("d.npz", tmp_path, SPEC, None, None, 0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s) == N and s.samples[123]["x"].shape == (1, 1, 28, 28)
    # stored members are memory-mapped (no member opened through zipfile); compressed ones read once each
    assert member_opens["n"] == (2 if compressed else 0)
    # linear: one copy of the data at most (the old reader held a copy per sample: N times the data)
    assert peak < (1.3 * nbytes if compressed else 0.25 * nbytes), peak
    # every sample is a view of the one array, not a copy
    bases = {id(smp["x"].base) for smp in s.samples}
    assert len(bases) == 1


def test_stored_npz_memory_mapped_samples_are_private_and_checked(tmp_path):
    _write(tmp_path / "d.npz", False, 50)
    before = (tmp_path / "d.npz").read_bytes()
    s = load_samples("d.npz", tmp_path, SPEC, None, None, 0)
    x = np.load(tmp_path / "d.npz")["x"]
    assert all(np.array_equal(s.samples[i]["x"][0], x[i]) for i in range(50))
    s.samples[0]["x"][...] = 7.0  # copy-on-write: writable, and the file is not changed
    assert (tmp_path / "d.npz").read_bytes() == before
    assert s.labels == list(range(10)) * 5


def test_same_file_shares_arrays_and_a_changed_file_is_read_again(tmp_path):
    _write(tmp_path / "d.npz", True, 40)
    before = npz.reads["read", "x"]
    a = load_samples("d.npz", tmp_path, SPEC, None, 10, 0)
    b = load_samples("d.npz", tmp_path, SPEC, None, 20, 1)
    assert npz.reads["read", "x"] - before == 1  # once for both sets
    assert a.samples[0]["x"].base is b.samples[0]["x"].base
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((40, 1, 28, 28), np.float32), labels=np.zeros(40, int))
    c = load_samples("d.npz", tmp_path, SPEC, None, None, 0)
    assert float(np.abs(c.samples[0]["x"]).max()) == 0.0 and c.samples[0]["x"].base is not a.samples[0]["x"].base


def test_memory_mapped_fortran_order_and_batch_axis(tmp_path):
    spec = [TensorSpec("h", (2, "batch", 3), "float32")]
    h = np.asfortranarray(np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3))
    np.savez(tmp_path / "d.npz", h=h)
    s = load_samples("d.npz", tmp_path, spec, None, None, 0)
    assert s.samples[4]["h"].shape == (2, 1, 3) and np.array_equal(s.samples[4]["h"][:, 0], h[4])


def test_stored_member_with_a_flipped_byte_is_corrupt(tmp_path):
    _write(tmp_path / "d.npz", False, 20)
    f = tmp_path / "d.npz"
    with zipfile.ZipFile(f) as z:
        info = z.getinfo("x.npy")
    data = bytearray(f.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CalibrationError, match=r"corrupt: cannot read its array 'x' \(Bad CRC-32"):
        load_samples("d.npz", tmp_path, SPEC, None, None, 0)


def test_object_member_is_refused_as_pickle(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(CalibrationError, match="holds Python objects"):
        load_samples("d.npz", tmp_path, SPEC, None, None, 0)
