"""Metrics per output: the budget gates on the metric and output named, each output is scored in a
form that fits its shape, error metrics gate the other way, and a user's function can score anything."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgepack.errors import ConfigError
from edgepack.measure import accuracy as acc

MODELS = '''
import torch
from torch import nn


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32),
                                  nn.ReLU())


class Face(Trunk):
    """box offsets (regression), landmarks (regression), class scores."""

    def __init__(self):
        super().__init__()
        self.box, self.marks, self.cls = nn.Linear(32, 4), nn.Linear(32, 10), nn.Linear(32, 10)

    def forward(self, x):
        h = self.body(x)
        return self.box(h), self.marks(h), self.cls(h)


class Seg(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return torch.sigmoid(self.net(x) * 4)


class Seq(Trunk):
    """CTC-style: 8 time steps x 5 symbols."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 40)

    def forward(self, x):
        return self.head(self.body(x)).reshape(-1, 8, 5)


class Scalar(Trunk):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.body(x))
'''

USER_METRIC = '''
import numpy as np


def greedy(seq):
    ids = np.argmax(seq.reshape(seq.shape[-2:]), -1)
    out = [int(i) for k, i in enumerate(ids) if i != 0 and (k == 0 or i != ids[k - 1])]
    return tuple(out)


def sequence_match(outputs, labels, reference):
    """Share of samples whose greedy CTC decoding equals FP32's."""
    same = [greedy(o) == greedy(r) for o, r in zip(outputs, reference)]
    return {"value": 100.0 * sum(same) / len(same), "higher_is_better": True, "unit": "percent"}
'''


def _project(root: Path, factory: str, outputs: str, metric: str, labels: bool = True) -> Path:
    from sklearn.datasets import load_digits

    root.mkdir(parents=True)
    (root / "models.py").write_text(MODELS)
    (root / "metrics.py").write_text(USER_METRIC)
    d = load_digits()
    images = np.clip(d.images * 16, 0, 255).astype(np.uint8)
    (root / "data").mkdir()
    np.savez(root / "data" / "calib.npz", images=images[:200], **({"labels": d.target[:200]} if labels else {}))
    np.savez(root / "data" / "eval.npz", images=images[1500:1700], **({"labels": d.target[1500:1700]} if labels else {}))
    (root / "edgepack.yaml").write_text(textwrap.dedent(f"""\
        name: metrics-{factory.lower()}
        version: 0.1.0
        model: {{path: "models.py:{factory}"}}
        inputs: [{{name: image, shape: [batch, 1, 8, 8]}}]
        outputs: {outputs}
        preprocess: {{layout: NCHW, scale: 0.00392156862745098, color: gray}}
        calibration: {{source: data/calib.npz, samples: 100}}
        evaluation: {{source: data/eval.npz{', metric: ' + metric if metric else ''}}}
        acceptance: {{max_accuracy_drop: 50.0}}
        """))
    return root


def _build(root: Path, tmp_path: Path):
    from edgepack.api import build

    (r,) = build(root, ["onnx"], tmp_path / "out")
    return r.manifest


def test_three_outputs_gate_on_the_output_named(tmp_path):
    metric = ('[{output: box, metric: mae}, {output: marks, metric: fidelity}, '
              '{output: cls, metric: top1, gate: true}]')
    m = _build(_project(tmp_path / "face", "Face", "[box, marks, cls]", metric), tmp_path)
    head = m.measurements.compiled.accuracy
    assert head["metric"] == "top1" and head["output"] == "cls"
    per = {p["output"]: p for p in head["per_output"]}
    assert per["box"]["metric"] == "mae" and per["box"]["higher_is_better"] is False and per["box"]["value"] >= 0
    assert per["marks"]["metric"] == "fidelity" and "snr_db" in per["marks"]
    assert m.acceptance.results[0]["metric"] == "top1 on output 'cls'"
    assert [e["gate"] for e in m.measurements.data["metrics"]] == [False, False, True]
    # the reference scores the FP32 model against itself: fidelity is perfect, errors are zero
    ref = {p["output"]: p for p in m.measurements.reference.accuracy["per_output"]}
    assert ref["box"]["value"] == 0 and ref["marks"]["value"] == 100.0
    # on the device, top-1 agreement is taken on the gating class-score output, not on the box offsets
    from edgepack.validation import validate

    report = validate(tmp_path / "out" / "metrics-face-0.1.0-onnx.edgepack", report=tmp_path / "r.json", runs=3)
    assert report["passed"] and report["golden"]["top1_output"] == "cls"


def test_a_probability_map_is_scored_by_iou(tmp_path):
    m = _build(_project(tmp_path / "seg", "Seg", "[mask]", "[{output: mask, metric: iou, threshold: 0.5}]",
                        labels=False), tmp_path)
    a = m.measurements.compiled.accuracy
    assert a["metric"] == "iou" and 50.0 < a["value"] <= 100.0 and a["threshold"] == 0.5


def test_a_sequence_output_scored_by_a_user_function(tmp_path):
    m = _build(_project(tmp_path / "seq", "Seq", "[symbols]", '["metrics.py:sequence_match"]', labels=False)
               if False else _project(tmp_path / "seq", "Seq", "[symbols]",
                                      "[{output: symbols, metric: 'metrics.py:sequence_match'}]", labels=False),
               tmp_path)
    a = m.measurements.compiled.accuracy
    assert a["metric"] == "metrics.py:sequence_match" and a["form"] == "user function"
    assert 0.0 <= a["value"] <= 100.0 and m.measurements.reference.accuracy["value"] == 100.0


def test_a_scalar_output_gets_a_metric_that_can_fail(tmp_path):
    m = _build(_project(tmp_path / "scalar", "Scalar", "[score]", "fidelity", labels=False), tmp_path)
    a = m.measurements.compiled.accuracy
    assert a["form"].startswith("values:") and 0.0 <= a["value"] <= 100.0
    # the same form on outputs that moved by more than 1% of the range scores 0
    ref = [[np.array([[float(v)]], np.float32)] for v in range(20)]
    off = [[o[0] + 5.0] for o in ref]
    plan = acc.plan("fidelity", ["score"], False, tmp_path, "test")
    assert plan.score(ref, None, ref)["value"] == 100.0 and plan.score(off, None, ref)["value"] == 0.0


def test_fidelity_forms_follow_the_output_shape():
    assert acc.form_of(np.zeros((1, 10))) == "scores"
    assert acc.form_of(np.zeros((1, 8, 5))) == "sequence"
    assert acc.form_of(np.zeros((1, 3, 8, 8))) == "map"
    assert acc.form_of(np.zeros((1, 1))) == "value"
    assert acc.form_of(np.zeros((2, 1, 16))) == "sequence"  # a recurrent state [layers, batch, hidden]
    assert acc.form_of(np.zeros((3, 4, 5))) == "values"


def test_error_metrics_gate_the_other_way():
    ref = {"metric": "mae", "value": 0.10, "higher_is_better": False}
    assert acc.drop(ref, {**ref, "value": 0.25}) == pytest.approx(0.15)  # worse: a positive drop
    assert acc.drop({"value": 90.0}, {"value": 88.0}) == pytest.approx(2.0)
    assert acc.goodness({**ref, "value": 0.1}) > acc.goodness({**ref, "value": 0.2})


def test_bad_metric_specs(tmp_path):
    from edgepack.project import load_project

    class Spec:
        def __init__(self, output, metric="fidelity", gate=False):
            self.output, self.metric, self.threshold, self.gate = output, metric, 0.5, gate

    with pytest.raises(ConfigError, match="no output 'logit'"):
        acc.plan([Spec("logit")], ["logits"], True, tmp_path, "edgepack.yaml")
    with pytest.raises(ConfigError, match="top1 needs labels"):
        acc.plan([Spec("logits", "top1")], ["logits"], False, tmp_path, "edgepack.yaml")
    root = _project(tmp_path / "p", "Face", "[box, marks, cls]",
                    "[{output: box, gate: true}, {output: cls, metric: top1, gate: true}]")
    with pytest.raises(ConfigError, match="more than one metric has gate"):
        load_project(root)
    (root / "edgepack.yaml").write_text((root / "edgepack.yaml").read_text().replace(
        "gate: true}, {output: cls, metric: top1, gate: true}", "metric: accuracy}"))
    with pytest.raises(ConfigError, match="unknown metric 'accuracy'"):
        load_project(root)
    assert json.dumps(acc.plan("top1", ["a", "b"], True, tmp_path, "x").describe()) == json.dumps(
        [{"output": "a", "metric": "top1", "gate": True}, {"output": "b", "metric": "fidelity", "gate": False}])
