"""`edgepack validate`: on the device, check a bundle's integrity, reproduce its recorded outputs,
and measure holdout accuracy and latency. Imports only numpy, pydantic and the bundle's runtime."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError as PydanticValidationError

from edgepack.errors import BundleError, ConfigError, ValidationError
from edgepack.target import Measurement

VALIDATION_SAMPLES = 200
HOLDOUT_SAMPLES = 300  # the default cap (evaluation.holdout_samples); text holdouts ship the whole set
# how inputs.npz / holdout.npz hold the inputs: one array per input as the model takes it, or the raw uint8
# images under 'images', preprocessed here with the manifest's `preprocess` (the build checked it gives the
# very tensors it measured); bundles without `validation.inputs_form` hold tensors
FORM_TENSORS, FORM_IMAGES = "tensors", "images"
MIN_TOP1_AGREEMENT = 0.98
MIN_WITHIN_TOLERANCE = 0.98


def tolerance_for(precision: str, outputs: list[list[np.ndarray]]) -> dict[str, Any]:
    """How far a device's outputs may differ from the build machine's.

    Integer kernels differ across instruction sets (VNNI, AVX2, NEON) by a quantization step or so;
    float kernels by rounding. The absolute tolerance scales with the outputs' own range.
    """
    first = np.concatenate([o[0].reshape(-1) for o in outputs]) if outputs else np.zeros(1)
    span = float(np.max(np.abs(first))) if first.size else 1.0
    # integer levels (int8, int16x8, dynamic-int8) differ across ISAs by quantization steps
    rel = 0.05 if "int" in precision else {"fp16": 0.01}.get(precision, 1e-3)
    return {"atol": round(max(1e-5, rel * span), 6), "rtol": rel,
            "min_top1_agreement": MIN_TOP1_AGREEMENT, "min_within_tolerance": MIN_WITHIN_TOLERANCE,
            "rule": "a sample is within tolerance when every output element has |got-ref| <= atol + rtol*|ref|; "
                    "pass when the share of samples within tolerance and the top-1 agreement both reach their minimums"}


def image_input(pre: dict, image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """A stored raw image as the model's input (batch 1), through the bundled preprocessing."""
    from edgepack import preprocess as pp

    hw = pp.spatial_size(tuple(spec["shape"]), pre.get("layout", "NCHW"))
    return pp.apply(pre, image, hw, spec["dtype"])[None]


class StoredInputs:
    """A validation file (inputs.npz, holdout.npz; compressed or not), each array read once: ``[i]`` is
    sample i as the model takes it, ``labels`` the holdout's labels."""

    def __init__(self, path: Path, manifest: Any):
        self.path, self.specs = path, list(manifest.runtime.inputs)
        self.form = getattr(manifest.validation, "inputs_form", None) or FORM_TENSORS
        self.pre = manifest.preprocess
        try:
            with np.load(path, allow_pickle=False) as z:
                self.arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zip, zlib and numpy errors alike: the file is not readable
            raise BundleError(f"{path.name}: cannot read the validation file ({type(e).__name__}: {e})") from e
        need = ["images"] if self.form == FORM_IMAGES else [s["name"] for s in self.specs]
        missing = [k for k in need if k not in self.arrays]
        if missing or (self.form == FORM_IMAGES and (self.pre is None or len(self.specs) != 1)):
            raise BundleError(f"{path.name}: holds {sorted(self.arrays)}, not the "
                              + ("raw images and a one-input model with `preprocess` that validation.inputs_form "
                                 "'images' needs" if not missing else f"arrays {missing} of the model's inputs"))
        self.labels = self.arrays.get("labels")

    def __len__(self) -> int:
        first = self.arrays["images"] if self.form == FORM_IMAGES else self.arrays[self.specs[0]["name"]]
        return len(first)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self.form == FORM_IMAGES:
            return {self.specs[0]["name"]: image_input(self.pre, self.arrays["images"][i], self.specs[0])}
        return {s["name"]: self.arrays[s["name"]][i] for s in self.specs}


def share_or_na(v: float | None) -> str:
    return "n/a (no class-score output)" if v is None else f"{v:.1%}"


def _golden(runner, bundle_root: Path, manifest) -> dict[str, Any]:
    v = manifest.validation
    ins = StoredInputs(bundle_root / v.inputs_file, manifest)
    with np.load(bundle_root / v.outputs_file, allow_pickle=False) as z:  # each array read once
        outs = {k: z[k] for k in z.files}
    out_names = [o["name"] for o in manifest.runtime.outputs]
    tol = v.tolerance
    # top-1 agreement on the output the accuracy budget gates on, when that output is a class-score vector
    gate = (manifest.measurements.compiled.accuracy or {}).get("output", out_names[0])
    k = out_names.index(gate) if gate in out_names else 0
    one = outs[out_names[k]].shape[1:]  # one sample's output (files hold samples stacked on axis 0)
    scores = len(one) == 2 and one[0] == 1 and one[1] > 1
    within, agree, max_err, failing = 0, 0, 0.0, []
    for i in range(v.samples):
        got = runner.run(ins[i])
        ok = True
        for j, name in enumerate(out_names):
            ref = outs[name][i]
            err = np.abs(got[j].astype(np.float64) - ref.astype(np.float64))
            max_err = max(max_err, float(err.max()) if err.size else 0.0)
            ok &= bool(np.all(err <= tol["atol"] + tol["rtol"] * np.abs(ref)))
        within += ok
        if not ok and len(failing) < 10:
            failing.append(i)
        agree += int(np.argmax(got[k].reshape(-1)) == np.argmax(outs[out_names[k]][i].reshape(-1)))
    n = max(v.samples, 1)
    res = {"samples": v.samples, "within_tolerance": round(within / n, 5),
           "top1_agreement": round(agree / n, 5) if scores else None,
           "top1_output": out_names[k] if scores else None,
           "max_abs_diff": round(max_err, 6), "first_failing_samples": failing, "tolerance": tol}
    res["passed"] = res["within_tolerance"] >= tol["min_within_tolerance"] and \
        (not scores or res["top1_agreement"] >= tol["min_top1_agreement"])
    return res


def _holdout(runner, bundle_root: Path, manifest) -> dict[str, Any] | None:
    v = manifest.validation
    if not v.holdout_file:
        return None
    if v.holdout_file.endswith(".jsonl"):
        return _text_holdout(runner, bundle_root, manifest)
    data = StoredInputs(bundle_root / v.holdout_file, manifest)
    labels = data.labels
    if labels is None:
        raise BundleError(f"{v.holdout_file}: holds no 'labels'")
    correct = sum(int(np.argmax(runner.run(data[i])[0].reshape(-1)) == labels[i]) for i in range(len(labels)))
    return {"metric": "top1", "value": round(100.0 * correct / len(labels), 3), "samples": int(len(labels)),
            "note": "labelled holdout shipped in the bundle (a subset of the build's evaluation set)"}


def _text_holdout(runner, bundle_root: Path, manifest) -> dict[str, Any]:
    """Labelled raw texts, tokenized here with the bundle's own tokenizer.json (no torch, no transformers).
    The golden inputs were tokenized at build time from the first of these texts: their ids must match."""
    from edgepack.text import TextEncoder, TextSpec

    v = manifest.validation
    encoder = TextEncoder(TextSpec.from_json(manifest.text), bundle_root)
    # split on "\n" only: str.splitlines() also breaks at U+0085, U+2028 and other characters a text may hold
    rows = []
    for n, line in enumerate((bundle_root / v.holdout_file).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append({"text": str(row["text"]), "label": int(row["label"])})
            except (ValueError, KeyError, TypeError) as e:
                raise BundleError(f"{v.holdout_file} line {n}: not a {{text, label}} JSON object ({e})") from e
    golden = StoredInputs(bundle_root / v.inputs_file, manifest)
    names = [i["name"] for i in manifest.runtime.inputs]
    same, correct = 0, 0
    for i, row in enumerate(rows):
        feeds = encoder.encode(row["text"], f"{v.holdout_file} line {i + 1}")
        if i < v.samples:
            same += int(all(np.array_equal(feeds[k], golden[i][k]) for k in names))
        correct += int(np.argmax(runner.run(feeds)[0].reshape(-1)) == int(row["label"]))
    n_check = min(v.samples, len(rows))
    return {"metric": "top1", "value": round(100.0 * correct / len(rows), 3), "samples": len(rows),
            "tokenizer_check": {"identical_ids": same, "of": n_check, "passed": same == n_check,
                                "how": "holdout texts re-tokenized on this machine vs the golden inputs "
                                       "tokenized at build time"},
            "note": "labelled evaluation texts shipped in the bundle, tokenized with the bundled tokenizer.json"}


def _measurement(raw: Any, bundle: Path) -> Measurement:
    """How the build measured (the profile's measurement block, its defaults where the bundle has none)."""
    try:
        return Measurement.model_validate(raw if raw is not None else {})
    except PydanticValidationError as e:
        first = e.errors()[0]
        raise BundleError(f"{bundle}: manifest profile.measurement is invalid at "
                          f"'{'.'.join(str(p) for p in first['loc'])[:80]}': {first['msg'][:200]}") from e


def validate(bundle: Path, threads: int | None = None, report: Path | None = None, runs: int | None = None,
             pubkey: Path | None = None, validation_file: Path | None = None) -> dict:
    """Validate a bundle on this machine. Writes the report and raises ValidationError on failure.
    With ``pubkey``, an unsigned, wrongly signed or modified bundle is refused before anything runs."""
    from edgepack.backends import get_backend
    from edgepack.bundle import open_bundle
    from edgepack.measure.host import host_info
    from edgepack.measure.latency import measure_latency

    bundle = Path(bundle)
    with open_bundle(bundle, verify=True, validation=validation_file) as opened:
        m = opened.manifest
        if not opened.validation_files:
            art = m.validation.artifact.file
            raise ConfigError(f"{bundle}: its golden outputs and holdout ship apart, in {art}, which is not beside it",
                              hint=f"copy {art} next to the bundle, or pass --validation-file PATH")
        signature = None
        if pubkey is not None:
            from edgepack.shipping.signing import verify_signature

            signature = verify_signature(opened.root, pubkey, str(bundle))
        backend = get_backend(m.runtime.backend)
        versions = backend.check_environment(compile=False)
        meas = _measurement(m.profile.get("measurement"), bundle)
        threads = threads or meas.threads
        runner = backend.load(opened.file(m.runtime.model_file), threads)
        golden = _golden(runner, opened.root, m)
        holdout = _holdout(runner, opened.root, m)
        sample = StoredInputs(opened.file(m.validation.inputs_file), m)[0]
        latency = measure_latency(runner, sample, meas.warmup_runs, runs or meas.runs, meas.max_seconds, threads)
    built = m.measurements.compiled
    result = {
        "bundle": str(bundle), "name": m.name, "version": m.version, "target": m.target, "build_id": m.build_id,
        "validated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "where": host_info(), "runtime": versions,
        "integrity": {"passed": True, "files_checked": len(m.files)},
        "signature": signature,
        "golden": golden,
        "holdout": holdout | {"build_value": built.accuracy.value if built.accuracy else None,
                              "build_samples": built.accuracy.samples if built.accuracy else None,
                              "build_note": "the build scored its whole evaluation set; the holdout is the subset "
                                            "shipped in the bundle"} if holdout else None,
        "latency": latency | {"build_p50_ms": built.latency.p50_ms,
                              "ratio_to_build": round(latency["p50_ms"] / built.latency.p50_ms, 3)
                              if built.latency.p50_ms else None,
                              "ratio_note": "this machine's p50 over the manifest's (same model, same threads and "
                                            "batch; > 1 means slower here)"},
        "fp32_comparison": {"measured_here": False,
                            "why": "the FP32 model is not shipped in the bundle, so it cannot be timed on this machine",
                            "build_speedup_p50": m.measurements.comparison.speedup_p50,
                            "build_noisy": m.measurements.comparison.noisy,
                            "build_where": built.latency.where.get("cpu"),
                            "note": "the compiled model's speed-up over FP32 as the build timed them in turn on its "
                                    "host"},
        "passed": golden["passed"] and (holdout or {}).get("tokenizer_check", {}).get("passed", True),
        "build_acceptance": {"passed": m.acceptance.passed, "reasons": list(m.acceptance.reasons)},
        "runtime_notes": list(getattr(runner, "notes", [])),
    }
    report = report or bundle.with_name(bundle.name + ".validation.json")
    report.write_text(json.dumps(result, indent=2) + "\n")
    result["report"] = str(report)
    if golden["passed"] and not result["passed"]:
        check = holdout["tokenizer_check"]
        raise ValidationError(f"{bundle}: the bundled tokenizer gives other token ids than at build time "
                              f"({check['identical_ids']} of {check['of']} texts identical)",
                              hint=f"check the 'tokenizers' version against the manifest's toolchain; details in {report}")
    if not golden["passed"]:
        raise ValidationError(
            f"{bundle}: outputs differ from the recorded ones: {golden['within_tolerance']:.1%} of samples within "
            f"tolerance, top-1 agreement {share_or_na(golden['top1_agreement'])} (max abs diff {golden['max_abs_diff']:.4g})",
            hint=f"details in {report}",
        )
    return result
