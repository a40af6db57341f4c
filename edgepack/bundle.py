"""The bundle: one tar archive holding ``manifest.json``, ``model/``, ``preprocess.json``,
``labels.json``, ``validation/`` and, for text models, ``tokenizer/``. The manifest lists every
other file with its sha256."""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic import ValidationError as PydanticValidationError

from edgepack.artifact import digest_paths, sha256_file
from edgepack.errors import BundleError, ConfigError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# A detached signature over manifest.json's exact bytes (edgepack/shipping/signing.py). The manifest
# cannot list its own signature, so this one root file is the only one allowed outside the listing.
SIGNATURE = "signature.json"
SUFFIX = ".edgepack"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(Strict):
    path: str
    sha256: str
    bytes: int


class Source(Strict):
    kind: str
    path: str
    digest: str = Field(description="sha256 of the source model file(s)")
    weights_digest: str | None = None
    project_digest: str | None = Field(default=None, description="sha256 of the project file (edgepack.yaml) content")


class Runtime(Strict):
    backend: str
    runtime_package: str
    format: str
    precision: str
    model_file: str = Field(description="path of the main model file inside the bundle")
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    io: dict[str, Any] | None = Field(default=None, description="how the device feeds the model when it differs "
                                      "from `inputs`/`outputs`: layout (e.g. NHWC), dtype and quantization of each tensor")


class Measured(Strict):
    """Figures for one model, all taken in the same run on the same data and threads."""

    model: str = Field(description="what was measured, e.g. 'fp32 reference (onnxruntime)'")
    runtime: str
    proxy: str | None = Field(default=None, description="set when a host runtime stood in for the device's")
    accuracy: dict[str, Any] | None = None
    latency: dict[str, Any]
    latency_by_shape: list[dict[str, Any]] | None = Field(
        default=None, description="latency at the representative sizes of symbolic dims (dims.NAME.measure), "
                                  "same runtime and threads as `latency`")
    size: dict[str, Any]
    peak_memory: dict[str, Any]


class Measurements(Strict):
    reference: Measured
    compiled: Measured
    target_fp32: dict[str, Any] | None = Field(
        default=None, description="latency of the FP32 model on the target's own runtime, when it is not the reference's")
    comparison: dict[str, Any] = Field(description="ratios derived from the two figures above")
    data: dict[str, Any] = Field(description="the evaluation and latency inputs: source, sample count, fingerprint")
    device: dict[str, Any] = Field(description="what was and was not measured on the target device itself")


class Acceptance(Strict):
    passed: bool
    gates: dict[str, Any]
    results: list[dict[str, Any]]
    reasons: list[str]


class Validation(Strict):
    inputs_file: str
    outputs_file: str
    holdout_file: str | None
    samples: int
    holdout_samples: int
    tolerance: dict[str, Any]


class Manifest(Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str
    version: str
    target: str
    build_id: str = Field(description="sha256 over every file's path and sha256: the bundle's content digest")
    created_at: str
    edgepack_version: str
    toolchain: dict[str, str]
    source: Source
    profile: dict[str, Any] = Field(description="the resolved target profile")
    runtime: Runtime
    stages: list[dict[str, Any]]
    files: list[FileEntry]
    calibration: dict[str, Any]
    measurements: Measurements
    acceptance: Acceptance
    validation: Validation
    preprocess: dict[str, Any] | None
    labels: list[str] | None
    tuning: dict[str, Any] | None = Field(default=None, description="the accuracy-budget search, when it ran")
    warnings: list[str] = Field(default_factory=list)
    prune: dict[str, Any] | None = Field(default=None, description="the prune stage: counts, accuracy, latency effect")
    conversion: dict[str, Any] | None = Field(default=None, description="what the converter produced: quantization "
                                              "level reached and why, and the float-op report")
    text: dict[str, Any] | None = Field(default=None, description="text models: the bundled tokenizer, max sequence "
                                                                  "length, padding; how text becomes inputs")


def bundle_name(name: str, version: str, target: str) -> str:
    return f"{name}-{version}-{target}{SUFFIX}"


def file_entries(root: Path) -> list[FileEntry]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return [FileEntry(path=p.relative_to(root).as_posix(), sha256=sha256_file(p), bytes=p.stat().st_size)
            for p in files]


def _covered(root: Path, p: Path) -> bool:
    """Files the manifest lists and the build id covers: all but manifest.json and the root signature."""
    return p.is_file() and p.name != MANIFEST and p.relative_to(root).as_posix() != SIGNATURE


def content_digest(root: Path) -> str:
    files = [p for p in root.rglob("*") if _covered(root, p)]
    return "sha256:" + digest_paths(files, root)


def write_bundle(staging: Path, manifest: Manifest, out: Path) -> Path:
    """Write manifest.json into ``staging``, tar it next to ``out``, then rename into place."""
    (staging / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for p in [staging / MANIFEST] + sorted(q for q in staging.rglob("*") if q.is_file() and q.name != MANIFEST):
                info = tar.gettarinfo(str(p), arcname=p.relative_to(staging).as_posix())
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.mode = 0o644
                with open(p, "rb") as f:
                    tar.addfile(info, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


@dataclass
class OpenedBundle:
    path: Path
    root: Path
    manifest: Manifest

    def file(self, rel: str) -> Path:
        return self.root / rel


def read_manifest_json(data: dict, where: str) -> Manifest:
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: manifest schema_version {version!r} is not supported (this edgepack reads {SCHEMA_VERSION})",
                          hint="use the edgepack version that built the bundle, or rebuild it")
    try:
        return Manifest.model_validate(data)
    except PydanticValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{where}: manifest.json is invalid at '{key}': {first['msg']}") from e


def _safe_extract(tar: tarfile.TarFile, dest: Path, where: str) -> None:
    dest = dest.resolve()
    for m in tar.getmembers():
        target = (dest / m.name).resolve()
        if m.name.startswith("/") or not str(target).startswith(str(dest) + os.sep):
            raise BundleError(f"{where}: refusing archive member '{m.name}' that points outside the bundle")
        if not (m.isfile() or m.isdir()):
            raise BundleError(f"{where}: refusing archive member '{m.name}' (links and devices are not allowed)")
    tar.extractall(dest, filter="data")


@contextlib.contextmanager
def open_bundle(path: Path, verify: bool = True) -> Iterator[OpenedBundle]:
    """Extract ``path`` into a temporary folder, read and (by default) verify it."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: bundle not found")
    where = str(path)
    with tempfile.TemporaryDirectory(prefix="edgepack-bundle-") as tmp:
        root = Path(tmp)
        if path.is_dir():
            root = path
        else:
            try:
                with tarfile.open(path, "r:*") as tar:
                    _safe_extract(tar, root, where)
            except (tarfile.TarError, EOFError, OSError) as e:
                raise BundleError(f"{where}: not a readable bundle archive (truncated or corrupt?): {e}") from e
        mfile = root / MANIFEST
        if not mfile.is_file():
            raise BundleError(f"{where}: no manifest.json inside")
        try:
            data = json.loads(mfile.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"{where}: manifest.json is not valid JSON: {e}") from e
        manifest = read_manifest_json(data, where)
        if verify:
            verify_files(root, manifest, where)
        yield OpenedBundle(path, root, manifest)


def verify_files(root: Path, manifest: Manifest, where: str) -> None:
    """Every listed file present with its sha256 and size; nothing unlisted; build id consistent."""
    listed = {f.path for f in manifest.files}
    for f in manifest.files:
        p = root / f.path
        if not p.is_file():
            raise BundleError(f"{where}: file '{f.path}' listed in the manifest is missing")
        size = p.stat().st_size
        if size != f.bytes:
            raise BundleError(f"{where}: file '{f.path}' has {size} bytes, the manifest says {f.bytes} (truncated or modified)")
        if sha256_file(p) != f.sha256:
            raise BundleError(f"{where}: file '{f.path}' does not match its sha256 in the manifest (modified after the build)")
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if _covered(root, p) and p.relative_to(root).as_posix() not in listed)
    if extra:
        raise BundleError(f"{where}: files not listed in the manifest: {', '.join(extra[:5])}")
    if content_digest(root) != manifest.build_id:
        raise BundleError(f"{where}: build_id does not match the bundle's content")


def manifest_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgepack.dev/schemas/manifest-1.json"
    return schema
