"""The device side: install, rollback, status; failures and kills leave the root usable."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepack.shipping.install import ROLLBACK_STEPS, STEPS
from tests.shipping.conftest import cli, edit_manifest, error_lines

REPO = Path(__file__).resolve().parents[2]


def status(root: Path, *extra: str) -> dict:
    res = cli("status", "--root", root, "--format", "json", *extra)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def install(source, root: Path, *extra: str):
    """Install as these tests need: with the key they name, else opting out of signatures (a device
    refuses every bundle without a trusted key: tests/faults/ checks that default)."""
    if "--pubkey" not in extra:
        extra = (*extra, "--allow-unsigned")
    return cli("install", source, "--root", root, "--runs", "3", *extra)


def test_ship_end_to_end(registry, signed_v1, signed_v2, tampered, keys, tmp_path):
    """The issue's 'done when': registry round trip, install, second version, rollback, and a
    tampered bundle refused at every entry point."""
    repo = f"{registry.host}/fleet/digits"
    pub = keys / "a.pub"
    res = cli("push", signed_v1, repo, "--format", "json")
    assert res.exit_code == 0, res.output
    v1 = json.loads(res.stdout)
    assert cli("push", signed_v2, repo).exit_code == 0

    fresh = tmp_path / "fresh"
    res = cli("pull", v1["pinned"], "--out", fresh, "--pubkey", pub)
    assert res.exit_code == 0, res.output
    root = tmp_path / "device"
    res = install(fresh / signed_v1.name, root, "--pubkey", pub, "--device-id", "cam-01")
    assert res.exit_code == 0, res.output
    s = status(root)
    assert s["active"]["version"] == "1.2.3" and s["previous"] is None
    assert s["active"]["validation"]["passed"] is True and s["active"]["signature_verified"] is True
    assert (root / "current" / "bundle" / "model" / "model.onnx").is_file()

    res = install(f"{repo}:1.3.0-onnx", root, "--pubkey", pub)  # straight from the registry
    assert res.exit_code == 0, res.output
    s = status(root, "--verify")
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.3.0", "1.2.3")
    assert s["active"]["pinned"].startswith(f"{repo}@sha256:") and s["active"]["integrity"] == "ok"
    assert s["device_id"] == "cam-01"

    res = cli("rollback", "--root", root)
    assert res.exit_code == 0, res.output
    s = status(root)
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.2.3", "1.3.0")
    assert s["last_attempt"]["action"] == "rollback" and s["state_cache"] == "ok"

    # a tampered bundle: refused by pull, install (file and reference) and validate
    assert cli("push", tampered, f"{repo}:tampered").exit_code == 0
    refusals = [
        cli("pull", f"{repo}:tampered", "--out", tmp_path / "t", "--pubkey", pub),
        install(f"{repo}:tampered", root, "--pubkey", pub),
        install(tampered, root, "--pubkey", pub),
        cli("validate", tampered, "--pubkey", pub, "--runs", "2"),
    ]
    for res in refusals:
        assert res.exit_code == 10, res.output
        assert "does not match its signature (modified after signing)" in error_lines(res)[0]
    assert not (tmp_path / "t").exists() or list((tmp_path / "t").iterdir()) == []
    s = status(root)
    assert s["active"]["version"] == "1.2.3" and s["last_attempt"]["result"] == "failed"
    assert "modified after signing" in s["last_attempt"]["error"]


@pytest.fixture(scope="module")
def root_v1(signed_v1, keys, tmp_path_factory) -> Path:
    """A device root with 1.2.3 installed (copy it before changing it)."""
    root = tmp_path_factory.mktemp("root-v1") / "root"
    res = install(signed_v1, root, "--pubkey", keys / "a.pub")
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture(scope="module")
def root_v1_v2(root_v1, signed_v2, keys, tmp_path_factory) -> Path:
    """A device root with 1.3.0 active and 1.2.3 previous."""
    root = tmp_path_factory.mktemp("root-v2") / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    res = install(signed_v2, root, "--pubkey", keys / "a.pub")
    assert res.exit_code == 0, res.output
    return root


def _killed(args: list, step: str) -> subprocess.CompletedProcess:
    env = os.environ | {"EDGEPACK_TEST_CRASH_AT": step,
                        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "edgepack.cli.main", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=900)  # a hang guard, not a verdict


@pytest.mark.parametrize("step", STEPS)
def test_kill_install_at_each_step_leaves_a_consistent_root(step, root_v1, signed_v2, keys, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    proc = _killed(["install", signed_v2, "--root", root, "--pubkey", keys / "a.pub", "--runs", "3"], step)
    assert proc.returncode == 137, proc.stderr
    s = status(root, "--verify")  # the active bundle is whole: every file matches its sha256
    # from the journal on, the switch is finished by the next command (here: status)
    switched = STEPS.index(step) >= STEPS.index("journal-written")
    assert s["active"]["version"] == ("1.3.0" if switched else "1.2.3"), s
    assert s["active"]["validation"]["passed"] is True and "problem" not in s
    # the next install cleans up and completes
    res = install(signed_v2, root, "--pubkey", keys / "a.pub")
    assert res.exit_code == 0, res.output
    s = status(root)
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.3.0", "1.2.3")
    assert s["interrupted"] is False and s["state_cache"] == "ok"
    assert sorted(p.name for p in (root / "versions").iterdir()) == sorted(s["versions_on_disk"])


@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_kill_rollback_at_each_step_leaves_a_consistent_root(step, root_v1_v2, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1_v2, root, symlinks=True)
    proc = _killed(["rollback", "--root", root], step)
    assert proc.returncode == 137, proc.stderr
    s = status(root, "--verify")  # finishes the switch the journal describes
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.2.3", "1.3.0"), s
    assert "problem" not in s and s["interrupted"] is False
    res = cli("rollback", "--root", root)  # and a second rollback returns to where it started
    assert res.exit_code == 0, res.output
    s = status(root)
    assert (s["active"]["version"], s["previous"]["version"]) == ("1.3.0", "1.2.3"), s


def _wrong_outputs(src: Path, dst: Path) -> None:
    """An honestly built-looking bundle whose recorded outputs this device cannot reproduce."""
    from edgepack.bundle import file_entries, open_bundle, write_bundle

    with open_bundle(src) as opened:
        staging = dst.parent / "staging"
        shutil.copytree(opened.root, staging)
        manifest = opened.manifest
    outs = dict(np.load(staging / "validation" / "outputs.npz"))
    outs = {k: np.roll(v, 3, axis=-1) for k, v in outs.items()}  # every argmax moves
    np.savez(staging / "validation" / "outputs.npz", **outs)
    manifest = manifest.model_copy(update={"files": file_entries(staging)})
    write_bundle(staging, manifest, dst)  # seals a new build id


def test_failed_validation_leaves_the_old_model_active(root_v1, built, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    out, _ = built
    bad = tmp_path / "wrong" / "digits-1.2.3-onnx.edgepack"
    bad.parent.mkdir()
    _wrong_outputs(out / "digits-1.2.3-onnx.edgepack", bad)
    res = install(bad, root)
    assert res.exit_code == 8, res.output
    err, hint = error_lines(res)
    assert "outputs differ from the recorded ones" in err and "failed-validation.json" in hint
    s = status(root)
    assert s["active"]["version"] == "1.2.3" and s["active"]["build_id"] != "x"
    assert s["last_attempt"]["result"] == "failed" and s["last_attempt"]["exit_code"] == 8
    assert (root / "failed-validation.json").is_file() and not list((root / "versions").glob(".staging-*"))
    assert json.loads((root / "device-status.json").read_text())["last_attempt"]["result"] == "failed"


def test_wrong_target_is_refused_before_validation(built, tmp_path):
    out, _ = built
    jetson = tmp_path / "digits-1.2.3-jetson-orin-nano.edgepack"

    def to_jetson(m: dict) -> None:
        m["target"], m["runtime"]["backend"] = "jetson-orin-nano", "tensorrt"
        m["profile"]["device"] = {"kind": "gpu", "name": "NVIDIA Jetson Orin Nano 8GB", "software": {"l4t": "36.4"}}

    edit_manifest(out / "digits-1.2.3-onnx.edgepack", jetson, to_jetson)
    res = install(jetson, tmp_path / "root")
    assert res.exit_code == 16, res.output
    err, hint = error_lines(res)
    assert "a Jetson, and this machine" in err and "--force" in hint
    assert status(tmp_path / "root")["active"] is None


def test_target_check_facts():
    from types import SimpleNamespace

    from edgepack.errors import WrongTargetError
    from edgepack.shipping.device import Host, check_target

    def manifest(target, backend, device):
        return SimpleNamespace(target=target, runtime=SimpleNamespace(backend=backend), profile={"device": device})

    cpu = manifest("cpu", "openvino", {"name": "x86", "isa": ["avx2", "fma"]})
    assert check_target(cpu, host=Host("x86_64", frozenset({"avx2", "fma"}))) == []
    with pytest.raises(WrongTargetError, match="x86-64 CPU .* this machine is aarch64"):
        check_target(cpu, host=Host("aarch64", frozenset({"asimd"})))
    assert "lacks avx2" in check_target(cpu, host=Host("x86_64", frozenset({"sse4_2"})))[0]
    trt = manifest("jetson-orin-nano", "tensorrt", {"name": "Orin", "software": {"l4t": "36.4"}})
    with pytest.raises(WrongTargetError, match="a Jetson"):
        check_target(trt, host=Host("x86_64", tensorrt=True))
    with pytest.raises(WrongTargetError, match="TensorRT, which is not installed"):
        check_target(trt, host=Host("aarch64", l4t=True))
    assert check_target(trt, host=Host("aarch64", tensorrt=True, l4t=True)) == []
    assert check_target(trt, force=True, host=Host("x86_64"))[0].startswith("--force: ")


def test_trusted_key_in_the_root_makes_signatures_mandatory(root_v1, built, keys, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    shutil.copy2(keys / "a.pub", root / "trusted.pub")
    out, _ = built
    res = install(out / "digits-1.2.3-cpu.edgepack", root)
    assert res.exit_code == 10 and "is not signed" in error_lines(res)[0]
    assert status(root)["active"]["version"] == "1.2.3"


def test_one_install_at_a_time(root_v1, signed_v2, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    with open(root / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        res = install(signed_v2, root)
    assert res.exit_code == 17 and "another edgepack install" in error_lines(res)[0]


def test_status_and_rollback_errors(root_v1, tmp_path):
    res = cli("status", "--root", tmp_path / "empty")
    assert res.exit_code == 17 and "nothing is installed" in error_lines(res)[0]
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    res = cli("rollback", "--root", root)
    assert res.exit_code == 17 and "no previous version" in error_lines(res)[0]
    res = install(tmp_path / "missing.edgepack", root)
    assert res.exit_code == 2 and "not a registry reference" in error_lines(res)[0]
    res = cli("status", "--root", root)
    assert res.exit_code == 0 and "active   digits 1.2.3 (onnx)" in res.output and "[signed]" in res.output


def test_same_build_again_reuses_its_folder_and_a_new_signature_gets_its_own(root_v1, signed_v1, keys, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    before = status(root)["versions_on_disk"]
    res = install(signed_v1, root)
    assert res.exit_code == 0, res.output
    s = status(root)
    assert s["versions_on_disk"] == before and s["previous"] is None  # nothing to switch
    resigned = tmp_path / signed_v1.name  # the same build, signed with a new key (key rotation)
    shutil.copy2(signed_v1, resigned)
    assert cli("sign", resigned, "--key", keys / "b.key").exit_code == 0
    res = install(resigned, root, "--pubkey", keys / "b.pub")
    assert res.exit_code == 0, res.output
    s = status(root, "--verify")
    assert s["active"]["id"].startswith(before[0] + ".") and s["previous"]["id"] == before[0]
    res = cli("verify", root / "current" / "bundle", "--pubkey", keys / "b.pub")
    assert res.exit_code == 0, res.output


def test_exit_codes_are_unique_per_error_class():
    import edgepack.errors as errors

    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.EdgepackError)]
    codes = [c.exit_code for c in classes]
    assert len(codes) == len(set(codes)), sorted(zip(codes, [c.__name__ for c in classes]))


def test_disk_full_while_extracting_keeps_the_old_version(root_v1, signed_v2, tmp_path, monkeypatch):
    import errno

    from edgepack import bundle as bundle_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    root = tmp_path / "root"
    shutil.copytree(root_v1, root, symlinks=True)
    monkeypatch.setattr(bundle_module, "extract_members", full)
    res = install(signed_v2, root)
    assert res.exit_code == 15, res.output
    assert "no space left" in error_lines(res)[0]
    s = status(root)
    assert s["active"]["version"] == "1.2.3" and s["last_attempt"]["exit_code"] == 15
    assert not list((root / "versions").glob(".staging-*"))
