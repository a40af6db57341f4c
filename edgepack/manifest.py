"""The manifest's schema: every field a bundle's ``manifest.json`` may hold, with typed sections for the
figures code reads (latency, accuracy, size, memory, the comparison to FP32, tuning, pruning, conversion,
coverage). A section also reads like the dict it was in schema 2's first releases (``latency["p50_ms"]``),
so scripts written against it keep working; unknown keys inside a section are kept, never dropped, so a
bundle from a newer edgepack still reads and its seal still holds."""

from __future__ import annotations

import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# 2: build_id also covers manifest.json's own content (every field but build_id)
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
# A detached signature over manifest.json's exact bytes (edgepack/shipping/signing.py). The manifest
# cannot list its own signature, so this one root file is the only one allowed outside the listing.
SIGNATURE = "signature.json"
SUFFIX = ".edgepack"
VALIDATION_DIR = "validation"
VALIDATION_SUFFIX = ".validation"  # <bundle>.validation: the validation files shipped apart

# Manifest fields that name folders on a device (`<name>-<version>-<target>-<build12>`): no separators,
# no `..`, no control characters. The same patterns are enforced on the project file and profiles.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
VERSION_PATTERN = r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,63}$"
TARGET_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


def safe_member_path(path: str) -> str | None:
    """``path`` as a normalised relative POSIX path inside a bundle, or None when it is not one
    (absolute, `..`, backslashes, empty parts, control characters)."""
    if not isinstance(path, str) or not path or len(path) > 512 or "\\" in path:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return None
    while path.startswith("./"):
        path = path[2:]
    path = path.rstrip("/")
    if not path or path.startswith("/") or posixpath.normpath(path) != path:
        return None
    if any(part in ("", ".", "..") for part in path.split("/")):
        return None
    return path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileEntry(Strict):
    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _inside(cls, v: str) -> str:
        if safe_member_path(v) != v or v in (MANIFEST, SIGNATURE):
            raise ValueError(f"'{v[:80]}' is not a relative path inside the bundle")
        return v


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


Number = int | float   # a figure keeps the JSON type it was written with (the seal hashes it as written)


class Section(BaseModel):
    """A typed manifest section that also reads as a mapping (``sec["p50_ms"]``, ``sec.get(...)``,
    ``{**sec}``): the sections were plain dicts before they were typed. Keys it does not declare are kept."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def _keys(self) -> list[str]:
        extra = list(self.__pydantic_extra__ or {})
        return [k for k in type(self).model_fields if k in self.model_fields_set] + extra

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields:
            return getattr(self, key)
        if self.__pydantic_extra__ and key in self.__pydantic_extra__:
            return self.__pydantic_extra__[key]
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys()

    def get(self, key: str, default: Any = None) -> Any:
        try:
            value = self[key]
        except KeyError:
            return default
        return default if value is None and key not in self._keys() else value

    def keys(self) -> list[str]:
        return self._keys()

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self[k]) for k in self._keys()]

    def __or__(self, other: Any) -> dict[str, Any]:
        return dict(self.items()) | dict(other)

    def __ror__(self, other: Any) -> dict[str, Any]:
        return dict(other) | dict(self.items())

    @model_serializer(mode="wrap")
    def _set_keys_only(self, handler: Any) -> dict[str, Any]:
        """Written as it was given: a key nobody set is not written (so an older bundle, sealed before a
        key was declared, dumps to the same JSON and its build id still holds)."""
        data = handler(self)
        keep = set(self._keys())
        return {k: v for k, v in data.items() if k in keep}


class Latency(Section):
    """One model's timing: percentiles of single calls on one input, and where/how they were taken."""

    p50_ms: Number
    p90_ms: Number
    p99_ms: Number | None = None
    mean_ms: Number | None = None
    throughput_per_s: Number | None = None
    how: dict[str, Any] = Field(default_factory=dict, description="runs, warm-up, threads, batch, clock, what was timed")
    where: dict[str, Any] = Field(default_factory=dict, description="the machine: cpu, isa, logical_cpus, os")
    noise: dict[str, Any] | None = Field(default=None, description="host load and block spread during the timing")


class Accuracy(Section):
    """The gating metric's value on the evaluation set (and each scored output's, when several)."""

    metric: str
    value: Number
    samples: int | None = None
    output: str | None = None
    unit: str | None = None
    higher_is_better: bool = True
    form: str | None = None
    correct: int | None = None
    per_output: list[dict[str, Any]] | None = None


class Size(Section):
    bytes: int
    files: dict[str, int] = Field(default_factory=dict)


class PeakMemory(Section):
    measured: bool
    peak_mb: Number | None = None
    reason: str | None = None
    how: dict[str, Any] | None = None


class TargetFP32(Section):
    """The FP32 model compiled and timed on the target's own runtime."""

    model: str
    latency: Latency
    size_bytes: int | None = None


class Comparison(Section):
    """Ratios of the compiled model to FP32: speed-ups from models timed in turn in one window."""

    note: str | None = None
    accuracy_delta_points: Number | None = None
    speedup: str | None = Field(default=None, description="why no speed-up was derived (host proxy)")
    speedup_p50: Number | None = None
    speedup_p90: Number | None = None
    speedup_p50_vs_target_fp32: Number | None = None
    noisy: bool | None = None
    in_turn: dict[str, Any] | None = None
    size_ratio: Number | None = None
    peak_memory_ratio: Number | None = None


class MeasurementData(Section):
    evaluation: dict[str, Any] = Field(default_factory=dict, description="source, sample count, fingerprint")
    metric: str | None = None
    metrics: Any = None
    latency_input: str | None = None


class Tuning(Section):
    """The accuracy-budget search or the fallback ladder, when it ran: each step and what was chosen."""

    kind: str | None = None
    budget_met: bool | None = None
    stopped: str | None = None
    chosen: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = Field(default_factory=list)


class Prune(Section):
    """The prune stage: method, counts before/after, accuracy, recovery and the latency effect."""

    method: str | None = None
    accuracy_fp32: dict[str, Any] | None = None
    latency_effect: dict[str, Any] | None = None


class Conversion(Section):
    """What the converter produced: the level reached and why, and its float-op report."""

    level: str | None = None
    reached: str | None = None
    why: str | None = None


class Coverage(Section):
    """The share of weighted ops and of MACs that run in INT8."""

    macs_share: Number | None = None
    ops_share: Number | None = None
    summary: str | None = None


class PrecisionChoice(Section):
    """How the bundled precision was chosen: kept (fast enough, or forced), or the fastest candidate that met
    the accuracy budget, with every candidate's accuracy, p50/p90 (timed in turn) and size."""

    policy: str
    chosen: str
    objective: str | None = None
    runner_up: str | None = None
    speedup_vs_fp32: Number | None = None
    why: str | None = None
    candidates: list[dict[str, Any]] = Field(default_factory=list)


class BuildTimes(Section):
    """What the build spent: each finished stage's wall seconds and their total."""

    stages: list[dict[str, Any]] = Field(default_factory=list)
    total_seconds: Number | None = None


class Measured(Strict):
    """Figures for one model, all taken in the same run on the same data and threads."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="what was measured, e.g. 'fp32 reference (onnxruntime)'")
    runtime: str
    proxy: str | None = Field(default=None, description="set when a host runtime stood in for the device's")
    accuracy: Accuracy | None = None
    latency: Latency
    latency_by_shape: list[dict[str, Any]] | None = Field(
        default=None, description="latency at the representative sizes of symbolic dims (dims.NAME.measure), "
                                  "same runtime and threads as `latency`")
    size: Size
    peak_memory: PeakMemory


class Measurements(Strict):
    reference: Measured
    compiled: Measured
    target_fp32: TargetFP32 | None = Field(
        default=None, description="latency of the FP32 model on the target's own runtime, when it is not the reference's")
    comparison: Comparison = Field(description="ratios derived from the two figures above")
    data: MeasurementData = Field(description="the evaluation and latency inputs: source, sample count, fingerprint")
    device: dict[str, Any] = Field(description="what was and was not measured on the target device itself")


class Acceptance(Strict):
    passed: bool
    gates: dict[str, Any]
    results: list[dict[str, Any]]
    reasons: list[str]


class ValidationArtifact(Strict):
    """The validation files shipped beside the bundle (``<bundle>.validation``, a plain tar of
    ``validation/``) instead of inside it; the manifest still lists each file with its sha256."""

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,250}\.validation$",
                      description="its file name when written (looked for beside the bundle)")
    sha256: str = Field(pattern=DIGEST_PATTERN)
    bytes: int = Field(ge=0)


class Validation(Strict):
    inputs_file: str
    outputs_file: str
    holdout_file: str | None
    samples: int
    holdout_samples: int
    tolerance: dict[str, Any]
    inputs_form: Literal["tensors", "images"] | None = Field(
        default=None, description="how inputs.npz and holdout.npz hold the inputs: 'tensors' (one array per input, "
                                  "as the model takes it; also when absent) or 'images' (raw uint8 images under "
                                  "'images', preprocessed on the device with the manifest's `preprocess`)")
    budget_bytes: int | None = Field(
        default=None, ge=0, description="the bytes the validation files were sized to when the project left the "
                                        "golden/holdout counts at their defaults (0.8x the compiled model, at least 1 MiB)")
    artifact: ValidationArtifact | None = Field(
        default=None, description="present when the validation files ship as a separate artifact, not inside")

    @model_serializer(mode="wrap")
    def _written_keys(self, handler: Any) -> dict[str, Any]:
        """A key nobody set is not written: bundles sealed before a key was declared keep their build id."""
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class Manifest(Strict):
    schema_version: Literal[2] = SCHEMA_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    target: str = Field(pattern=TARGET_PATTERN)
    build_id: str = Field(pattern=DIGEST_PATTERN,
                          description="sha256 over every file's path and sha256 and over this manifest's other "
                                      "fields: a seal against accidental edits, not a signature (anyone can "
                                      "recompute it; `edgepack sign` protects a bundle)")
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
    tuning: Tuning | None = Field(default=None, description="the accuracy-budget search, when it ran")
    warnings: list[str] = Field(default_factory=list)
    prune: Prune | None = Field(default=None, description="the prune stage: counts, accuracy, latency effect")
    conversion: Conversion | None = Field(default=None, description="what the converter produced: quantization "
                                              "level reached and why, and the float-op report")
    text: dict[str, Any] | None = Field(default=None, description="text models: the bundled tokenizer, max sequence "
                                                                  "length, padding; how text becomes inputs")
    coverage: Coverage | None = Field(
        default=None, description="quantization coverage of the compiled model (ONNX QDQ, OpenVINO IR): the share of "
                                  "weighted ops and of MACs that run in INT8, subgraphs included, and the ops that do not")
    precision_choice: PrecisionChoice | None = Field(
        default=None, description="how the bundled precision was chosen (select_precision): the candidates "
                                  "measured, the one chosen and why")
    timings: BuildTimes | None = Field(default=None, description="the build's stages and their wall seconds")

    @model_serializer(mode="wrap")
    def _unset_optional_fields_stay_out(self, handler: Any) -> dict[str, Any]:
        """An optional field a manifest never had (added in a later release, e.g. precision_choice) is not
        written as null: a bundle sealed before it was declared dumps to the same JSON, so its build id holds."""
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.model_fields_set}

    @model_validator(mode="after")
    def _paths_are_listed(self) -> "Manifest":
        """Every path the manifest points at is a listed file of the bundle; no file is listed twice."""
        listed = [f.path for f in self.files]
        if len(set(listed)) != len(listed):
            raise ValueError("a file is listed twice in 'files'")
        pointers = {"runtime.model_file": self.runtime.model_file, "validation.inputs_file": self.validation.inputs_file,
                    "validation.outputs_file": self.validation.outputs_file}
        if self.validation.holdout_file is not None:
            pointers["validation.holdout_file"] = self.validation.holdout_file
        if self.text is not None:
            pointers["text.tokenizer"] = self.text.get("tokenizer")
            for i, f in enumerate(self.text.get("files") or []):
                pointers[f"text.files.{i}"] = f
        for key, value in pointers.items():
            if not isinstance(value, str) or value not in listed:
                raise ValueError(f"{key} {str(value)[:80]!r} is not a file listed in the bundle")
        return self


def manifest_schema() -> dict[str, Any]:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://edgepack.dev/schemas/manifest-2.json"
    return schema
