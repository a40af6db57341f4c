"""AMD Quark's AdaRound on an FP32 ONNX model, run as a script by the ``quark`` toolchain's own Python.

This file imports nothing from edgepack: it runs in the isolated environment ``edgepack toolchain install
quark`` makes (amd-quark 0.13 pins onnx <= 1.22, and its typing_extensions breaks litert-converter's xdsl),
called by :func:`edgepack.stages.adaround.quantize_adaround` and by ``benchmarks/int8_recovery.py``:

    QUARK_PYTHON edgepack/stages/quark_adaround.py FP32.onnx CALIBRATION.npz OUT.onnx \\
        [--iterations 50] [--samples 64] [--activations uint8|int8] [--symmetric-activations] \\
        [--per-tensor-weights] [--method minmax|entropy|percentile] [--exclude NODE ...]

CALIBRATION.npz holds one array per model input, samples stacked on axis 0 (batch 1 each). The output is
QDQ ONNX in the ONNX Runtime formats edgepack's ``onnx`` profile uses (uint8 asymmetric activations by
default, int8 symmetric weights per output channel, every Conv/Gemm quantized unless excluded); AdaRound
learns each weight's rounding (up or down), layer by layer, so the layer's output on the calibration
samples stays closest to FP32's (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training
Quantization", ICML 2020). Activation ranges, weight scales and biases are those of the plain build. Prints
one JSON line: seconds and settings.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

SEED = 1705472343  # Quark's own default seed, fixed so the same inputs give the same rounding


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calibration")
    ap.add_argument("out")
    ap.add_argument("--iterations", type=int, default=50, help="AdaRound iterations per layer (Quark's default: 1000)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples AdaRound trains on")
    ap.add_argument("--learning-rate", type=float, default=0.1)
    ap.add_argument("--activations", choices=("uint8", "int8"), default="uint8")
    ap.add_argument("--symmetric-activations", action="store_true")
    ap.add_argument("--per-tensor-weights", action="store_true")
    ap.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    ap.add_argument("--exclude", nargs="*", default=[], help="node names kept in float")
    args = ap.parse_args()

    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import AdaRoundConfig, ModelQuantizer, QConfig
    from quark.onnx.quantization.config.spec import CalibMethod, Int8Spec, QLayerConfig, QuantGranularity, UInt8Spec

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

    method = {"minmax": CalibMethod.MinMax, "entropy": CalibMethod.Entropy, "percentile": CalibMethod.Percentile}
    act_spec = UInt8Spec if args.activations == "uint8" else Int8Spec
    granularity = QuantGranularity.Tensor if args.per_tensor_weights else QuantGranularity.Channel
    samples = min(args.samples, n)
    config = QConfig(
        global_config=QLayerConfig(
            activation=act_spec(symmetric=args.symmetric_activations, calibration_method=method[args.method]),
            weight=Int8Spec(symmetric=True, calibration_method=CalibMethod.MinMax, quant_granularity=granularity)),
        algo_config=[AdaRoundConfig(num_iterations=args.iterations, learning_rate=args.learning_rate, batch_size=1,
                                    data_size=samples, early_stop=True, fixed_seed=SEED)],
        exclude=list(args.exclude) or None,
        ForceQuantizeNoInputCheck=True)
    t0 = time.perf_counter()
    ModelQuantizer(config).quantize_model(args.model, args.out, calibration_data_reader=Reader())
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "iterations": args.iterations,
                      "samples": samples, "calibration_samples": n, "learning_rate": args.learning_rate,
                      "seed": SEED}))


if __name__ == "__main__":
    main()
