"""The build spine piece by piece (edgepack/build/), from cheap contexts made in the test: the plan step,
the typed context and its data, export and reference caching, latency, gates and manifest assembly,
per-target outcomes, and the typed manifest sections' compatibility with older bundles."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgepack.artifact import StageRecord
from edgepack.build.context import BuildContext, BuildResult, Data, Settings, TargetFailure
from edgepack.build.data import check_data, prepare_data
from edgepack.build.gates import comparison, gates
from edgepack.build.manifest import Built, assemble
from edgepack.build.measuring import reference
from edgepack.build.plan import plan_targets, toolchain_versions
from edgepack.build.source import exported, source_of
from edgepack.bundle import Measured, parse_manifest
from edgepack.calibration.reader import SampleSet
from edgepack.errors import CalibrationError, ConfigError, ToolchainError
from edgepack.loaders.resolve import resolve
from edgepack.manifest import Latency, Section
from edgepack.measure.latency import measure_latency
from edgepack.project import find_project, load_project
from edgepack.target import load_target

QNN_PROFILE = """\
name: future-npu
description: a board whose backend this edgepack does not have
backend: qnn
precision: int8
device: {kind: npu, name: some NPU}
"""


def _measured(p50: float, p90: float, size: int, value: float, peak: float | None = 10.0) -> Measured:
    return Measured(model="m", runtime="r", latency={"p50_ms": p50, "p90_ms": p90, "where": {"cpu": "x"}},
                    size={"bytes": size, "files": {}}, accuracy={"metric": "top1", "value": value, "samples": 10},
                    peak_memory={"measured": peak is not None, "peak_mb": peak})


@pytest.fixture
def ctx(project, tmp_path) -> BuildContext:
    """A context on the digits project, as build() makes it, with its data read."""
    proj = load_project(project)
    plans = plan_targets(["onnx"])
    scratch = tmp_path / "scratch"
    c = BuildContext(resolve(proj, scratch / "source"), source_of(proj, find_project(project)),
                     toolchain_versions(plans), Settings(threads=1), tmp_path / "out", scratch)
    c.data = prepare_data(c, plans[0].profile)
    return c


def test_plan_strict_raises_lenient_records_and_names_are_deduplicated(tmp_path):
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "future-npu.yaml").write_text(QNN_PROFILE)
    with pytest.raises(ConfigError, match="backend 'qnn'"):
        plan_targets(["onnx", "future-npu"], [targets])
    plans = plan_targets(["onnx", "onnx", "future-npu"], [targets], strict=False)
    assert [p.profile.name for p in plans] == ["onnx", "future-npu"]
    assert plans[0].buildable and plans[0].backend.name == "onnxruntime" and plans[0].options is not None
    assert not plans[1].buildable and plans[1].backend is None and "qnn" in plans[1].problem
    with pytest.raises(ConfigError, match="no target"):
        plan_targets([])


def test_toolchain_versions_come_from_the_planned_backends():
    onnx_only = toolchain_versions(plan_targets(["onnx"]))
    assert {"edgepack", "numpy", "onnxruntime", "onnx"} <= set(onnx_only) and "openvino" not in onnx_only
    with_cpu = toolchain_versions(plan_targets(["onnx", "cpu"]))
    assert {"openvino", "nncf"} <= set(with_cpu)


def test_data_is_read_once_with_its_metric_and_recorded(ctx):
    assert isinstance(ctx.data, Data) and ctx.metric == "top1"
    assert len(ctx.calibration) > 0 and ctx.evaluation.labels is not None
    assert [s.name for s in ctx.stages] == ["data"]
    with pytest.raises(Exception):
        ctx.data.metric = "fidelity"  # frozen


def test_overlapping_sets_are_refused_and_thin_ones_warned():
    a = SampleSet([{"x": np.full((1, 2), float(i), np.float32)} for i in range(3)], [0, 1, 0], "a.npz")
    same = SampleSet([dict(s) for s in a.samples], [0, 1, 0], "b.npz")
    with pytest.raises(CalibrationError, match="share 3 identical"):
        check_data(Data(a, same, "top1"), 1, None)
    notes = check_data(Data(a, a, "top1"), 10, ["n0", "n1", "n2"])
    assert any("only 3 calibration samples" in n for n in notes)
    assert any("cover 2 of 3 classes" in n and "n2" in n for n in notes)


def test_export_and_reference_are_made_once_and_reused(ctx):
    profile = load_target("onnx")
    art = exported(ctx, profile)
    assert exported(ctx, profile) is art and [i.name for i in art.inputs] == ["image"]
    assert [o.name for o in art.outputs] == ["logits"] and art.path.is_file()
    ref = reference(ctx, art, 1, profile)
    assert reference(ctx, art, 1, profile) is ref
    assert ctx.metric_plan is not None and ref.measured.accuracy.metric == "top1"
    assert 50 < ref.measured.accuracy.value <= 100 and ref.measured.latency.p50_ms > 0
    assert len(ref.outputs) == len(ctx.evaluation)


def test_latency_is_bounded_by_the_runs_asked_for():
    class Runner:
        input_names = ["x"]
        calls = 0

        def run(self, feeds):
            Runner.calls += 1
            return [feeds["x"] * 2]

    lat = measure_latency(Runner(), {"x": np.ones((1, 4), np.float32)}, 3, 25, 60.0, 1)
    assert lat["how"]["runs"] == 25 and Runner.calls == 28
    assert 0 < lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]


def test_gates_and_ratios_from_given_figures(project):
    proj, profile = load_project(project), load_target("onnx")
    ref, got = _measured(2.0, 3.0, 4000, 90.0), _measured(1.0, 1.5, 1000, 87.5)
    ratios = comparison(ref, got)
    assert ratios["speedup_p50"] == 2.0 and ratios["speedup_p90"] == 2.0 and ratios["size_ratio"] == 0.25
    assert ratios["accuracy_delta_points"] == -2.5 and ratios["peak_memory_ratio"] == 1.0
    verdict = gates(proj, profile, ref, got)   # the digits project allows 2 points
    assert not verdict.passed and "accuracy dropped 2.50 points" in verdict.reasons[0]
    assert gates(proj, profile, ref, _measured(1.0, 1.5, 1000, 88.5)).passed
    proxied = got.model_copy(update={"proxy": "onnxruntime standing in"})
    assert "not derived" in comparison(ref, proxied)["speedup"]


def test_assemble_writes_validation_files_and_a_typed_manifest(ctx, tmp_path):
    profile = load_target("onnx")
    (plan,) = plan_targets(["onnx"])
    art = exported(ctx, profile)
    ref = reference(ctx, art, 1, profile)
    staging = tmp_path / "staging"
    (staging / "model").mkdir(parents=True)
    compiled = art.__class__(art.format, staging / "model" / "model.onnx", art.inputs, art.outputs,
                             precision="fp32")
    shutil.copy(art.path, compiled.path)
    got = _measured(ref.measured.latency.p50_ms / 2, ref.measured.latency.p90_ms / 2, compiled.size_bytes,
                    ref.measured.accuracy.value)
    ctx.stages.append(StageRecord("export", {}, None, None, 0.0))
    m = assemble(ctx, plan, Built(compiled, art, ref.measured, got, ref.outputs), staging)
    assert m.runtime.model_file == "model/model.onnx" and m.runtime.precision == "fp32"
    assert m.measurements.comparison.speedup_p50 == pytest.approx(2.0, rel=0.01)
    assert m.acceptance.passed and m.measurements.data.metric == "top1"
    assert (staging / m.validation.inputs_file).is_file() and (staging / m.validation.holdout_file).is_file()
    n = m.validation.samples
    assert np.load(staging / m.validation.inputs_file)["images"].shape[0] == n and m.validation.inputs_form == "images"
    assert [s["name"] for s in m.stages] == ["data", "export"]
    assert json.loads((staging / "labels.json").read_text())[0] == "zero"


def test_build_reports_each_target_and_one_failure_does_not_stop_the_others(project, tmp_path, monkeypatch):
    """keep_going: a target whose compile fails becomes a TargetFailure; the other's bundle is written."""
    from edgepack.backends.onnxruntime import ONNXRuntimeBackend
    from edgepack.build import build

    targets = tmp_path / "targets"
    targets.mkdir()
    text = (Path(__file__).parents[1] / "edgepack" / "targets" / "onnx.yaml").read_text()
    (targets / "onnx-other.yaml").write_text(text.replace("name: onnx", "name: onnx-other"))
    real = ONNXRuntimeBackend.compile

    def compile(self, model, target, options, calibration, workdir):
        if target.name == "onnx-other":
            raise ToolchainError("the converter crashed on purpose")
        return real(self, model, target, options, calibration, workdir)

    monkeypatch.setattr(ONNXRuntimeBackend, "compile", compile)
    outcomes = build(project, ["onnx", "onnx-other"], tmp_path / "out", targets_dirs=[targets], tune=False,
                     keep_going=True)
    ok, failed = outcomes
    assert isinstance(ok, BuildResult) and ok.bundle.is_file()
    assert isinstance(failed, TargetFailure) and failed.target == "onnx-other"
    assert "crashed on purpose" in failed.error and failed.error_type == "ToolchainError" and failed.exit_code == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("*.edgepack")) == [ok.bundle.name]
    with pytest.raises(ToolchainError):
        build(project, ["onnx-other"], tmp_path / "out2", targets_dirs=[targets], tune=False)


def test_sections_read_as_mappings_and_keep_unknown_keys():
    lat = Latency.model_validate({"p50_ms": 1, "p90_ms": 2.5, "future_key": {"a": 1}})
    assert lat["p50_ms"] == 1 and lat.p90_ms == 2.5 and lat["future_key"] == {"a": 1}
    assert lat.get("noise") is None and "noise" not in lat and "p50_ms" in lat
    assert {**lat}["p90_ms"] == 2.5 and (lat | {"p50_ms": 3})["p50_ms"] == 3
    assert lat.model_dump(mode="json") == {"p50_ms": 1, "p90_ms": 2.5, "future_key": {"a": 1}}
    assert isinstance(lat, Section)
    with pytest.raises(KeyError):
        lat["nope"]


def test_a_manifest_written_before_the_sections_were_typed_reads_back_unchanged(built):
    """Keys a section did not have then are absent, keys it no longer declares are kept: the manifest
    dumps back to the same JSON, so its build id (a hash of that JSON) still holds."""
    _, results = built
    data = json.loads(results["onnx"].manifest.model_dump_json())
    comp = data["measurements"]["compiled"]
    comp["latency"].pop("noise", None)
    comp["latency"]["older_field"] = 7
    comp["accuracy"].pop("form", None)
    data["measurements"]["comparison"].pop("noisy", None)
    data.pop("precision_choice", None)   # top-level fields added later are absent from older manifests
    m = parse_manifest(json.dumps(data).encode(), "old.edgepack")
    assert json.loads(m.model_dump_json()) == data
    assert m.measurements.compiled.latency["older_field"] == 7 and m.measurements.compiled.latency.noise is None
    bad = json.loads(json.dumps(data))
    bad["measurements"]["compiled"]["latency"]["p50_ms"] = "fast"
    with pytest.raises(Exception, match="p50_ms"):
        parse_manifest(json.dumps(bad).encode(), "hostile.edgepack")


def test_each_bundle_says_what_its_build_spent(built):
    """Stage times in the manifest: the shared data reading in every target, the export and the FP32
    reference with the first target that needed them, the target's own compile and measurement."""
    _, results = built
    first, second = results["cpu"].manifest.timings, results["onnx"].manifest.timings
    names = [r["stage"] for r in first.stages]
    assert names[:2] == ["calibration data", "evaluation data"] and "measure fp32 reference" in names
    assert any(n.startswith("compile cpu") for n in names) and not any(n.startswith("compile onnx") for n in names)
    other = [r["stage"] for r in second.stages]
    assert other[:2] == names[:2] and any(n.startswith("compile onnx") for n in other)
    assert "measure fp32 reference" not in other   # cached: counted once, with the first target
    assert first.total_seconds > 0
    assert first.total_seconds == pytest.approx(sum(r["seconds"] for r in first.stages), abs=0.01)
