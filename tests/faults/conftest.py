"""Fixtures for the fault catalogue: a built bundle to craft hostile copies from, keys, and small
file systems (tmpfs) to fill up or make read-only."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bundle(built) -> Path:
    """The digits onnx bundle of the shared build (read-only: tests copy or rewrite it)."""
    out, _ = built
    return out / "digits-1.2.3-onnx.edgepack"


@pytest.fixture(scope="session")
def fault_keys(tmp_path_factory) -> Path:
    pytest.importorskip("cryptography", reason="signing needs `cryptography`: pip install 'edgepack[ship]'")
    from edgepack.shipping.signing import generate_keypair

    d = tmp_path_factory.mktemp("fault-keys")
    generate_keypair(d / "a.key", d / "a.pub")
    return d


@pytest.fixture(scope="session")
def signed(bundle, fault_keys, tmp_path_factory) -> Path:
    from edgepack.shipping.signing import sign_bundle

    dst = tmp_path_factory.mktemp("signed") / bundle.name
    shutil.copy2(bundle, dst)
    sign_bundle(dst, fault_keys / "a.key")
    return dst


class SmallFS:
    """A tmpfs of a given size mounted on a fresh folder; ``readonly()`` remounts it read-only."""

    def __init__(self, where: Path, size: str):
        self.path = where
        self.path.mkdir(parents=True)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"edgepack-{uuid.uuid4().hex[:8]}",
                            str(self.path)], capture_output=True, text=True)
        if p.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")

    def readonly(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """small_fs("256k") -> a mounted tmpfs of that size (skipped where mounting is not allowed)."""
    made: list[SmallFS] = []

    def make(size: str) -> SmallFS:
        fs = SmallFS(tmp_path / f"fs{len(made)}", size)
        made.append(fs)
        return fs

    yield make
    for fs in made:
        fs.close()
