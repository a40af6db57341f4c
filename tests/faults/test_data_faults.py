"""Bad data, bad files, bad names: each is refused before anything is calibrated or written, with one
`error:` line naming the file (and key, input, sample) and the class's exit code. Nothing lands in
--out (no bundle, no `.edgepack-*.build` scratch folder) and the project folder is left as it was."""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import edit_yaml
from tests.faults.helpers import Fault, cli, expect_fault, snapshot

CALIB, EVAL = "data/calib.npz", "data/eval.npz"


def _tensors(root: Path, rel: str, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The raw images of ``rel`` as preprocessed float32 tensors (so that NaN/Inf can be stored)."""
    d = np.load(root / rel)
    x = ((d["images"].astype(np.float32) / 255 - 0.5) / 0.5)[:, None]
    return x[:n], d["labels"][:n]


def write_tensors(root: Path, rel: str, change_x: Callable | None = None, change_y: Callable | None = None,
                  n: int | None = None) -> None:
    x, y = _tensors(root, rel, n)
    if change_x:
        change_x(x)
    if change_y:
        y = change_y(y)
    np.savez(root / rel, image=x, labels=y)


def set_label(i: int, value) -> Callable:
    def change(y):
        y = y.astype(type(value)) if isinstance(value, float) else y.copy()
        y[i] = value
        return y
    return change


def drop_labels_list(root: Path) -> None:
    edit_yaml(root, "labels: [zero, one, two, three, four, five, six, seven, eight, nine]\n", "")


# --- the rows: (setup(project), exit code, key words of the error line) -----------------------------------

def calib_inf(p):  # 50 samples, all used (samples: 200): indices are the file's
    write_tensors(p, CALIB, lambda x: x.__setitem__((17, 0, 3, 3), np.inf), n=50)


def eval_nan(p):
    write_tensors(p, EVAL, lambda x: x.__setitem__((5, 0, 0, 0), np.nan))


def callable_nan(p):
    (p / "data" / "source.py").write_text(
        "import numpy as np\n"
        "def samples():\n"
        "    for i in range(40):\n"
        "        x = np.random.default_rng(i).standard_normal((1, 1, 8, 8)).astype(np.float32)\n"
        "        if i == 9:\n"
        "            x[0, 0, 1, 1] = np.nan\n"
        "        yield {'image': x}\n")
    edit_yaml(p, f"source: {CALIB}", "source: data/source.py:samples")


def labels_nan(p):
    write_tensors(p, EVAL, change_y=set_label(3, float("nan")))


def label_42(p):
    write_tensors(p, EVAL, change_y=set_label(3, 42))


def label_minus_1(p):
    write_tensors(p, EVAL, change_y=set_label(3, -1))


def label_1_5(p):
    write_tensors(p, EVAL, change_y=set_label(3, 1.5))


def label_10_no_labels_list(p):  # no `labels`: the model's 10 outputs bound the labels (known once it has run)
    drop_labels_list(p)
    write_tensors(p, EVAL, change_y=set_label(7, 10))


def not_utf8(p):
    f = p / "edgepack.yaml"
    f.write_bytes(f.read_bytes().replace(b"name: digits", b"name: d\xe9gits"))


def npz_crc(p):
    """One byte flipped inside the stored (uncompressed) images member: the zip's CRC no longer matches."""
    f = p / EVAL
    with zipfile.ZipFile(f) as z:
        info = z.getinfo("images.npy")
        assert info.compress_type == zipfile.ZIP_STORED
    data = bytearray(f.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 500] ^= 0xFF
    f.write_bytes(bytes(data))


def npz_truncated(p):
    f = p / EVAL
    f.write_bytes(f.read_bytes()[: 30_000])


def project_name_dots(p):
    edit_yaml(p, "name: digits", "name: digits..x")


def project_name_long(p):
    edit_yaml(p, "name: digits", "name: " + "d" * 65)


def project_version_long(p):
    edit_yaml(p, "version: 1.2.3", "version: 1.2.3-" + "a" * 60)


def factory_exits(p):
    (p / "model.py").write_text((p / "model.py").read_text() + "\n\ndef exits():\n    import sys\n    sys.exit(3)\n")
    edit_yaml(p, "model.py:build", "model.py:exits")


def factory_interrupted(p):
    (p / "model.py").write_text((p / "model.py").read_text() + "\n\ndef stop():\n    raise KeyboardInterrupt\n")
    edit_yaml(p, "model.py:build", "model.py:stop")


def weights_empty(p):
    (p / "weights.pt").write_bytes(b"")


def weights_nan(p):
    import torch

    state = torch.load(p / "weights.pt")
    state["body.3.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, p / "weights.pt")


def outputs_nan(p):
    """Finite weights and data, finite on random inputs (the export check passes), NaN on real digits: the
    top-left pixel of most digits is background (-1 after normalisation)."""
    (p / "model.py").write_text((p / "model.py").read_text() + (
        "\n\nclass Corner(DigitsCNN):\n"
        "    def forward(self, x):\n"
        "        return self.body(x) + torch.where(x[:, :1, 0, 0] == -1.0, float('nan'), 0.0)\n"
        "\n\ndef corner():\n    return Corner()\n"))
    edit_yaml(p, "model.py:build", "model.py:corner")


ROWS = {
    "calibration Inf": (calib_inf, 6, (CALIB, "input 'image'", "sample 17", "holds Inf")),
    "evaluation NaN": (eval_nan, 6, (EVAL, "input 'image'", "sample 5", "holds NaN")),
    "function source NaN": (callable_nan, 6, ("data/source.py:samples", "sample 9", "holds NaN")),
    "label NaN": (labels_nan, 6, (EVAL, "label nan", "sample 3", "not a whole class index")),
    "label 42": (label_42, 6, (EVAL, "label 42", "sample 3", "10 classes")),
    "label -1": (label_minus_1, 6, (EVAL, "label -1", "sample 3", "negative", "10 classes")),
    "label 1.5": (label_1_5, 6, (EVAL, "label 1.5", "sample 3", "not a whole class index")),
    "label 10, no labels list": (label_10_no_labels_list, 6,
                                 (EVAL, "label 10", "sample 7", "10 classes", "model's output")),
    "edgepack.yaml not UTF-8": (not_utf8, 2, ("edgepack.yaml", "not UTF-8", "line 1")),
    "npz CRC error": (npz_crc, 6, ("eval.npz", "corrupt", "images")),
    "npz truncated": (npz_truncated, 6, ("eval.npz", "cannot read")),
    "project name with ..": (project_name_dots, 2, ("edgepack.yaml", "key 'name'", "digits..x")),
    "project name too long": (project_name_long, 2, ("edgepack.yaml", "key 'name'", "64 characters")),
    "project version too long": (project_version_long, 2, ("edgepack.yaml", "key 'version'", "64 characters")),
    "factory calls sys.exit(3)": (factory_exits, 9, ("model.py:exits", "sys.exit(3)")),
    "factory interrupted": (factory_interrupted, 130, ("interrupted",)),
    "weights.pt empty": (weights_empty, 9, ("weights.pt is empty (0 bytes)",)),
    "weights hold NaN": (weights_nan, 9, ("weights hold NaN", "body.3.weight")),
    "outputs hold NaN": (outputs_nan, 9, ("outputs hold NaN", "output 'logits'", EVAL)),
}


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


def build(proj: Path, out: Path, *extra):
    return cli("build", "--project", proj, "--target", "onnx", "--out", out, "--quiet", *extra)


def _precompile(proj: Path) -> None:
    """Write model.py's bytecode now, so that importing it during the build changes nothing in the project."""
    import importlib.util
    import py_compile

    py_compile.compile(str(proj / "model.py"), cfile=importlib.util.cache_from_source(str(proj / "model.py")),
                       doraise=True)


@pytest.mark.parametrize("what", list(ROWS))
def test_bad_data_is_refused_before_anything_is_written(project, out, what):
    setup, code, words = ROWS[what]
    setup(project)
    _precompile(project)
    fault = Fault(what, code, words, [out, project])
    before = snapshot(out, project)
    expect_fault(build(project, out), fault, before)


# --- target profiles named like paths ------------------------------------------------------------------

def _profile(folder: Path, file: str, name: str) -> Path:
    from edgepack.target import _builtin_files

    onnx_yaml = next(f for f in _builtin_files() if f.name == "onnx.yaml")
    folder.mkdir(exist_ok=True)
    text = onnx_yaml.read_text()
    assert "\nname: onnx\n" in text
    (folder / file).write_text(text.replace("\nname: onnx\n", f"\nname: {name!r}\n"))
    return folder / file


@pytest.mark.parametrize("name", ["../../x", "a/b", "Upper", "x" * 64])
def test_profile_name_must_be_kebab_case(project, out, tmp_path, name):
    profiles = tmp_path / "profiles"
    path = _profile(profiles, "x.yaml", name)
    _precompile(project)
    before = snapshot(out, project, profiles)
    fault = Fault(f"profile name {name!r}", 2, ("x.yaml", "key 'name'", "not a profile name"), [out, project, profiles])
    # by path: the file name cannot be matched against `name`, so the pattern is the only guard
    expect_fault(cli("build", "--project", project, "--target", path, "--out", out, "--quiet"), fault, before)
    # in a --targets-dir folder: refused when the folder is read, whatever target is asked for
    expect_fault(build(project, out, "--targets-dir", profiles), fault, before)


def test_builtin_profile_names_are_kebab_case():
    from edgepack.target import PROFILE_NAME, discover

    known = discover()
    assert {"onnx", "cpu", "jetson-orin-nano", "x86-avx512-vnni"} <= set(known)
    assert all(PROFILE_NAME.match(n) for n in known)


# --- ONNX sources: declared outputs must be the file's ---------------------------------------------------

@pytest.fixture(scope="module")
def digits_onnx(trained_project, tmp_path_factory) -> Path:
    """The trained digits CNN exported to ONNX (TorchScript exporter), outputs [logits, scores]: scores is
    an Identity copy, so that a subset and a reordering can be declared."""
    import importlib.util

    import onnx
    import torch
    from onnx import helper

    spec = importlib.util.spec_from_file_location("digits_model_for_onnx", trained_project / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build()
    model.load_state_dict(torch.load(trained_project / "weights.pt"))
    path = tmp_path_factory.mktemp("digits-onnx") / "model.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 8, 8),), str(path), input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                      dynamo=False)
    m = onnx.load(str(path))
    m.graph.node.append(helper.make_node("Identity", ["logits"], ["scores"], name="scores_copy"))
    m.graph.output.append(helper.make_tensor_value_info("scores", onnx.TensorProto.FLOAT, ["batch", 10]))
    onnx.checker.check_model(m)
    onnx.save(m, str(path))
    return path


def onnx_project(project: Path, model: Path, outputs: str) -> Path:
    shutil.copyfile(model, project / "model.onnx")
    edit_yaml(project, "model:\n  path: model.py:build\n  weights: weights.pt\n", "model: model.onnx\n")
    edit_yaml(project, "outputs: [logits]", f"outputs: [{outputs}]")
    return project


@pytest.mark.parametrize("outputs, words", [
    ("probs", ("edgepack.yaml", "key 'outputs'", "'probs'", "logits, scores")),
    ("logit, scores", ("edgepack.yaml", "key 'outputs'", "'logit'", "logits, scores")),
    ("scores, logits", ("edgepack.yaml", "key 'outputs'", "['logits', 'scores']", "order")),
    ("logits", ("edgepack.yaml", "key 'outputs'", "['logits', 'scores']")),
])
def test_onnx_outputs_must_match_the_file(project, out, digits_onnx, outputs, words):
    onnx_project(project, digits_onnx, outputs)
    before = snapshot(out, project)
    expect_fault(build(project, out), Fault(f"outputs: [{outputs}]", 2, words, [out, project]), before)


def test_onnx_outputs_as_in_the_file_build(project, out, digits_onnx):
    onnx_project(project, digits_onnx, "logits, scores")
    res = build(project, out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["digits-1.2.3-onnx.edgepack"]


def test_empty_onnx_file(project, out, digits_onnx):
    onnx_project(project, digits_onnx, "logits, scores")
    (project / "model.onnx").write_bytes(b"")
    before = snapshot(out, project)
    expect_fault(build(project, out), Fault("model.onnx empty", 9, ("model.onnx is empty (0 bytes)",),
                                            [out, project]), before)


def test_onnx_weights_with_nan(project, out, digits_onnx):
    import onnx
    from onnx import numpy_helper

    onnx_project(project, digits_onnx, "logits, scores")
    m = onnx.load(str(project / "model.onnx"))
    init = next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(project / "model.onnx"))
    before = snapshot(out, project)
    expect_fault(build(project, out), Fault("ONNX weights NaN", 9, ("weights hold NaN", init.name),
                                            [out, project]), before)


def test_a_fixed_size_the_graph_cannot_take(tmp_path):
    """A graph that reshapes to 12 values, declared with 10: ONNX Runtime's failure becomes one line, exit 9."""
    from onnx import TensorProto, helper, numpy_helper

    import onnx

    shape = numpy_helper.from_array(np.array([1, 4, 3], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    (tmp_path / "data").mkdir()
    rng = np.random.default_rng(0)
    for name in ("calib", "eval"):
        np.savez(tmp_path / "data" / f"{name}.npz", x=rng.normal(size=(20, 10)).astype(np.float32))
    (tmp_path / "edgepack.yaml").write_text(
        "name: fixed\nversion: 0.1.0\nmodel: {path: m.onnx}\ninputs: [{name: x, shape: [batch, 10]}]\n"
        "outputs: [y]\ncalibration: {source: data/calib.npz}\nevaluation: {source: data/eval.npz}\n")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    res = cli("build", "--project", tmp_path, "--target", "onnx", "--out", out, "--quiet")
    expect_fault(res, Fault("fixed size the graph cannot take", 9, ("ONNX Runtime could not run", "x (1, 10)"),
                            [out]), before)
