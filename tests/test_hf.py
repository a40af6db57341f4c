"""Hugging Face folders end to end on tiny models made in code: a BERT text classifier (export with
dynamic batch and sequence, INT8 on `cpu` and `onnx`, tokenizer in the bundle, validate on the bundle
alone without torch) and a ViT image classifier (preprocessing read from preprocessor_config.json)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pytest

from edgepack.bundle import manifest_schema
from edgepack.errors import CalibrationError, ConfigError, ModelError
from tests import hf_models

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TEXT_YAML = """\
name: tiny-sentiment
version: 0.1.0
# INT8 forced: these tests check the INT8 path (select_precision would pick by this host's timing)
precision: int8
model: {hf: model, task: text-classification}
dims:
  sequence: {max: 24, measure: [8, 24]}
calibration: {source: data/calib.csv}
evaluation: {source: data/eval.csv, metric: top1}
acceptance: {max_accuracy_drop: 5.0}
"""


@pytest.fixture(scope="module")
def bert_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-bert")
    hf_models.tiny_bert(root)
    (root / "edgepack.yaml").write_text(TEXT_YAML)
    return root


@pytest.fixture(scope="module")
def bert_built(bert_root, tmp_path_factory):
    from edgepack.api import build

    out = tmp_path_factory.mktemp("bert-dist")
    return {r.target: r for r in build(bert_root, ["cpu", "onnx"], out)}


def _members(bundle: Path) -> set[str]:
    with tarfile.open(bundle) as tar:
        return set(tar.getnames())


def test_text_model_builds_int8_for_cpu_and_onnx_with_its_tokenizer(bert_built):
    for target, r in bert_built.items():
        m = r.manifest
        jsonschema.validate(json.loads(m.model_dump_json()), manifest_schema())
        assert m.source.kind == "hf" and m.runtime.precision == "int8"
        assert [i["name"] for i in m.runtime.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
        assert all(i["shape"] == ["batch", "sequence"] and i["dtype"] == "int64" for i in m.runtime.inputs)
        assert m.text["max_length"] == 24 and m.text["tokenizer"] == "tokenizer/tokenizer.json"
        assert "tokenizer/tokenizer.json" in _members(r.bundle) and "validation/holdout.jsonl" in _members(r.bundle)
        meas = m.measurements
        # 300 labelled held-out texts scored in FP32 and INT8 side by side
        assert meas.reference.accuracy["samples"] == meas.compiled.accuracy["samples"] == 300
        assert meas.reference.accuracy["value"] > 85.0, "the tiny model learnt the task"
        assert meas.reference.accuracy["value"] - meas.compiled.accuracy["value"] <= 5.0, target
        assert m.validation.holdout_samples == 300
        shapes = [row["dims"]["sequence"] for row in meas.compiled.latency_by_shape]
        assert shapes == [8, 24] and all(row["p50_ms"] > 0 for row in meas.compiled.latency_by_shape)
        assert m.labels == ["negative", "positive"]
    export = next(s for s in bert_built["onnx"].manifest.stages if s["name"] == "export_onnx")
    assert export["config"]["dynamic_dims"] == ["batch", "sequence"] and export["config"]["max_abs_diff_vs_torch"] < 1e-3
    compile_cfg = next(s for s in bert_built["onnx"].manifest.stages if s["name"] == "compile")["config"]
    assert compile_cfg["quantized_op_types"] == ["MatMul", "Gemm", "Conv"]


def test_exported_text_model_takes_other_batch_and_sequence_sizes(bert_built, tmp_path):
    import numpy as np
    import onnxruntime as ort

    with tarfile.open(bert_built["onnx"].bundle) as tar:
        tar.extract("model/model.onnx", tmp_path, filter="data")
    sess = ort.InferenceSession(str(tmp_path / "model" / "model.onnx"))
    feeds = {i.name: np.ones((3, 11), np.int64) for i in sess.get_inputs()}
    assert sess.run(None, feeds)[0].shape == (3, 2)


def test_validate_reproduces_accuracy_from_the_bundle_alone_without_torch(bert_built, bert_root, tmp_path):
    """Validate in a fresh process that cannot import torch or transformers, with the HF folder gone."""
    r = bert_built["onnx"]
    report = tmp_path / "report.json"
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from pathlib import Path\n"
        "from edgepack.validation import validate\n"
        f"res = validate(Path({str(r.bundle)!r}), report=Path({str(report)!r}), runs=10)\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print(res['passed'])\n"
    )
    moved = bert_root.parent / (bert_root.name + "-away")
    bert_root.rename(moved)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        moved.rename(bert_root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(report.read_text())
    assert res["passed"] is True
    assert res["holdout"]["samples"] == 300
    assert res["holdout"]["value"] == pytest.approx(r.manifest.measurements.compiled.accuracy["value"], abs=1e-9)
    assert res["holdout"]["tokenizer_check"] == {**res["holdout"]["tokenizer_check"], "identical_ids": 200, "of": 200,
                                                 "passed": True}


def test_image_model_takes_its_preprocessing_from_the_folder(tmp_path):
    from edgepack.api import build

    hf_models.tiny_vit(tmp_path)
    (tmp_path / "edgepack.yaml").write_text(
        "name: tiny-vit\nversion: 0.1.0\nmodel: {hf: model, task: image-classification}\n"
        "calibration: {source: data/calib}\nevaluation: {source: data/eval}\n")
    [r] = build(tmp_path, ["onnx"], tmp_path / "dist")
    m = r.manifest
    assert m.runtime.inputs == [{"name": "pixel_values", "shape": ["batch", 3, 32, 32], "dtype": "float32"}]
    assert m.preprocess["mean"] == [0.5, 0.5, 0.5] and m.preprocess["scale"] == pytest.approx(1 / 255)
    assert m.labels == ["class-0", "class-1", "class-2", "class-3"]
    acc = m.measurements.compiled.accuracy
    assert acc["metric"] == "fidelity" and acc["samples"] == 40 and acc["cosine_mean"] > 0.9


# --- errors ---------------------------------------------------------------------------------------

def _project(root: Path, model_line: str, extra: str = "") -> Path:
    (root / "edgepack.yaml").write_text(TEXT_YAML.replace("model: {hf: model, task: text-classification}", model_line)
                                        + extra)
    return root


@pytest.fixture
def bert_copy(bert_root, tmp_path) -> Path:
    import shutil

    dst = tmp_path / "proj"
    shutil.copytree(bert_root, dst)
    return dst


def _build(root: Path):
    from edgepack.api import build

    return build(root, ["onnx"], root / "dist")


def test_folder_without_weights(bert_copy):
    (bert_copy / "model" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"model.hf: .*model has no weights \(model.safetensors") as e:
        _build(bert_copy)
    assert "save_pretrained" in e.value.hint
    assert not (bert_copy / "dist").exists() or not list((bert_copy / "dist").glob("*.edgepack"))


def test_folder_without_config(bert_copy):
    (bert_copy / "model" / "config.json").unlink()
    with pytest.raises(ModelError, match="has no config.json"):
        _build(bert_copy)


def test_task_that_does_not_fit_the_model_type(bert_copy):
    _project(bert_copy, "model: {hf: model, task: image-classification}")
    with pytest.raises(ModelError, match="'image-classification' does not fit model.*model_type 'bert'") as e:
        _build(bert_copy)
    assert "text-classification" in e.value.hint


def test_task_that_does_not_match_the_checkpoint_head(tmp_path):
    hf_models.tiny_bert(tmp_path, head=False)
    _project(tmp_path, "model: {hf: model, task: text-classification}")
    with pytest.raises(ModelError, match=r"does not match the checkpoint.*BertModel") as e:
        _build(tmp_path)
    assert "feature-extraction" in e.value.hint


def test_text_file_without_the_named_column(bert_copy):
    hf_models.write_csv(bert_copy / "data" / "calib.csv", hf_models.sentences(50, 3), text_column="review")
    with pytest.raises(ConfigError, match=r"calibration.source: calib.csv has no column 'text' \(columns: review, label\)") as e:
        _build(bert_copy)
    assert "calibration.text_column" in e.value.hint


def test_sequence_longer_than_the_declared_maximum(bert_copy):
    rows = hf_models.sentences(20, 4) + [(" ".join(["good"] * 30), 1)]
    hf_models.write_csv(bert_copy / "data" / "calib.csv", rows)
    with pytest.raises(CalibrationError, match=r"calib.csv text 21: 32 tokens, more than the declared maximum sequence length 24") as e:
        _build(bert_copy)
    assert "dims.sequence.max" in e.value.hint


def test_declared_maximum_beyond_the_model_positions(bert_copy):
    (bert_copy / "edgepack.yaml").write_text(TEXT_YAML.replace("max: 24, measure: [8, 24]", "max: 100"))
    with pytest.raises(ConfigError, match=r"dims.sequence.max': 100 is more than the model accepts \(64 positions\)"):
        _build(bert_copy)


def test_cli_exit_code_for_a_folder_without_weights(bert_copy):
    from typer.testing import CliRunner

    from edgepack.cli.app import app

    (bert_copy / "model" / "model.safetensors").unlink()
    res = CliRunner().invoke(app, ["build", "--project", str(bert_copy), "--target", "onnx", "--out",
                                   str(bert_copy / "dist")])
    assert res.exit_code == ModelError.exit_code
    assert "error: model.hf:" in res.output and "hint:" in res.output and "Traceback" not in res.output


def test_texts_with_unicode_line_breaks_validate(bert_root, tmp_path):
    """U+0085 and U+2028 inside evaluation texts: the bundle's holdout.jsonl keeps one text per line,
    and `validate` reads back exactly the texts the build scored."""
    import csv
    import shutil

    from edgepack.api import build
    from edgepack.validation import validate

    root = tmp_path / "proj"
    shutil.copytree(bert_root, root)
    path = root / "data" / "eval.csv"
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    for i, row in enumerate(body[:20]):
        words = row[0].split(" ")
        row[0] = ("\u0085" if i % 2 else "\u2028").join(words)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *body])
    (result,) = build(root, ["onnx"], tmp_path / "out")
    report = validate(result.bundle, report=tmp_path / "report.json", runs=5)
    assert report["passed"] and report["holdout"]["samples"] == len(body)
    assert report["holdout"]["value"] == pytest.approx(result.manifest.measurements.compiled.accuracy["value"], abs=0.5)


def test_compare_twice_on_a_text_project(bert_root, tmp_path):
    """CSV text data and the folder's tokenizer are read as the build reads them: the second run reuses."""
    import shutil

    from edgepack.compare import compare

    root = tmp_path / "proj"
    shutil.copytree(bert_root, root)
    first = compare(root, ["onnx"], tmp_path / "out", workers=1)
    events: list[tuple] = []
    second = compare(root, ["onnx"], tmp_path / "out", workers=1, progress=lambda *e: events.append(e))
    assert any(status == "done" and "reused" in detail for _, status, detail in events), events
    rows = [[(r["target"], r["status"], r["accuracy"]) for r in c.to_json()["rows"]] for c in (first, second)]
    assert rows[0] == rows[1]
    # the folder is exported as the build does it (at the sequence length's representative size) and its
    # graph counted through the run-time shapes of the attention (Shape -> Reshape): rows get estimates
    assert first.model is not None and first.model["macs"] > 0, (first.model, first.notes)
    assert all(r.estimate is not None and r.estimate["p50_ms"] > 0 for r in first.rows), first.notes
