"""push/pull against a real OCI registry on 127.0.0.1 (Debian's docker-registry)."""

from __future__ import annotations

import errno
import hashlib
import json
import urllib.request
from pathlib import Path

import pytest

from tests.shipping.conftest import cli, error_lines


def _oci_manifest(host: str, repo: str, ref: str) -> dict:
    req = urllib.request.Request(f"http://{host}/v2/{repo}/manifests/{ref}",
                                 headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_parse_ref():
    from edgepack.errors import ConfigError
    from edgepack.shipping.reference import parse_ref, tag_for

    r = parse_ref("127.0.0.1:5000/models/digits:1.2.3-onnx")
    assert (r.registry, r.repository, r.tag, r.digest, r.loopback) == ("127.0.0.1:5000", "models/digits", "1.2.3-onnx", None, True)
    r = parse_ref("ghcr.io/acme/vision/digits@sha256:" + "a" * 64)
    assert (r.registry, r.repository, r.tag, r.loopback) == ("ghcr.io", "acme/vision/digits", None, False)
    assert parse_ref("localhost/digits:1").registry == "localhost"
    for bad in ("digits:1.2.3", "models/digits:1", "127.0.0.1:5000/Digits:1", "127.0.0.1:5000/d@sha256:xyz"):
        with pytest.raises(ConfigError):
            parse_ref(bad)
    assert tag_for("1.2.3+build.7", "jetson-orin-nano") == "1.2.3_build.7-jetson-orin-nano"


def test_push_pull_round_trip_by_tag_and_by_digest(registry, signed_v1, keys, tmp_path):
    repo = f"{registry.host}/models/digits"
    res = cli("push", signed_v1, repo, "--tag", "onnx-latest", "--format", "json")
    assert res.exit_code == 0, res.output
    pushed = json.loads(res.stdout)
    assert pushed["tags"] == ["1.2.3-onnx", "onnx-latest"]
    assert pushed["pinned"] == f"{repo}@{pushed['digest']}"
    # what a registry UI shows: artifact type, the manifest as config blob, headline annotations
    oci = _oci_manifest(registry.host, "models/digits", "1.2.3-onnx")
    assert oci["artifactType"] == "application/vnd.edgepack.bundle.v1"
    assert oci["config"]["mediaType"] == "application/vnd.edgepack.manifest.v1+json"
    assert [la["mediaType"] for la in oci["layers"]] == ["application/vnd.edgepack.bundle.v1.tar"]
    ann = oci["annotations"]
    assert ann["org.opencontainers.image.version"] == "1.2.3" and ann["dev.edgepack.target"] == "onnx"
    assert float(ann["dev.edgepack.accuracy"].split()[0]) > 90 and float(ann["dev.edgepack.latency-p50-ms"]) > 0
    assert ann["dev.edgepack.signed-by"].startswith("sha256:")

    res = cli("pull", f"{repo}:onnx-latest", "--out", tmp_path / "a", "--pubkey", keys / "a.pub")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / signed_v1.name).read_bytes() == signed_v1.read_bytes()
    res = cli("pull", pushed["pinned"], "--out", tmp_path / "b", "--format", "json")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["digest"] == pushed["digest"] and got["version"] == "1.2.3"
    assert [p.name for p in (tmp_path / "b").iterdir()] == [signed_v1.name]


def test_tag_not_found_lists_the_tags(registry, signed_v1, tmp_path):
    repo = f"{registry.host}/models/tags"
    assert cli("push", signed_v1, repo).exit_code == 0
    res = cli("pull", f"{repo}:9.9.9-onnx", "--out", tmp_path)
    assert res.exit_code == 13
    err, hint = error_lines(res)
    assert "tag '9.9.9-onnx' not found" in err and "1.2.3-onnx" in hint
    res = cli("pull", f"{registry.host}/models/nothing-here:1", "--out", tmp_path)
    assert res.exit_code == 13 and "no tags" in error_lines(res)[1]
    assert list(tmp_path.iterdir()) == []


def test_registry_unreachable_retries_then_names_it(fast_retries, tmp_path, signed_v1):
    from tests.shipping.conftest import _free_port

    host = f"127.0.0.1:{_free_port()}"  # nothing listens there
    for cmd in (("pull", f"{host}/models/digits:1.2.3-onnx", "--out", tmp_path), ("push", signed_v1, f"{host}/m/d")):
        res = cli(*cmd)
        assert res.exit_code == 12, res.output
        err, hint = error_lines(res)
        assert f"registry {host} is unreachable" in err and "after 4 attempts (Connection refused)" in err
        assert "registry is running" in hint
    assert list(tmp_path.iterdir()) == []


def _blob_file(registry, digest: str) -> Path:
    hexd = digest.split(":")[1]
    return registry.data / "docker" / "registry" / "v2" / "blobs" / "sha256" / hexd[:2] / hexd / "data"


def test_blob_changed_in_the_registry_is_a_digest_mismatch(registry, signed_v1, tmp_path):
    repo = f"{registry.host}/models/corrupt"
    assert cli("push", signed_v1, repo).exit_code == 0
    layer = _oci_manifest(registry.host, "models/corrupt", "1.2.3-onnx")["layers"][0]
    blob = _blob_file(registry, layer["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte off: only the digest can tell
    blob.write_bytes(bytes(data))
    try:
        res = cli("pull", f"{repo}:1.2.3-onnx", "--out", tmp_path)
        assert res.exit_code == 14, res.output
        assert "downloaded" in error_lines(res)[0] and "the artifact names" in error_lines(res)[0]
        assert list(tmp_path.iterdir()) == []
    finally:
        blob.write_bytes(signed_v1.read_bytes())


def test_pinned_digest_that_does_not_exist(registry, signed_v1, tmp_path):
    repo = f"{registry.host}/models/pinned"
    assert cli("push", signed_v1, repo).exit_code == 0
    res = cli("pull", f"{repo}@sha256:{hashlib.sha256(b'other').hexdigest()}", "--out", tmp_path)
    assert res.exit_code == 13 and "digest sha256:" in error_lines(res)[0]


def test_disk_full_during_pull_keeps_nothing(registry, signed_v1, tmp_path, monkeypatch):
    from edgepack.shipping import registry as reg

    repo = f"{registry.host}/models/full"
    assert cli("push", signed_v1, repo).exit_code == 0

    class FullDisk:
        def __init__(self, path: Path):
            self.f = open(path, "wb")
            self.room = 64 * 1024

        def write(self, chunk: bytes) -> int:
            if len(chunk) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(chunk)
            return self.f.write(chunk)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(reg, "_sink", FullDisk)
    res = cli("pull", f"{repo}:1.2.3-onnx", "--out", tmp_path)
    assert res.exit_code == 15, res.output
    err, hint = error_lines(res)
    assert "no space left in" in err and "nothing was kept" in err and "free space" in hint
    assert list(tmp_path.iterdir()) == []


def test_tampered_bundle_is_refused_by_pull(registry, tampered, keys, tmp_path):
    repo = f"{registry.host}/models/tampered"
    assert cli("push", tampered, repo).exit_code == 0  # the registry stores whatever it is given
    res = cli("pull", f"{repo}:1.2.3-onnx", "--out", tmp_path, "--pubkey", keys / "a.pub")
    assert res.exit_code == 10, res.output
    err, _ = error_lines(res)
    assert f"{repo}:1.2.3-onnx: manifest.json does not match its signature" in err
    assert list(tmp_path.iterdir()) == []


def test_push_refuses_a_corrupt_bundle(registry, signed_v1, tmp_path):
    from tests.shipping.conftest import rewrite_member

    bad = tmp_path / "bad.edgepack"
    rewrite_member(signed_v1, bad, "labels.json", lambda b: b + b" ")
    res = cli("push", bad, f"{registry.host}/models/bad")
    assert res.exit_code == 7 and "labels.json" in error_lines(res)[0]


def test_not_an_edgepack_artifact(registry, tmp_path):
    import oras.provider

    (tmp_path / "notes.txt").write_text("hello")
    client = oras.provider.Registry(hostname=registry.host, insecure=True)
    client.push(f"{registry.host}/other/thing:1", files=[str(tmp_path / "notes.txt")],
                disable_path_validation=True, quiet=True)
    res = cli("pull", f"{registry.host}/other/thing:1", "--out", tmp_path / "out")
    assert res.exit_code == 7 and "is not an edgepack bundle" in error_lines(res)[0]


def test_login_from_the_docker_config(auth_registry, signed_v1, tmp_path, monkeypatch):
    host, docker = auth_registry
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.docker/config.json
    monkeypatch.delenv("DOCKER_CONFIG", raising=False)
    res = cli("push", signed_v1, f"{host}/models/digits")
    assert res.exit_code == 11
    err, hint = error_lines(res)
    assert "asks for a login" in err and f"docker login {host}" in hint
    monkeypatch.setenv("DOCKER_CONFIG", str(docker))
    res = cli("push", signed_v1, f"{host}/models/digits")
    assert res.exit_code == 0, res.output
    res = cli("pull", f"{host}/models/digits:1.2.3-onnx", "--out", tmp_path / "pulled")
    assert res.exit_code == 0, res.output
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"auths": {host: {"auth": "ZmxlZXQ6bm9wZQ=="}}}))  # fleet:nope
    monkeypatch.setenv("DOCKER_CONFIG", str(wrong))
    res = cli("pull", f"{host}/models/digits:1.2.3-onnx", "--out", tmp_path / "denied")
    assert res.exit_code == 11 and "denied access" in error_lines(res)[0]


def test_chunked_upload_for_big_bundles(registry, signed_v1, tmp_path, monkeypatch):
    from edgepack.shipping import registry as reg

    monkeypatch.setattr(reg, "CHUNKED_ABOVE_BYTES", 0)  # POST, PATCH, PUT instead of one PUT
    res = cli("push", signed_v1, f"{registry.host}/models/chunked")
    assert res.exit_code == 0, res.output
    res = cli("pull", f"{registry.host}/models/chunked:1.2.3-onnx", "--out", tmp_path)
    assert res.exit_code == 0 and (tmp_path / signed_v1.name).read_bytes() == signed_v1.read_bytes()


def test_transient_answers_are_retried(fast_retries):
    from types import SimpleNamespace

    pytest.importorskip("oras", reason="needs `oras`: pip install 'edgepack[ship]'")

    from edgepack.errors import RegistryUnreachableError
    from edgepack.shipping.registry import with_retries

    answers = iter([503, 502, 200])
    resp = with_retries(lambda: SimpleNamespace(status_code=next(answers), reason="x"), "r:1", "get")
    assert resp.status_code == 200
    final = with_retries(lambda: SimpleNamespace(status_code=503, reason="busy"), "r:1", "get")
    assert final.status_code == 503  # the caller reports the last answer

    def refused():
        import requests

        raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")

    with pytest.raises(RegistryUnreachableError, match="could not get after 4 attempts"):
        with_retries(refused, "r:1", "get")


def test_split_bundle_travels_with_its_validation_file_and_installs_from_the_registry(registry, signed_v1, keys,
                                                                                      tmp_path):
    """A bundle built with --separate-validation: push sends <bundle>.validation as a second layer, pull
    fetches it beside the bundle (only with the digest the verified manifest records), install validates."""
    from edgepack.bundle import read_archive, write_bundle
    from edgepack.shipping.signing import sign_bundle

    staging = tmp_path / "staging"
    m = read_archive(signed_v1, staging)
    for f in ("manifest.json", "signature.json"):
        (staging / f).unlink()
    split = tmp_path / "dist" / signed_v1.name
    m = write_bundle(staging, m, split, separate_validation=True)
    sign_bundle(split, keys / "a.key")
    repo = f"{registry.host}/models/split"
    res = cli("push", split, repo, "--format", "json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["validation_file"].endswith(".validation")
    oci = _oci_manifest(registry.host, "models/split", "1.2.3-onnx")
    assert [la["mediaType"] for la in oci["layers"]] == ["application/vnd.edgepack.bundle.v1.tar",
                                                          "application/vnd.edgepack.validation.v1.tar"]
    assert oci["layers"][1]["digest"] == m.validation.artifact.sha256
    res = cli("pull", f"{repo}:1.2.3-onnx", "--out", tmp_path / "pulled", "--pubkey", keys / "a.pub")
    assert res.exit_code == 0, res.output
    art = tmp_path / "pulled" / (signed_v1.name + ".validation")
    assert art.read_bytes() == split.with_name(split.name + ".validation").read_bytes()
    res = cli("install", f"{repo}:1.2.3-onnx", "--root", tmp_path / "root", "--pubkey", keys / "a.pub", "--runs", "3")
    assert res.exit_code == 0, res.output
    # pushed without its file beside it: the bundle alone; a device then cannot validate it and says why
    alone = tmp_path / "alone" / split.name
    alone.parent.mkdir()
    alone.write_bytes(split.read_bytes())
    res = cli("push", alone, f"{registry.host}/models/alone", "--format", "json")
    assert res.exit_code == 0, res.output
    res = cli("install", f"{registry.host}/models/alone:1.2.3-onnx", "--root", tmp_path / "root2",
              "--pubkey", keys / "a.pub", "--runs", "3")
    assert res.exit_code == 2, res.output
    assert "ship apart" in res.output and ".validation" in res.output
