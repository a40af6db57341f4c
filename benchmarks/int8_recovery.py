"""INT8 recovery: edgepack's INT8 recipes beside the peers' by-hand post-training quantization, per model.

For each example project (EfficientNet-Lite0, the Fashion-MNIST CNN, and with --text the MiniLM sentiment
model) and MobileNetV2 (benchmarks/mobilenetv2: transformers' classes, random weights with re-estimated
batch-norm statistics, since no pretrained weights load offline: its agreement is the fidelity of that
network, not ImageNet accuracy; its latencies are real), on the project's own calibration and evaluation
sets and the FP32 ONNX edgepack exports:

- peer rows: OpenVINO + ``nncf.quantize`` with its defaults, and ONNX Runtime ``quantize_static`` (QDQ, U8S8,
  per-channel weights, MinMax), each by hand on the same calibration samples;
- edgepack rows: the ``cpu`` (OpenVINO) and ``onnx`` (ONNX Runtime) backends' plain INT8 and each of their
  recovery methods (``quantization.recipe``), compiled with the backend as a build does;

top-1 agreement with FP32 and mean logit cosine on the evaluation set, the compile (quantize) seconds, and
p50 latency of every row and FP32, timed in turn in one window in this process (so a shared host's load falls
on all of them alike). Where the project's metric is top-1 against labels, each row's label top-1 too.

Each table marks edgepack's chosen build per target: the search's ladder walked over the rows (plain INT8
if it meets the project's accuracy budget, else the first recovery method that does; the other calibration
methods and the float fallback are not benchmarked, so a target none of whose rows meets the budget is
said to be undecided), and ends with a verdict per target: chosen vs the best peer (the most accurate,
then the fastest), accuracy and p50 ratio from the same in-turn window. Prints a markdown table per model.

    python benchmarks/int8_recovery.py [--text] [--threads 2] [--skip-fashion] [--skip-efficientnet]
        [--skip-mobilenet]
        [--stop-at-chosen] [--eval-limit N] [--quark-python VENV/bin/python | --no-quark]
        [--quark-iterations 50] [--quark-samples 300] [--olive-python VENV/bin/python]

AMD Quark's AdaRound (learned rounding) by hand is one more peer row, in the ``onnx`` profile's format
(U8S8, per-channel weights), when the ``quark`` toolchain is installed (``edgepack toolchain install quark``)
or ``--quark-python`` names another venv's interpreter with amd-quark and torch; it runs
edgepack/stages/quark_adaround.py there, the script the ``onnx`` target's ``adaround`` recipe runs too (with
the benchmark's own sample count and iterations). ``--no-quark`` leaves the row out.

Microsoft Olive's ``OnnxStaticQuantization`` pass with its defaults is one more peer row when ``--olive-python``
names a venv's interpreter with it (olive-ai's pins are not ours, so it runs apart, through
benchmarks/olive_static.py):

    python -m venv olive && olive/bin/pip install torch==2.13.0 olive-ai==0.13.0 onnxruntime requests

Each verdict also gives the paired exact test (McNemar) on the samples the two rows disagree on: both rows are
scored on the same samples, so a difference of a few samples is "less accurate, not a measurable difference"
unless that test's p < 0.05; and a p50 ratio above 1 is set against the round-to-round spread of both rows'
ratios in the window (measure_in_turn's check), so 0.1% slower in a window that spreads by 3% is said to be
within it.
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
            "mobilenetv2 (random weights)": ROOT / "benchmarks" / "mobilenetv2",
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


def by_hand_nncf(onnx_path: Path, calibration, out: Path, transformer: bool = False) -> Path:
    import nncf
    import openvino as ov

    q = nncf.quantize(ov.convert_model(str(onnx_path)), nncf.Dataset(list(calibration)), subset_size=len(calibration),
                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
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


def by_hand_ort_dynamic(onnx_path: Path, out: Path) -> Path:
    """ONNX Runtime's documented route for transformers: dynamic quantization (INT8 weights, no calibration)."""
    from onnxruntime import quantization as q

    q.quantize_dynamic(str(onnx_path), str(out), weight_type=q.QuantType.QInt8)
    return out


def calibration_npz(calibration, folder: Path) -> Path:
    """The calibration samples as one .npz (one array per input, samples along axis 0), for a peer that runs
    in its own environment."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "calibration.npz"
    names = list(next(iter(calibration)).keys())
    np.savez(data, **{k: np.concatenate([np.asarray(s[k]) for s in calibration]) for k in names})
    return data


def run_isolated(cmd: list[str], cwd: Path, env: dict | None = None) -> None:
    import os
    import subprocess

    res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise RuntimeError((res.stderr.strip().splitlines() or ["no output"])[-1])


def by_hand_quark_adaround(python: str, onnx_path: Path, calibration, out: Path, iterations: int,
                           samples: int) -> Path:
    """AMD Quark AdaRound (learned rounding) in its own environment: ``python`` is that venv's interpreter
    (see edgepack/stages/quark_adaround.py); the calibration samples are handed over as one .npz."""
    data = calibration_npz(calibration, out.parent)
    # cwd: Quark writes a quantized_info.csv into the current folder
    run_isolated([python, str(ROOT / "edgepack" / "stages" / "quark_adaround.py"), str(onnx_path), str(data), str(out),
                  "--iterations", str(iterations), "--samples", str(samples)], out.parent)
    return out


def by_hand_olive(python: str, onnx_path: Path, calibration, out: Path) -> Path:
    """Microsoft Olive's ``OnnxStaticQuantization`` pass with its defaults, in its own environment
    (benchmarks/olive_static.py); telemetry off."""
    data = calibration_npz(calibration, out.parent)
    run_isolated([python, str(ROOT / "benchmarks" / "olive_static.py"), str(onnx_path), str(data), str(out)],
                 out.parent, {"OLIVE_DISABLE_TELEMETRY": "1"})
    return out


def agreement(outputs, reference) -> tuple[float, float]:
    agree, cos = 0, []
    for o, r in zip(outputs, reference):
        a, b = np.asarray(o[0], np.float64).reshape(-1), np.asarray(r[0], np.float64).reshape(-1)
        agree += int(a.argmax() == b.argmax())
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return 100.0 * agree / len(outputs), float(np.mean(cos))


def hits(outputs, truth) -> np.ndarray:
    """Per evaluation sample: is the row's top-1 the label (or FP32's top-1)? For the paired test of a verdict."""
    return np.array([int(np.argmax(o[0])) == int(t) for o, t in zip(outputs, truth)])


def rows_for(name: str, project_dir: Path, threads: int, work: Path, stop_at_chosen: bool = False,
             eval_limit: int | None = None, quark: dict | None = None, olive: str | None = None) -> list[dict]:
    from edgepack.backends import get_backend
    from edgepack.build.search import accuracy_budget
    from edgepack.calibration.reader import SampleSet
    from edgepack.measure.accuracy import run_all, top1
    from edgepack.measure.latency import measure_in_turn

    ctx, plans, art = context(project_dir, work)
    ev, cal = ctx.evaluation, ctx.calibration
    if eval_limit and eval_limit < len(ev.samples):
        ev = SampleSet(ev.samples[:eval_limit], ev.labels[:eval_limit] if ev.labels else None, ev.source)
    labelled = ctx.project.evaluation.metric == "top1" and bool(ev.labels)
    ort_backend, ov_backend = get_backend("onnxruntime"), get_backend("openvino")
    runners, rows = {}, []
    runners["fp32 (onnxruntime)"] = ort_backend.load(art.path, threads)
    reference = run_all(runners["fp32 (onnxruntime)"], ev)
    rows.append({"row": "fp32 (onnxruntime)", "agree": 100.0, "cos": 1.0, "seconds": 0.0,
                 "top1": top1(reference, ev.labels)["value"] if labelled else None})
    # the budget the build's search checks: the project's metric (label top-1, else agreement with FP32)
    ref_score = {"metric": "top1" if labelled else "fidelity", "value": rows[0]["top1"] if labelled else 100.0}

    def add(label: str, make, load, target: str | None = None, runtime: str = "onnxruntime") -> dict | None:
        t0 = time.perf_counter()
        try:
            path = make()
            seconds = time.perf_counter() - t0
            runner = load(path)  # a tool's output that its runtime refuses fails its row too
            outputs = run_all(runner, ev)
        except Exception as e:  # noqa: BLE001 - a row that fails is reported, the others still run
            rows.append({"row": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            return None
        a, c = agreement(outputs, reference)
        runners[label] = runner
        row = {"row": label, "agree": a, "cos": c, "seconds": seconds, "target": target, "runtime": runtime,
               "top1": top1(outputs, ev.labels)["value"] if labelled else None,
               "hits": hits(outputs, ev.labels if labelled else [int(np.argmax(r[0])) for r in reference])}
        rows.append(row)
        extra = f", label top-1 {row['top1']:.1f}%" if labelled else ""
        print(f"  {name}: {label}: {a:.1f}% cos {c:.4f}{extra} ({seconds:.0f} s)", flush=True)
        return row

    add("peer: OpenVINO + nncf.quantize defaults", lambda: by_hand_nncf(art.path, cal, work / "nncf" / "m.xml"),
        lambda p: ov_backend.load(p, threads), runtime="openvino")
    (work / "ortq").mkdir(exist_ok=True)
    add("peer: ORT quantize_static U8S8 per-channel", lambda: by_hand_ort(art.path, cal, work / "ortq" / "m.onnx"),
        lambda p: ort_backend.load(p, threads))
    if quark is not None:
        add(f"peer: AMD Quark AdaRound ({quark['iterations']} iterations, {min(quark['samples'], len(cal))} samples)",
            lambda: by_hand_quark_adaround(quark["python"], art.path, cal, work / "quark" / "m.onnx",
                                           quark["iterations"], quark["samples"]),
            lambda p: ort_backend.load(p, threads))
    if olive is not None:
        add("peer: Olive OnnxStaticQuantization defaults", lambda: by_hand_olive(olive, art.path, cal,
                                                                               work / "olive" / "m.onnx"),
            lambda p: ort_backend.load(p, threads))
    if "input_ids" in ev.samples[0]:  # a transformer: each peer's documented setting for one, too
        add("peer: OpenVINO + nncf.quantize model_type=TRANSFORMER",
            lambda: by_hand_nncf(art.path, cal, work / "nncf-t" / "m.xml", transformer=True),
            lambda p: ov_backend.load(p, threads), runtime="openvino")
        add("peer: ORT quantize_dynamic (INT8 weights)", lambda: by_hand_ort_dynamic(art.path, work / "ortq" / "d.onnx"),
            lambda p: ort_backend.load(p, threads))
    for plan in plans:
        backend, profile = plan.backend, plan.profile
        meets = accuracy_budget(ctx.project, profile, ref_score) or (lambda value: True)
        value = (lambda r: r["top1"]) if labelled else (lambda r: r["agree"])
        method, chosen = profile.quantization.calibration_method, None
        # the search's ladder: plain; the other calibration methods only when plain misses (keeping the most
        # accurate); then the recovery methods on that calibration method, each with every layer in INT8
        ladder = [("default", method)]
        ladder += [("calibration", m) for m in backend.calibration_methods if m != method]
        ladder += [(r, None) for r in getattr(backend, "recovery_methods", ())]
        best_value = None
        for recipe, m in ladder:
            if recipe == "calibration" and (chosen is not None or best_value is None):
                continue  # plain met the budget (or failed): the search tries no other calibration method
            if chosen is not None and stop_at_chosen:
                break
            m = m or method
            update = {"calibration_method": m} | ({} if recipe == "calibration" else {"recipe": recipe})
            variant = profile.model_copy(update={"quantization": profile.quantization.model_copy(update=update)})
            label = {"default": "plain int8", "calibration": f"calibration {m}"}.get(recipe, recipe)
            label += f" ({m})" if recipe not in ("default", "calibration") and m != "minmax" else ""
            row = add(f"edgepack {profile.name} ({backend.name}) {label}",
                      lambda b=backend, v=variant, o=plan.options, w=work / f"{profile.name}-{recipe}-{m}":
                      b.compile(art, v, o, cal, w).path,
                      lambda p, b=backend: b.host_runner(p, threads)[0], profile.name, backend.name)
            if row is None:
                continue
            if chosen is None and meets(value(row)):
                row["chosen"] = chosen = True  # the search stops at the first all-INT8 rung that meets the budget
            if recipe in ("default", "calibration") and (best_value is None or value(row) > best_value):
                best_value, method = value(row), m
    lat, noise = measure_in_turn(runners, ev.samples[0], 10, 200, 60.0, threads)
    spread = (noise.get("checks") or [{}])[-1].get("ratio_spread", {})  # per row: its ratios' round-to-round spread
    for r in rows:
        if r["row"] in lat:
            r["p50_ms"] = lat[r["row"]]["p50_ms"]
            r["spread"] = spread.get(r["row"], 0.0)
    budget = ctx.project.acceptance.max_accuracy_drop
    rows.append({"noise": noise, "metric": ref_score["metric"], "budget": budget, "samples": len(ev.samples),
                 "targets": [p.profile.name for p in plans]})
    return rows


def paired_p(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact two-sided sign test (McNemar) on the samples two rows disagree on: (a right & b wrong, the
    reverse, p). Both rows were scored on the same samples, so only their discordant samples carry evidence.
    scipy comes with scikit-learn (the dev extra)."""
    from scipy.stats import binomtest

    wins, losses = int((a & ~b).sum()), int((~a & b).sum())
    return wins, losses, (1.0 if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5).pvalue))


def verdict(label: str, chosen: dict, best: dict, key: str, n: int) -> str:
    """Chosen vs one peer: the accuracy difference, the paired test that says whether it is more than sampling
    noise, and the p50 ratio from the same in-turn window."""
    d_acc, d_agree = chosen[key] - best[key], chosen["agree"] - best["agree"]
    ratio = chosen.get("p50_ms", float("nan")) / best.get("p50_ms", float("nan"))
    wins, losses, p = paired_p(chosen["hits"], best["hits"])
    # the p50 ratio against the spread of both rows' per-round ratios in this window: a gap inside it is noise
    noise = max(chosen.get("spread", 0.0), best.get("spread", 0.0))
    speed = ("no slower" if ratio <= 1.0 else
             f"slower by {ratio - 1:.1%}, within this window's round-to-round spread ({noise:.1%})" if ratio - 1 <= noise
             else f"slower by {ratio - 1:.1%}, beyond this window's round-to-round spread ({noise:.1%})")
    if d_acc >= -1e-9:
        what = f"at least as accurate, {speed}"
    else:
        what = (f"LESS accurate (paired exact test p={p:.3f} < 0.05), {speed}" if p < 0.05 else
                f"less accurate by {round(-d_acc * n / 100)} of {n}, not a measurable difference (paired exact "
                f"test p={p:.2f}), {speed}")
    metric = "label top-1" if key == "top1" else "agreement"
    return (f"verdict {label}: chosen '{chosen['row']}' vs best peer '{best['row']}': {metric} "
            f"{chosen[key]:.2f} vs {best[key]:.2f} ({d_acc:+.2f} points = {round(d_acc * n / 100):+d} of {n} samples; "
            f"right where the peer is wrong {wins}, the reverse {losses}; agreement {d_agree:+.2f}, cosine "
            f"{chosen['cos']:.4f} vs {best['cos']:.4f}), p50 {chosen.get('p50_ms', float('nan')):.3f} vs "
            f"{best.get('p50_ms', float('nan')):.3f} ms = {ratio:.2f}x: {what}")


def verdicts(rows: list[dict]) -> list[str]:
    """Per target: edgepack's chosen build vs the best peer (most accurate, then fastest), in one window; then vs
    the best peer on the target's own runtime where that is another row; then the model's verdict: edgepack's
    most accurate chosen build (then the fastest) vs the best peer."""
    ok = [r for r in rows[:-1] if "error" not in r]
    key = "top1" if rows[-1]["metric"] == "top1" else "agree"
    n = rows[-1]["samples"]
    peers = [r for r in ok if r["row"].startswith("peer:")]
    if not peers:
        return ["verdict: no peer row succeeded"]

    def most_accurate(rs: list[dict]) -> dict:
        return max(rs, key=lambda r: (r[key], r["cos"], -r.get("p50_ms", float("inf"))))

    best, out, picked = most_accurate(peers), [], []
    for target in rows[-1]["targets"]:
        chosen = next((r for r in ok if r.get("target") == target and r.get("chosen")), None)
        if chosen is None:
            out.append(f"verdict {target}: undecided: no benchmarked all-INT8 row meets the budget (the search "
                       f"goes on to calibration methods / float layers, not benchmarked)")
            continue
        picked.append(chosen)
        out.append(verdict(target, chosen, best, key, n))
        same = [r for r in peers if r["runtime"] == chosen["runtime"]]
        if same and most_accurate(same) is not best:
            out.append(verdict(f"{target} (same runtime, {chosen['runtime']})", chosen, most_accurate(same), key, n))
    if len(picked) > 1:
        out.append(verdict("model", most_accurate(picked), best, key, n))
    return out


def table(name: str, rows: list[dict]) -> str:
    info = rows[-1]
    noise, labelled = info.get("noise", {}), info["metric"] == "top1"
    head = "| build | top-1 agreement % | cosine |" + (" label top-1 % |" if labelled else "")
    budget = (f"budget: {info['metric']} drop <= {info['budget']} points; {info['samples']} evaluation samples; "
              "**chosen** = the search's choice per target")
    out = [f"### {name}", "", budget, "",
           head + " p50 ms (in turn) | quantize s |", "|---" * (6 if labelled else 5) + "|"]
    for r in rows[:-1]:
        if "error" in r:
            out.append(f"| {r['row']} | failed: {r['error']} |" + " |" * (4 if labelled else 3))
            continue
        label = f"**{r['row']} (chosen)**" if r.get("chosen") else r["row"]
        lab = f" {r['top1']:.2f} |" if labelled else ""
        out.append(f"| {label} | {r['agree']:.1f} | {r['cos']:.4f} |{lab} {r.get('p50_ms', float('nan')):.3f} | "
                   f"{r['seconds']:.0f} |")
    out.append("")
    out.extend(verdicts(rows))
    out.append("")
    out.append(f"in-turn window noisy: {noise.get('noisy')} (checks: {len(noise.get('checks', []))})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", action="store_true", help="also the MiniLM sentiment model (slow: 1,000 texts)")
    ap.add_argument("--skip-fashion", action="store_true")
    ap.add_argument("--skip-efficientnet", action="store_true")
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument("--stop-at-chosen", action="store_true",
                    help="per target, skip the recovery methods after the first one that meets the budget (the "
                         "search never builds them)")
    ap.add_argument("--eval-limit", type=int, default=None, help="score on the first N evaluation samples only")
    ap.add_argument("--quark-python", default=None,
                    help="the interpreter of a venv with amd-quark and torch for the AMD Quark AdaRound peer row "
                         "(default: the quark toolchain's, when installed)")
    ap.add_argument("--no-quark", action="store_true", help="leave the AMD Quark AdaRound peer row out")
    ap.add_argument("--olive-python", default=None,
                    help="the interpreter of a venv with olive-ai (and torch, onnxruntime, requests) for the Olive "
                         "OnnxStaticQuantization defaults peer row; without it the row is left out")
    ap.add_argument("--quark-iterations", type=int, default=50)
    ap.add_argument("--quark-samples", type=int, default=300)
    args = ap.parse_args()
    from edgepack.toolchains import executable

    python = None if args.no_quark else args.quark_python or executable("quark")
    quark = None if python is None else {
        "python": str(python), "iterations": args.quark_iterations, "samples": args.quark_samples}
    names = [n for n in PROJECTS if not (n == "minilm sentiment" and not args.text)
             and not (n == "fashion-mnist cnn" and args.skip_fashion)
             and not (n == "efficientnet-lite0" and args.skip_efficientnet)
             and not (n.startswith("mobilenetv2") and args.skip_mobilenet)]
    for name in names:
        work = Path(tempfile.mkdtemp(prefix="edgepack-int8-recovery-"))
        try:
            print(table(name, rows_for(name, PROJECTS[name], args.threads, work, args.stop_at_chosen,
                                       args.eval_limit, quark, args.olive_python)), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
