"""CPU INT8 benchmark: one table, every row measured side by side in one process and one run.

Rows per model: torch eager FP32 (N threads and 1 thread), ONNX Runtime FP32, ONNX Runtime INT8
(the `onnx` target's bundle), OpenVINO FP32, OpenVINO INT8 (the `cpu` target's bundle).
Models: the Fashion-MNIST example (accuracy on its 10,000 test images) and a ResNet-50-sized model
(transformers ResNetConfig defaults, random weights: latency only).

    python benchmarks/cpu_int8.py [--threads 2] [--runs 100] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"

RESNET_PROJECT = """\
name: resnet50-random
version: 0.0.1
model: {path: model.py:build}
inputs: [{name: pixel_values, shape: [batch, 3, 224, 224], dtype: float32}]
outputs: [logits]
calibration: {source: data.py:calibration}
evaluation: {source: data.py:evaluation, metric: fidelity}
"""
RESNET_MODEL = """\
import torch
from transformers import ResNetConfig, ResNetForImageClassification


class ResNet50(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = ResNetForImageClassification(ResNetConfig())  # ResNet-50 layout, random weights

    def forward(self, pixel_values):
        return self.net(pixel_values=pixel_values).logits


def build():
    return ResNet50()
"""
RESNET_DATA = """\
import numpy as np


def _images(n, seed):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"pixel_values": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)}


def calibration():
    return _images(64, 0)


def evaluation():
    return _images(16, 1)
"""


class TorchRunner:
    def __init__(self, module, threads: int):
        import torch

        self.torch, self.module, self.threads = torch, module, threads

    def run(self, feeds):
        self.torch.set_num_threads(self.threads)
        with self.torch.no_grad():
            out = self.module(*[self.torch.from_numpy(v) for v in feeds.values()])
        return [out.numpy()]


def _extract(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tar:
        tar.extractall(dest, filter="data")
    return dest


def bench_model(label: str, project_dir: Path, work: Path, threads: int, runs: int, max_seconds: float,
                cal_samples: int | None) -> list[dict]:
    from edgepack.api import build
    from edgepack.backends import get_backend
    from edgepack.calibration.reader import load_samples
    from edgepack.loaders.torch import load_module
    from edgepack.measure import accuracy as acc
    from edgepack.measure.latency import measure_latency
    from edgepack.project import load_project
    from edgepack.stages.export_onnx import export
    from edgepack.target import load_target

    print(f"[{label}] building the cpu and onnx bundles ...", file=sys.stderr, flush=True)
    targets_dir = work / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    for name in ("cpu", "onnx"):  # the shipped profiles, with this run's calibration size and thread count
        p = load_target(name)
        data = p.model_dump(mode="json", exclude={"source"})
        data["quantization"]["samples"] = cal_samples or p.quantization.samples
        data["measurement"].update(threads=threads, runs=runs, max_seconds=max_seconds)
        import yaml

        (targets_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))
    results = {r.target: r for r in build(project_dir, ["cpu", "onnx"], work / "dist", threads, None, [targets_dir])}
    project = load_project(project_dir)
    pre = project.preprocess.model_dump() if project.preprocess else None
    ev = project.evaluation
    data = load_samples(ev.source, project.root, project.input_specs(), pre, ev.samples, ev.seed,
                        project.label_names(), "evaluation")
    module = load_module(project)
    fp32 = export(module, project.input_specs(), project.outputs or ["output"], work / "fp32")
    import openvino as ov

    ov_fp32 = work / "ov-fp32" / "model.xml"
    ov.save_model(ov.convert_model(str(fp32.path)), str(ov_fp32), compress_to_fp16=False)
    cpu = _extract(results["cpu"].bundle, work / "cpu")
    onnx = _extract(results["onnx"].bundle, work / "onnx")
    ort_b, ov_b = get_backend("onnxruntime"), get_backend("openvino")
    rows = [
        ("torch eager", "fp32", f"{threads} threads", lambda: TorchRunner(module, threads), [fp32.path]),
        ("torch eager", "fp32", "1 thread", lambda: TorchRunner(module, 1), [fp32.path]),
        ("onnxruntime", "fp32", "", lambda: ort_b.load(fp32.path, threads), [fp32.path]),
        ("onnxruntime", "int8 (onnx target)", "", lambda: ort_b.load(onnx / "model/model.onnx", threads),
         [onnx / "model/model.onnx"]),
        ("openvino", "fp32", "", lambda: ov_b.load(ov_fp32, threads), [ov_fp32, ov_fp32.with_suffix(".bin")]),
        ("openvino", "int8 (cpu target)", "", lambda: ov_b.load(cpu / "model/model.xml", threads),
         [cpu / "model/model.xml", cpu / "model/model.bin"]),
    ]
    out, ref_outputs = [], None
    for runtime, precision, note, make, files in rows:
        print(f"[{label}] timing {runtime} {precision} {note}", file=sys.stderr, flush=True)
        runner = make()
        lat = measure_latency(runner, data.samples[0], 10, runs, max_seconds, 1 if note == "1 thread" else threads)
        outputs = acc.run_all(runner, data)
        if ref_outputs is None:
            ref_outputs = outputs
        metric = acc.score("top1" if data.labels is not None else "fidelity", outputs, data.labels, ref_outputs)
        out.append({"model": label, "runtime": runtime, "precision": precision, "note": note,
                    "p50": lat["p50_ms"], "p90": lat["p90_ms"], "size": sum(f.stat().st_size for f in files),
                    "acc": metric})
        del runner
    return out


def print_table(rows: list[dict], threads: int) -> None:
    head = f"| model | runtime | precision | p50 ms | p90 ms | p50 vs torch eager ({threads}t) | p50 vs ORT FP32 | size MB | accuracy |"
    print(head)
    print("|" + "---|" * 9)
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        eager = group[0]["p50"]
        ort32 = next(r["p50"] for r in group if r["runtime"] == "onnxruntime" and r["precision"] == "fp32")
        for r in group:
            a = r["acc"]
            accs = f"{a['value']:.2f} top1 (n={a['samples']})" if a["metric"] == "top1" else \
                f"{a['value']:.1f}% agree w/ eager (n={a['samples']})"
            name = f"{r['runtime']} {r['note']}".strip()
            print(f"| {model} | {name} | {r['precision']} | {r['p50']:.3f} | {r['p90']:.3f} | "
                  f"{r['p50'] / eager:.2f}x | {r['p50'] / ort32:.2f}x | {r['size'] / 1e6:.2f} | {accs} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--max-seconds", type=float, default=20.0)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-example", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_example:
            if not (EXAMPLE / "weights.pt").exists():
                subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, check=True)
            rows += bench_model("fashion-cnn (example)", EXAMPLE, tmp / "example", args.threads, args.runs,
                                args.max_seconds, None)
        if not args.skip_resnet:
            proj = tmp / "resnet50"
            proj.mkdir()
            (proj / "edgepack.yaml").write_text(RESNET_PROJECT)
            (proj / "model.py").write_text(RESNET_MODEL)
            (proj / "data.py").write_text(RESNET_DATA)
            work = tmp / "resnet-work"
            work.mkdir()
            rows += bench_model("resnet-50-sized (random weights)", proj, work, args.threads, args.runs,
                                args.max_seconds, 64)
    from edgepack.measure.host import host_info

    h = host_info()
    print(f"\nhost: {h['cpu']} ({', '.join(h['isa'])}), {h['logical_cpus']} logical CPUs; batch 1, "
          f"{args.threads} threads unless noted, up to {args.runs} timed runs after 10 warm-up runs\n")
    print_table(rows, args.threads)


if __name__ == "__main__":
    main()
