"""Accuracy first: a model made sensitive to INT8 misses a 1-point budget with plain INT8, and the
tuning search provably recovers it by keeping the sensitive layer in higher precision."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.calibration.table import fit_ranges
from tests.backends.contract import samples, tiny_onnx
from tests.conftest import edit_yaml


def test_calibration_methods_really_differ(tmp_path):
    art = tiny_onnx(tmp_path / "m")
    data = samples(64)
    tables = {m: fit_ranges(art.path, data, m, tmp_path / m)[0] for m in ("minmax", "entropy", "percentile")}
    names = sorted(tables["minmax"].ranges)
    for a, b in (("minmax", "entropy"), ("minmax", "percentile"), ("entropy", "percentile")):
        differ = [n for n in names if not np.allclose(tables[a].ranges[n], tables[b].ranges[n])]
        assert differ, f"{a} and {b} gave identical ranges"


@pytest.fixture(scope="module")
def tuned(sensitive_project, tmp_path_factory):
    from edgepack.api import build

    out = tmp_path_factory.mktemp("tuned")
    return {r.target: r for r in build(sensitive_project, ["onnx", "cpu"], out, max_tuning_minutes=5)}


@pytest.mark.parametrize("target", ["onnx", "cpu"])
def test_plain_int8_misses_and_tuning_recovers_the_budget(tuned, target):
    m = tuned[target].manifest
    t = m.tuning
    assert t is not None
    plain = t["steps"][0]
    assert plain["step"] == "plain int8" and plain["drop_points"] > 1.0 and not plain["meets_budget"]
    assert t["budget_met"] is True and m.acceptance.passed
    drop = m.measurements.reference.accuracy["value"] - m.measurements.compiled.accuracy["value"]
    assert drop <= 1.0
    assert all(s["accuracy"] is not None and s["p50_ms_host"] > 0 for s in t["steps"])
    assert t["steps"][-1]["meets_budget"] and not any(s["meets_budget"] for s in t["steps"][:-1])
    assert m.runtime.precision == "int8"


def test_onnx_runtime_recovers_by_entropy_calibration(tuned):
    """Entropy calibration clips the x1000 outlier channel: the method step alone meets the budget."""
    t = tuned["onnx"].manifest.tuning
    assert t["chosen"] == {"step": "calibration entropy", "calibration_method": "entropy", "recipe": "default"}
    assert t["kept_in_higher_precision"] == []


def test_openvino_recovers_by_keeping_the_sensitive_layers_in_float(tuned):
    """NNCF's range estimators do not clip the outlier, so the search falls through to layer sensitivity."""
    t = tuned["cpu"].manifest.tuning
    kept = [k["layer"] for k in t["kept_in_higher_precision"]]
    ranked = [s["layer"] for s in t["sensitivity"]]
    assert kept and kept == ranked[: len(kept)]  # the most sensitive first
    # the two convolutions that produce and read the scaled activation stand out
    errors = [s["output_error"] for s in t["sensitivity"]]
    assert min(errors[:2]) > 100 * max(errors[2:])
    assert [s["step"] for s in t["steps"]][-1].startswith("keep ")
    assert "higher precision" in t["stopped"]


def test_tuned_bundle_still_validates(tuned, tmp_path):
    from edgepack.validation import validate

    assert validate(tuned["onnx"].bundle, report=tmp_path / "r.json", runs=5)["passed"]


def test_step_cap_ends_with_exit_3_and_the_best_bundle(sensitive_project, tmp_path):
    from edgepack.api import build, raise_for_acceptance
    from edgepack.errors import AcceptanceError

    [res] = build(sensitive_project, ["cpu"], tmp_path, max_tuning_steps=1)
    assert res.bundle.is_file() and not res.passed
    assert res.manifest.tuning["stopped"] == "step cap (1) reached"
    assert len(res.manifest.tuning["steps"]) == 2
    assert res.manifest.tuning["budget_met"] is False
    with pytest.raises(AcceptanceError) as info:
        raise_for_acceptance([res])
    assert info.value.exit_code == 3 and "max_accuracy_drop" in info.value.message


def test_time_cap_through_the_cli(sensitive_project, tmp_path):
    from edgepack.cli.app import app

    res = CliRunner().invoke(app, ["build", "--project", str(sensitive_project), "--target", "cpu", "--out",
                                   str(tmp_path), "--max-tuning-minutes", "0.001", "--format", "json", "-q"])
    assert res.exit_code == 3, res.output
    head = json.loads(res.stdout)[0]
    assert head["tuning"]["budget_met"] is False and "time cap" in head["tuning"]["stopped"]
    assert Path(head["bundle"]).is_file()


def test_no_tune_keeps_plain_int8(sensitive_project, tmp_path):
    from edgepack.api import build

    [res] = build(sensitive_project, ["onnx"], tmp_path, tune=False)
    assert res.manifest.tuning is None and not res.passed


def test_overlapping_calibration_and_evaluation_sets_are_refused(project):
    from edgepack.api import build
    from edgepack.errors import CalibrationError

    shutil.copyfile(project / "data" / "eval.npz", project / "data" / "calib.npz")
    with pytest.raises(CalibrationError, match="share 200 identical sample"):
        build(project, ["onnx"], project / "dist")


def test_few_calibration_samples_and_missing_classes_warn(project):
    from edgepack.api import build

    d = np.load(project / "data" / "calib.npz")
    keep = d["labels"] < 5
    np.savez(project / "data" / "calib.npz", images=d["images"][keep][:40], labels=d["labels"][keep][:40])
    edit_yaml(project, "max_accuracy_drop: 2.0", "max_accuracy_drop: 100")
    [res] = build(project, ["onnx"], project / "dist")
    w = " | ".join(res.manifest.warnings)
    assert "only 40 calibration samples" in w and "cover 5 of 10 classes" in w and "missing: five" in w


def test_a_calibration_method_the_toolchain_cannot_fit_is_skipped_and_recorded():
    """ORT's histogram methods fail on tensors holding finfo.min (attention masks): the search goes on."""
    from edgepack.errors import ToolchainError
    from edgepack.tuning import Trial, search

    def trial(step, method, kept, acc):
        return Trial(step, method, kept, None, {"value": acc}, [], 1.0, 0.1, acc >= 90)

    def try_build(step, method, kept):
        if method == "entropy":
            raise ToolchainError("ONNX Runtime quantization failed: Too many bins for data range.")
        return trial(step, method, kept, 91.0 if method == "percentile" else 80.0)

    notes: list[str] = []
    result = search(trial("plain int8", "minmax", [], 80.0), ["minmax", "entropy", "percentile"], try_build,
                    lambda deadline: [], 1.0, 5, notes.append)
    assert result.best.method == "percentile" and result.best.meets_budget
    assert result.failed == [{"step": "calibration entropy",
                              "error": "ONNX Runtime quantization failed: Too many bins for data range."}]
    assert any("entropy failed" in n for n in notes)


def test_the_ranking_stops_at_its_deadline(tmp_path):
    """With the time cap already spent, one layer is ranked and the others follow unranked (NaN), so a
    cap is honoured inside the ranking step, not only between steps."""
    import time

    from edgepack.tuning import Trial, rank_layers, search

    art = tiny_onnx(tmp_path / "m")
    data = samples(16)
    full = rank_layers(art.path, data, tmp_path / "full")
    cut = rank_layers(art.path, data, tmp_path / "cut", deadline=time.monotonic())
    assert len(cut) == len(full) >= 2 and cut[0][1] == cut[0][1] and all(e != e for _, e in cut[1:])
    assert {n for n, _ in cut} == {n for n, _ in full}

    seen: list[float] = []

    def rank(deadline):
        seen.append(deadline - time.monotonic())
        return [("a", 0.5), ("b", float("nan"))]

    def try_build(step, method, kept):
        return Trial(step, method, kept, None, {"value": 95.0 if kept else 80.0}, [], 1.0, 0.1, bool(kept))

    notes: list[str] = []
    result = search(Trial("plain", "minmax", [], None, {"value": 80.0}, [], 1.0, 0.1, False), ["minmax"],
                    try_build, rank, 2.0, 5, notes.append)
    assert 0 < seen[0] <= 60.0 + 1  # half of the 2 minutes left
    assert result.best.kept == ["a"] and any("1 of 2 layers ranked" in n for n in notes)


@pytest.mark.parametrize("needed", [0, 3, 5, 11, 12])
def test_rounds_built_at_once_walk_to_the_serial_search_result(needed):
    """With a trial map set, each round (calibration methods, recipes, the 1, 2, 4, ... counts, a short
    bisection) is built at once, and the search keeps exactly the trials, and the build, of the serial
    search; what the serial walk never reached is counted, and the step cap still holds."""
    from edgepack.errors import ToolchainError
    from edgepack.tuning import Trial, search, trial_map

    layers = [f"L{i}" for i in range(12)]

    def try_build(step, method, kept, recipe="default"):
        if method == "entropy":
            raise ToolchainError("does not fit")
        acc = 80.0 + (2.0 if method == "percentile" else 0) + (3.0 if recipe == "bc" else 0)
        acc += 10.0 if needed and len(kept) >= needed else 0
        return Trial(step, method, kept, None, {"value": acc}, [], 1.0 + len(kept), 0.1, acc >= 90, recipe)

    calls: list[list[str]] = []

    def at_once(build, round_):
        calls.append([c[0] for c in round_])
        found = []
        for step, method, kept, extra in round_:
            try:
                found.append(build(step, method, kept, **extra))
            except ToolchainError as e:
                found.append(e)
        return found

    def run(steps=20):
        return search(Trial("plain int8", "minmax", [], None, {"value": 80.0}, [], 1.0, 0.1, False),
                      ["minmax", "entropy", "percentile", "mse"], try_build,
                      lambda deadline: [(n, 1.0 / (i + 1)) for i, n in enumerate(layers)], 5.0, steps,
                      lambda msg: None, recipes=("bc", "bc2"))

    serial = run()
    token = trial_map.set(at_once)
    try:
        capped = run(steps=6)
        calls.clear()
        parallel = run()
    finally:
        trial_map.reset(token)
    assert [t.step for t in parallel.trials] == [t.step for t in serial.trials]
    assert parallel.best.step == serial.best.step and parallel.best.kept == serial.best.kept
    assert parallel.stopped == serial.stopped and parallel.failed == serial.failed
    assert calls[0] == ["calibration entropy", "calibration percentile", "calibration mse"]
    assert calls[1] == ["recovery bc", "recovery bc2"]
    assert calls[2] == [f"keep {k} in float" for k in (1, 2, 4, 8, 12)][:len(calls[2])]
    assert parallel.parallel["rounds"] == [len(c) for c in calls] and len(calls) <= 4
    walked = {t.step for t in parallel.trials} | {f["step"] for f in parallel.failed}
    assert parallel.parallel["not_reached"] == sum(1 for c in calls for step in c if step not in walked)
    assert len(capped.trials) - 1 <= 6 and capped.stopped == "step cap (6) reached"
