"""The fault catalogue, crafted bundles: each row makes a hostile or broken copy of a good bundle and
runs one command on it. Expected: the documented exit code, one `error:` line with the key words,
and nothing written outside the command's own output (the sandbox folder is compared entry by entry)."""

from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from tests.faults import crafting as c
from tests.faults.helpers import Fault, cli, expect_fault, snapshot

BUNDLE_ERROR, SIGNATURE_ERROR, DISK_FULL = 7, 10, 15


def _set(path: str, value):
    return lambda m: c.set_field(m, path, value)


def _bomb_listing(m: dict) -> None:
    m["files"][0]["bytes"] = 10 << 30


def _listed_twice(m: dict) -> None:
    m["files"].append(dict(m["files"][0]))


# (id, how to craft it from the good bundle, command, exit code, key words)
ROWS = [
    ("name-traversal", lambda s, d: c.with_manifest(s, d, _set("name", "./../../some/dir/x")),
     "install", BUNDLE_ERROR, ("name",)),
    ("target-traversal", lambda s, d: c.with_manifest(s, d, _set("target", "../x")),
     "install", BUNDLE_ERROR, ("target",)),
    ("version-with-slash", lambda s, d: c.with_manifest(s, d, _set("version", "1/../../x")),
     "verify", BUNDLE_ERROR, ("version",)),
    ("name-with-escape", lambda s, d: c.with_manifest(s, d, _set("name", "digits\x1b[2J")),
     "inspect", BUNDLE_ERROR, ("name",)),
    ("gzip-bundle", lambda s, d: c.gzipped(s, d), "install", BUNDLE_ERROR, ("gzip", "plain tar")),
    ("member-larger-than-listed", lambda s, d: c.with_member(s, d, "labels.json", lambda b: b + b" " * 4096),
     "verify", BUNDLE_ERROR, ("bytes, the manifest says",)),
    ("listing-of-10-GiB", lambda s, d: c.with_manifest(s, d, _bomb_listing),
     "install", BUNDLE_ERROR, ("bytes, the manifest says",)),
    ("duplicate-manifest", lambda s, d: c.plus(s, d, c.entry("manifest.json", b"{}")),
     "verify", BUNDLE_ERROR, ("appears twice",)),
    ("duplicate-listed-file", lambda s, d: c.plus(s, d, c.entry("labels.json", b"[]")),
     "verify", BUNDLE_ERROR, ("appears twice",)),
    ("edited-figure-unsigned", lambda s, d: c.with_manifest(
        s, d, lambda m: m["measurements"]["compiled"]["accuracy"].update(value=99.99)),
     "verify", BUNDLE_ERROR, ("build_id", "edited")),
    ("absolute-model-file", lambda s, d: c.with_manifest(s, d, _set("runtime.model_file", "/etc/passwd")),
     "validate", BUNDLE_ERROR, ("runtime.model_file",)),
    ("inputs-file-outside", lambda s, d: c.with_manifest(s, d, _set("validation.inputs_file", "/etc/passwd")),
     "validate", BUNDLE_ERROR, ("validation.inputs_file",)),
    ("holdout-file-traversal", lambda s, d: c.with_manifest(s, d, _set("validation.holdout_file", "../../x.npz")),
     "validate", BUNDLE_ERROR, ("holdout_file",)),
    ("listed-path-traversal", lambda s, d: c.with_manifest(s, d, _set("files.0.path", "../../etc/cron.d/x")),
     "install", BUNDLE_ERROR, ("files.0.path",)),
    ("file-listed-twice", lambda s, d: c.with_manifest(s, d, _listed_twice), "verify", BUNDLE_ERROR, ("twice",)),
    ("malformed-build-id", lambda s, d: c.with_manifest(s, d, _set("build_id", "sha256:../../x")),
     "verify", BUNDLE_ERROR, ("build_id",)),
    ("old-schema", lambda s, d: c.with_manifest(s, d, _set("schema_version", 1)),
     "verify", BUNDLE_ERROR, ("schema_version 1", "not supported")),
    ("not-a-tar", lambda s, d: d.write_bytes(b"\x00garbage" * 1000), "verify", BUNDLE_ERROR, ("not a readable",)),
    ("truncated", lambda s, d: d.write_bytes(s.read_bytes()[: s.stat().st_size // 2]),
     "install", BUNDLE_ERROR, ("bundle",)),
    ("symlink-member", lambda s, d: c.plus(s, d, c.entry("model/evil", type=tarfile.SYMTYPE, linkname="/etc/shadow")),
     "install", BUNDLE_ERROR, ("links and devices",)),
    ("hardlink-member", lambda s, d: c.plus(s, d, c.entry("model/evil", type=tarfile.LNKTYPE, linkname="labels.json")),
     "verify", BUNDLE_ERROR, ("links and devices",)),
    ("device-member", lambda s, d: c.plus(s, d, c.entry("model/tty", type=tarfile.CHRTYPE, devmajor=5, devminor=0)),
     "install", BUNDLE_ERROR, ("links and devices",)),
    ("fifo-member", lambda s, d: c.plus(s, d, c.entry("model/fifo", type=tarfile.FIFOTYPE)),
     "verify", BUNDLE_ERROR, ("links and devices",)),
    ("absolute-member", lambda s, d: c.plus(s, d, c.entry("/tmp/edgepack-evil", b"x")),
     "install", BUNDLE_ERROR, ("outside the bundle",)),
    ("dotdot-member", lambda s, d: c.plus(s, d, c.entry("model/../../edgepack-evil", b"x")),
     "install", BUNDLE_ERROR, ("outside the bundle",)),
    ("manifest-is-a-folder", lambda s, d: c.write(d, [c.entry("manifest.json", type=tarfile.DIRTYPE, mode=0o755)]),
     "verify", BUNDLE_ERROR, ("no manifest.json",)),
    ("no-manifest", lambda s, d: c.without(s, d, "manifest.json"), "verify", BUNDLE_ERROR, ("no manifest.json",)),
    ("deeply-nested-manifest", lambda s, d: c.with_member(s, d, "manifest.json", lambda b: b"[" * 100_000),
     "inspect", BUNDLE_ERROR, ("not valid JSON",)),
    ("non-utf8-manifest", lambda s, d: c.with_member(s, d, "manifest.json", lambda b: b"\xff\xfe" + b),
     "verify", BUNDLE_ERROR, ("not valid JSON",)),
    ("manifest-not-an-object", lambda s, d: c.with_member(s, d, "manifest.json", lambda b: b"[1, 2]"),
     "verify", BUNDLE_ERROR, ("not a JSON object",)),
    ("unlisted-member", lambda s, d: c.plus(s, d, c.entry("model/backdoor.py", b"import os")),
     "install", BUNDLE_ERROR, ("not listed", "model/backdoor.py")),
    ("unlisted-folder", lambda s, d: c.plus(s, d, c.entry("hooks", type=tarfile.DIRTYPE, mode=0o755)),
     "verify", BUNDLE_ERROR, ("not listed", "hooks/")),
    ("listed-file-missing", lambda s, d: c.without(s, d, "labels.json"), "verify", BUNDLE_ERROR, ("missing",)),
    ("changed-file", lambda s, d: c.with_member(s, d, "labels.json", lambda b: b.replace(b"zero", b"ZERO")),
     "install", BUNDLE_ERROR, ("sha256",)),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_crafted_bundle(row, bundle, tmp_path):
    what, craft, command, code, words = row
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    bad = sandbox / f"{what}.edgepack"
    craft(bundle, bad)
    root = sandbox / "root"
    args = {"verify": ("verify", bad), "inspect": ("inspect", bad),
            "validate": ("validate", bad, "--runs", "2", "--report", sandbox / "report.json"),
            "install": ("install", bad, "--root", root, "--allow-unsigned", "--runs", "2")}[command]
    before = snapshot(sandbox)
    outcome = cli(*args)
    after_root = {k: v for k, v in snapshot(sandbox).items() if not k.startswith(str(root))}
    fault = Fault(what, code, words, [sandbox])
    expect_fault(outcome, fault)
    assert {k: v for k, v in before.items()} == after_root, f"{what}: wrote outside the install root"
    if command == "install":  # the root holds the failed attempt's record, never a version
        assert not [p for p in (root / "versions").iterdir()], list((root / "versions").iterdir())
        assert not (root / "current").exists()


def test_too_many_members(bundle, tmp_path, monkeypatch):
    from edgepack import tarsafe

    monkeypatch.setattr(tarsafe, "MAX_MEMBERS", 20)
    bad = c.plus(bundle, tmp_path / "many.edgepack",
                 *[c.entry(f"model/f{i}", b"x") for i in range(30)])
    before = snapshot(tmp_path)
    expect_fault(cli("verify", bad), Fault("more members than allowed", BUNDLE_ERROR, ("more than 20 members",),
                                          [tmp_path]), before)


def test_oversized_manifest_and_signature(bundle, tmp_path, monkeypatch):
    from edgepack import bundle as b

    monkeypatch.setattr(b, "MAX_MANIFEST_BYTES", 1000)
    expect_fault(cli("inspect", bundle), Fault("manifest over its cap", BUNDLE_ERROR, ("manifest.json is",)))
    monkeypatch.undo()
    monkeypatch.setattr(b, "MAX_SIGNATURE_BYTES", 10)
    bad = c.plus(bundle, tmp_path / "sig.edgepack", c.entry("signature.json", b"{" + b" " * 100 + b"}"))
    expect_fault(cli("verify", bad), Fault("signature over its cap", BUNDLE_ERROR, ("signature.json",)))


def test_total_size_limit_from_the_environment(bundle, tmp_path):
    out = cli("inspect", bundle, env={"EDGEPACK_MAX_BUNDLE_BYTES": "1000"})
    expect_fault(out, Fault("bundle above EDGEPACK_MAX_BUNDLE_BYTES", BUNDLE_ERROR, ("more than the limit",)))
    out = cli("inspect", bundle, env={"EDGEPACK_MAX_BUNDLE_BYTES": "lots"})
    expect_fault(out, Fault("bad EDGEPACK_MAX_BUNDLE_BYTES", 2, ("EDGEPACK_MAX_BUNDLE_BYTES",)))


def test_bundle_larger_than_free_space_writes_nothing(bundle, tmp_path, monkeypatch):
    from edgepack import bundle as b

    monkeypatch.setattr(b, "free_bytes", lambda folder: 1000)
    root = tmp_path / "root"
    out = cli("install", bundle, "--root", root, "--allow-unsigned")
    expect_fault(out, Fault("bundle larger than the free space", DISK_FULL, ("only 1,000 are free",)))
    assert not list((root / "versions").iterdir())


def test_unsigned_bundle_needs_a_key_or_the_opt_out(bundle, tmp_path):
    root = tmp_path / "root"
    out = cli("install", bundle, "--root", root, "--runs", "2")
    expect_fault(out, Fault("install without a trusted key", SIGNATURE_ERROR, ("no trusted key",)))
    assert not list((root / "versions").iterdir())
    (root / "allow-unsigned").touch()  # the documented opt-out for this root
    ok = cli("install", bundle, "--root", root, "--runs", "2")
    assert ok.exit_code == 0, ok.output
    assert "unsigned: figures not protected" in ok.output


def test_resealed_edit_of_a_signed_bundle_is_caught_by_the_signature(signed, fault_keys, tmp_path):
    bad = c.with_manifest(signed, tmp_path / "boast.edgepack",
                          lambda m: m["measurements"]["compiled"]["accuracy"].update(value=99.99), reseal=True)
    assert cli("verify", bad).exit_code == 0  # the build id alone cannot tell: it is a seal, not a signature
    root = tmp_path / "root"
    out = cli("install", bad, "--root", root, "--pubkey", fault_keys / "a.pub")
    expect_fault(out, Fault("resealed edit, signed bundle", SIGNATURE_ERROR, ("does not match its signature",)))
    assert not list((root / "versions").iterdir())


HOSTILE = "\x1b[2J\x1b[H\r\nPASS \u202eevil\x07"


def _hostile_text(m: dict) -> None:
    m["profile"]["device"]["name"] = HOSTILE
    m["warnings"] = [HOSTILE]
    m["source"]["path"] = HOSTILE
    m["stages"][0]["name"] = HOSTILE
    m["measurements"]["compiled"]["model"] = HOSTILE


@pytest.mark.parametrize("command", ["inspect", "verify", "install-status"])
def test_control_characters_never_reach_the_terminal(command, bundle, tmp_path):
    bad = c.with_manifest(bundle, tmp_path / "escape.edgepack", _hostile_text, reseal=True)
    if command == "install-status":
        root = tmp_path / "root"
        res = cli("install", bad, "--root", root, "--allow-unsigned", "--runs", "2")
        assert res.exit_code == 0, res.output
        out = res.output + cli("status", "--root", root).output
    else:
        res = cli(command, bad)
        assert res.exit_code == 0, res.output
        out = res.output
    for ch in ("\x1b", "\r", "\x07", "\u202e"):
        assert ch not in out, (command, repr(ch))
    assert not any(line.lstrip().startswith("PASS") for line in out.splitlines()), out
    if command == "inspect":
        assert "\\x1b[2J" in out  # shown, escaped


def test_install_from_a_directory_with_a_symlink_is_refused(bundle, tmp_path):
    folder = tmp_path / "folder"
    with tarfile.open(bundle) as tar:
        tar.extractall(folder, filter="data")
    (folder / "labels.json").unlink()
    (folder / "labels.json").symlink_to("/etc/hostname")
    out = cli("verify", folder)
    expect_fault(out, Fault("folder bundle with a symlink", BUNDLE_ERROR, ("link",)))


def test_status_with_a_dangling_current_link_exits_non_zero(bundle, tmp_path):
    root = tmp_path / "root"
    assert cli("install", bundle, "--root", root, "--allow-unsigned", "--runs", "2").exit_code == 0
    active = (root / "current").resolve()
    shutil.rmtree(active)
    out = cli("status", "--root", root, "--verify")
    expect_fault(out, Fault("status on a broken root", 17, ("missing version",)))
    out = cli("status", "--root", root, "--format", "json")
    body = "\n".join(ln for ln in out.output.splitlines() if not ln.startswith(("error:", "hint:")))
    assert out.exit_code == 17 and json.loads(body)["problem"]


def test_a_bundle_that_failed_its_gates_is_flagged_and_not_installed(project, tmp_path):
    from tests.conftest import edit_yaml

    edit_yaml(project, "  max_accuracy_drop: 2.0", "  max_accuracy_drop: 2.0\n  max_latency_ms_p90: 0.000001")
    res = cli("build", "--project", project, "--target", "onnx", "--out", tmp_path / "out", "--quiet")
    assert res.exit_code == 3, res.output  # the gate failed; the bundle is kept
    failed = tmp_path / "out" / "digits-1.2.3-onnx.edgepack"
    res = cli("validate", failed, "--runs", "2", "--report", tmp_path / "report.json")
    assert res.exit_code == 0 and "warning: this bundle failed its acceptance gates" in res.output, res.output
    root = tmp_path / "root"
    res = cli("install", failed, "--root", root, "--allow-unsigned", "--runs", "2")
    expect_fault(res, Fault("install a bundle that failed its gates", 3, ("acceptance gates", "p90")))
    assert not list((root / "versions").iterdir())
    res = cli("install", failed, "--root", root, "--allow-unsigned", "--runs", "2", "--force")
    assert res.exit_code == 0, res.output
