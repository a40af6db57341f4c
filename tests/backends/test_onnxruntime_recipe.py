"""The ``onnx`` target's bias-correction recipe (NNCF's ONNX backend, rewritten to U8S8 QDQ) leaves no layer in
float: every Conv and the classifier Gemm read a DequantizeLinear on their data input and weight, and ONNX
Runtime's optimized graph runs them as QLinearConv / QGemm (a Gemm whose output NNCF left unquantized stayed
in float there)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tests.backends.contract import samples, tiny_onnx

VIEWS = {"Reshape", "Flatten", "Identity", "Transpose", "Squeeze", "Unsqueeze"}


def _from_dq(name: str, producers: dict) -> bool:
    node = producers.get(name)
    while node is not None and node.op_type in VIEWS:
        node = producers.get(node.input[0])
    return node is not None and node.op_type == "DequantizeLinear"


def _ort_optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # QDQ fusions, no NCHWc
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def test_the_bias_correction_recipe_quantizes_every_conv_and_the_classifier_gemm(tmp_path):
    pytest.importorskip("nncf")
    from edgepack.backends import get_backend
    from edgepack.target import load_target

    backend, profile = get_backend("onnxruntime"), load_target("onnx")
    art = tiny_onnx(tmp_path / "m")  # Conv, ReLU, Conv, ReLU, average pool, Flatten, Linear (Gemm)
    variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(
        update={"recipe": "bias-correction"})})
    compiled = backend.compile(art, variant, backend.Options(**profile.backend_options), samples(16), tmp_path / "out")
    assert compiled.lineage[-1].config["quantize_outputs"] is True
    graph = onnx.load(str(compiled.path)).graph
    producers = {o: n for n in graph.node for o in n.output}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    assert sorted(n.op_type for n in weighted) == ["Conv", "Conv", "Gemm"]
    for n in weighted:
        assert _from_dq(n.input[0], producers) and _from_dq(n.input[1], producers), n.name
    gemm = next(n for n in weighted if n.op_type == "Gemm")
    readers = [n.op_type for n in graph.node if gemm.output[0] in n.input]
    assert readers == ["QuantizeLinear"]  # what ONNX Runtime needs to fuse it
    assert [o.name for o in graph.output] == [o.name for o in onnx.load(str(art.path)).graph.output]
    ops = _ort_optimized_ops(compiled.path, tmp_path)
    assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 1
    assert "Conv" not in ops and "Gemm" not in ops


def test_output_views_only_when_a_gemm_writes_an_output():
    from onnx import TensorProto, helper

    from edgepack.stages.quantize_qdq import _output_views

    def model(op: str):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], [0.1] * 16)
        nodes = [helper.make_node(op, ["x", "w"], ["y"], name="op"),
                 helper.make_node("Relu", ["y"], ["z"], name="reader")]
        z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])
        return helper.make_model(helper.make_graph(nodes, "g", [x], [y, z], [w]))

    gemm = model("Gemm")
    assert _output_views(gemm)
    onnx.checker.check_model(gemm)
    names = {n.name: n for n in gemm.graph.node}
    assert names["op"].output[0] == "y_before_output" and names["reader"].input[0] == "y_before_output"
    assert names["y_output"].op_type == "Identity" and list(names["y_output"].output) == ["y"]
    assert names["z_output"].op_type == "Identity" and list(names["z_output"].output) == ["z"]
    add = model("Add")  # no Gemm/MatMul writes an output: nothing ONNX Runtime would leave in float
    before = add.SerializeToString()
    assert not _output_views(add) and add.SerializeToString() == before


def test_the_dynamic_recipe_runs_a_transformers_matmuls_as_integer_ops_and_skips_cnns(tmp_path):
    """`dynamic` (ONNX Runtime's quantize_dynamic): a transformer's weighted MatMuls become integer ops with
    no float MatMul left and its outputs stay close to FP32; a conv net is refused with a ToolchainError, so
    the search records it and goes on to static INT8 with layers in float."""
    import dataclasses

    import numpy as np
    import torch

    from edgepack.artifact import TensorSpec
    from edgepack.backends import get_backend
    from edgepack.calibration.reader import SampleSet
    from edgepack.errors import ToolchainError
    from edgepack.stages.export_onnx import export
    from edgepack.target import load_target

    backend, profile = get_backend("onnxruntime"), load_target("onnx")
    variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(update={"recipe": "dynamic"})})
    opts = backend.Options(**profile.backend_options)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).eval()
    art = export(mlp, [TensorSpec("x", ("batch", 8, 32), "float32")], ["y"], tmp_path / "mlp")
    art = dataclasses.replace(art, details={**art.details, "model_type": "transformer"})
    rng = np.random.default_rng(0)
    data = SampleSet([{"x": rng.standard_normal((1, 8, 32)).astype(np.float32)} for _ in range(8)], None, "random")
    compiled = backend.compile(art, variant, opts, data, tmp_path / "out")
    cfg = compiled.lineage[-1].config
    assert cfg["tool"] == "onnxruntime.quantization.quantize_dynamic" and "calibration_method" not in cfg
    ops = _ort_optimized_ops(compiled.path, tmp_path)
    assert "MatMul" not in ops and "Gemm" not in ops
    assert sum(op in ("MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat") for op in ops) == 2
    fp32, int8 = backend.load(art.path, 1), backend.load(compiled.path, 1)
    for s in data:
        a, b = fp32.run(s)[0], int8.run(s)[0]
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    with pytest.raises(ToolchainError, match="transformer"):
        backend.compile(tiny_onnx(tmp_path / "cnn"), variant, opts, samples(4), tmp_path / "cnn-out")
