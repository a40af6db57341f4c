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


# --- lean bundles -------------------------------------------------------------------------------------------

def _members(bundle) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _npz(data: bytes) -> tuple[dict[str, np.ndarray], set[int]]:
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        kinds = {i.compress_type for i in z.infolist()}
    with np.load(io.BytesIO(data)) as f:
        return {k: f[k] for k in f.files}, kinds


def test_digits_bundle_ships_raw_uint8_images_compressed(built):
    out, results = built
    files = _members(out / "digits-1.2.3-cpu.edgepack")
    m = results["cpu"].manifest
    assert m.validation.inputs_form == "images" and m.validation.holdout_samples == 300
    ins, kinds = _npz(files["validation/inputs.npz"])
    hold, _ = _npz(files["validation/holdout.npz"])
    assert kinds == {zipfile.ZIP_DEFLATED}
    assert ins["images"].dtype == np.uint8 and ins["images"].shape == (200, 8, 8) and set(ins) == {"images"}
    assert hold["images"].shape == (300, 8, 8) and hold["labels"].shape == (300,)
    # the float32 tensors it replaces: (200 + 300) samples x 1x8x8 x 4 bytes
    payload = sum(len(files[f"validation/{n}.npz"]) for n in ("inputs", "holdout"))
    assert payload < 0.25 * 500 * 64 * 4, payload


def test_images_form_gives_back_the_measured_tensors(trained_project, tmp_path):
    from edgepack.calibration.payload import write_payload
    from edgepack.project import load_project
    from edgepack.validation import StoredInputs

    p = load_project(trained_project / "edgepack.yaml")
    pre = p.preprocess.model_dump()
    ev = load_samples("data/eval.npz", trained_project, p.input_specs(), pre, None, 0, p.label_names(), "evaluation")
    vdir = tmp_path / "validation"
    outputs = [[np.zeros((1, 10), np.float32)] for _ in range(len(ev))]
    fields = write_payload(vdir, ev, outputs, p.input_specs(), ["logits"], pre, 40)
    assert fields["inputs_form"] == "images" and fields["holdout_samples"] == 40

    class M:  # the manifest fields StoredInputs reads
        runtime = type("R", (), {"inputs": [s.to_json() for s in p.input_specs()]})
        validation = type("V", (), {"inputs_form": "images"})
        preprocess = pre

    golden, hold = StoredInputs(vdir / "inputs.npz", M), StoredInputs(vdir / "holdout.npz", M)
    assert all(np.array_equal(golden[i]["image"], ev.samples[i]["image"]) for i in range(200))
    assert all(np.array_equal(hold[j]["image"], ev.samples[len(ev) - 40 + j]["image"]) for j in range(40))
    assert list(hold.labels) == ev.labels[-40:]


def test_tensors_stay_tensors_when_images_were_resized_or_not_uint8(tmp_path):
    from edgepack.calibration.payload import write_payload

    spec = [TensorSpec("image", ("batch", 1, 8, 8), "float32")]
    pre = {"layout": "NCHW", "scale": 1 / 255, "mean": [0.5], "std": [0.5], "color": "gray"}
    np.savez(tmp_path / "big.npz", images=np.full((5, 16, 16), 200, np.uint8), labels=np.zeros(5, int))
    np.savez(tmp_path / "tensors.npz", image=np.zeros((5, 1, 8, 8), np.float32), labels=np.zeros(5, int))
    for name in ("big.npz", "tensors.npz"):
        ev = load_samples(name, tmp_path, spec, pre, None, 0)
        fields = write_payload(tmp_path / name[:-4], ev, [[np.zeros((1, 3), np.float32)]] * 5, spec, ["y"], pre)
        ins, _ = _npz((tmp_path / name[:-4] / "inputs.npz").read_bytes())
        assert fields["inputs_form"] == "tensors" and ins["image"].dtype == np.float32
        assert ins["image"].shape == (5, 1, 1, 8, 8) and fields["holdout_samples"] == 5


def test_holdout_cap_zero_ships_no_holdout_and_text_holdouts_keep_their_first_texts(tmp_path):
    from edgepack.calibration.payload import holdout_indices, write_payload
    from edgepack.calibration.reader import SampleSet

    spec = [TensorSpec("x", ("batch", 2), "float32")]
    ev = SampleSet([{"x": np.full((1, 2), i, np.float32)} for i in range(500)], [i % 3 for i in range(500)], "s")
    fields = write_payload(tmp_path / "v", ev, [[np.zeros((1, 3), np.float32)]] * 500, spec, ["y"], None, 0)
    assert fields["holdout_file"] is None and fields["holdout_samples"] == 0
    assert not (tmp_path / "v" / "holdout.npz").exists()
    assert holdout_indices(ev, None, False) == list(range(200, 500))  # the default cap, from the end
    assert holdout_indices(ev, None, True) == list(range(500))  # texts: all by default
    assert holdout_indices(ev, 10, True) == list(range(10))  # the golden inputs are the first texts


def test_holdout_cap_is_a_validated_project_key(project):
    from tests.conftest import edit_yaml
    from edgepack.errors import ConfigError
    from edgepack.project import load_project

    edit_yaml(project, "  metric: top1\n", "  metric: top1\n  holdout_samples: 50\n")
    assert load_project(project / "edgepack.yaml").evaluation.holdout_samples == 50
    edit_yaml(project, "holdout_samples: 50", "holdout_samples: -1")
    with pytest.raises(ConfigError, match="holdout_samples"):
        load_project(project / "edgepack.yaml")


def test_a_bundle_with_float32_uncompressed_validation_files_still_validates(built, tmp_path):
    """Bundles built before: tensors as float32 in plain np.savez files, no validation.inputs_form."""
    import tarfile

    from edgepack.bundle import Validation, file_entries, write_bundle
    from edgepack.validation import StoredInputs, validate

    out, results = built
    staging = tmp_path / "staging"
    with tarfile.open(out / "digits-1.2.3-cpu.edgepack") as tar:
        tar.extractall(staging, filter="data")
    m = results["cpu"].manifest
    for name in ("inputs", "holdout"):
        stored = StoredInputs(staging / "validation" / f"{name}.npz", m)
        extra = {"labels": stored.labels} if stored.labels is not None else {}
        np.savez(staging / "validation" / f"{name}.npz", image=np.stack([stored[i]["image"] for i in range(len(stored))]),
                 **extra)
    with np.load(staging / "validation" / "outputs.npz") as z:
        outs = {k: z[k] for k in z.files}
    np.savez(staging / "validation" / "outputs.npz", **outs)
    v = m.validation.model_dump(exclude={"inputs_form"})
    old = m.model_copy(update={"validation": Validation(**v), "files": file_entries(staging)})
    assert "inputs_form" not in old.model_dump()["validation"]
    bundle = tmp_path / "old.edgepack"
    write_bundle(staging, old, bundle)
    with np.load(staging / "validation" / "inputs.npz") as z:
        assert z["image"].dtype == np.float32 and z["image"].shape == (200, 1, 1, 8, 8)
    res = validate(bundle, report=tmp_path / "r.json", runs=5)
    assert res["passed"] and res["golden"]["within_tolerance"] == 1.0 and res["holdout"]["samples"] == 300


def test_each_model_is_timed_once_per_target(built):
    """The FP32 reference, FP32 on the target's runtime and the compiled model all take their latency
    from the one in-turn window (the compiled model's is also what validate compares a device with);
    the compiled model's section carries the window's noise verdict."""
    m = built[1]["cpu"].manifest.measurements
    ref, fp32, comp = m.reference.latency, m.target_fp32.latency, m.compiled.latency
    assert "in turn with compiled" in ref.how["interleaved"] and "in turn with" in fp32.how["interleaved"]
    assert "in turn with fp32 reference" in comp.how["interleaved"]
    it = m.comparison.in_turn
    assert comp.noise["noisy"] == it["noise"]["noisy"] and "in-turn window" in comp.noise["how"]
    assert ref.p50_ms == it["p50_ms"]["fp32 reference"] and fp32.p50_ms == it["p50_ms"]["fp32 on the target's runtime"]
    assert comp.p50_ms == it["p50_ms"]["compiled"] and comp.how["runs"] == it["runs"]["compiled"]
    assert ref.how["runs"] == it["runs"]["fp32 reference"] >= 12 * 5  # a dozen rounds of blocks of >= 5 calls
    assert comp.how["warmup_runs"] == built[1]["cpu"].manifest.profile["measurement"]["warmup_runs"]
    from edgepack.measure.memory import RUNS

    for mem in (m.reference.peak_memory, m.compiled.peak_memory):  # probes collected, none left pending
        assert mem.measured and mem.peak_mb > 0 and mem.how["runs"] == RUNS
    stages = built[1]["cpu"].manifest.timings["stages"]
    assert all(s["peak_rss_mb"] >= s["rss_mb"] > 0 for s in stages)


def _photo_folder(folder, n: int, size: int = 48):
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(n):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size + 16, size + 8, 3), dtype=np.uint8)).save(
            folder / f"c{i % 2}" / f"{i:04d}.png")


def test_an_image_set_holds_its_images_and_one_chunk_of_inputs(tmp_path):
    """Memory bounded by a chunk: the set keeps each photo resized to the model's size in uint8 (a quarter
    of its float32 input) and makes the inputs when read, at most PreprocessedImages.CHUNK at a time."""
    import pickle

    from edgepack import preprocess as pp
    from edgepack.calibration.reader import PreprocessedImages

    n, size = 300, 48
    _photo_folder(tmp_path / "photos", n, size)
    spec = [TensorSpec("image", ("batch", 3, size, size), "float32")]
    pre = {"layout": "NCHW", "scale": 1 / 255, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3], "color": "rgb"}
    s = load_samples("photos", tmp_path, spec, pre, None, 0)
    assert isinstance(s.samples, PreprocessedImages) and len(s) == n and s.labels == [0] * (n // 2) + [1] * (n // 2)
    held = s.samples.images
    assert all(im.dtype == np.uint8 and im.shape == (size, size, 3) for im in held)  # resized once, at load
    one_input = 3 * size * size * 4
    assert sum(im.nbytes for im in held) == n * one_input // 4
    # the inputs are what the bundled preprocessing makes of each photo, whenever and however they are read
    from PIL import Image

    files = sorted((tmp_path / "photos").rglob("*.png"))
    for i in (0, 31, 32, n - 1):
        want = pp.apply(pre, np.asarray(Image.open(files[i]).convert("RGB")), (size, size))[None]
        assert np.array_equal(s.samples[i]["image"], want) and np.array_equal(s.samples[i - n]["image"], want)
    assert [np.array_equal(a["image"], b["image"]) for a, b in zip(s.samples[5:8], list(s)[5:8])] == [True] * 3
    with pytest.raises(IndexError):
        s.samples[n]
    # reading the whole set (as calibration or an evaluation pass does) holds one chunk of inputs at a time
    tracemalloc.start()
    try:
        total = sum(float(smp["image"].sum()) for smp in s)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == total and peak < (PreprocessedImages.CHUNK + 4) * one_input, peak
    assert peak < 0.2 * n * one_input  # the old reader held all n inputs as float32
    # a pickled set (sent to a cluster task) carries the images, not the chunk it made last
    clone = pickle.loads(pickle.dumps(s.samples))
    assert clone._chunk is None and np.array_equal(clone[7]["image"], s.samples[7]["image"])
    # drawing a subset (calibration.samples) keeps it lazy and picks the same images
    part = load_samples("photos", tmp_path, spec, pre, 10, 3)
    assert isinstance(part.samples, PreprocessedImages) and len(part) == 10
    assert all(np.array_equal(part.samples[j]["image"], s.samples[i]["image"]) for j, i in enumerate(part.indices))
