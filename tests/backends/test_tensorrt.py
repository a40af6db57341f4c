"""TensorRT backend: everything around the engine build is checked here (QDQ graph, op check,
calibration cache, builder config, compatibility keys); the engine itself needs TensorRT and a
GPU (tests marked `gpu`, skipped where absent)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepack.artifact import TensorSpec
from edgepack.backends import get_backend
from edgepack.backends import tensorrt_device as dev
from edgepack.backends.tensorrt import check_ops, trtexec_command
from edgepack.calibration.table import read_tensorrt_cache
from edgepack.errors import ConfigError, MissingDependencyError, ModelError
from edgepack.target import load_target
from tests.backends.contract import samples, tiny_onnx

HAS_TRT = dev.available()


def compile_for(art, tmp_path, target="jetson", **overrides):
    backend = get_backend("tensorrt")
    profile = load_target(target)
    if overrides:
        profile = profile.model_copy(update=overrides)
    options = backend.options(profile.backend_options, "test")
    return backend.compile(art, profile, options, samples(32), tmp_path / "trt")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_onnx(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    return compile_for(tiny, tmp_path_factory.mktemp("c"))


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_qdq_structure_symmetric_per_channel_weights_and_symmetric_activations(compiled):
    model = onnx.load(str(compiled.path))
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    assert len(weighted) == 3
    for node in weighted:
        # activation input: DQ <- Q <- float tensor, zero point 0
        act_dq = producers[node.input[0]]
        assert act_dq.op_type == "DequantizeLinear" and producers[act_dq.input[0]].op_type == "QuantizeLinear"
        assert np.all(inits[act_dq.input[2]] == 0) and inits[act_dq.input[2]].dtype == np.int8
        assert inits[act_dq.input[1]].size == 1  # per-tensor activation scale
        # weight input: DQ <- Q <- float initializer, per-channel, zero points 0
        w_dq = producers[node.input[1]]
        w_q = producers[w_dq.input[0]]
        assert w_dq.op_type == "DequantizeLinear" and w_q.op_type == "QuantizeLinear"
        weight = inits[w_q.input[0]]
        assert weight.dtype == np.float32
        scale, zp = inits[w_dq.input[1]], inits[w_dq.input[2]]
        axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
        assert scale.size == weight.shape[axis] > 1, "weights must be quantized per output channel"
        assert np.all(zp == 0) and zp.dtype == np.int8
        # bias stays float (TensorRT fuses it)
        if len(node.input) > 2:
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32


def test_calibration_cache_matches_the_qdq_scales(compiled):
    model_dir = compiled.path.parent
    header, scales = read_tensorrt_cache(model_dir / "calibration.cache")
    assert header == "TRT-100300-EntropyCalibration2"
    model = onnx.load(str(compiled.path))
    inits = _inits(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    act_q = producers[producers[conv.input[0]].input[0]]
    tensor = act_q.input[0]
    assert scales[tensor] == pytest.approx(float(inits[act_q.input[1]]), rel=1e-5)
    table = json.loads((model_dir / "calibration.json").read_text())
    assert table["samples"] == 32 and tensor in table["ranges"]


def test_builder_config_and_trtexec_command(compiled):
    cfg = json.loads((compiled.path.parent / "builder.json").read_text())
    assert cfg["precision"] == "int8" and cfg["strongly_typed"] is True and cfg["dla_core"] is None
    assert cfg["optimization_profiles"] == [{"x": {"min": [1, 3, 16, 16], "opt": [1, 3, 16, 16], "max": [8, 3, 16, 16]}}]
    assert cfg["target"]["sm"] == "8.7" and cfg["target"]["tensorrt"] == "10.3.0"
    assert cfg["trtexec"] == ("trtexec --onnx=model.onnx --saveEngine=model.engine --timingCacheFile=timing.cache "
                              "--memPoolSize=workspace:1024M --stronglyTyped --minShapes=x:1x3x16x16 "
                              "--optShapes=x:1x3x16x16 --maxShapes=x:8x3x16x16")


def test_tensorrt_85_uses_int8_fp16_flags_and_dla():
    cfg = {"onnx": "model.onnx", "workspace_mb": 512, "precision": "int8", "dla_core": 0, "sparsity": True,
           "optimization_profiles": [], "target": {"tensorrt": "8.5.2"}}
    cmd = trtexec_command(cfg)
    assert "--int8 --fp16" in cmd and "--useDLACore=0 --allowGPUFallback" in cmd and "--sparsity=enable" in cmd


def test_fp16_precision_ships_the_fp32_onnx_with_an_fp16_builder(tiny, tmp_path):
    art = compile_for(tiny, tmp_path, precision="fp16")
    cfg = json.loads((art.path.parent / "builder.json").read_text())
    assert cfg["precision"] == "fp16" and "--fp16" in cfg["trtexec"]
    ops = {n.op_type for n in onnx.load(str(art.path)).graph.node}
    assert "QuantizeLinear" not in ops


def test_unsupported_op_is_named(tmp_path):
    import torch

    from edgepack.stages.export_onnx import export

    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)).eval()
    art = export(net, [TensorSpec("x", ("batch", 8), "float32")], ["y"], tmp_path / "ln", max_opset=17)
    with pytest.raises(ModelError, match=r"TensorRT 8.5.2's parser does not support: LayerNormalization \(nodes"):
        compile_for(art, tmp_path, target="jetson-xavier-nx")
    model = onnx.load(str(art.path))
    assert check_ops(model, "10.3.0") == []  # TensorRT 10 parses LayerNormalization


def test_dynamic_dim_without_profile_is_an_error(tiny, tmp_path):
    from dataclasses import replace

    dynamic = replace(tiny, inputs=(TensorSpec("x", ("batch", 3, "height", 16), "float32"),))
    with pytest.raises(ConfigError, match=r"dynamic dim\(s\) \['height'\].*neither the target profile nor the project") as e:
        compile_for(dynamic, tmp_path)
    assert "dims: {height: {min: 1" in e.value.hint and "backend_options.dynamic_dims" in e.value.hint


def test_dynamic_dim_range_from_the_project_file(tiny, tmp_path):
    """A range the project declares (dims.NAME, carried in the artifact) makes the optimization profile."""
    from dataclasses import replace

    dynamic = replace(tiny, inputs=(TensorSpec("x", ("batch", 3, "height", 16), "float32"),),
                      details={**tiny.details, "dim_ranges": {"height": {"min": 16, "opt": 16, "max": 32}}})
    compiled = compile_for(dynamic, tmp_path)
    cfg = json.loads((compiled.path.parent / "builder.json").read_text())
    assert cfg["optimization_profiles"][0]["x"]["max"] == [8, 3, 32, 16]


def test_dynamic_dim_with_a_profile_range():
    from edgepack.backends.tensorrt import DimRange, optimization_profile

    prof = optimization_profile((TensorSpec("x", ("batch", 3, "height", 16), "float32"),), 4,
                                {"height": DimRange(min=8, opt=16, max=32)})
    assert prof == {"x": {"min": [1, 3, 8, 16], "opt": [1, 3, 16, 16], "max": [4, 3, 32, 16]}}


def test_dla_core_must_exist_on_the_device(tiny, tmp_path):
    with pytest.raises(ConfigError, match="dla_core 0 but the device has 0 DLA"):
        compile_for(tiny, tmp_path, backend_options={"dla_core": 0})


# --- compatibility keys --------------------------------------------------------------------------

ORIN = dev.CompatKey("8.7", "10.3.0", "36.4.0", None)
XAVIER = dev.CompatKey("7.2", "8.5.2", "35.4.1", None)


def test_key_folder_round_trips():
    assert ORIN.folder == "sm87-trt10.3.0-l4t36.4.0-gpu"
    assert dev.CompatKey.parse(ORIN.folder) == ORIN
    dla = dev.CompatKey("8.7", "8.5.2", None, 1)
    assert dla.folder == "sm87-trt8.5.2-dgpu-dla1" and dev.CompatKey.parse(dla.folder) == dla


def test_l4t_release_parsing():
    text = "# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13"
    assert dev.l4t_release(text) == "36.4.0"


def _model_dir(tmp_path: Path, engines: list[str]) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"qdq onnx bytes")
    for key in engines:
        (d / "engines" / key).mkdir(parents=True)
        (d / "engines" / key / "model.engine").write_bytes(b"engine for " + key.encode())
        (d / "engines" / key / "timing.cache").write_bytes(b"timing")
    return d


def test_matching_bundled_engine_is_used_without_a_build(tmp_path, monkeypatch):
    monkeypatch.setenv(dev.CACHE_ENV, str(tmp_path / "cache"))
    d = _model_dir(tmp_path, [ORIN.folder])
    built = []
    engine, notes = dev.ensure_engine(d, ORIN, lambda *a: built.append(a))
    assert engine == d / "engines" / ORIN.folder / "model.engine" and built == []
    assert "matches this device" in notes[0]


def test_mismatched_engine_is_rebuilt_with_the_bundled_timing_cache_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(dev.CACHE_ENV, str(tmp_path / "cache"))
    d = _model_dir(tmp_path, [ORIN.folder])
    calls = []

    def build(onnx_path, out, timing):
        calls.append((onnx_path, timing))
        out.write_bytes(b"xavier engine")

    engine, notes = dev.ensure_engine(d, XAVIER, build)
    assert calls == [(d / "model.onnx", d / "engines" / ORIN.folder / "timing.cache")]
    assert engine.read_bytes() == b"xavier engine" and engine.parent.name == XAVIER.folder
    assert "do not match this device" in notes[0] and "rebuilt" in notes[0]
    # the next run on the same device finds it in the cache: no second build
    engine2, notes2 = dev.ensure_engine(d, XAVIER, build)
    assert engine2 == engine and len(calls) == 1 and "cached engine" in notes2[0]


def test_failed_engine_build_leaves_no_cached_engine(tmp_path, monkeypatch):
    monkeypatch.setenv(dev.CACHE_ENV, str(tmp_path / "cache"))
    d = _model_dir(tmp_path, [])

    def build(onnx_path, out, timing):
        out.write_bytes(b"half")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        dev.ensure_engine(d, ORIN, build)
    assert dev.choose_engine(d, ORIN, dev.cache_root_for(d / "model.onnx"))[0] is None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here")
def test_validate_without_tensorrt_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setattr(dev, "TEGRA_RELEASE", tmp_path / "nv_tegra_release")
    (tmp_path / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.0")
    with pytest.raises(MissingDependencyError) as info:
        get_backend("tensorrt").check_environment(compile=False)
    assert "python3-libnvinfer" in info.value.hint


# --- the build on the example-like project ---------------------------------------------------------

def test_jetson_builds_host_proxy_bundles_and_xavier_keeps_opset_17(trained_project, tmp_path):
    from edgepack.api import build

    results = {r.target: r for r in build(trained_project, ["jetson", "jetson-xavier-nx"], tmp_path)}
    for target, max_opset in (("jetson-orin-nano", 20), ("jetson-xavier-nx", 17)):
        r = results[target]
        m = r.manifest
        with tarfile.open(r.bundle) as tar:
            names = set(tar.getnames())
            model = onnx.load_from_string(tar.extractfile("model/model.onnx").read())
        assert {"model/model.onnx", "model/calibration.cache", "model/calibration.json", "model/builder.json"} <= names
        assert not any(n.endswith(".engine") for n in names)  # never an engine built on the wrong machine
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset <= max_opset
        assert m.measurements.compiled.proxy == "host proxy (onnxruntime, QDQ)"
        assert "speedup_p50" not in m.measurements.comparison
        assert "not measured on the device" in m.measurements.device["latency"]
        drop = m.measurements.reference.accuracy["value"] - m.measurements.compiled.accuracy["value"]
        assert drop <= 1.0
    assert next(o.version for o in onnx.load_from_string(
        tarfile.open(results["jetson-orin-nano"].bundle).extractfile("model/model.onnx").read()).opset_import
        if o.domain in ("", "ai.onnx")) >= 18


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU")
def test_engine_builds_runs_and_matches_the_host_proxy(compiled, tmp_path, monkeypatch):
    monkeypatch.setenv(dev.CACHE_ENV, str(tmp_path / "cache"))
    runner = get_backend("tensorrt").load(compiled.path, 1)
    proxy, _ = get_backend("onnxruntime").host_runner(compiled.path, 1)
    for s in samples(5, seed=3):
        np.testing.assert_allclose(runner.run(s)[0], proxy.run(s)[0], atol=0.1, rtol=0.05)
