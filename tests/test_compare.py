"""`compare` on the digits project: reuse by digest, parallel builds, estimate rows, budgets, the HTML
report (with a headless Chromium screenshot where Chromium exists) and the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepack.api import Budget, compare
from edgepack.cli.app import app
from edgepack.build.plan import plan_targets
from edgepack.compare import Cell, Row, reusable
from edgepack.compare.rows import apply_budget

CHROMIUM = Path("/usr/bin/chromium")
TARGETS = ["cpu", "onnx", "jetson-orin-nano", "android-arm64", "future-npu", "broken-jetson"]
FUTURE = """\
name: future-npu
description: a board whose backend this edgepack does not have
backend: qnn
precision: int8
device:
  kind: npu
  name: Future NPU board
  peak_int8_tops: {value: 10.0, source: "test figure"}
  memory_bandwidth_gbs: {value: 30.0, source: "test figure"}
"""
BROKEN = """\
name: broken-jetson
description: a Jetson profile whose build fails (DLA core 3 on a device without DLA)
backend: tensorrt
precision: int8
device:
  kind: gpu
  name: Broken Jetson
  dla_cores: 0
  software: {tensorrt: "10.3.0"}
  peak_int8_tops: {value: 20.0, source: "test figure"}
  memory_bandwidth_gbs: {value: 68.0, source: "test figure"}
backend_options: {dla_core: 3}
"""
runner = CliRunner()


@pytest.fixture(scope="module")
def compared(built, trained_project, tmp_path_factory):
    """cpu and onnx reused from the `built` fixture, jetson and the phone built, broken-jetson failing,
    future-npu (no backend) estimated only; one quick calibration per host runtime."""
    dist, results = built
    out = tmp_path_factory.mktemp("compare")
    for r in results.values():
        shutil.copy2(r.bundle, out / r.bundle.name)
    profiles = tmp_path_factory.mktemp("profiles")
    (profiles / "broken-jetson.yaml").write_text(BROKEN)
    (profiles / "future-npu.yaml").write_text(FUTURE)
    events: list = []
    c = compare(trained_project, TARGETS, out, [profiles], Budget(max_latency_ms=1000.0, max_drop=1.0),
                suite="quick", on_build_event=events.append)
    return out, profiles, c, events


def rows(c) -> dict[str, Row]:
    return {r.target: r for r in c.rows}


def test_host_rows_are_measured_and_reused_with_the_estimate_error(compared):
    _, _, c, _ = compared
    for name in ("cpu", "onnx"):
        r = rows(c)[name]
        assert r.reused and r.status == "measured"
        # the only reason a measured row may carry: its build timed on a noisy host, said beside the figures
        assert r.reason is None or ("noisy host" in r.reason and "noisy" in r.details), r.reason
        assert r.p50_ms.source.startswith("measured (host: ") and r.p50_ms.value > 0
        assert r.accuracy.source.startswith("measured (host: ") and r.accuracy.value > 90
        assert r.estimate["kind"] == "estimate" and r.estimate["p50_ms"] > 0
        # calibrated on the reference models, never on this model
        assert "digits" not in r.estimate["calibration"]["fitted_on"]
        assert r.estimate["calibration"]["fitted_on"][0].startswith("ref-")
        assert r.estimate_error_pct == pytest.approx(
            100 * (r.estimate["p50_ms"] - r.p50_ms.value) / r.p50_ms.value, abs=0.1)
    assert {cal["runtime"] for cal in c.calibrations} == {"openvino int8", "onnxruntime int8"}


def test_device_rows_are_estimates_with_reasons(compared):
    _, _, c, events = compared
    jet = rows(c)["jetson-orin-nano"]
    assert not jet.reused and jet.status == "estimated" and jet.bundle
    assert jet.p50_ms.source == "estimate" and jet.accuracy.source.startswith("host proxy")
    assert "transferred from openvino int8" in jet.p50_ms.note
    assert jet.size_mb.source == "bundle" and jet.details["host_latency"]["note"]
    phone = rows(c)["android-arm64"]
    assert phone.status == "estimated" and phone.bundle and phone.backend == "tflite"
    assert phone.accuracy.source.startswith("measured (host: ") and phone.accuracy.value > 80
    assert phone.p50_ms.source == "estimate" and "this host is not the device" in phone.reason
    assert phone.size_mb.source == "bundle" and phone.details["host_latency"]["runtime"].startswith("ai-edge-litert")
    r = rows(c)["future-npu"]
    assert r.status == "estimate only" and "'qnn'" in r.reason and "accuracy is not measured" in r.reason
    assert r.accuracy.value is None and r.p50_ms.source == "estimate" and r.p50_ms.value > 0
    assert r.size_mb.source == "estimate" and r.p90_ms.value is None and r.p90_ms.note
    broken = rows(c)["broken-jetson"]
    assert broken.status == "failed" and "build failed" in broken.reason and "DLA" in broken.reason
    assert broken.p50_ms.source == "estimate"            # still estimated, never a crash
    assert any(e[1].startswith("compile jetson-orin-nano") for e in events)   # progress from the worker
    # every figure says where it came from, and nothing is a silent NaN
    text = json.dumps(c.to_json(), allow_nan=False)
    for r in c.to_json()["rows"]:
        for key in ("accuracy", "p50_ms", "p90_ms", "throughput_per_s", "size_mb", "peak_memory_mb"):
            cell = r[key]
            assert cell["source"] and (cell["value"] is not None or cell["source"] == "n/a"), (r["target"], key)
    assert "NaN" not in text


def test_budget_marks_rows_and_names_the_cheapest(compared):
    _, _, c, _ = compared
    r = rows(c)
    assert c.budget["max_drop"] == 1.0 and c.budget["cheapest_by"].startswith("device price_usd")
    assert r["future-npu"].budget["meets"] is None    # accuracy unknown: neither meets nor fails
    assert r["cpu"].budget["meets"] is True
    assert c.cheapest in c.budget["meeting"]
    priced = [x for x in c.rows if x.budget["meets"] and x.price_usd is not None]
    assert c.cheapest == min(priced, key=lambda x: x.price_usd).target


def test_apply_budget_unit():
    def row(name, p50, delta, size, price):
        return Row(name, "d", "b", "int8", "measured", None, p50_ms=Cell(p50, "estimate"),
                   accuracy_delta=Cell(delta, "measured (host: x)") if delta is not None else Cell(None, "n/a"),
                   size_mb=Cell(size, "bundle"), price_usd=price)

    rs = [row("fast-costly", 2.0, -0.5, 1.0, 900.0), row("fast-cheap", 5.0, -0.2, 1.0, 100.0),
          row("slow", 50.0, 0.0, 1.0, 50.0), row("lossy", 1.0, -3.0, 1.0, 10.0), row("unknown", 1.0, None, 1.0, 5.0)]
    summary, cheapest = apply_budget(rs, Budget(max_latency_ms=20, max_drop=1))
    assert [r.budget["meets"] for r in rs] == [True, True, False, False, None]
    assert cheapest == "fast-cheap" and summary["unknown"] == ["unknown"]
    assert apply_budget(rs, Budget()) == (None, None)


def test_reusable_names_what_changed(built):
    from edgepack.bundle import open_bundle

    _, results = built
    with open_bundle(results["onnx"].bundle) as b:
        m = b.manifest
    fps = {"calibration": m.calibration["fingerprint"], "evaluation": m.measurements.data["evaluation"]["fingerprint"]}
    prof = plan_targets(["onnx"], precision="int8")[0].profile   # the digits project forces precision: int8
    assert reusable(m, m.source, prof, fps) is None
    assert "project file" in reusable(m, m.source.model_copy(update={"project_digest": "sha256:x"}), prof, fps)
    assert "weights" in reusable(m, m.source.model_copy(update={"weights_digest": "sha256:x"}), prof, fps)
    changed = prof.model_copy(update={"measurement": prof.measurement.model_copy(update={"runs": 7})})
    assert "profile" in reusable(m, m.source, changed, fps)
    assert "calibration data" in reusable(m, m.source, prof, fps | {"calibration": "sha256:other"})
    lat = m.measurements.compiled.latency
    moved = m.model_copy(deep=True)
    moved.measurements.compiled.latency = lat | {"where": lat["where"] | {"cpu": "Some Other CPU"}}
    assert "another machine" in reusable(moved, m.source, prof, fps)


def test_second_run_reuses_everything(compared, trained_project):
    out, profiles, c, _ = compared
    before = {p.name: p.stat().st_mtime for p in out.glob("*.edgepack")}
    again = compare(trained_project, ["cpu", "jetson-orin-nano", "android-arm64", "future-npu"], out, [profiles],
                    suite="quick")
    assert all(r.reused for r in again.rows if r.bundle)
    assert {p.name: p.stat().st_mtime for p in out.glob("*.edgepack")} == before


def test_html_report_is_self_contained_and_renders(compared, tmp_path):
    from edgepack.compare.html import write_html

    _, _, c, _ = compared
    written = write_html(c, tmp_path / "report.html")
    html = written["html"].read_text()
    assert "data:image/png;base64," in html and "<script" not in html
    assert "http://" not in html and "https://" not in html          # nothing fetched at view time
    for name in TARGETS:
        assert name in html
    assert "Pareto front" in html and "estimate" in html and "measured (host" in html
    for key in ("latency_accuracy", "size"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install -y chromium) for the screenshot")
    shot = tmp_path / "shot.png"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chrome'}", f"--screenshot={shot}", "--window-size=1280,2000",
           written["html"].as_uri()]
    try:  # a guard against a hung browser only: it skips the screenshot, it never fails the test
        subprocess.run(cmd, capture_output=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip("headless Chromium did not finish the screenshot")
    assert shot.is_file() and shot.stat().st_size > 50_000
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1280, 2000)
    colors = img.resize((64, 100)).getcolors(maxcolors=64 * 100)
    assert colors is not None and len(colors) > 50                     # not a blank page


def test_cli_compare_json_markdown_and_html(compared, trained_project, tmp_path):
    out, profiles, _, _ = compared
    base = ["compare", "--project", str(trained_project), "--out", str(out), "--targets-dir", str(profiles),
            "--calibration-suite", "quick", "-q"]
    res = runner.invoke(app, base + ["-t", "cpu,future-npu", "--format", "json", "--html", str(tmp_path / "r.html"),
                                     "--max-latency-ms", "1000"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [r["target"] for r in data["rows"]] == ["cpu", "future-npu"]
    assert data["rows"][1]["p50_ms"]["source"] == "estimate" and (tmp_path / "r.html").is_file()
    assert data["report"]["size"].endswith("r-size.png")
    res = runner.invoke(app, base + ["-t", "cpu", "-t", "android-arm64", "--format", "markdown"])
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("# digits 1.2.3") and "| cpu |" in res.stdout and "est." in res.stdout
    res = runner.invoke(app, base + ["-t", "cpu,future-npu"])
    assert res.exit_code == 0 and "estimate vs measured on this host" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["-t", "cpu,rpi6"], "unknown target 'rpi6'"),
    (["-t", "cpu,,onnx"], "empty target name"),
    (["-t", "cpu", "--max-drop", "-1"], "--max-drop -1.0: must not be negative"),
    (["-t", "cpu", "--html", "report.txt"], "must end in .html"),
    (["-t", "cpu", "--workers", "0"], "--workers 0"),
    (["-t", "cpu", "--calibration-suite", "huge"], "unknown calibration suite"),
])
def test_cli_compare_errors(trained_project, tmp_path, args, message):
    res = runner.invoke(app, ["compare", "--project", str(trained_project), "--out", str(tmp_path / "o"), "-q"] + args)
    assert res.exit_code == 2, res.output
    assert any(line.startswith("error:") and message in line for line in res.output.splitlines()), res.output
    assert any(line.startswith("hint:") for line in res.output.splitlines())


def test_build_for_a_profile_without_its_backend_names_it(trained_project, tmp_path):
    (tmp_path / "future-npu.yaml").write_text(FUTURE)
    res = runner.invoke(app, ["build", "--project", str(trained_project), "-t", "future-npu", "--targets-dir",
                              str(tmp_path), "--out", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2
    assert "target 'future-npu'" in res.output and "needs backend 'qnn'" in res.output
    res = runner.invoke(app, ["targets", "list", "--format", "json"])
    names = {t["name"] for t in json.loads(res.stdout)}
    assert {"rpi5", "android-flagship", "android-arm64", "x86-avx512-vnni"} <= names


def test_parallel_builds_run_in_worker_processes_and_report_errors(trained_project, tmp_path):
    from edgepack.build.parallel import default_workers, groups_of, run_builds

    assert groups_of(["a", "b", "c"], 2) == [["a", "c"], ["b"]]
    assert groups_of(["a"], 4) == [["a"]]
    assert 1 <= default_workers(5) <= 5 and default_workers(1) == 1
    events: list = []
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "future-npu.yaml").write_text(FUTURE)
    (profiles / "future-npu-2.yaml").write_text(FUTURE.replace("name: future-npu", "name: future-npu-2"))
    outcomes = run_builds(trained_project / "edgepack.yaml", ["future-npu", "future-npu-2"], tmp_path, [profiles], 2,
                          events.append)
    assert sorted(o.target for o in outcomes) == ["future-npu", "future-npu-2"]
    assert all(o.bundle is None and "needs backend 'qnn'" in o.error and o.error_type == "ConfigError"
               for o in outcomes)



def test_compare_twice_on_an_onnx_project_without_inputs(tmp_path):
    """The second compare reads the data the way the build did (inputs from the ONNX file): it reuses
    the bundle and gives the same rows, where it used to fail with "key 'inputs' is required"."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgepack.compare import compare

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["scores"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    (tmp_path / "data").mkdir()
    for name, n in (("calib", 100), ("eval", 50)):
        np.savez(tmp_path / "data" / f"{name}.npz", x=rng.normal(size=(n, 4)).astype(np.float32))
    (tmp_path / "edgepack.yaml").write_text("name: cmp\nversion: 0.1.0\nmodel: {path: m.onnx}\n"
                                            "calibration: {source: data/calib.npz}\n"
                                            "evaluation: {source: data/eval.npz}\n")
    events: list[tuple[str, str, str]] = []
    first = compare(tmp_path, ["onnx"], tmp_path / "out", workers=1)
    second = compare(tmp_path, ["onnx"], tmp_path / "out", workers=1,
                     progress=lambda *e: events.append(e))
    assert any(status == "done" and "reused" in detail for _, status, detail in events), events
    rows = [[(r["target"], r["status"], r["accuracy"]) for r in c.to_json()["rows"]] for c in (first, second)]
    assert rows[0] == rows[1]
