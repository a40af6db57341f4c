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


def _digits_net():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def _specs():
    from edgepack.artifact import TensorSpec

    return [TensorSpec(name="image", shape=[1, 1, 8, 8], dtype="float32")]


def test_layer_ratios_fix_named_layers_and_the_search_fills_in_the_rest():
    from edgepack.stages.prune import structured

    net = _digits_net()
    pruned, rec = structured(net, _specs(), "l1", ["0", "10"], None, 0.4, None, {"8": 0.75})
    assert rec["channels"]["8"] == [64, 16]          # the fixed share, whatever the search did
    assert "0" not in rec["channels"] and "10" not in rec["channels"]  # ignored layers stay whole
    assert rec["channels"]["3"][1] < 32               # the searched ratio pruned the free layer
    assert rec["macs_removed"] >= 0.4 and rec["layer_ratios"] == {"8": 0.75}
    out = pruned(__import__("torch").zeros(2, 1, 8, 8))
    assert tuple(out.shape) == (2, 10)


def test_round_to_keeps_channel_counts_multiples_of_n():
    from edgepack.stages.prune import structured

    _, rec = structured(_digits_net(), _specs(), "l1", ["10"], 0.3, None, None, None, 8)
    assert rec["channels"] and all(after % 8 == 0 for _, after in rec["channels"].values())


@pytest.mark.parametrize("layers,ignore,goal,message", [
    ({"3": 0.5}, ["3", "10"], 0.2, "prune.layers and prune.ignore both name ['3']"),
    ({"body.99": 0.5}, ["10"], 0.2, "prune.layers: no module named ['body.99']"),
    ({"3": 0.9}, ["10"], 0.1, "prune.layers alone remove"),
])
def test_bad_layer_ratios_are_config_errors(layers, ignore, goal, message):
    from edgepack.errors import ConfigError
    from edgepack.stages.prune import structured

    with pytest.raises(ConfigError) as e:
        structured(_digits_net(), _specs(), "l1", ignore, None, goal, None, layers)
    assert message in str(e.value)


def test_layer_ratio_out_of_range_in_the_project_file(project):
    edit_yaml(project, "acceptance:", "prune:\n  target_macs: 0.3\n  layers: {body.8: 1.5}\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "-q")
    assert res.exit_code == 2 and "layers: ratios must be between 0 and 1" in res.output


def test_prune_flags_build_a_pruned_bundle_and_say_so(project, tmp_path):
    import json

    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(tmp_path), "-q",
              "--prune-macs", "0.3", "--prune-finetune-epochs", "1")
    assert res.exit_code == 0, res.output
    assert "pruned (structured): MACs" in res.output and "timed in turn" in res.output
    [bundle] = tmp_path.glob("*.edgepack")
    p = json.loads(run("inspect", str(bundle), "--format", "json").output)["prune"]
    assert p["set_by_flags"] == {"target_macs": 0.3, "finetune_epochs": 1} and p["method"] == "structured"
    assert p["macs_removed"] >= 0.3 and p["finetune"]["epochs"] == 1
    eff = p["latency_effect"]
    assert eff["runs"] >= 10 and "in turn with" in eff["how"]


@pytest.mark.parametrize("args,message", [
    (["--prune-ratio", "1.5"], "--prune-ratio: prune.ratio: Input should be less than 1"),
    (["--prune", "magic"], "--prune: unknown method 'magic'"),
    (["--prune", "off", "--prune-macs", "0.3"], "--prune off cannot be combined"),
    (["--prune", "sparse-2of4", "--prune-ratio", "0.3"], "sparse-2of4 fixes the amount"),
])
def test_bad_prune_flags_fail_before_building(project, tmp_path, args, message):
    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(tmp_path / "out"), "-q", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not list((tmp_path / "out").glob("*")) if (tmp_path / "out").exists() else True


def test_prune_off_drops_the_project_files_block_and_flags_replace_its_amount(project):
    from edgepack.project import load_project, with_prune_flags

    edit_yaml(project, "acceptance:", "prune:\n  ratio: 0.3\n  ignore: [body.10]\n  finetune: {epochs: 2}\nacceptance:")
    p = load_project(project)
    assert with_prune_flags(p, {"method": "off"}).prune is None
    q = with_prune_flags(p, {"target_macs": 0.5}).prune
    assert q.ratio is None and q.target_macs == 0.5 and q.ignore == ["body.10"] and q.finetune.epochs == 2
    assert with_prune_flags(p, {"finetune_epochs": 0}).prune.finetune is None
    assert with_prune_flags(p, {}) is p


def test_interleaved_timing_alternates_blocks_and_counts_every_model():
    from edgepack.measure.latency import measure_interleaved

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, feeds):
            calls.append(self.name)
            return []

    sample = {"x": np.zeros((1, 2), np.float32)}
    lat = measure_interleaved({"a": Fake("a"), "b": Fake("b")}, sample, warmup=1, runs=45, max_seconds=60,
                              threads=1, block=20)
    assert lat["a"]["how"]["runs"] == lat["b"]["how"]["runs"] == 45
    timed = calls[2:]  # after the warm-up call of each
    # round 1: a (1 untimed + 20), b (1 + 20); round 2 reversed: b then a; round 3: a then b, 5 each
    assert timed[:21] == ["a"] * 21 and timed[21:42] == ["b"] * 21 and timed[42:63] == ["b"] * 21
    assert timed[63:84] == ["a"] * 21 and timed[84:90] == ["a"] * 6 and timed[90:] == ["b"] * 6
    assert "in turn with b" in lat["a"]["how"]["interleaved"]


def test_the_latency_effect_is_the_bundled_models_when_the_precision_choice_picks_fp32(trained_project, tmp_path,
                                                                                         monkeypatch):
    """The pruning's measured effect must describe what ships: when the precision choice swaps the INT8
    build for FP32, the pruned side of the timing is measured again on the FP32 model."""
    import shutil

    from edgepack.api import build
    from edgepack.build import choice

    root = tmp_path / "proj"
    shutil.copytree(trained_project, root)
    (root / "edgepack.yaml").write_text((root / "edgepack.yaml").read_text() + STRUCTURED.replace("epochs: 3", "epochs: 1"))
    edit_yaml(root, "precision: int8\n", "")  # the profile's choice, not a forced precision
    monkeypatch.setattr(choice, "gain", lambda in_turn: 0.5)  # INT8 "slower than FP32": the choice runs
    monkeypatch.setattr(choice, "_pick", lambda rows, objective: ("fp32", "int8", "picked by the test"))
    stages: list[str] = []
    [res] = build(root, ["onnx"], root / "dist", progress=lambda name, state, secs, detail: stages.append((name, state)))
    m = res.manifest
    assert m.precision_choice["chosen"] == "fp32" and m.runtime.precision == "fp32", (m.precision_choice, m.runtime)
    eff = m.prune["latency_effect"]
    assert eff["precision"] == "int8" and eff["pruned_precision"] == "fp32"
    assert eff["pruned_p50_ms"] > 0 and eff["measured_in_same_run"]
    # timed twice (INT8, then the FP32 that ships), the unpruned model compiled once
    assert [s for s in stages if s == ("measure unpruned onnx", "done")] == [("measure unpruned onnx", "done")] * 2
    out = CliRunner().invoke(app, ["inspect", str(res.bundle)])
    assert "int8 unpruned vs fp32 pruned: p50 unpruned" in out.output, out.output
