"""INT8 recovery before float fallback: the accuracy search tries the backend's recovery methods (bias
correction...) with every layer in INT8 before it keeps any layer in float; among builds that meet the
budget the fastest wins; trials are scored on a subset first and cached by the compiled model's digest."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgepack.errors import ToolchainError
from edgepack.tuning import Trial, pick, search
from tests.backends.contract import samples, tiny_onnx


def _trial(step, method, kept, acc, p50=1.0, recipe="default", budget=90.0):
    return Trial(step, method, list(kept), None, {"value": acc}, [], p50, 0.1, acc >= budget, recipe)


def test_a_recovery_method_that_meets_the_budget_keeps_every_layer_in_int8():
    calls: list[tuple] = []

    def try_build(step, method, kept, recipe="default"):
        calls.append((step, method, tuple(kept), recipe))
        acc = {"default": 80.0 if method == "minmax" else 82.0, "bias-correction": 91.0}[recipe]
        return _trial(step, method, kept, acc, recipe=recipe)

    def rank(deadline):
        raise AssertionError("no layer is ranked when a recovery method meets the budget")

    result = search(_trial("plain int8", "minmax", [], 80.0), ["minmax", "entropy"], try_build, rank, 1.0, 6,
                    lambda _: None, recipes=("bias-correction",))
    # the recovery method starts from the most accurate calibration method
    assert calls == [("calibration entropy", "entropy", (), "default"),
                     ("recovery bias-correction", "entropy", (), "bias-correction")]
    assert result.best.recipe == "bias-correction" and result.best.kept == []
    assert "every layer in INT8" in result.stopped


def _fallback_search(base: dict[str, float], recipes: tuple[str, ...], missing: str | None = None):
    """The search over a fake ladder: each recipe's all-INT8 accuracy, +5 points per layer kept in float;
    ``missing`` names a recipe whose toolchain is not installed. Returns the result and every build call."""
    calls: list[tuple] = []

    def try_build(step, method, kept, recipe="default"):
        calls.append((step, tuple(kept), recipe))
        if recipe == missing:
            raise ToolchainError("toolchain 'quark' is not installed")
        return _trial(step, method, kept, base[recipe] + 5.0 * len(kept), recipe=recipe)

    result = search(_trial("plain int8", "minmax", [], 80.0), ["minmax"], try_build,
                    lambda deadline: [("a", 1.0), ("b", 0.5), ("c", 0.1)], 1.0, 8, lambda _: None, recipes=recipes)
    return result, calls


def test_float_fallback_starts_from_the_most_accurate_recovery_and_failures_are_recorded():
    result, calls = _fallback_search({"default": 80.0, "bias-correction": 86.0},
                                     ("bias-correction", "learned-rounding"), missing="learned-rounding")
    keeps = [c for c in calls if c[0].startswith("keep ")]
    assert keeps and all(c[2] == "bias-correction" for c in keeps)
    assert result.best.kept == ["a"] and result.best.recipe == "bias-correction" and result.best.meets_budget
    assert result.failed == [{"step": "recovery learned-rounding", "error": "toolchain 'quark' is not installed"}]


def test_float_fallback_does_not_start_from_adaround_even_when_it_is_the_most_accurate():
    result, calls = _fallback_search({"default": 80.0, "bias-correction": 84.0, "adaround": 88.0},
                                     ("bias-correction", "adaround"))
    keeps = [c for c in calls if c[0].startswith("keep ")]
    # AdaRound's model lost most of its accuracy with a layer in float (measured): the fallback builds on
    # the most accurate recipe that composes with float layers
    assert keeps and all(c[2] == "bias-correction" for c in keeps)
    assert result.best.recipe == "bias-correction" and result.best.kept == ["a", "b"]
    assert [c[2] for c in calls[:2]] == ["bias-correction", "adaround"]


def test_the_fastest_build_that_meets_the_budget_wins_and_near_ties_go_to_fewer_float_layers():
    slow_float = _trial("keep 1 in float", "minmax", ["a"], 92.0, p50=10.0)
    int8 = _trial("recovery bias-correction", "minmax", [], 90.5, p50=8.0, recipe="bias-correction")
    miss = _trial("plain int8", "minmax", [], 80.0, p50=7.0)
    best, record = pick([miss, slow_float, int8])
    assert best is int8 and record["chosen"] == int8.step and record["how"] == "each build's own host p50"
    # timed in one window: a float layer that costs nothing measurable is a tie, which fewer float layers win
    best, record = pick([miss, slow_float, int8], lambda ts: [8.1 if t.kept else 8.0 for t in ts])
    assert best is int8 and record["how"] == "timed in turn in one window"
    best, _ = pick([miss, slow_float, int8], lambda ts: [5.0 if t.kept else 8.0 for t in ts])
    assert best is slow_float
    best, record = pick([miss])  # none meets: the most accurate, no timing
    assert best is miss and record is None


class _Runner:
    def __init__(self, bias: float):
        self.calls, self.bias = 0, bias

    def run(self, feeds):
        self.calls += 1
        x = feeds["x"].reshape(-1)[:5].astype(np.float64)
        return [x + self.bias * np.sign(x[::-1])]


def _trials(n: int, budget_points: float):
    from edgepack.build.search import Trials

    data = samples(n)
    ref = [[s["x"].reshape(-1)[:5].astype(np.float64)] for s in data]
    ctx = SimpleNamespace(evaluation=data, metric_plan="fidelity")
    t = Trials(ctx, None, None, SimpleNamespace(outputs=ref), Path("."), 1, lambda e, w: e,
               lambda value: 100.0 - value <= budget_points)
    return t, ref


def test_trials_score_a_subset_first_and_the_whole_set_only_for_finalists():
    t, _ = _trials(400, budget_points=1.0)
    t.subset = 100
    far = _Runner(bias=10.0)  # flips the top-1 of nearly every sample: a clear miss on the subset
    outputs, score, scored_on = t.evaluate(far, "digest-far")
    assert far.calls == 100 and scored_on == 100 and len(outputs) == 100 and score["samples"] == 100
    close = _Runner(bias=0.0)  # identical to FP32: meets the budget, so the rest of the set runs too
    outputs, score, scored_on = t.evaluate(close, "digest-close")
    assert close.calls == 400 and scored_on is None and len(outputs) == 400 and score["value"] == 100.0
    again = _Runner(bias=0.0)  # the same compiled model (digest) again: its outputs come from the cache
    outputs, score, scored_on = t.evaluate(again, "digest-close")
    assert again.calls == 0 and len(outputs) == 400 and score["value"] == 100.0


def test_without_a_budget_every_trial_scores_the_whole_set():
    t, _ = _trials(150, budget_points=1.0)
    t.budget = None
    r = _Runner(bias=10.0)
    _, score, scored_on = t.evaluate(r, "d")
    assert r.calls == 150 and scored_on is None and score["samples"] == 150


@pytest.mark.parametrize("backend_name", ["onnxruntime", "openvino"])
def test_the_bias_correction_recipe_compiles_a_working_int8_model(backend_name, tmp_path):
    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend = get_backend(backend_name)
    profile = load_target("onnx" if backend_name == "onnxruntime" else "cpu")
    assert "bias-correction" in backend.recovery_methods
    art = tiny_onnx(tmp_path / "m")
    data = samples(16)
    variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(
        update={"recipe": "bias-correction"})})
    options = backend.Options(**profile.backend_options)
    compiled = backend.compile(art, variant, options, data, tmp_path / "out")
    cfg = compiled.lineage[-1].config
    assert cfg["recipe"] == "bias-correction" and cfg["fast_bias_correction"] is False
    assert cfg["overflow_fix"] == "disable"
    runner = backend.load(compiled.path, 1)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    for s in list(data)[:4]:
        got, want = runner.run(s)[0], ref.run(None, s)[0]
        assert np.abs(got - want).max() <= 0.25 * (np.abs(want).max() + 1e-6)
    with pytest.raises(ToolchainError, match="no INT8 recipe 'no-such'"):
        bad = profile.model_copy(update={"quantization": profile.quantization.model_copy(update={"recipe": "no-such"})})
        backend.compile(art, bad, options, data, tmp_path / "bad")


def test_openvino_recipes_map_to_nncf_parameters_cheapest_first():
    from edgepack.backends.openvino import (
        OpenVINOBackend,
        nncf_ranges,
        nncf_subset_size,
        recipe_settings,
    )

    assert OpenVINOBackend.recovery_methods == ("bias-correction", "bias-correction-all-samples",
                                                "bias-correction-median-ranges")
    plain = recipe_settings("default", True)
    assert plain["fast_bias_correction"] and nncf_ranges(plain, "minmax") == "MINMAX"
    assert nncf_ranges(plain, "entropy") == "HISTOGRAM" and nncf_subset_size(plain, 300) == 300
    for name in OpenVINOBackend.recovery_methods:  # every rung: full bias correction, 8-bit first layer, per-tensor
        r = recipe_settings(name, True)
        assert not r["fast_bias_correction"] and r["overflow_fix"] == "disable" and r["per_tensor_activations"]
        assert nncf_ranges(r, "entropy") == "HISTOGRAM"  # another method keeps its own estimator
    bc = recipe_settings("bias-correction", True)
    assert nncf_ranges(bc, "minmax") is None and nncf_subset_size(bc, 300) == 300  # NNCF's defaults; 60 for BC
    all_samples = recipe_settings("bias-correction-all-samples", True)
    # NNCF's full BiasCorrection takes a fifth of subset_size: five times the set gives it every sample
    assert nncf_ranges(all_samples, "minmax") is None and nncf_subset_size(all_samples, 300) == 1500
    median = recipe_settings("bias-correction-median-ranges", True)
    assert nncf_ranges(median, "minmax") == "MEDIAN_MINMAX" and nncf_subset_size(median, 300) == 1500
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    assert getattr(RangeEstimatorParametersSet, nncf_ranges(median, "minmax")) is RangeEstimatorParametersSet.MEDIAN_MINMAX


@pytest.mark.parametrize("recipe", ["bias-correction-all-samples", "bias-correction-median-ranges"])
def test_the_all_samples_recipes_compile_and_record_their_nncf_settings(recipe, tmp_path):
    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend, profile = get_backend("openvino"), load_target("cpu")
    art, data = tiny_onnx(tmp_path / "m"), samples(16)
    variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(update={"recipe": recipe})})
    compiled = backend.compile(art, variant, backend.Options(**profile.backend_options), data, tmp_path / "out")
    cfg = compiled.lineage[-1].config
    assert cfg["recipe"] == recipe and cfg["fast_bias_correction"] is False and cfg["bias_correction_samples"] == 16
    want = "MEDIAN_MINMAX" if recipe.endswith("median-ranges") else "nncf's defaults"
    assert want in cfg["range_estimator"]


def _recipe_variant(profile, recipe: str, keep_float=()):
    return profile.model_copy(update={"quantization": profile.quantization.model_copy(
        update={"recipe": recipe, "keep_float": list(keep_float)})})


def test_the_onnx_ladder_tries_learned_rounding_last_after_the_cheaper_methods():
    from edgepack.backends.onnxruntime import ONNXRuntimeBackend

    assert ONNXRuntimeBackend.recovery_methods == ("bias-correction", "dynamic", "adaround")
    with pytest.raises(Exception, match="adaround_samples"):
        ONNXRuntimeBackend.Options(adaround_samples=0)


def test_adaround_without_the_quark_toolchain_is_a_step_the_search_skips(tmp_path, monkeypatch):
    from edgepack.backends import get_backend
    from edgepack.target import load_target

    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("EDGEPACK_QUARK_PYTHON", raising=False)
    backend, profile = get_backend("onnxruntime"), load_target("onnx")
    art = tiny_onnx(tmp_path / "m")
    # a ToolchainError (not a missing dependency that ends the build): the search records it and goes on
    with pytest.raises(ToolchainError, match="needs the quark toolchain") as info:
        backend.compile(art, _recipe_variant(profile, "adaround"), backend.Options(), samples(8), tmp_path / "out")
    assert "edgepack toolchain install quark" in info.value.hint and "EDGEPACK_QUARK_PYTHON" in info.value.hint
    assert not (tmp_path / "out" / "model.onnx").exists()
    monkeypatch.setenv("EDGEPACK_QUARK_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(ToolchainError, match="needs the quark toolchain"):
        backend.compile(art, _recipe_variant(profile, "adaround"), backend.Options(), samples(8), tmp_path / "out")


def _needs_quark():
    from edgepack.toolchains import executable

    if executable("quark") is None:
        pytest.skip("the quark toolchain is not installed (`edgepack toolchain install quark`)")


def _weights(model) -> dict[str, tuple[np.ndarray, np.ndarray | None, int]]:
    """Each Conv/Gemm's weight: (array, scale or None when float, axis of the scale) by node name."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for n in model.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        dq = producers.get(n.input[1])
        if dq is not None and dq.op_type == "DequantizeLinear":
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            found[n.name] = (inits[dq.input[0]], inits[dq.input[1]], axis)
        else:
            found[n.name] = (inits[n.input[1]], None, 0)
    return found


def test_adaround_learns_each_weights_rounding_and_keeps_the_named_layers_in_float(tmp_path):
    _needs_quark()
    import onnx
    import onnxruntime as ort

    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend, profile = get_backend("onnxruntime"), load_target("onnx")
    art, data = tiny_onnx(tmp_path / "m"), samples(16)
    options = backend.Options(adaround_samples=8, adaround_iterations=40)
    compiled = backend.compile(art, _recipe_variant(profile, "adaround"), options, data, tmp_path / "out")
    cfg = compiled.lineage[-1].config
    assert cfg["recipe"] == "adaround" and cfg["adaround_samples"] == 8 and cfg["adaround_iterations"] == 40
    assert cfg["tool"].startswith("AMD Quark AdaRound") and cfg["activations"] == "uint8"
    fp32 = _weights(onnx.load(str(art.path)))
    learned = _weights(onnx.load(str(compiled.path)))
    assert set(learned) == set(fp32) and all(s is not None for _, s, _ in learned.values())  # every layer INT8
    moved = 0
    for name, (q, scale, axis) in learned.items():
        w = fp32[name][0]
        shape = [1] * w.ndim
        shape[axis] = -1
        exact = w / np.asarray(scale).reshape(shape)
        assert q.dtype == np.int8 and np.all(np.abs(q - exact) < 1.0 + 1e-4)  # rounded down or up, never further
        moved += int(np.sum(q != np.clip(np.round(exact), -127, 127)))
    assert moved > 0  # some weights took the other rounding than nearest: the rounding was learned
    ref = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    runner = backend.load(compiled.path, 1)
    for s in list(data)[:4]:
        got, want = runner.run(s)[0], ref.run(None, s)[0]
        assert np.abs(got - want).max() <= 0.25 * (np.abs(want).max() + 1e-6)
    # a layer the search keeps in float stays float; the others are still learned INT8
    kept = backend.compile(art, _recipe_variant(profile, "adaround", ["node_conv2d"]), options, data, tmp_path / "kept")
    weights = _weights(onnx.load(str(kept.path)))
    assert weights["node_conv2d"][1] is None and weights["node_conv2d_1"][1] is not None
    assert kept.lineage[-1].config["kept_in_float"] == ["node_conv2d"]


def test_adaround_past_its_time_bound_stops_and_leaves_no_model(tmp_path):
    _needs_quark()
    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend, profile = get_backend("onnxruntime"), load_target("onnx")
    art = tiny_onnx(tmp_path / "m")
    options = backend.Options(adaround_timeout_s=0.2)  # Quark's own import takes longer than this
    with pytest.raises(ToolchainError, match="did not finish within 0.2 s") as info:
        backend.compile(art, _recipe_variant(profile, "adaround"), options, samples(8), tmp_path / "out")
    assert "adaround_samples" in info.value.hint and (tmp_path / "out" / "quark.log").is_file()
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert not list((tmp_path / "out").glob("*.npz"))


def _shared_dq_model(path):
    """x -> Q -> DQ read by two Convs, each with an int32 bias behind a DequantizeLinear (Quark's form)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = [numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3), dtype=np.int8), f"w{i}_q") for i in (0, 1)]
    b = [numpy_helper.from_array(rng.integers(-500, 500, (4,), dtype=np.int32), f"b{i}_q") for i in (0, 1)]
    consts = [numpy_helper.from_array(np.array(v, dtype=d), n) for n, v, d in (
        ("s", 0.02, np.float32), ("z", 0, np.int8), ("ws", [0.01, 0.02, 0.03, 0.04], np.float32),
        ("wz", [0, 0, 0, 0], np.int8), ("bs", [0.0002, 0.0004, 0.0006, 0.0008], np.float32),
        ("bz", [0, 0, 0, 0], np.int32))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq")]
    for i in (0, 1):
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}_q", "ws", "wz"], [f"w{i}"], name=f"wdq{i}", axis=0),
                  helper.make_node("DequantizeLinear", [f"b{i}_q", "bs", "bz"], [f"b{i}"], name=f"bdq{i}", axis=0),
                  helper.make_node("Conv", ["xd", f"w{i}", f"b{i}"], [f"y{i}"], name=f"conv{i}", pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 4, 8, 8]) for i in (0, 1)],
                              w + b + consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _tensorrt_qdq_form(model) -> None:
    """TensorRT's explicit-quantization constraints: symmetric (zero points 0), 8-bit Q/DQ only, each
    DequantizeLinear read by one node, every Conv/Gemm weight an int8 constant behind a DequantizeLinear."""
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, int] = {o.name: 1 for o in model.graph.output}  # a graph output is read once
    for n in model.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert n.input[2] in inits and not inits[n.input[2]].any() and inits[n.input[2]].dtype == np.int8, n.name
        if n.op_type == "DequantizeLinear":
            assert readers.get(n.output[0], 0) == 1, n.name
        if n.op_type in ("Conv", "Gemm"):
            dq = producers[n.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8
            assert len(n.input) < 3 or n.input[2] in inits  # a float bias TensorRT folds
    assert not any(v.dtype == np.int32 for v in inits.values())


def test_dedicate_qdq_gives_each_consumer_its_own_dq_and_float_biases_with_the_same_outputs(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgepack.stages.adaround import dedicate_qdq

    path = tmp_path / "m.onnx"
    _shared_dq_model(path)
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    assert dedicate_qdq(path) == {"dq_copied": 1, "int32_biases_folded": 2, "unread_nodes_dropped": 0}
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, x)
    for a, b in zip(before, after):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-5)
    _tensorrt_qdq_form(onnx.load(str(path)))


def test_the_jetson_adaround_recipe_writes_tensorrt_qdq_with_learned_rounding(tmp_path):
    _needs_quark()
    import onnx
    import onnxruntime as ort

    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend, profile = get_backend("tensorrt"), load_target("jetson-orin-nano")
    assert backend.recovery_methods == ("adaround",)
    art, data = tiny_onnx(tmp_path / "m"), samples(16)
    variant = _recipe_variant(profile.model_copy(update={"precision": "int8"}), "adaround")
    options = backend.options({**profile.backend_options, "adaround_samples": 8, "adaround_iterations": 20}, "test")
    compiled = backend.compile(art, variant, options, data, tmp_path / "out")
    cfg = compiled.lineage[-1].config
    assert cfg["recipe"] == "adaround" and cfg["tool"].startswith("AMD Quark AdaRound")
    assert cfg["op_check"].startswith("passed") and cfg["int32_biases_folded"] == 3
    assert {p.name for p in compiled.path.parent.iterdir()} >= {"model.onnx", "builder.json", "calibration.cache"}
    model = onnx.load(str(compiled.path))
    _tensorrt_qdq_form(model)
    assert set(_weights(model)) == {"node_conv2d", "node_conv2d_1", "node_linear"}
    ref = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    runner, _ = backend.host_runner(compiled.path, 1)  # the host proxy the build scores it with
    for s in list(data)[:4]:
        got, want = runner.run(s)[0], ref.run(None, s)[0]
        assert np.abs(got - want).max() <= 0.25 * (np.abs(want).max() + 1e-6)
    with pytest.raises(ToolchainError, match="no INT8 recipe 'bias-correction'"):
        backend.compile(art, _recipe_variant(variant, "bias-correction"), options, data, tmp_path / "bad")
