"""`edgepack fleet report` over status files written by real installs."""

from __future__ import annotations

import json
import shutil

from tests.shipping.conftest import cli, error_lines


def test_fleet_report(signed_v1, signed_v2, built, tmp_path):
    out, _ = built
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    for device, bundles in (("cam-01", [signed_v1]), ("cam-02", [signed_v1, signed_v2]),
                            ("cam-03", [signed_v1, tmp_path / "missing.edgepack"])):
        root = tmp_path / device
        for b in bundles:
            cli("install", b, "--root", root, "--runs", "2", "--device-id", device, "--allow-unsigned")
        dst = gathered / f"{device}.json" if device != "cam-03" else gathered / device / "device-status.json"
        dst.parent.mkdir(exist_ok=True)
        shutil.copy2(root / "device-status.json", dst)  # flat, or a device's folder as rsync leaves it
    (gathered / "notes.json").write_text(json.dumps({"something": "else"}))
    (gathered / "cam-03" / "other.json").write_text("{}")  # not read: only device-status.json in subfolders
    res = cli("fleet", "report", gathered, "--format", "json")
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    rows = {d["device"]: d for d in r["devices"]}
    assert {k: (v["version"], v["validation"], v["previous"]) for k, v in rows.items()} == {
        "cam-01": ("1.2.3", "pass", None), "cam-02": ("1.3.0", "pass", "1.2.3"), "cam-03": ("1.2.3", "pass", None)}
    assert rows["cam-03"]["last_attempt"] == "failed" and "missing.edgepack" in rows["cam-03"]["last_error"]
    assert rows["cam-03"]["last_attempt_version"].endswith("missing.edgepack")
    assert r["versions"] == {"digits 1.2.3 (onnx)": 2, "digits 1.3.0 (onnx)": 1}
    assert r["failed_last_attempt"] == 1 and r["unreadable"] == [str(gathered / "notes.json")]
    res = cli("fleet", "report", gathered)
    assert res.exit_code == 0 and "cam-02" in res.output and "2 x digits 1.2.3 (onnx)" in res.output
    res = cli("fleet", "report", tmp_path / "nowhere")
    assert res.exit_code == 2 and "no such folder" in error_lines(res)[0]
