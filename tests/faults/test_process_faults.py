"""The fault catalogue, processes and file systems: signals at several points of a build, kill -9
during builds, installs and rollbacks, full and read-only file systems, a hung registry."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.faults import crafting as c
from tests.faults.helpers import Fault, Outcome, cli, cli_process, expect_fault, snapshot

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _build_args(project: Path, out: Path) -> list[str]:
    return ["build", "--project", str(project), "--target", "onnx", "--out", str(out)]


def _signal_at(args: list[str], sig: int, after_line: str | None, delay_s: float = 0.0) -> Outcome:
    """Run edgepack, send ``sig`` when a stderr line contains ``after_line`` (or after ``delay_s``)."""
    # Ctrl-C as a terminal delivers it, even when this test run was started with it ignored (nohup, `&`)
    proc = subprocess.Popen([sys.executable, "-m", "edgepack.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ | ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    if after_line is None:
        time.sleep(delay_s)
        proc.send_signal(sig)
    else:
        for line in proc.stderr:
            lines.append(line)
            if after_line in line:
                proc.send_signal(sig)
                break
    out, err = proc.communicate()
    text = "".join(lines) + out + err
    return Outcome(proc.returncode, text, "Traceback" in text)


STAGES = ["calibration data", "export onnx", "measure onnx"]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")],
                         ids=["sigterm", "sigint"])
@pytest.mark.parametrize("stage", STAGES)
def test_signal_during_a_build_leaves_nothing(stage, sig, code, word, project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out, project)
    res = _signal_at(_build_args(project, out), sig, stage)
    expect_fault(res, Fault(f"{signal.Signals(sig).name} after '{stage}'", code, (word,), [out, project]), before)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
@pytest.mark.parametrize("delay", [0.25, 0.6])
def test_signal_while_the_cli_starts(sig, code, delay, project, tmp_path):
    """Ctrl-C or SIGTERM in the first second: one line, no traceback (the build may not have begun)."""
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    res = _signal_at(_build_args(project, out), sig, None, delay)
    if res.exit_code == -sig:  # the interpreter had not yet run a line of edgepack
        pytest.skip("the signal arrived before Python started edgepack")
    expect_fault(res, Fault(f"{signal.Signals(sig).name} at {delay} s", code, ("",), [out]), before)


def test_a_killed_build_leaves_a_folder_the_next_build_removes(project, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "edgepack.cli.main", *_build_args(project, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=os.environ | ENV)
    for line in proc.stderr:
        if "export onnx" in line:
            break
    proc.kill()
    proc.wait()
    left = list(out.glob(".edgepack-*.build"))
    assert left, "the kill -9 should have left the scratch folder"
    res = cli(*_build_args(project, out), "--quiet")
    assert res.exit_code == 0, res.output
    assert not list(out.glob(".edgepack-*")), list(out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["digits-1.2.3-onnx.edgepack"]


def test_build_on_a_full_disk(project, small_fs):
    fs = small_fs("400k")
    out = fs.path / "out"
    res = cli(*_build_args(project, out), "--quiet")
    expect_fault(res, Fault("build into a 400 kB file system", 15, ("--out", "no space")))
    assert not [p for p in out.iterdir()], list(out.iterdir())


def test_install_on_a_full_disk(bundle, small_fs):
    fs = small_fs("150k")  # the bundle is ~200 kB
    root = fs.path / "root"
    res = cli("install", bundle, "--root", root, "--allow-unsigned", "--runs", "2")
    expect_fault(res, Fault("install into a 150 kB file system", 15, ("are free", "nothing was written")))
    assert not list((root / "versions").iterdir())


def test_validate_report_into_a_missing_folder(bundle, tmp_path):
    before = snapshot(tmp_path)
    res = cli("validate", bundle, "--runs", "2", "--report", tmp_path / "no" / "such" / "report.json")
    expect_fault(res, Fault("validate --report into a missing folder", 2, ("no such file",), [tmp_path]), before)


def test_validate_report_and_sign_on_a_read_only_file_system(bundle, fault_keys, small_fs):
    fs = small_fs("1m")
    copy = fs.path / bundle.name
    shutil.copy2(bundle, copy)
    fs.readonly()
    before = snapshot(fs.path)
    res = cli("validate", copy, "--runs", "2")
    expect_fault(res, Fault("validate, report on a read-only fs", 2, ("read-only",), [fs.path]), before)
    res = cli("sign", copy, "--key", fault_keys / "a.key")
    expect_fault(res, Fault("sign on a read-only fs", 2, ("cannot sign", "read-only"), [fs.path]), before)


def test_keygen_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    res = cli("keygen", "--out", tmp_path / "afile" / "edgepack")
    expect_fault(res, Fault("keygen --out below a file", 2, ("afile", "not a folder"), [tmp_path]), before)


@pytest.fixture
def two_versions(bundle, tmp_path) -> Path:
    """A root with 1.3.0 active and 1.2.3 previous (unsigned bundles, the root opted out)."""
    root = tmp_path / "root"
    v2 = c.with_manifest(bundle, tmp_path / "v2.edgepack", lambda m: m.update(version="1.3.0"), reseal=True)
    for b in (bundle, v2):
        res = cli("install", b, "--root", root, "--allow-unsigned", "--runs", "2")
        assert res.exit_code == 0, res.output
    return root


def _status(root: Path) -> dict:
    import json

    res = cli("status", "--root", root, "--format", "json")
    assert res.exit_code == 0, res.output
    return json.loads(res.output)


@pytest.mark.parametrize("step", ["rollback-journal-written", "rollback-previous-linked", "rollback-current-linked"])
def test_rollback_killed_at_each_step(step, two_versions):
    root = two_versions
    res = cli_process("rollback", "--root", root, env=ENV | {"EDGEPACK_TEST_CRASH_AT": step})
    assert res.exit_code == 137, res.output
    s = _status(root)  # finishes the switch
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.2.3", "1.3.0"), s
    res = cli("rollback", "--root", root)
    assert res.exit_code == 0, res.output
    s = _status(root)
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.3.0", "1.2.3"), s
    assert not (root / "switch.json").exists()


@pytest.mark.parametrize("step", ["fetched", "extracted", "verified", "validated", "placed"])
def test_install_killed_leaves_nothing_in_tmp(step, bundle, tmp_path):
    import tempfile

    tmp = Path(tempfile.gettempdir())
    before = {p.name for p in tmp.glob("edgepack-bundle-*")}
    root = tmp_path / "root"
    res = cli_process("install", bundle, "--root", root, "--allow-unsigned", "--runs", "2",
                      env=ENV | {"EDGEPACK_TEST_CRASH_AT": step})
    assert res.exit_code == 137, res.output
    assert {p.name for p in tmp.glob("edgepack-bundle-*")} <= before
    res = cli("install", bundle, "--root", root, "--allow-unsigned", "--runs", "2")
    assert res.exit_code == 0, res.output
    assert not list((root / "versions").glob(".staging-*"))


def test_a_hung_registry_fails_fast(tmp_path, monkeypatch):
    """A registry that accepts connections and never answers: two read timeouts, then exit 12."""
    pytest.importorskip("oras")
    from edgepack.shipping import registry

    monkeypatch.setattr(registry, "TIMEOUT_S", (1.0, 0.5))
    monkeypatch.setattr(registry, "BACKOFF_S", 0.01)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        host = f"127.0.0.1:{server.getsockname()[1]}"
        res = cli("pull", f"{host}/fleet/digits:1.2.3-onnx", "--out", tmp_path / "pulled")
    finally:
        stop.set()
        t.join()
        for s in accepted:
            s.close()
        server.close()
    expect_fault(res, Fault("pull from a hung registry", 12, ("did not answer",)))
    assert len(accepted) == registry.MAX_READ_TIMEOUTS
    assert not (tmp_path / "pulled").exists() or not list((tmp_path / "pulled").iterdir())


def test_json_output_stays_clean_when_toolchains_chatter(project, tmp_path):
    """Anything printed to stdout during the build (Python prints, native writes to fd 1) goes to stderr:
    `--format json` prints one JSON document on stdout."""
    import json

    model = project / "model.py"
    model.write_text(model.read_text().replace(
        "def build():\n    return DigitsCNN()",
        "def build():\n    import os\n    print('calibrating... 1/185')\n    os.write(1, b'native chatter\\n')\n"
        "    return DigitsCNN()"))
    p = subprocess.run([sys.executable, "-m", "edgepack.cli.main", *_build_args(project, tmp_path / "out"),
                        "--format", "json"], capture_output=True, text=True, env=os.environ | ENV)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc[0]["target"] == "onnx"
    assert "calibrating... 1/185" in p.stderr and "native chatter" in p.stderr
