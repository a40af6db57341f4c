"""Quantization coverage (edgepack.measure.coverage) on tiny models made here: a CNN quantized to QDQ by
edgepack's own quantize stage, ONNX models with an ``If`` holding a Conv, and OpenVINO IR from NNCF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgepack.calibration.reader import SampleSet
from edgepack.measure.coverage import coverage_for, describe, onnx_coverage, openvino_coverage

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
h, T, nh = onnx.helper, onnx.TensorProto, onnx.numpy_helper

SHAPE = (1, 3, 16, 16)
# Conv 3->8 3x3 on 16x16, Conv 8->16 3x3 stride 2 -> 8x8, Linear 1024 -> 10
CNN_MACS = 8 * 3 * 9 * 256 + 16 * 8 * 9 * 64 + 1024 * 10


def _samples(n: int = 4, name: str = "x") -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{name: rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).eval()
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    torch.onnx.export(model, torch.randn(*SHAPE), str(path), input_names=["x"], output_names=["y"],
                      opset_version=17, dynamo=False)
    return path


def _qdq(src: Path, out: Path, workdir: Path, **kw) -> Path:
    from edgepack.stages.quantize_qdq import preprocess, quantize

    pre = preprocess(src, workdir / f"{src.stem}-pre.onnx")
    calibration = SampleSet(_samples(name=onnx.load(str(src)).graph.input[0].name), None, "random")
    quantize(pre, out, calibration, "minmax", workdir, **kw)
    return out


@pytest.fixture(scope="module")
def cnn_qdq(cnn, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("qdq")
    return _qdq(cnn, work / "cnn-int8.onnx", work)


def test_fp32_onnx_has_no_int8(cnn):
    cov = onnx_coverage(cnn)
    assert (cov["weighted_ops"], cov["int8_ops"], cov["ops_share"], cov["macs_share"]) == (3, 0, 0.0, 0.0)
    assert cov["macs"] == CNN_MACS and not cov["macs_estimated"]
    assert {f["type"] for f in cov["float_ops"]} == {"Conv", "Gemm"}
    assert all(f["where"] == "main graph" for f in cov["float_ops"])
    assert cov["subgraphs"] == {"count": 0, "weighted_ops": 0, "int8_ops": 0, "macs": 0, "int8_macs": 0}
    assert describe(cov).startswith("int8 on 0% of MACs (0 of 3 weighted ops); float: ")


def test_qdq_onnx_is_fully_int8(cnn_qdq):
    cov = coverage_for(cnn_qdq)
    assert (cov["weighted_ops"], cov["int8_ops"], cov["ops_share"], cov["macs_share"]) == (3, 3, 1.0, 1.0)
    assert cov["macs"] == cov["int8_macs"] == CNN_MACS
    assert cov["float_ops"] == []
    assert describe(cov) == "int8 on 100% of MACs (3 of 3 weighted ops)"
    assert "DequantizeLinear" in cov["how"]


def test_excluded_node_is_reported_float(cnn, tmp_path):
    pre = onnx.load(str(cnn))
    gemm = next(n.name for n in pre.graph.node if n.op_type == "Gemm")
    out = _qdq(cnn, tmp_path / "partial.onnx", tmp_path, exclude=[gemm])
    cov = onnx_coverage(out)
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 2)
    assert cov["float_ops"] == [{"name": gemm, "type": "Gemm", "macs": 10240, "where": "main graph"}]
    assert cov["macs_share"] == pytest.approx((CNN_MACS - 10240) / CNN_MACS)
    assert f"float: {gemm} (Gemm)" in describe(cov)


def test_external_data_model_loads(cnn_qdq, tmp_path, monkeypatch):
    model = onnx.load(str(cnn_qdq))
    ext = tmp_path / "ext" / "m.onnx"
    ext.parent.mkdir()
    onnx.save_model(model, str(ext), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (ext.parent / "m.onnx.data").is_file()
    monkeypatch.chdir(tmp_path)            # data is found beside the model, not in the working folder
    cov = onnx_coverage(ext)
    assert (cov["int8_ops"], cov["macs"], cov["macs_share"]) == (3, CNN_MACS, 1.0)


def test_coverage_for_dispatch(tmp_path):
    assert coverage_for(tmp_path / "model.tflite") is None
    assert coverage_for(tmp_path / "model.engine") is None


def test_symbolic_batch_counts_as_one(tmp_path):
    w = nh.from_array(np.ones((10, 32), np.float32), "w")
    g = h.make_graph([h.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["batch", 32])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["batch", 10])], [w])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    onnx.save(m, str(tmp_path / "fc.onnx"))
    cov = onnx_coverage(tmp_path / "fc.onnx")
    assert (cov["macs"], cov["macs_estimated"]) == (320, True)
    assert describe(cov).startswith("int8 on ~0% of MACs")


# ---------------------------------------------------------------------------------- ONNX If subgraph

def _if_model(quantized_branch: bool = False) -> onnx.ModelProto:
    """inp [1,3,8,8] -> main_conv (1x1) -> x; If(cond): then/else each a 3x3 Conv 3->4 on x.

    With ``quantized_branch`` the model is QDQ by hand: x goes through Q/DQ in the main graph and
    then_branch's weight is an int8 initializer behind a DequantizeLinear (else_branch stays float)."""
    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "wm")]
    nodes = [h.make_node("Conv", ["inp", "wm"], ["x"], name="main_conv")]
    act = "x"
    if quantized_branch:
        inits += [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(0, np.int8), "zp")]
        nodes += [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="x_q"),
                  h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="x_dq")]
        act = "xdq"

    def branch(name: str, int8: bool) -> onnx.GraphProto:
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        if int8:
            binits = [nh.from_array(np.clip(np.round(w / 0.02), -127, 127).astype(np.int8), f"{name}_wq"),
                      nh.from_array(np.array(0.02, np.float32), f"{name}_ws"),
                      nh.from_array(np.array(0, np.int8), f"{name}_wz")]
            bnodes = [h.make_node("DequantizeLinear", [f"{name}_wq", f"{name}_ws", f"{name}_wz"], [f"{name}_w"],
                                  name=f"{name}_w_dq")]
        else:
            binits, bnodes = [nh.from_array(w, f"{name}_w")], []
        bnodes.append(h.make_node("Conv", [act, f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1]))
        return h.make_graph(bnodes, name, [], [h.make_tensor_value_info(f"{name}_y", T.FLOAT, [1, 4, 8, 8])], binits)

    nodes.append(h.make_node("If", ["cond"], ["y"], name="the_if",
                             then_branch=branch("then", quantized_branch), else_branch=branch("else", False)))
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("inp", T.FLOAT, [1, 3, 8, 8]),
                                  h.make_tensor_value_info("cond", T.BOOL, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, [1, 4, 8, 8])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


IF_MAIN_MACS, IF_BRANCH_MACS = 3 * 3 * 64, 4 * 3 * 9 * 64


def test_if_subgraph_float_convs_are_counted(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(_if_model(), str(path))
    cov = onnx_coverage(path)
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 0)
    assert cov["macs"] == IF_MAIN_MACS + 2 * IF_BRANCH_MACS
    assert cov["subgraphs"]["count"] == 2 and cov["subgraphs"]["weighted_ops"] == 2
    where = {f["name"]: f["where"] for f in cov["float_ops"]}
    assert where == {"then_conv": "subgraph the_if", "else_conv": "subgraph the_if", "main_conv": "main graph"}
    assert describe(cov).endswith("2 subgraphs: 0 of 2 weighted ops int8")


def test_if_subgraph_quantized_inside_is_int8(tmp_path):
    path = tmp_path / "if-qdq.onnx"
    onnx.save(_if_model(quantized_branch=True), str(path))
    cov = onnx_coverage(path)
    # then_conv: activation DQ'd in the main graph (outer scope), weight DQ'd in the branch -> int8
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 1)
    assert cov["subgraphs"]["int8_ops"] == 1 and cov["subgraphs"]["int8_macs"] == IF_BRANCH_MACS
    assert {f["name"] for f in cov["float_ops"]} == {"main_conv", "else_conv"}


def test_edgepack_qdq_leaves_if_branches_float(tmp_path):
    """ONNX Runtime's QDQ quantizer only walks the main graph (EnableSubgraph is QOperator-only):
    the branches' Convs stay float and coverage says so."""
    src = tmp_path / "if.onnx"
    onnx.save(_if_model(), str(src))
    rng = np.random.default_rng(1)
    samples = [{"inp": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(i % 2 == 0)}
               for i in range(4)]
    from edgepack.stages.quantize_qdq import quantize

    out = tmp_path / "if-int8.onnx"
    quantize(src, out, SampleSet(samples, None, "random"), "minmax", tmp_path, extra={"EnableSubgraph": True})
    cov = onnx_coverage(out)
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 1)
    assert [f["name"] for f in cov["float_ops"] if f["where"] == "main graph"] == []
    assert cov["subgraphs"]["weighted_ops"] == 2 and cov["subgraphs"]["int8_ops"] == 0
    assert cov["macs_share"] == pytest.approx(IF_MAIN_MACS / (IF_MAIN_MACS + 2 * IF_BRANCH_MACS))


# ------------------------------------------------------------------------------------------- OpenVINO

@pytest.fixture(scope="module")
def ov_irs(cnn, tmp_path_factory) -> tuple[Path, Path]:
    ov = pytest.importorskip("openvino")
    nncf = pytest.importorskip("nncf")
    folder = tmp_path_factory.mktemp("ov")
    model = ov.convert_model(str(cnn))
    fp32 = folder / "fp32.xml"
    ov.save_model(model, str(fp32))
    data = [s["x"] for s in _samples(8)]
    q = nncf.quantize(ov.convert_model(str(cnn)), nncf.Dataset(data), subset_size=len(data))
    int8 = folder / "int8.xml"
    ov.save_model(q, str(int8))
    return fp32, int8


def test_openvino_fp32_ir_has_no_int8(ov_irs):
    cov = openvino_coverage(ov_irs[0])
    assert (cov["weighted_ops"], cov["int8_ops"], cov["macs_share"]) == (3, 0, 0.0)
    assert cov["macs"] == CNN_MACS


def test_openvino_nncf_ir_is_int8(ov_irs):
    cov = coverage_for(ov_irs[1])
    assert cov["int8_ops"] > 0 and cov["macs_share"] > 0.9
    assert cov["macs"] == CNN_MACS
    assert "FakeQuantize" in cov["how"]
    assert describe(cov).startswith("int8 on ")


def test_openvino_if_body_is_walked(tmp_path):
    ov = pytest.importorskip("openvino")
    src = tmp_path / "if.onnx"
    onnx.save(_if_model(), str(src))
    xml = tmp_path / "if.xml"
    ov.save_model(ov.convert_model(str(src)), str(xml))
    cov = openvino_coverage(xml)
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 0)
    assert cov["subgraphs"]["count"] == 2 and cov["subgraphs"]["weighted_ops"] == 2
    assert cov["macs"] == IF_MAIN_MACS + 2 * IF_BRANCH_MACS


def test_openvino_if_body_fed_from_outer_fakequantize(tmp_path):
    """The QDQ If model through OpenVINO: x's Q/DQ becomes a FakeQuantize in the main graph, read by the
    then-body through a body Parameter; the body's i8 weight is a compressed constant."""
    ov = pytest.importorskip("openvino")
    src = tmp_path / "if-qdq.onnx"
    onnx.save(_if_model(quantized_branch=True), str(src))
    xml = tmp_path / "if-qdq.xml"
    ov.save_model(ov.convert_model(str(src)), str(xml))
    cov = openvino_coverage(xml)
    assert (cov["weighted_ops"], cov["int8_ops"]) == (3, 1)
    assert cov["subgraphs"]["int8_ops"] == 1 and cov["subgraphs"]["int8_macs"] == IF_BRANCH_MACS
    assert {f["name"]: f["where"] for f in cov["float_ops"]} == {"else_y": "subgraph y", "main_conv": "main graph"}


def test_openvino_nncf_quantizes_if_bodies(tmp_path):
    ov = pytest.importorskip("openvino")
    nncf = pytest.importorskip("nncf")
    src = tmp_path / "if.onnx"
    onnx.save(_if_model(), str(src))
    rng = np.random.default_rng(2)
    data = [{"inp": rng.standard_normal((1, 3, 8, 8)).astype(np.float32), "cond": np.array(i % 2 == 0)}
            for i in range(6)]
    xml = tmp_path / "if-int8.xml"
    ov.save_model(nncf.quantize(ov.convert_model(str(src)), nncf.Dataset(data), subset_size=len(data)), str(xml))
    cov = openvino_coverage(xml)
    assert (cov["weighted_ops"], cov["int8_ops"], cov["macs_share"]) == (3, 3, 1.0)
    assert cov["subgraphs"] == {"count": 2, "weighted_ops": 2, "int8_ops": 2,
                                "macs": 2 * IF_BRANCH_MACS, "int8_macs": 2 * IF_BRANCH_MACS}
    assert describe(cov) == "int8 on 100% of MACs (3 of 3 weighted ops); 2 subgraphs: 2 of 2 weighted ops int8"


def test_build_reports_the_if_branches_it_could_not_quantize(tmp_path):
    """An ONNX model whose Convs sit inside an `If`: ONNX Runtime's QDQ quantizer does not enter
    subgraphs, and the manifest says so instead of claiming int8 for the whole model."""
    from edgepack.api import build

    onnx.save(_if_model(), str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for name, n in (("calib", 40), ("eval", 20)):
        np.savez(tmp_path / "data" / f"{name}.npz", inp=rng.normal(size=(n, 1, 3, 8, 8)).astype(np.float32)[:, 0],
                 cond=rng.random(n) < 0.5)
    (tmp_path / "edgepack.yaml").write_text(
        "name: branchy\nversion: 0.1.0\nmodel: {path: m.onnx}\nprecision: int8\n"   # the INT8 path, forced
        "calibration: {source: data/calib.npz}\nevaluation: {source: data/eval.npz}\n")
    (r,) = build(tmp_path, ["onnx"], tmp_path / "out")
    cov = r.manifest.coverage
    assert cov["subgraphs"]["count"] == 2 and cov["subgraphs"]["int8_ops"] == 0
    # the main graph's Conv is float too on ONNX Runtime: the branches read its float output from the
    # outer scope, so ORT does not fuse it (its optimized graph has no integer op at all)
    assert {(f["name"], f["where"]) for f in cov["float_ops"]} == {
        ("then_conv", "subgraph the_if"), ("else_conv", "subgraph the_if"), ("main_conv", "main graph")}
    assert any("declared int8, but int8 on" in w for w in r.manifest.warnings)


# ------------------------------------------------------- ONNX Runtime's QDQ fusion as the ground truth

ORT_INTEGER = {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger"}


def _ort_integer_nodes(path: Path, workdir: Path) -> set[str]:
    """Names of the nodes ONNX Runtime (CPU) runs as integer ops, read from its own optimized graph."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(workdir / f"{path.stem}.ort-optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return {n.name for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type in ORT_INTEGER}


def _drop_q_after(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """``model`` without the QuantizeLinear/DequantizeLinear pair that follows ``node_name``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == node_name)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and node.output[0] in n.input)
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and q.output[0] in n.input)
    m.graph.node.remove(q)
    m.graph.node.remove(dq)
    if any(o.name == dq.output[0] for o in m.graph.output):
        node.output[0] = dq.output[0]
    for n in m.graph.node:
        n.input[:] = [node.output[0] if i == dq.output[0] else i for i in n.input]
    return m


def _float_bias(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """``model`` with ``node_name``'s int32 DequantizeLinear bias folded to a float initializer (as NNCF writes)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if n.output and n.output[0] == node.input[2])
    init = {i.name: nh.to_array(i) for i in model.graph.initializer}
    model.graph.node.remove(dq)
    model.graph.initializer.append(nh.from_array((init[dq.input[0]] * init[dq.input[1]]).astype(np.float32),
                                                 dq.output[0]))
    return model


def test_onnxruntime_rule_agrees_with_ort_optimized_graph(tmp_path):
    """tiny_onnx (Conv, Conv, pool, Flatten, Gemm) quantized to QDQ, then variants without the QuantizeLinear
    after an op: ONNX Runtime's optimized graph says which ops it runs as QLinearConv/QGemm, and coverage with
    runtime="onnxruntime" must say the same; the TensorRT rule keeps counting every DQ'd op as INT8."""
    from edgepack.stages.quantize_qdq import preprocess, quantize
    from tests.backends.contract import samples, tiny_onnx

    art = tiny_onnx(tmp_path / "tiny")
    qdq = tmp_path / "with-q.onnx"
    quantize(preprocess(art.path, tmp_path / "pre.onnx"), qdq, samples(8), "minmax", tmp_path)
    model = onnx.load(str(qdq))
    weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    gemm = next(n.name for n in model.graph.node if n.op_type == "Gemm")
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    variants = {
        "with-q": (model, 3),                                                   # all fused
        "gemm-no-q": (_drop_q_after(model, gemm), 3),                           # QGemm, float output
        "gemm-no-q-float-bias": (_float_bias(_drop_q_after(model, gemm), gemm), 2),   # NNCF's classifier
        "conv-no-q": (_drop_q_after(model, conv), 2),                           # FusedConv, float
    }
    for tag, (m, expected) in variants.items():
        path = tmp_path / f"{tag}.onnx"
        onnx.save(m, str(path))
        truth = _ort_integer_nodes(path, tmp_path)
        cov = coverage_for(path, runtime="onnxruntime")
        int8 = set(weighted) - {f["name"] for f in cov["float_ops"]}
        assert (tag, int8) == (tag, truth) and cov["int8_ops"] == len(truth) == expected
        assert "Rule: onnxruntime" in cov["how"]
        trt = coverage_for(path, runtime="tensorrt")
        assert trt["int8_ops"] == 3 and "Rule: tensorrt" in trt["how"]
        assert onnx_coverage(path)["int8_ops"] == 3           # the default stays TensorRT's rule
    assert set(weighted) == _ort_integer_nodes(qdq, tmp_path)


@pytest.mark.parametrize("op,wshape,xshape,yshape,with_q,ort_int8", [
    ("MatMul", (32, 10), [1, 32], [1, 10], False, True),                 # MatMulIntegerToFloat
    ("ConvTranspose", (4, 4, 3, 3), [1, 4, 8, 8], [1, 4, 10, 10], True, False),   # no CPU kernel: float
    ("Conv", (4, 4, 3, 3), [1, 4, 8, 8], [1, 4, 6, 6], True, True),    # QLinearConv
])
def test_onnxruntime_rule_single_op(tmp_path, op, wshape, xshape, yshape, with_q, ort_int8):
    """One DQ'd op, with or without a QuantizeLinear after it: coverage agrees with ONNX Runtime's graph."""
    inits = [nh.from_array(np.array(0.05, np.float32), "s"), nh.from_array(np.array(128, np.uint8), "zp"),
             nh.from_array(np.random.default_rng(0).integers(-100, 100, wshape).astype(np.int8), "wq"),
             nh.from_array(np.array(0.01, np.float32), "ws"), nh.from_array(np.array(0, np.int8), "wz")]
    nodes = [h.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"]),
             h.make_node(op, ["xd", "wd"], ["o" if with_q else "y"], name="op")]
    if with_q:
        nodes += [h.make_node("QuantizeLinear", ["o", "s", "zp"], ["oq"]),
                  h.make_node("DequantizeLinear", ["oq", "s", "zp"], ["y"])]
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, xshape)],
                     [h.make_tensor_value_info("y", T.FLOAT, yshape)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "op.onnx"
    onnx.save(m, str(path))
    assert _ort_integer_nodes(path, tmp_path) == ({"op"} if ort_int8 else set())
    assert coverage_for(path, runtime="onnxruntime")["int8_ops"] == int(ort_int8)
    assert coverage_for(path, runtime="tensorrt")["int8_ops"] == 1
