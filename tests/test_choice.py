"""Choosing the precision by measurement (select_precision): the pick among measured candidates, the
search when INT8 is not faster than FP32 on the target's runtime, and a forced precision."""

from __future__ import annotations

import pytest

from edgepack.build import choice
from edgepack.validation import validate
from tests.conftest import edit_yaml


def row(name: str, p50: float, size: int, ok: bool = True, precision: str = "int8") -> dict:
    return {"candidate": name, "precision": precision, "accuracy": 90.0, "drop_points": 0.0, "meets_budget": ok,
            "p50_ms": p50, "p90_ms": p50 * 1.2, "size_bytes": size}


def test_the_fastest_candidate_within_budget_wins_and_size_breaks_near_ties():
    rows = [row("int8", 1.2, 100), row("int8 weighted ops", 0.9, 150, ok=False), row("fp32", 1.0, 400, precision="fp32")]
    pick, second, why = choice._pick(rows, "latency")
    assert (pick, second) == ("fp32", "int8") and "meets the accuracy budget" in why   # the 0.9 one misses
    near = [row("int8", 1.02, 100), row("fp32", 1.0, 400, precision="fp32")]
    assert choice._pick(near, "latency")[0] == "int8"       # within 3%: the smaller model
    assert choice._pick([row("int8", 1.5, 100), row("fp32", 1.0, 400)], "size")[0] == "int8"
    assert choice._pick([row("int8", 1.5, 100), row("fp32", 1.0, 400)], "balanced")[0] == "int8"
    none_ok = [row("int8", 0.5, 100, ok=False), row("fp32", 1.0, 400, ok=False, precision="fp32")]
    pick, _, why = choice._pick(none_ok, "latency")
    assert pick == "fp32" and "no candidate met" in why


def test_int8_not_faster_than_fp32_builds_the_candidates_and_bundles_the_pick(project, tmp_path, monkeypatch):
    """Forced down the search (INT8 would have to be 100x FP32 to stay): every candidate is compiled,
    scored and timed in turn, the pick is the fastest within budget, and the bundle holds exactly it."""
    from edgepack.api import build

    monkeypatch.setattr(choice, "MIN_GAIN", 100.0)
    edit_yaml(project, "precision: int8\n", "")   # the shared project forces INT8; let the build choose
    (r,) = build(project, ["onnx"], tmp_path / "out", tune=False)
    pc = r.manifest.precision_choice
    assert pc.policy == "fastest" and pc.chosen in {c["candidate"] for c in pc.candidates}
    names = [c["candidate"] for c in pc.candidates]
    assert names[0] == "int8" and "fp32" in names
    within = [c for c in pc.candidates if c["meets_budget"]]
    fastest = min(c["p50_ms"] for c in within)
    chosen = next(c for c in pc.candidates if c["candidate"] == pc.chosen)
    assert chosen["meets_budget"] and chosen["p50_ms"] <= fastest * (1 + choice.NEAR_TIE)
    assert r.manifest.runtime.precision == chosen["precision"] and pc.runner_up in names
    assert "timed in turn" in pc.how and pc.why
    report = validate(r.bundle, report=tmp_path / "v.json", runs=5)
    assert report["passed"]


def test_a_fast_int8_stays_and_a_forced_precision_is_recorded(project, tmp_path):
    from edgepack.api import build

    (r,) = build(project, ["cpu"], tmp_path / "out", tune=False)
    pc = r.manifest.precision_choice
    assert r.manifest.profile["select_precision"] == "fixed" and r.manifest.profile["precision"] == "int8"
    assert pc.policy == "fixed" and pc.chosen == "int8" and "fixed by the profile or project" in pc.why
    assert pc.speedup_vs_fp32 == r.manifest.measurements.comparison.speedup_p50_vs_target_fp32
    if pc.speedup_vs_fp32 < 1.0:  # the host decides which; either way the record and the warning agree
        assert any("forced" in w and "slower than FP32" in w for w in r.manifest.warnings)


def test_a_precision_the_backend_does_not_offer_is_refused(project, tmp_path):
    from edgepack.api import build
    from edgepack.errors import ConfigError

    edit_yaml(project, "precision: int8", "precision: w8a16")
    with pytest.raises(ConfigError, match="w8a16"):
        build(project, ["onnx"], tmp_path / "out")
