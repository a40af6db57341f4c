"""INT8 recovery: edgepack's INT8 recipes beside the peers' by-hand post-training quantization, per model.

For each example project (EfficientNet-Lite0, the Fashion-MNIST CNN, and with --text the MiniLM sentiment
model), on the project's own calibration and evaluation sets and the FP32 ONNX edgepack exports:

- peer rows: OpenVINO + ``nncf.quantize`` with its defaults, and ONNX Runtime ``quantize_static`` (QDQ, U8S8,
  per-channel weights, MinMax), each by hand on the same calibration samples;
- edgepack rows: the ``cpu`` (OpenVINO) and ``onnx`` (ONNX Runtime) backends' plain INT8 and each of their
  recovery methods (``quantization.recipe``), compiled with the backend as a build does;

top-1 agreement with FP32 and mean logit cosine on the evaluation set, the compile (quantize) seconds, and
p50 latency of every row and FP32, timed in turn in one window in this process (so a shared host's load falls
on all of them alike). Prints a markdown table per model.

    python benchmarks/int8_recovery.py [--text] [--threads 2] [--skip-fashion]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROJECTS = {"efficientnet-lite0": ROOT / "examples" / "efficientnet_lite0",
            "fashion-mnist cnn": ROOT / "examples" / "fashion_mnist",
            "minilm sentiment": ROOT / "examples" / "text_sentiment"}


def context(project_dir: Path, scratch: Path):
    """The build's own data and FP32 ONNX for a project (what `edgepack build` would quantize)."""
    from edgepack.build.context import BuildContext, Settings
    from edgepack.build.data import prepare_data
    from edgepack.build.plan import plan_targets, toolchain_versions
    from edgepack.build.source import exported, source_of
    from edgepack.loaders.resolve import resolve
    from edgepack.project import find_project, load_project

    project = load_project(project_dir)
    plans = plan_targets(["cpu", "onnx"], None, strict=True, precision=project.precision)
    ctx = BuildContext(resolve(project, scratch / "source"), source_of(project, find_project(project_dir)),
                       toolchain_versions(plans), Settings(False, 1.0, 1, None, {}, False), scratch, scratch)
    ctx.data = prepare_data(ctx, plans[0].profile)
    return ctx, plans, exported(ctx, plans[0].profile)


def by_hand_nncf(onnx_path: Path, calibration, out: Path) -> Path:
    import nncf
    import openvino as ov

    q = nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(list(calibration)), subset_size=len(calibration))
    ov.save_model(q, str(out))
    return out


def by_hand_ort(onnx_path: Path, calibration, out: Path) -> Path:
    from onnxruntime import quantization as q

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(calibration))

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(str(onnx_path), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    return out


def agreement(outputs, reference) -> tuple[float, float]:
    agree, cos = 0, []
    for o, r in zip(outputs, reference):
        a, b = np.asarray(o[0], np.float64).reshape(-1), np.asarray(r[0], np.float64).reshape(-1)
        agree += int(a.argmax() == b.argmax())
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return 100.0 * agree / len(outputs), float(np.mean(cos))


def rows_for(name: str, project_dir: Path, threads: int, work: Path) -> list[dict]:
    from edgepack.backends import get_backend
    from edgepack.measure.accuracy import run_all
    from edgepack.measure.latency import measure_in_turn

    ctx, plans, art = context(project_dir, work)
    ev, cal = ctx.evaluation, ctx.calibration
    ort_backend, ov_backend = get_backend("onnxruntime"), get_backend("openvino")
    runners, rows = {}, []
    runners["fp32 (onnxruntime)"] = ort_backend.load(art.path, threads)
    reference = run_all(runners["fp32 (onnxruntime)"], ev)
    rows.append({"row": "fp32 (onnxruntime)", "agree": 100.0, "cos": 1.0, "seconds": 0.0})

    def add(label: str, make, load) -> None:
        t0 = time.perf_counter()
        try:
            path = make()
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
            rows.append({"row": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            return
        seconds = time.perf_counter() - t0
        runner = load(path)
        a, c = agreement(run_all(runner, ev), reference)
        runners[label] = runner
        rows.append({"row": label, "agree": a, "cos": c, "seconds": seconds})
        print(f"  {name}: {label}: {a:.1f}% cos {c:.4f} ({seconds:.0f} s)", flush=True)

    add("peer: OpenVINO + nncf.quantize defaults", lambda: by_hand_nncf(art.path, cal, work / "nncf" / "m.xml"),
        lambda p: ov_backend.load(p, threads))
    (work / "ortq").mkdir(exist_ok=True)
    add("peer: ORT quantize_static U8S8 per-channel", lambda: by_hand_ort(art.path, cal, work / "ortq" / "m.onnx"),
        lambda p: ort_backend.load(p, threads))
    for plan in plans:
        backend, profile = plan.backend, plan.profile
        for recipe in ("default", *getattr(backend, "recovery_methods", ())):
            variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(
                update={"recipe": recipe})})
            where = work / f"{profile.name}-{recipe}"
            add(f"edgepack {profile.name} ({backend.name}) {'plain int8' if recipe == 'default' else recipe}",
                lambda b=backend, v=variant, w=where: b.compile(art, v, plan.options, cal, w).path,
                lambda p, b=backend: b.host_runner(p, threads)[0])
    lat, noise = measure_in_turn(runners, ev.samples[0], 10, 200, 60.0, threads)
    for r in rows:
        if r["row"] in lat:
            r["p50_ms"] = lat[r["row"]]["p50_ms"]
    rows.append({"noise": noise})
    return rows


def table(name: str, rows: list[dict]) -> str:
    noise = rows[-1].get("noise", {})
    out = [f"### {name}", "", "| build | top-1 agreement % | cosine | p50 ms (in turn) | quantize s |", "|---|---|---|---|---|"]
    for r in rows[:-1]:
        if "error" in r:
            out.append(f"| {r['row']} | failed: {r['error']} | | | |")
            continue
        out.append(f"| {r['row']} | {r['agree']:.1f} | {r['cos']:.4f} | {r.get('p50_ms', float('nan')):.3f} | "
                   f"{r['seconds']:.0f} |")
    out.append("")
    out.append(f"in-turn window noisy: {noise.get('noisy')} (checks: {len(noise.get('checks', []))})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", action="store_true", help="also the MiniLM sentiment model (slow: 1,000 texts)")
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--skip-efficientnet", action="store_true")
    args = ap.parse_args()
    names = [n for n in PROJECTS if not (n == "minilm sentiment" and not args.text)
             and not (n == "fashion-mnist cnn" and args.skip_fashion)
             and not (n == "efficientnet-lite0" and args.skip_efficientnet)]
    for name in names:
        work = Path(tempfile.mkdtemp(prefix="edgepack-int8-recovery-"))
        try:
            print(table(name, rows_for(name, PROJECTS[name], args.threads, work)), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
