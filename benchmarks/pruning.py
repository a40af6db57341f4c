"""Pruning benchmark: ratio vs accuracy vs latency, each row one `edgepack build` run (the unpruned
INT8 model is compiled and timed in the same run as the pruned one).

Example CNN (Fashion-MNIST, accuracy on 10,000 test images): structured pruning to a MACs target with
the recovery fine-tuning of examples/fashion_mnist/edgepack-pruned.yaml, two allocations: every layer
alike ("uniform": only the classifier kept whole) and the example file's ("time-weighted": classifier.1
keeps 1/8 of its units, features.0 whole, the search prunes the rest), and "automatic": a latency goal
(prune.target_latency, no per-layer shares written) with the same recovery, the allocation searched on
the target's per-layer timings. ResNet-50-sized model (random weights): latency only; the automatic row
recovers by one epoch of distillation. After the builds, the bundled models (and the unpruned ones) are
timed again all in turn in one window ("in one window" column): ratios between rows from separate
builds are only comparable there.

    python benchmarks/pruning.py [--target cpu] [--skip-resnet] [--skip-example] [--auto-only]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion_mnist"
sys.path.insert(0, str(ROOT / "benchmarks"))


def row(label: str, manifest) -> dict:
    p, m = manifest.prune, manifest.measurements
    acc = p["accuracy_fp32"]
    return {"model": label, "macs_removed": p["macs_removed"], "params_removed": p["params_removed"],
            "fp32_before": acc["before_pruning"], "fp32_pruned": acc["after_pruning"],
            "fp32_recovered": acc.get("after_recovery"), "int8": m.compiled.accuracy["value"],
            "metric": m.compiled.accuracy["metric"], "unpruned_p50": p["latency_effect"]["unpruned_p50_ms"],
            "pruned_p50": p["latency_effect"]["pruned_p50_ms"], "speedup": p["latency_effect"]["speedup_p50"],
            "search": p.get("latency_search")}


def run(project_file: Path, target: str, out: Path) -> dict:
    from edgepack.api import build

    [res] = build(project_file, [target], out, tune=False)
    BUNDLES.append(res.bundle)
    return res.manifest


BUNDLES: list[Path] = []


def in_one_window(bundles: list[Path], unpruned: Path | None, target: str, tmp: Path) -> dict[str, float]:
    """Every bundled model (and ``unpruned``, a bundle of the unpruned model) timed in turn in one window:
    each one's p50 over the unpruned one's."""
    import tarfile

    from edgepack.backends import get_backend
    from edgepack.bundle import open_bundle
    from edgepack.measure.latency import measure_in_turn
    from edgepack.target import load_target

    profile = load_target(target)
    backend = get_backend(profile.backend)
    runners, sample = {}, None
    for b in ([unpruned] if unpruned else []) + bundles:
        d = tmp / f"window-{len(runners)}"
        with tarfile.open(b) as t:
            t.extractall(d, filter="data")
        with open_bundle(b) as opened:
            model_file = opened.manifest.runtime.model_file
        runners[b.name] = backend.host_runner(d / model_file, 2)[0]
        if sample is None:
            import numpy as np

            inp = opened.manifest.runtime.inputs[0]
            shape = [1 if not isinstance(x, int) else x for x in inp["shape"]]
            sample = {inp["name"]: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    lat, _ = measure_in_turn(runners, sample, 10, 300, 60, 2)
    base = next(iter(lat))
    return {k: round(v["p50_ms"] / lat[base]["p50_ms"], 3) for k, v in lat.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-example", action="store_true")
    ap.add_argument("--auto-only", action="store_true", help="only the automatic rows and the hand allocation at 40%%")
    args = ap.parse_args()
    rows = []
    windows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_example:
            if not (EXAMPLE / "data" / "finetune.npz").exists() or not (EXAMPLE / "weights.pt").exists():
                subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, check=True)
            base = yaml.safe_load((EXAMPLE / "edgepack.yaml").read_text())
            example_prune = yaml.safe_load((EXAMPLE / "edgepack-pruned.yaml").read_text())["prune"]
            uniform = {k: v for k, v in example_prune.items() if k not in ("ignore", "layers", "target_macs")}
            hand = {k: v for k, v in example_prune.items() if k != "target_macs"}
            auto = {k: v for k, v in example_prune.items() if k not in ("ignore", "layers", "target_macs")}
            plans = [] if args.auto_only else [("uniform", goal, uniform) for goal in (0.2, 0.4, 0.6)]
            plans += [("time-weighted", goal, hand) for goal in ((0.4,) if args.auto_only else (0.3, 0.4, 0.5))]
            plans += [("automatic", goal, auto) for goal in ((0.7,) if args.auto_only else (0.8, 0.7))]
            BUNDLES.clear()
            for alloc, goal, prune in plans:
                cfg = dict(base, name=f"fashion-pruned-{alloc}-{int(goal * 100)}",
                           acceptance={"max_accuracy_drop": 1.0} if alloc == "automatic" else {})
                cfg["prune"] = {**prune, ("target_latency" if alloc == "automatic" else "target_macs"): goal}
                f = EXAMPLE / f".bench-prune-{alloc}-{int(goal * 100)}.yaml"
                f.write_text(yaml.safe_dump(cfg))
                try:
                    print(f"[example] {alloc} {'target_latency' if alloc == 'automatic' else 'target_macs'} {goal} ...",
                          file=sys.stderr, flush=True)
                    rows.append(row(f"fashion-cnn, {alloc}" + (f" (goal {goal}x)" if alloc == "automatic" else ""),
                                    run(f, args.target, tmp / f.stem)))
                finally:
                    f.unlink()
            f = EXAMPLE / ".bench-prune-unpruned.yaml"
            f.write_text(yaml.safe_dump(dict(base, name="fashion-unpruned", acceptance={})))
            try:
                from edgepack.api import build

                [res] = build(f, [args.target], tmp / "unpruned", tune=False)
            finally:
                f.unlink()
            windows.append(("fashion-cnn", in_one_window(list(BUNDLES), res.bundle, args.target, tmp)))
            for r, b in zip(rows[-len(BUNDLES):], BUNDLES):
                r["window"] = windows[-1][1][b.name]
        if not args.skip_resnet:
            from cpu_int8 import RESNET_DATA, RESNET_MODEL, RESNET_PROJECT

            proj = tmp / "resnet"
            proj.mkdir()
            (proj / "model.py").write_text(RESNET_MODEL)
            (proj / "data.py").write_text(RESNET_DATA)
            BUNDLES.clear()
            plans = [] if args.auto_only else [("ratio", r) for r in (0.2, 0.4, 0.6)]
            for kind, amount in plans + [("target_latency", 0.5)]:
                cfg = yaml.safe_load(RESNET_PROJECT)
                cfg["prune"] = {"method": "structured", kind: amount}
                if kind == "target_latency":  # recovery: one epoch of distillation on the calibration images
                    cfg["prune"]["finetune"] = {"epochs": 1}  # as --prune-finetune-epochs 1
                f = proj / f"prune-{kind}-{int(amount * 100)}.yaml"
                f.write_text(yaml.safe_dump(cfg))
                print(f"[resnet] {kind} {amount} ...", file=sys.stderr, flush=True)
                label = "resnet-50-sized (random, latency only)" + (f", automatic (goal {amount}x)"
                                                                     if kind == "target_latency" else "")
                rows.append(row(label, run(f, args.target, tmp / f.stem)))
    print(f"\ntarget {args.target}; FP32 accuracy by PyTorch on the evaluation set; INT8 accuracy and p50 latency "
          "on the target's runtime on this host, pruned and unpruned compiled and timed in turn in the same build\n")
    print("| model | MACs removed | params removed | FP32 before | FP32 pruned | FP32 recovered | INT8 | "
          "unpruned INT8 p50 ms | pruned INT8 p50 ms | speed-up | pruned/unpruned p50 | in one window |")
    print("|" + "---|" * 12)
    for r in rows:
        rec = "-" if r["fp32_recovered"] is None else f"{r['fp32_recovered']:.2f}"
        win = f"{r['window']:.3f}x" if r.get("window") is not None else "-"
        print(f"| {r['model']} | {r['macs_removed']:.0%} | {r['params_removed']:.0%} | {r['fp32_before']:.2f} | "
              f"{r['fp32_pruned']:.2f} | {rec} | {r['int8']:.2f} {r['metric']} | {r['unpruned_p50']:.3f} | "
              f"{r['pruned_p50']:.3f} | {r['speedup']:.2f}x | {1 / r['speedup']:.3f}x | {win} |")
    for r in rows:
        s = r.get("search")
        if s:
            curve = "; ".join(f"{p['round']}: {p.get('measured_ratio') or '-'} measured / {p['predicted_ratio']} "
                              f"predicted, fp32 {p.get('fp32_accuracy') or '-'}" for p in s["trade_curve"])
            print(f"\n{r['model']}: goal {s['goal']['ratio']}x {'reached' if s['reached'] else 'NOT reached'} in the "
                  f"search; allocation {s['allocation']}; trade curve {curve}")


if __name__ == "__main__":
    main()
