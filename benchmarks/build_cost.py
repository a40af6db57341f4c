"""Build cost: wall time, peak memory and bundle size of an edgepack `cpu` build, beside the same
quantization done by hand (OpenVINO convert + `nncf.quantize` with the `cpu` profile's settings, on the
same calibration samples, then evaluation passes on the same data and threads).

Each build runs in its own child process; its peak memory is that process's maximum resident set size
(``os.wait4``), its time the child's wall time. Models: the Fashion-MNIST example (its 300 calibration
and 10,000 evaluation images) and a ResNet-50-sized model (transformers' ResNetConfig defaults, random
weights, no tuning) on 224x224 crops of scikit-image's sample photos stored as uint8 `images` npz files.

    python benchmarks/build_cost.py [--threads 2] [--skip-resnet] [--skip-example] [--resnet-samples 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_int8  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
# ImageNet normalisation for the ResNet project (what its preprocess block says)
RESNET_PRE = {"layout": "NCHW", "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
              "color": "rgb"}
RESNET_PROJECT = f"""\
name: resnet50-random
version: 0.0.1
model: {{path: model.py:build}}
inputs: [{{name: pixel_values, shape: [batch, 3, 224, 224], dtype: float32}}]
outputs: [logits]
preprocess: {json.dumps(RESNET_PRE)}
calibration: {{source: data/calib.npz}}
evaluation: {{source: data/eval.npz, metric: fidelity}}
"""
RESNET_MODEL = cpu_int8.RESNET_MODEL  # the same ResNet-50 layout (random weights) as benchmarks/cpu_int8.py
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "cat", "horse", "coins", "camera", "brick", "grass"]


def _crops(n: int, seed: int) -> np.ndarray:
    """n 224x224 RGB uint8 crops of scikit-image's sample photos (shipped in the package: no download)."""
    import skimage.data as sd
    from PIL import Image

    photos = []
    for name in PHOTOS:
        im = np.asarray(getattr(sd, name)())
        im = im.astype(np.uint8) if im.dtype != np.uint8 else im
        photos.append(np.stack([im] * 3, -1) if im.ndim == 2 else im[..., :3])
    rng, out = np.random.default_rng(seed), []
    for i in range(n):
        im = photos[(i + seed) % len(photos)]
        h, w = im.shape[:2]
        s = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        crop = Image.fromarray(np.ascontiguousarray(im[y : y + s, x : x + s])).resize((224, 224), Image.BILINEAR)
        out.append(np.asarray(crop))
    return np.stack(out)


def _resnet_project(folder: Path, samples: int) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "edgepack.yaml").write_text(RESNET_PROJECT)
    (folder / "model.py").write_text(RESNET_MODEL)
    np.savez(folder / "data" / "calib.npz", images=_crops(samples, 0))
    np.savez(folder / "data" / "eval.npz", images=_crops(samples, 1))
    return folder


# --- the by-hand quantization, run in its own child process ------------------------------------------------

def _preprocess(images: np.ndarray, pre: dict) -> np.ndarray:
    """uint8 N x H x W [x C] -> float32 N x C x H x W, the same arithmetic as the project's `preprocess`."""
    x = images[..., None] if images.ndim == 3 else images
    x = x.astype(np.float32) * np.float32(pre.get("scale", 1.0))
    x = (x - np.asarray(pre["mean"], np.float32)) / np.asarray(pre["std"], np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def by_hand(project_dir: Path, work: Path, threads: int) -> dict:
    """OpenVINO + NNCF as a user would write it, with the `cpu` profile's settings; seconds per step."""
    import importlib.util

    import yaml

    t0 = time.perf_counter()
    steps: dict[str, float] = {}
    cfg = yaml.safe_load((project_dir / "edgepack.yaml").read_text())
    pre, cal, ev = cfg["preprocess"], cfg["calibration"], cfg["evaluation"]
    with np.load(project_dir / cal["source"]) as z:
        images = z["images"]
    if cal.get("samples") and cal["samples"] < len(images):  # the same draw as edgepack's reader
        images = images[np.sort(np.random.default_rng(cal.get("seed", 0)).choice(len(images), cal["samples"],
                                                                                  replace=False))]
    calib = _preprocess(images, pre)
    with np.load(project_dir / ev["source"]) as z:
        evaluation, labels = _preprocess(z["images"], pre), (z["labels"] if "labels" in z.files else None)
    steps["data"] = time.perf_counter() - t0

    import nncf
    import openvino as ov
    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    t = time.perf_counter()
    path, _, factory = cfg["model"]["path"].rpartition(":")
    spec = importlib.util.spec_from_file_location("bench_model", project_dir / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    module = getattr(mod, factory)()
    if cfg["model"].get("weights"):
        module.load_state_dict(torch.load(project_dir / cfg["model"]["weights"], map_location="cpu"))
    module.eval()
    steps["load model"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad():
        # batch 1, static (as edgepack fixes it): INT8 on fully dynamic shapes does not compile on the CPU plugin
        fp32 = ov.convert_model(module, example_input=torch.from_numpy(calib[:1]),
                                input=[ov.PartialShape(list(calib[:1].shape))])
    steps["convert (ov.convert_model)"] = time.perf_counter() - t
    t = time.perf_counter()
    int8 = nncf.quantize(fp32, nncf.Dataset([calib[i : i + 1] for i in range(len(calib))]),
                         preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calib),
                         fast_bias_correction=True,
                         advanced_parameters=AdvancedQuantizationParameters(
                             activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    steps["nncf.quantize"] = time.perf_counter() - t
    t = time.perf_counter()
    xml = work / "int8" / "model.xml"
    ov.save_model(int8, str(xml), compress_to_fp16=False)  # as edgepack saves INT8
    steps["save"] = time.perf_counter() - t
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}

    def scores(model) -> np.ndarray:
        req = core.compile_model(model, "CPU", config).create_infer_request()
        return np.stack([req.infer([evaluation[i : i + 1]])[0].copy() for i in range(len(evaluation))])

    t = time.perf_counter()
    q = scores(core.read_model(str(xml)))
    steps["evaluate int8 (one pass)"] = time.perf_counter() - t
    t = time.perf_counter()
    f = scores(fp32)
    steps["evaluate fp32 (the reference)"] = time.perf_counter() - t
    top = q.reshape(len(q), -1).argmax(1)
    metric = (f"top1 {100 * float((top == labels).mean()):.2f} (fp32 "
              f"{100 * float((f.reshape(len(f), -1).argmax(1) == labels).mean()):.2f})" if labels is not None else
              f"fidelity {100 * float((top == f.reshape(len(f), -1).argmax(1)).mean()):.1f}% top-1 agreement")
    size = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
    return {"steps": steps, "metric": metric, "model_bytes": size, "samples": [len(calib), len(evaluation)]}


# --- the parent: child processes, their wall time and peak memory ------------------------------------------

def _child(cmd: list[str], log: Path, tree: Path = ROOT) -> tuple[float, int, int]:
    """Run ``cmd`` (edgepack imported from ``tree``); its wall seconds, peak RSS (bytes) and exit status."""
    t = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=tree, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t, usage.ru_maxrss * 1024, proc.returncode


def _data_bytes(project_dir: Path) -> int:
    """The project's data files on disk (what a build reads): npz files, image folders, csv files."""
    return sum(p.stat().st_size for p in (project_dir / "data").rglob("*")
               if p.is_file() and p.name != "finetune.npz")


def run_model(label: str, project_dir: Path, work: Path, threads: int, tree: Path = ROOT,
              hand: bool = True, extra: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    out = work / "dist"
    print(f"[{label}] edgepack build -t cpu {' '.join(extra)}...", file=sys.stderr, flush=True)
    secs, rss, rc = _child([sys.executable, "-m", "edgepack.cli.main", "build", "-p", str(project_dir), "-t", "cpu",
                            "-o", str(out), "--threads", str(threads), *extra], work / "build.log", tree)
    if rc not in (0, 3):  # 3: a failed acceptance gate (the bundle is kept: its size and time still count)
        raise SystemExit(f"edgepack build failed ({rc}): see {work / 'build.log'}\n" + (work / "build.log").read_text()[-3000:])
    bundle = next(out.glob("*.edgepack"))
    with tarfile.open(bundle) as tar:
        members = {m.name: m.size for m in tar.getmembers() if m.isfile()}
        manifest = json.load(tar.extractfile("manifest.json"))
    model = sum(v for k, v in members.items() if k.startswith("model/"))
    # the validation files, inside the bundle or (--separate-validation) in <bundle>.validation beside it
    payload = sum(f["bytes"] for f in manifest["files"] if f["path"].startswith("validation/"))
    # the progress lines (`✓ export onnx   3.09s  ...`): what the build spent its time on
    stages = [(m[1], float(m[2])) for m in re.finditer(r"^[^\w\s] (\S.*?)\s{2,}([\d.]+)s", (work / "build.log").read_text(), re.MULTILINE)]
    rest = secs - sum(t for _, t in stages)
    stages = sorted(stages, key=lambda s: -s[1])[:5] + [("start-up, imports and the rest", rest)]
    acc = manifest["measurements"]["compiled"].get("accuracy") or {}
    how = " ".join(["edgepack build -t cpu", *extra]) + ("" if tree == ROOT else f" ({tree.name})")
    art = (manifest.get("validation") or {}).get("artifact")
    if art:
        how += f" (validation files apart: {art['bytes'] / 1e6:.2f} MB)"
    v = manifest["validation"]
    how += f"; {v['samples']} golden + {v['holdout_samples']} holdout samples"
    rows.append({"model": label, "how": how, "wall_s": secs, "peak_rss": rss,
                 "bundle": bundle.stat().st_size, "model_bytes": model, "payload": payload,
                 "data": _data_bytes(project_dir), "precision": manifest["runtime"]["precision"],
                 "metric": f"{acc.get('metric', '?')} {acc.get('value', float('nan')):.2f}",
                 "detail": ", ".join(f"{n} {s:.1f}s" for n, s in stages)})
    if not hand:
        return rows
    print(f"[{label}] by hand: convert + nncf.quantize + evaluation ...", file=sys.stderr, flush=True)
    (work / "hand").mkdir()
    secs, rss, rc = _child([sys.executable, __file__, "--by-hand", str(project_dir), "--work", str(work / "hand"),
                            "--threads", str(threads)], work / "hand.log")
    text = (work / "hand.log").read_text()
    if rc != 0:
        raise SystemExit(f"by-hand quantization failed ({rc}):\n{text[-3000:]}")
    res = json.loads(text.strip().splitlines()[-1])
    rows.append({"model": label, "how": "by hand: ov.convert_model + nncf.quantize + eval", "wall_s": secs,
                 "peak_rss": rss, "bundle": None, "model_bytes": res["model_bytes"], "payload": None,
                 "data": _data_bytes(project_dir), "precision": "int8", "metric": res["metric"],
                 "detail": ", ".join(f"{n} {s:.1f}s" for n, s in res["steps"].items())
                 + f", start-up, imports and the rest {secs - sum(res['steps'].values()):.1f}s"})
    return rows


def print_table(rows: list[dict]) -> None:
    mb = lambda b: "-" if b is None else f"{b / 1e6:.2f}"
    print("| model | how | wall s | peak RSS MB | bundle MB | model MB | validation files MB | data files MB | "
          "precision | accuracy | where the time went |")
    print("|" + "---|" * 11)
    for r in rows:
        print(f"| {r['model']} | {r['how']} | {r['wall_s']:.1f} | {r['peak_rss'] / 1e6:.0f} | {mb(r['bundle'])} | "
              f"{mb(r['model_bytes'])} | {mb(r['payload'])} | {mb(r['data'])} | {r['precision']} | {r['metric']} | "
              f"{r['detail']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-example", action="store_true")
    ap.add_argument("--resnet-samples", type=int, default=64, help="calibration and evaluation crops each")
    ap.add_argument("--edgepack-tree", type=Path, default=ROOT,
                    help="build with the edgepack of this source tree (e.g. a `git archive` of an older commit)")
    ap.add_argument("--skip-by-hand", action="store_true")
    ap.add_argument("--efficientnet", action="store_true",
                    help="also EfficientNet-Lite0 and the MiniLM text example (edgepack only, --no-tune; their data "
                         "must be prepared: make example-deps, then each example's prepare.py)")
    ap.add_argument("--by-hand", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.by_hand:
        print(json.dumps(by_hand(args.by_hand, args.work, args.threads)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_example:
            if not (EXAMPLE / "weights.pt").exists():
                subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, check=True)
            (tmp / "example").mkdir()
            rows += run_model("fashion-cnn (example)", EXAMPLE, tmp / "example", args.threads,
                              args.edgepack_tree.resolve(), not args.skip_by_hand)
        if not args.skip_resnet:
            proj = _resnet_project(tmp / "resnet50", args.resnet_samples)
            (tmp / "resnet-work").mkdir()
            rows += run_model("resnet-50-sized (random weights)", proj, tmp / "resnet-work", args.threads,
                              args.edgepack_tree.resolve(), not args.skip_by_hand)
        if args.efficientnet:
            for label, folder in (("efficientnet-lite0 (pretrained)", "efficientnet_lite0"),
                                  ("all-MiniLM-L6-v2 sentiment (text)", "text_sentiment")):
                for extra in (("--no-tune",), ("--no-tune", "--separate-validation")):
                    work = tmp / f"{folder}-{len(extra)}"
                    work.mkdir()
                    rows += run_model(label, ROOT / "examples" / folder, work, args.threads,
                                      args.edgepack_tree.resolve(), False, extra)
    from edgepack.measure.host import host_info

    h = host_info()
    print(f"\nhost: {h['cpu']} ({', '.join(h['isa'])}), {h['logical_cpus']} logical CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at the end; {args.threads} threads; peak RSS of each child process\n")
    print_table(rows)


if __name__ == "__main__":
    main()
