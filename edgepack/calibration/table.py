"""Calibration ranges as a value: fitted once, cacheable, written as JSON and as a TensorRT
calibration cache. Calibration (fitting ranges) is kept separate from quantization."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class CalibrationTable:
    method: str
    ranges: dict[str, tuple[float, float]]  # tensor name -> (min, max)
    samples: int
    fingerprint: str

    def amax(self, name: str) -> float:
        lo, hi = self.ranges[name]
        return max(abs(lo), abs(hi))

    def to_json(self) -> dict:
        return {"method": self.method, "samples": self.samples, "fingerprint": self.fingerprint,
                "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in sorted(self.ranges.items())}}

    def write_json(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def read_json(cls, path: Path) -> "CalibrationTable":
        d = json.loads(path.read_text())
        return cls(d["method"], {k: (v[0], v[1]) for k, v in d["ranges"].items()}, d["samples"], d["fingerprint"])

    def write_tensorrt_cache(self, path: Path, tensorrt_version: str) -> Path:
        """TensorRT's calibration cache: a header line, then ``tensor: <scale as big-endian float32 hex>``
        with symmetric INT8 scale = amax / 127 (the format IInt8Calibrator caches read and write)."""
        lines = [f"TRT-{_trt_version_number(tensorrt_version)}-EntropyCalibration2"]
        for name in sorted(self.ranges):
            scale = max(self.amax(name), 1e-12) / 127.0
            lines.append(f"{name}: {struct.pack('>f', np.float32(scale)).hex()}")
        path.write_text("\n".join(lines) + "\n")
        return path


def read_tensorrt_cache(path: Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) from a TensorRT calibration cache."""
    header, *rows = path.read_text().splitlines()
    scales = {}
    for row in rows:
        name, _, hexv = row.rpartition(": ")
        scales[name] = struct.unpack(">f", bytes.fromhex(hexv))[0]
    return header, scales


def _trt_version_number(version: str) -> int:
    """'8.5.2' -> 8502, '10.3.0' -> 100300 (NV_TENSORRT_VERSION's encoding)."""
    parts = [int(p) for p in (version.split(".") + ["0", "0"])[:3]]
    major, minor, patch = parts
    return major * 1000 + minor * 100 + patch if major < 10 else major * 10000 + minor * 100 + patch


# Settings that make each method what its name says. Entropy needs many more histogram bins than
# quantized bins, or it degenerates to min/max (ONNX Runtime's defaults are 128 and 128); TensorRT's
# entropy calibrator uses 2048 and 128.
CALIBRATION_CHUNK = 16
METHOD_OPTIONS: dict[str, dict] = {
    "minmax": {},
    "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
    "percentile": {"num_bins": 2048, "percentile": 99.99},
}


def fit_ranges(onnx_path: Path, samples, method: str, workdir: Path) -> tuple[CalibrationTable, Path]:
    """Run ONNX Runtime's calibrator over the samples: the range of every activation tensor.

    Returns the table and ONNX Runtime's own range file (``quantize_static(calibration_cache_path=)``
    reads it), so the quantized model and the TensorRT cache come from the very same ranges.
    """
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    workdir.mkdir(parents=True, exist_ok=True)
    calibrator = create_calibrator(onnx_path, None, augmented_model_path=str(workdir / "augmented.onnx"),
                                   calibrate_method=methods[method], extra_options=METHOD_OPTIONS[method])

    class _Reader:
        def __init__(self, chunk):
            self.it = iter(chunk)

        def get_next(self):
            return next(self.it, None)

    # ONNX Runtime keeps every activation of every sample it is given until it folds them into its
    # ranges/histograms; in chunks that is CHUNK samples' worth (a transformer at sequence 128 x 300
    # samples would otherwise need tens of GB). Ranges merge and histograms accumulate across chunks.
    items = getattr(samples, "samples", samples)  # read a chunk at a time (image sets make inputs when read)
    for start in range(0, len(items), CALIBRATION_CHUNK):
        calibrator.collect_data(_Reader(items[start:start + CALIBRATION_CHUNK]))
    data = calibrator.compute_data()
    ranges = {k: (float(np.asarray(v.range_value[0]).min()), float(np.asarray(v.range_value[1]).max()))
              for k, v in data.items()}
    (workdir / "augmented.onnx").unlink(missing_ok=True)
    ort_file = workdir / "ort_ranges.json"
    save_tensors_data(data, ort_file)
    return CalibrationTable(method, ranges, len(samples), samples.fingerprint), ort_file
