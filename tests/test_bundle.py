"""Bundle format: schema, safe extraction, integrity."""

from __future__ import annotations

import io
import json
import tarfile
from importlib import resources

import pytest

from edgepack.bundle import manifest_schema, open_bundle
from edgepack.errors import BundleError


def test_shipped_json_schema_is_the_current_manifest_model():
    shipped = json.loads((resources.files("edgepack") / "schemas" / "manifest.schema.json").read_text())
    assert shipped == json.loads(json.dumps(manifest_schema()))


def _add(tar: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "model/../../evil.txt"])
def test_refuses_members_outside_the_bundle(tmp_path, member):
    bad = tmp_path / "bad.edgepack"
    with tarfile.open(bad, "w") as tar:
        _add(tar, "manifest.json", b"{}")
        _add(tar, member, b"x")
    with pytest.raises(BundleError, match="outside the bundle"):
        with open_bundle(bad):
            pass
    assert not (tmp_path.parent / "evil.txt").exists()


def test_refuses_links(tmp_path):
    bad = tmp_path / "link.edgepack"
    with tarfile.open(bad, "w") as tar:
        _add(tar, "manifest.json", b"{}")
        info = tarfile.TarInfo("model/model.onnx")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(BundleError, match="links and devices"):
        with open_bundle(bad):
            pass


def test_refuses_unknown_schema_version(tmp_path):
    bad = tmp_path / "future.edgepack"
    with tarfile.open(bad, "w") as tar:
        _add(tar, "manifest.json", json.dumps({"schema_version": 99}).encode())
    with pytest.raises(BundleError, match="schema_version 99 is not supported"):
        with open_bundle(bad):
            pass


def test_refuses_files_not_listed_in_the_manifest(built, tmp_path):
    out, _ = built
    src = out / "digits-1.2.3-onnx.edgepack"
    bad = tmp_path / "extra.edgepack"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for info in tin.getmembers():
            tout.addfile(info, tin.extractfile(info))
        _add(tout, "model/backdoor.py", b"print('hi')")
    with pytest.raises(BundleError, match="not listed in the manifest: model/backdoor.py"):
        with open_bundle(bad):
            pass


def test_refuses_a_changed_manifest_figure(built, tmp_path):
    """Editing a number in manifest.json is caught through the build id only when files change;
    the files themselves are covered by sha256. Here a listed file's hash is edited."""
    out, _ = built
    src = out / "digits-1.2.3-onnx.edgepack"
    bad = tmp_path / "edited.edgepack"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info).read()
            if info.name == "manifest.json":
                m = json.loads(data)
                m["files"][0]["sha256"] = "0" * 64
                data = json.dumps(m).encode()
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        with open_bundle(bad):
            pass
