"""Signing: keygen, sign, verify; unsigned, wrongly signed and modified bundles refused distinctly."""

from __future__ import annotations

import json
import shutil
import stat
import tarfile

from tests.shipping.conftest import cli, error_lines, rewrite_member


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path):
    res = cli("keygen", "--out", tmp_path / "fleet", "--format", "json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert stat.S_IMODE((tmp_path / "fleet.key").stat().st_mode) == 0o600
    assert (tmp_path / "fleet.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert info["key_id"].startswith("sha256:") and len(info["key_id"]) == 71
    res = cli("keygen", "--out", tmp_path / "fleet")
    assert res.exit_code == 2 and "already exists" in error_lines(res)[0]


def test_sign_then_verify(built, keys, tmp_path):
    out, _ = built
    bundle = tmp_path / "b.edgepack"
    shutil.copy2(out / "digits-1.2.3-onnx.edgepack", bundle)
    res = cli("verify", bundle)
    assert res.exit_code == 0 and "unsigned: the manifest's figures are not protected" in res.output
    res = cli("sign", bundle, "--key", keys / "a.key")
    assert res.exit_code == 0, res.output
    res = cli("sign", bundle, "--key", keys / "a.key")  # re-signing replaces, never duplicates
    assert res.exit_code == 0
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "signature.json"] and names.count("signature.json") == 1
    res = cli("verify", bundle, "--pubkey", keys / "a.pub", "--format", "json")
    assert res.exit_code == 0, res.output
    sig = json.loads(res.stdout)["signature"]
    assert sig["verified"] is True
    res = cli("verify", bundle)
    assert res.exit_code == 0 and "not checked" in res.output


def test_unsigned_bundle_is_refused_with_a_key(built, keys):
    out, _ = built
    for cmd in (("verify",), ("validate", "--runs", "2")):
        res = cli(*cmd, out / "digits-1.2.3-onnx.edgepack", "--pubkey", keys / "a.pub")
        assert res.exit_code == 10, res.output
        err, hint = error_lines(res)
        assert "is not signed" in err and "edgepack sign" in hint


def test_bundle_signed_by_another_key_is_refused(signed_v1, keys):
    res = cli("verify", signed_v1, "--pubkey", keys / "b.pub")
    assert res.exit_code == 10
    err, _ = error_lines(res)
    assert "signed with key sha256:" in err and "not with the trusted key" in err


def test_manifest_changed_after_signing_is_refused(tampered, keys):
    res = cli("verify", tampered)  # without a key, the change is invisible: files still match
    assert res.exit_code == 0
    for cmd in (("verify",), ("validate", "--runs", "2")):
        res = cli(*cmd, tampered, "--pubkey", keys / "a.pub")
        assert res.exit_code == 10, res.output
        assert "manifest.json does not match its signature (modified after signing)" in error_lines(res)[0]


def test_model_file_changed_after_signing_is_refused(signed_v1, keys, tmp_path):
    bad = tmp_path / "bad.edgepack"
    rewrite_member(signed_v1, bad, "model/model.onnx", lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    res = cli("verify", bad, "--pubkey", keys / "a.pub")
    assert res.exit_code == 7
    assert "model/model.onnx' does not match its sha256" in error_lines(res)[0]


def test_signature_file_garbage_is_refused(signed_v1, keys, tmp_path):
    bad = tmp_path / "garbage.edgepack"
    rewrite_member(signed_v1, bad, "signature.json", lambda b: b"not json")
    res = cli("verify", bad, "--pubkey", keys / "a.pub")
    assert res.exit_code == 10 and "signature.json is unreadable" in error_lines(res)[0]


def test_sign_refuses_a_corrupt_bundle_and_a_readable_key(built, keys, tmp_path):
    out, _ = built
    bad = tmp_path / "bad.edgepack"
    rewrite_member(out / "digits-1.2.3-onnx.edgepack", bad, "labels.json", lambda b: b + b" ")
    before = bad.read_bytes()
    res = cli("sign", bad, "--key", keys / "a.key")
    assert res.exit_code == 7 and bad.read_bytes() == before
    loose = tmp_path / "loose.key"
    shutil.copy2(keys / "a.key", loose)
    loose.chmod(0o644)
    res = cli("sign", out / "digits-1.2.3-onnx.edgepack", "--key", loose)
    assert res.exit_code == 2
    err, hint = error_lines(res)
    assert "readable by other users" in err and "chmod 600" in hint
    res = cli("sign", out / "digits-1.2.3-onnx.edgepack", "--key", keys / "a.pub")
    assert res.exit_code == 2 and "is a public key" in error_lines(res)[0]
    (tmp_path / "junk.key").write_text("junk")
    (tmp_path / "junk.key").chmod(0o600)
    res = cli("sign", out / "digits-1.2.3-onnx.edgepack", "--key", tmp_path / "junk.key")
    assert res.exit_code == 2 and "not an unencrypted PEM private key" in error_lines(res)[0]


def test_validate_with_the_right_key_reports_the_signature(signed_v1, keys, tmp_path):
    res = cli("validate", signed_v1, "--runs", "3", "--pubkey", keys / "a.pub", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "signature      valid" in res.output
    assert json.loads((tmp_path / "r.json").read_text())["signature"]["verified"] is True
