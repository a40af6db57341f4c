"""Pruning to a latency goal: per-layer times mapped to layers, the latency table, the greedy
allocation, sensitivity by zeroing, the prune.layers it writes, and bad input. Behaviour only: no
verdict depends on how fast anything ran."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from edgepack.artifact import TensorSpec
from edgepack.cli.app import app
from edgepack.measure import layer_times as lt
from edgepack.stages import prune_search as ps
from tests.conftest import edit_yaml

SPECS = [TensorSpec("x", ("batch", 1, 8, 8), "float32")]


def run(*args):
    return CliRunner().invoke(app, list(args))


def tiny_cnn():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_runtime_node_names_are_charged_to_the_layer_they_came_from():
    n2m = {"node_Conv_1": "body.0", "node_Conv_19": "body.3", "node_linear": "body.8", "node_linear_1": "body.10"}
    times = [("image/fq_output_0", 0.002),                       # before any layer: fixed
             ("node_Conv_19/WithoutBiases", 0.010),               # OpenVINO's name for node_Conv_19, not node_Conv_1
             ("node_max_pool2d", 0.004),                          # follows body.3: its extra
             ("node_linear_1_quant", 0.003),                      # ONNX Runtime's QDQ name
             ("node_linear/WithoutBiases/DequantizationMultiply", 0.006)]
    att = lt.attribute(times, n2m)
    assert att["layers"] == {"body.3": 0.010, "body.10": 0.003, "body.8": 0.006}
    assert att["extra"] == {"body.3": 0.004} and att["fixed_ms"] == 0.002
    assert att["total_ms"] == pytest.approx(0.025)


def test_groups_and_shares_follow_the_dependency_graph():
    m = tiny_cnn()
    groups = {g.root: g for g in ps.channel_groups(m, SPECS, ["10"])}
    assert set(groups) == {"0", "3", "8"}       # the output layer is ignored
    assert groups["3"].channels == 32 and groups["3"].out_layers == ["3"] and groups["3"].in_layers == ["8"]
    shares = ps.shares(list(groups.values()), ps.weighted_shapes(m), {"3": 16, "8": 32})
    assert shares["3"] == (0.5, 0.5)            # output halved, input whole
    assert shares["8"] == (0.25, 0.5)           # input and output halved
    assert shares["10"] == (0.5, 1.0)           # input halved, output (the classes) whole


def test_layer_ratios_make_torch_pruning_keep_exactly_the_allocation():
    from edgepack.stages.prune import structured

    m = tiny_cnn()
    groups = ps.channel_groups(m, SPECS, ["10"])
    keep = {"0": 7, "3": 23, "8": 13}
    _, record = structured(m, SPECS, "l1", ["10"], None, None, None, ps.layer_ratios(groups, keep))
    assert {k: v[1] for k, v in record["channels"].items()} == keep


def test_zeroing_a_groups_channels_is_what_removing_them_does_downstream():
    import torch

    from edgepack.stages.prune import structured

    m = tiny_cnn()
    with torch.no_grad():  # BN statistics that are not the identity, so a zeroed conv alone would not do
        for bn in (m[1], m[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.bias.uniform_(-1, 1)
    x = torch.randn(4, 1, 8, 8)
    before = m(x).detach().clone()
    seen = {}

    def cost(mod):
        seen["out"] = mod(x).detach().clone()
        return 0.0

    ps.sensitivity(m, SPECS, ["0", "8", "10"], "l1", cost, shares_=(0.5,))  # only group "3", half kept
    pruned, _ = structured(m, SPECS, "l1", ["0", "8", "10"], None, None, None, {"3": 0.5})
    assert torch.allclose(seen["out"], pruned(x), atol=1e-5)
    assert torch.equal(m(x), before)   # the model is restored afterwards


def table(points: dict[str, list[tuple[float, float]]]) -> ps.LatencyTable:
    return ps.LatencyTable(points, {}, 0.001, "test")


def test_the_greedy_spends_the_budget_where_time_is_cheap_in_accuracy():
    m = tiny_cnn()
    groups = ps.channel_groups(m, SPECS, ["10"])
    shapes = ps.weighted_shapes(m)
    t = table({"0": [(0.0, 0.0), (1.0, 0.001)], "3": [(0.0, 0.0), (1.0, 0.001)], "8": [(0.0, 0.0), (1.0, 0.010)]})
    sens = {"0": [(1.0, 0.0), (0.5, 30.0)], "3": [(1.0, 0.0), (0.5, 30.0)], "8": [(1.0, 0.0), (0.5, 0.5)]}
    full = t.predict(ps.shares(groups, shapes, {}))
    a = ps.allocate(groups, shapes, t, sens, 0.7 * full)
    assert a.predicted_ms <= 0.7 * full
    assert a.keep["0"] == 16 and a.keep["3"] == 32 and a.keep["8"] < 64   # the costly, insensitive layer pays
    assert [p["predicted_ms"] for p in a.path] == sorted([p["predicted_ms"] for p in a.path], reverse=True)
    capped = ps.allocate(groups, shapes, t, sens, 0.01 * full, max_cost=2.0)
    assert capped.cost <= 2.0 and capped.predicted_ms > 0.01 * full   # the accuracy cap stops it short
    pinned = ps.allocate(groups, shapes, t, sens, 0.7 * full, pinned={"8": 64})
    assert pinned.keep["8"] == 64


def test_a_goal_pruning_cannot_buy_is_refused_with_the_reason_not_called_met():
    from edgepack.build.prune_latency import nothing_to_prune

    m = tiny_cnn()
    groups, shapes = ps.channel_groups(m, SPECS, ["10"]), ps.weighted_shapes(m)
    sens = {"0": [(1.0, 0.0), (0.5, 1.0)], "3": [(1.0, 0.0), (0.5, 1.0)], "8": [(1.0, 0.0), (0.5, 1.0)]}

    def why(t, goal=0.8, max_cost=None):
        full = t.predict(ps.shares(groups, shapes, {}))
        a = ps.allocate(groups, shapes, t, sens, goal * full, max_cost=max_cost)
        assert ps.layer_ratios(groups, a.keep) == {}       # the round would remove nothing
        return str(nothing_to_prune(a, goal, 0.05, full, max_cost, "onnx"))

    flat = table({n: [(0.25, 0.01), (1.0, 0.01)] for n in ("0", "3", "8")})   # times that do not shrink
    msg = why(flat)
    assert "out of pruning's reach on onnx" in msg and "predicts 0.0% of the time saved" in msg
    assert "met unpruned" not in msg
    slight = table({n: [(0.0, 0.01), (1.0, 0.0101)] for n in ("0", "3", "8")})  # under 2% even at the floor
    assert "out of pruning's reach" in why(slight) and "at its narrowest" in why(slight)
    steep = table({n: [(0.0, 0.0), (1.0, 0.01)] for n in ("0", "3", "8")})
    assert "within the accuracy cap" in why(steep, max_cost=0.01)   # the first step of any layer costs more
    assert "met unpruned" in why(steep, goal=1.2)                    # target_latency_ms over the p50


def test_the_table_fits_a_line_per_layer_that_one_outlier_does_not_move():
    a, b = ps.fit_line([(1.0, 0.010), (0.5625, 0.030), (0.25, 0.004), (0.0625, 0.002)])  # a busy-host outlier
    assert b == pytest.approx(0.0085, rel=0.2) and a == pytest.approx(0.0015, abs=0.001)
    assert ps.fit_line([(1.0, 0.002), (0.5, 0.003), (0.25, 0.003)])[1] == 0.0   # never slower when narrower
    t = ps.LatencyTable({"a": [(1.0, 0.004), (0.25, 0.001)]}, {"a": [(1.0, 0.001), (0.5, 0.0005)]}, 0.002, "test", 0.01)
    assert t.predict({"a": (0.5, 0.5)}) == pytest.approx(0.002 + 0.01 + 0.002 + 0.0005)
    back = ps.LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert back.predict({"a": (0.5, 0.5)}) == pytest.approx(t.predict({"a": (0.5, 0.5)}), abs=1e-5)


def test_roofline_times_cover_the_weighted_layers(tmp_path):
    from edgepack.stages.export_onnx import export
    from edgepack.target import load_target

    m = tiny_cnn()
    art = export(m, SPECS, ["logits"], tmp_path, None, "sha256:test")
    n2m = lt.onnx_layers(art.path, {n for n, _ in m.named_modules()})
    assert sorted(n2m.values()) == ["0", "10", "3", "8"]
    att = lt.attribute(lt.estimated_times(art.path, load_target("jetson-orin-nano").device, "int8"), n2m)
    assert set(att["layers"]) == {"0", "3", "8", "10"} and all(v > 0 for v in att["layers"].values())


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_bad_prune_latency_is_a_config_error_naming_the_flag(project, tmp_path, value):
    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(tmp_path / "out"), "-q",
              "--prune-latency", value)
    assert res.exit_code == 2 and "--prune-latency" in res.output and "hint:" in res.output, res.output


def test_non_numeric_prune_latency_is_refused(project, tmp_path):
    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(tmp_path), "-q",
              "--prune-latency", "abc")
    assert res.exit_code == 2 and "--prune-latency" in res.output


def test_both_latency_goals_in_the_project_file_are_refused(project, tmp_path):
    edit_yaml(project, "acceptance:", "prune:\n  target_latency: 0.5\n  target_latency_ms: 2\nacceptance:")
    res = run("build", "--project", str(project), "--target", "onnx", "--out", str(tmp_path), "-q")
    assert res.exit_code == 2 and "target_latency and target_latency_ms" in res.output, res.output


def test_the_latency_flag_replaces_the_amount_and_the_hand_allocation(project):
    from edgepack.project import load_project, with_prune_flags

    edit_yaml(project, "acceptance:", "prune:\n  target_macs: 0.4\n  layers: {body.8: 0.5}\n  ignore: [body.10]\n"
                                      "acceptance:")
    p = with_prune_flags(load_project(project), {"target_latency": 0.6}).prune
    assert p.target_latency == 0.6 and p.target_macs is None and p.layers == {} and p.ignore == ["body.10"]
    assert p.latency_goal


# Wide enough that its convolutions, not the runtime's per-node and fixed time, are most of its latency:
# the digits CNN's layers run in microseconds, and on a busy host the latency table can find no time that
# pruning saves (that case is an error of its own, tested below without timing anything).
WIDE_MODEL_PY = """
from torch import nn


def build():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(),
                         nn.Conv2d(96, 96, 3, padding=1), nn.BatchNorm2d(96), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(96 * 16, 10))
"""


@pytest.fixture(scope="module")
def latency_build(tmp_path_factory):
    import os

    from tests.conftest import train_digits

    root = tmp_path_factory.mktemp("latency") / "proj"
    root.mkdir()
    train_digits(root, WIDE_MODEL_PY, epochs=4)
    (root / "edgepack.yaml").write_text((root / "edgepack.yaml").read_text()
                                        + "prune:\n  target_latency: 0.8\n  finetune: {epochs: 1, lr: 0.002}\n")
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EDGEPACK_CACHE")
    os.environ["EDGEPACK_CACHE"] = str(cache)
    try:
        first = run("build", "--project", str(root), "--target", "onnx", "--out", str(root / "dist"), "--no-tune")
        second = run("build", "--project", str(root), "--target", "onnx", "--out", str(root / "again"), "--no-tune",
                     "-q")
    finally:
        if old is None:
            os.environ.pop("EDGEPACK_CACHE")
        else:
            os.environ["EDGEPACK_CACHE"] = old
    return root, first, second, cache


def test_a_latency_goal_builds_and_records_the_search(latency_build):
    root, first, _, cache = latency_build
    assert first.exit_code in (0, 3), first.output   # 3: an accuracy gate, which the manifest explains
    assert "latency goal 0.8x" in first.output and "trade curve" in first.output
    [bundle] = (root / "dist").glob("*.edgepack")
    p = json.loads(run("inspect", str(bundle), "--format", "json").output)["prune"]
    s = p["latency_search"]
    assert s["goal"]["ratio"] == 0.8 and s["target"] == "onnx" and not s["estimated"]
    assert s["table"]["source"].startswith("measured: ONNX Runtime") and s["table"]["cached"] is False
    assert len(s["trade_curve"]) >= 2 and all("measured_ratio" in pt for pt in s["trade_curve"])
    # the chosen allocation: of the rounds that reached the goal, the most accurate before recovery (then the
    # fastest), else the fastest round (which round depends on the measured ratios: not always the last)
    curve, goal = s["trade_curve"][1:], s["goal"]["ratio"]  # [0]: the unpruned model
    ok = [pt for pt in curve if pt["measured_ratio"] <= goal]
    want = (max(ok, key=lambda pt: (pt["fp32_accuracy"], -pt["measured_ratio"])) if ok
            else min(curve, key=lambda pt: pt["measured_ratio"]))
    layouts = [pt["layers"] for pt in curve]
    assert all(a != b for i, a in enumerate(layouts) for b in layouts[i + 1:])   # no allocation timed twice
    assert s["reached"] == bool(ok) and p["layer_ratios"] == want["layers"]
    assert p["finetune"]["epochs"] == 1 and "after_recovery" in p["accuracy_fp32"]
    # the allocation, written out as a prune block that loads as one
    block = yaml.safe_load((root / "dist" / s["layers_block"]).read_text())["prune"]
    from edgepack.prune_spec import Prune

    pinned = Prune.model_validate({**block, "target_macs": None})
    assert pinned.layers == p["layer_ratios"] and not pinned.latency_goal
    assert list(cache.glob("latency-tables/*.json"))


def test_the_second_build_reads_the_latency_table_from_the_cache(latency_build):
    root, _, second, _ = latency_build
    assert second.exit_code in (0, 3), second.output
    [bundle] = (root / "again").glob("*.edgepack")
    s = json.loads(run("inspect", str(bundle), "--format", "json").output)["prune"]["latency_search"]
    assert s["table"]["cached"] is True
    text = run("inspect", str(bundle)).output
    assert "trade curve" in text and "(cached)" in text and "allocation (channels kept)" in text


def test_sensitivity_stops_at_its_time_budget():
    m = tiny_cnn()
    calls = []
    out = ps.sensitivity(m, SPECS, ["10"], "l1", lambda mod: calls.append(1) or 0.0, budget_s=0.0)
    assert len(out) <= 1 and np.isfinite(len(calls))


def test_the_next_round_aims_along_the_greedy_path_at_the_measured_goal():
    from edgepack.build.prune_latency import TOLERANCE, next_goal

    # overshot (predicted 0.5, measured 0.128): aim between it and the unpruned point
    nxt = next_goal(0.5, [(1.0, 1.0), (0.5, 0.128)])
    assert 0.5 < nxt < 1.0
    assert 1.0 - (1.0 - nxt) * (1 - 0.128) / 0.5 == pytest.approx(0.5 - TOLERANCE / 2)
    # fell short (predicted 0.7, measured 0.8): aim lower than the prediction that fell short
    assert next_goal(0.7, [(1.0, 1.0), (0.7, 0.8)]) < 0.7
    assert next_goal(0.7, [(1.0, 1.0)]) is None
