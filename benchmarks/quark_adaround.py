"""AMD Quark's AdaRound on an FP32 ONNX model: the learned-rounding peer row of int8_recovery.py.

Runs in its own virtual environment, not edgepack's (amd-quark 0.13 pins onnx <= 1.22 and a newer
typing_extensions than litert-converter's xdsl accepts):

    python3 -m venv .quark && .quark/bin/pip install torch==2.13.0 amd-quark==0.13

    .quark/bin/python benchmarks/quark_adaround.py FP32.onnx CALIBRATION.npz OUT.onnx [--iterations 50] [--samples 300]

CALIBRATION.npz holds one array per model input, samples stacked on axis 0 (batch 1 each). The output is
QDQ ONNX in the `onnx` profile's format: uint8 asymmetric activations (MinMax), int8 symmetric
per-channel weights, every Conv/Gemm quantized; AdaRound learns each weight's rounding (up or down),
layer by layer, on the calibration samples. Prints one JSON line: seconds and settings.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("out")
    ap.add_argument("--iterations", type=int, default=50, help="AdaRound iterations per layer (Quark's default: 1000)")
    ap.add_argument("--samples", type=int, default=300, help="calibration samples AdaRound trains on")
    ap.add_argument("--learning-rate", type=float, default=0.1)
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import AdaRoundConfig, ModelQuantizer, QConfig
    from quark.onnx.quantization.config.spec import (
        CalibMethod,
        Int8Spec,
        QLayerConfig,
        QuantGranularity,
        UInt8Spec,
    )

    with np.load(args.calibration) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):
            if self.i >= n:
                return None
            self.i += 1
            return {k: a[self.i - 1 : self.i] for k, a in arrays.items()}

        def rewind(self) -> None:
            self.i = 0

    config = QConfig(
        global_config=QLayerConfig(
            activation=UInt8Spec(calibration_method=CalibMethod.MinMax),
            weight=Int8Spec(calibration_method=CalibMethod.MinMax, quant_granularity=QuantGranularity.Channel)),
        algo_config=[AdaRoundConfig(num_iterations=args.iterations, learning_rate=args.learning_rate, batch_size=1,
                                    data_size=min(args.samples, n), early_stop=True)],
        ForceQuantizeNoInputCheck=True)
    t0 = time.perf_counter()
    ModelQuantizer(config).quantize_model(args.model, args.out, calibration_data_reader=Reader())
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "iterations": args.iterations,
                      "samples": min(args.samples, n), "calibration_samples": n}))


if __name__ == "__main__":
    main()
