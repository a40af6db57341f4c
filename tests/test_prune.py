"""Pruning: structured channel pruning with recovery, 2:4 sparsity kept through export, errors."""

from __future__ import annotations

import tarfile

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from edgepack.cli.app import app
from tests.conftest import edit_yaml

STRUCTURED = """
prune:
  method: structured
  target_macs: 0.4
  finetune:
    epochs: 3
    lr: 0.002
"""


@pytest.fixture(scope="module")
def pruned(trained_project, tmp_path_factory):
    import shutil

    from edgepack.api import build

    root = tmp_path_factory.mktemp("pruned") / "proj"
    shutil.copytree(trained_project, root)
    (root / "edgepack.yaml").write_text((root / "edgepack.yaml").read_text() + STRUCTURED)
    [res] = build(root, ["onnx"], root / "dist")
    return res


def test_structured_pruning_removes_macs_and_recovers(pruned):
    p = pruned.manifest.prune
    assert p["method"] == "structured" and p["ignored"] == ["body.10"]
    assert p["macs_removed"] >= 0.4 and p["after"]["params"] < p["before"]["params"]
    acc = p["accuracy_fp32"]
    assert acc["metric"] == "top1" and acc["samples"] == 500
    assert acc["after_recovery"] >= acc["before_pruning"] - 3.0
    assert p["finetune"]["epochs"] == 3 and len(p["finetune"]["loss_per_epoch"]) == 3
    assert p["finetune"]["objective"] == "cross-entropy on labels"
    eff = p["latency_effect"]
    assert eff["measured_in_same_run"] and eff["unpruned_p50_ms"] > 0 and eff["pruned_p50_ms"] > 0
    assert "prune" in [s["name"] for s in pruned.manifest.stages]


def test_pruned_model_exports_and_matches_the_pruned_torch_model(pruned):
    export = next(s for s in pruned.manifest.stages if s["name"] == "export_onnx")
    assert export["config"]["max_abs_diff_vs_torch"] < 1e-3
    # the exported graph really is smaller: the first conv lost channels
    with tarfile.open(pruned.bundle) as tar:
        model = onnx.load_from_string(tar.extractfile("model/model.onnx").read())
    shapes = [numpy_helper.to_array(i).shape for i in model.graph.initializer if numpy_helper.to_array(i).ndim == 4]
    assert min(s[0] for s in shapes) < 16


def test_sparse_2of4_pattern_holds_in_every_pruned_weight_of_the_exported_onnx(project, tmp_path):
    from edgepack.api import build

    edit_yaml(project, "acceptance:", "prune:\n  method: sparse-2of4\n  finetune: {epochs: 1}\nacceptance:")
    edit_yaml(project, "max_accuracy_drop: 2.0", "max_accuracy_drop: 100")
    [res] = build(project, ["jetson"], tmp_path)
    p = res.manifest.prune
    assert sorted(p["layers_sparse"]) == ["body.3", "body.8"]
    assert p["layers_dense"] == ["body.0"]  # 1 input channel x 3x3 = 9 weights: no whole groups of 4
    with tarfile.open(res.bundle) as tar:
        qdq = onnx.load_from_string(tar.extractfile("model/model.onnx").read())
        import json

        assert json.load(tar.extractfile("model/builder.json"))["sparsity"] is True
    checked = 0
    for init in qdq.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim not in (2, 4) or w.shape[0] == 10:
            continue  # biases, scales, and the classifier (ignored by default)
        flat = w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else w
        if flat.shape[1] % 4:
            continue
        nonzero = (flat.reshape(flat.shape[0], -1, 4) != 0).sum(axis=2)
        assert nonzero.max() <= 2, f"{init.name} breaks the 2:4 pattern"
        checked += 1
    assert checked >= 2


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_ratio_out_of_range_is_a_config_error(project):
    edit_yaml(project, "acceptance:", "prune:\n  method: structured\n  ratio: 1.5\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 2 and "prune.ratio" in res.output


def test_structured_needs_one_amount(project):
    edit_yaml(project, "acceptance:", "prune:\n  method: structured\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 2 and "exactly one of ratio, target_macs, target_params" in res.output


def test_unknown_ignored_layer_is_named(project):
    edit_yaml(project, "acceptance:", "prune:\n  ratio: 0.3\n  ignore: [head]\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 2 and "no module named ['head']" in res.output


def test_finetune_data_of_the_wrong_shape(project):
    np.savez(project / "data" / "ft.npz", image=np.zeros((8, 1, 9, 9), np.float32), labels=np.zeros(8, np.int64))
    edit_yaml(project, "acceptance:", "prune:\n  ratio: 0.3\n  finetune:\n    epochs: 1\n    data: {source: data/ft.npz}\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 6 and "shape (1, 1, 9, 9)" in res.output


def test_pruning_an_onnx_model_needs_the_pytorch_model(project, tmp_path):
    import torch

    torch.onnx.export(torch.nn.Conv2d(1, 2, 3), (torch.zeros(1, 1, 8, 8),), str(project / "m.onnx"),
                      input_names=["image"], dynamo=False)
    edit_yaml(project, "path: model.py:build\n  weights: weights.pt", "path: m.onnx")
    edit_yaml(project, "acceptance:", "prune:\n  ratio: 0.3\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 2 and "pruning needs the PyTorch model" in res.output


def test_evaluate_without_labels_scores_fidelity_against_the_reference():
    """A project with `metric: fidelity` (no labels): the unpruned model is its own reference."""
    import torch

    from edgepack.stages.prune import evaluate

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3).eval()
    xs = {"x": np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)}
    before = evaluate(net, xs, None, None)
    assert before["metric"] == "fidelity" and before["value"] == 100.0
    with torch.no_grad():
        net.weight.mul_(-1.0)
    after = evaluate(net, xs, None, before["logits"])
    assert after["value"] < 100.0
