"""Graph counting, the roofline, the calibration fit and host peaks: no builds, a few seconds."""

from __future__ import annotations

import pytest

from edgepack.errors import ConfigError
from edgepack.measure.calibrate import SUITES, RefModel, host_peaks, make_reference_model
from edgepack.measure.estimate import Calibration, Peaks, count_graph, device_peaks, estimate, fit, roofline_ms
from edgepack.target import load_target


def test_counts_macs_bytes_and_fusion(tmp_path):
    spec = RefModel("t", (3, 8, 8), (("conv", 4, 1), ("res", 4), ("conv", 8, 2)), classes=5)
    art = make_reference_model(spec, tmp_path / "m.onnx")
    c = count_graph(art.path)
    convs = [layer for layer in c.layers if layer.op == "Conv"]
    # out elements x (Cin x 3 x 3) per conv; the stride-2 conv halves H and W
    assert [layer.macs for layer in convs] == [4 * 64 * 27, 4 * 64 * 36, 8 * 16 * 36]
    gemm = next(layer for layer in c.layers if layer.op == "Gemm")
    assert gemm.macs == 8 * 5
    assert c.macs == sum(layer.macs for layer in convs) + 40
    relus = [layer for layer in c.layers if layer.op == "Relu"]
    assert relus and all(layer.fused for layer in relus)       # fused into the conv that feeds them
    add = next(layer for layer in c.layers if layer.op == "Add")
    assert not add.fused and add.elements == 4 * 64            # fused, but the residual input is still read
    assert next(layer for layer in c.layers if layer.op == "Flatten").elements == 0
    assert c.params == 4 * 27 + 4 + 4 * 36 + 4 + 8 * 36 + 8 + 8 * 5 + 5
    # batch scales MACs linearly
    assert count_graph(art.path, batch=4).macs == 4 * c.macs


def test_reference_models_are_valid_and_run(tmp_path):
    import numpy as np
    import onnx
    import onnxruntime as ort

    for i, spec in enumerate(SUITES["standard"]):
        art = make_reference_model(spec, tmp_path / spec.name / "model.onnx", seed=i)
        onnx.checker.check_model(onnx.load(str(art.path)), full_check=True)
        sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
        (out,) = sess.run(None, {"input": np.zeros((1, *spec.input_chw), np.float32)})
        assert out.shape == (1, spec.classes)
        assert count_graph(art.path).macs > 0
    bottleneck = count_graph(make_reference_model(SUITES["standard"][4], tmp_path / "b.onnx").path)
    assert [layer.op for layer in bottleneck.layers].count("Conv") == 8


def test_roofline_takes_the_slower_bound_per_layer(tmp_path):
    art = make_reference_model(SUITES["quick"][1], tmp_path / "m.onnx")
    c = count_graph(art.path)
    fast_memory = roofline_ms(c, Peaks(1e12, 1e15, "int8"))
    assert fast_memory["bound"] == "compute"
    assert fast_memory["roofline_ms"] == pytest.approx(2 * c.macs / 1e12 * 1e3, rel=1e-3)  # + pooling bytes
    slow_memory = roofline_ms(c, Peaks(1e15, 1e9, "int8"))
    assert slow_memory["bound"] == "memory"
    assert slow_memory["roofline_ms"] == pytest.approx(c.elements / 1e9 * 1e3, rel=1e-6)
    fp32 = roofline_ms(c, Peaks(1e15, 1e9, "fp32"))
    assert fp32["roofline_ms"] == pytest.approx(4 * slow_memory["roofline_ms"], rel=1e-6)


def test_fit_recovers_overhead_and_efficiency():
    points = [(f"m{i}", r, 0.05 + r / 0.25) for i, r in enumerate([0.001, 0.01, 0.1, 1.0])]
    cal = fit(points, "rt", "host")
    assert cal.overhead_ms == pytest.approx(0.05, rel=0.02)
    assert cal.efficiency == pytest.approx(0.25, rel=0.02)
    assert all(abs(p["error_pct"]) < 2 for p in cal.points)
    # a single point: efficiency only
    one = fit([("m", 0.5, 2.0)], "rt", "host")
    assert (one.overhead_ms, one.efficiency) == (0.0, 0.25)
    # an outlier 3x slow pulls a log fit less than a fit on relative error would
    noisy = fit(points + [("slow", 0.5, 3 * (0.05 + 0.5 / 0.25))], "rt", "host")
    assert 0.1 < noisy.efficiency < 0.25
    # times that fall with size cannot give a negative overhead
    odd = fit([("a", 0.001, 1.0), ("b", 1.0, 0.9)], "rt", "host")
    assert odd.overhead_ms >= 0 and 0 < odd.efficiency <= 1


def test_device_peaks_follow_precision_and_say_when_they_fall_back():
    nano = load_target("jetson-orin-nano").device
    assert device_peaks(nano, "int8").ops_per_s == pytest.approx(20.5e12)
    assert device_peaks(nano, "fp16").ops_per_s == pytest.approx(10.2e12)
    assert device_peaks(nano, "int8").bytes_per_s == pytest.approx(68e9)
    no_int8 = nano.model_copy(update={"peak_int8_tops": None})
    p = device_peaks(no_int8, "int8")
    assert p.ops_per_s == pytest.approx(10.2e12) and "no peak_int8_tops" in p.notes[0]
    bare = nano.model_copy(update={"peak_int8_tops": None, "peak_fp16_tflops": None, "peak_fp32_tflops": None})
    with pytest.raises(ConfigError, match="no peak throughput figures"):
        device_peaks(bare, "int8")


def test_every_estimate_profile_has_sourced_figures():
    for name in ("cpu", "onnx", "x86-avx512-vnni", "rpi5", "android-flagship", "android-arm64",
                 "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx"):
        dev = load_target(name).device
        for key in ("peak_int8_tops", "peak_fp16_tflops", "memory_bandwidth_gbs", "tdp_w", "price_usd"):
            fig = getattr(dev, key)
            assert fig is not None and fig.value > 0 and len(fig.source) > 10, (name, key)
        assert dev.cores and dev.memory_gb and {"cores", "memory_gb"} <= set(dev.sources), name


def test_host_peaks_are_derived_and_documented():
    peaks, how = host_peaks("int8", threads=2)
    assert peaks.ops_per_s > 0 and peaks.bytes_per_s > 0
    assert how["peak_int8_tops"]["source"].startswith("derived:")
    assert "cores" in how["peak_int8_tops"]["source"] and "GHz" in how["peak_int8_tops"]["source"]
    assert how["memory_bandwidth_gbs"]["source"].startswith("measured:")


def test_estimate_is_labelled_and_adds_overhead(tmp_path):
    art = make_reference_model(SUITES["quick"][0], tmp_path / "m.onnx")
    c = count_graph(art.path)
    cal = Calibration(0.5, 0.1, "openvino int8", ("ref-a",), "host")
    e = estimate(c, Peaks(1e12, 1e10, "int8"), cal)
    assert e["kind"] == "estimate"
    assert e["p50_ms"] == pytest.approx(0.1 + e["roofline_ms"] / 0.5, rel=1e-3)
    assert e["calibration"]["fitted_on"] == ["ref-a"] and e["model"]["macs"] == c.macs
