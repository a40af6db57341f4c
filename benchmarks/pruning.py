"""Pruning benchmark: ratio vs accuracy vs latency, each row one `edgepack build` run (the unpruned
INT8 model is compiled and timed in the same run as the pruned one).

Example CNN (Fashion-MNIST, accuracy on 10,000 test images): structured pruning to a MACs target with
the recovery fine-tuning of examples/fashion_mnist/edgepack-pruned.yaml, two allocations: every layer
alike ("uniform": only the classifier kept whole) and the example file's ("time-weighted": classifier.1
keeps 1/8 of its units, features.0 whole, the search prunes the rest). ResNet-50-sized model (random
weights): latency only, no recovery.

    python benchmarks/pruning.py [--target cpu] [--skip-resnet] [--skip-example]
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
            "pruned_p50": p["latency_effect"]["pruned_p50_ms"], "speedup": p["latency_effect"]["speedup_p50"]}


def run(project_file: Path, target: str, out: Path) -> dict:
    from edgepack.api import build

    [res] = build(project_file, [target], out, tune=False)
    return res.manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="cpu")
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--skip-example", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_example:
            if not (EXAMPLE / "data" / "finetune.npz").exists() or not (EXAMPLE / "weights.pt").exists():
                subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, check=True)
            base = yaml.safe_load((EXAMPLE / "edgepack.yaml").read_text())
            example_prune = yaml.safe_load((EXAMPLE / "edgepack-pruned.yaml").read_text())["prune"]
            uniform = {k: v for k, v in example_prune.items() if k not in ("ignore", "layers", "target_macs")}
            plans = [("uniform", goal, uniform) for goal in (0.2, 0.4, 0.6)]
            plans += [("time-weighted", goal, {k: v for k, v in example_prune.items() if k != "target_macs"})
                      for goal in (0.3, 0.4, 0.5)]
            for alloc, goal, prune in plans:
                cfg = dict(base, name=f"fashion-pruned-{alloc}-{int(goal * 100)}", acceptance={})
                cfg["prune"] = {**prune, "target_macs": goal}
                f = EXAMPLE / f".bench-prune-{alloc}-{int(goal * 100)}.yaml"
                f.write_text(yaml.safe_dump(cfg))
                try:
                    print(f"[example] {alloc} target_macs {goal} ...", file=sys.stderr, flush=True)
                    rows.append(row(f"fashion-cnn, {alloc}", run(f, args.target, tmp / f.stem)))
                finally:
                    f.unlink()
        if not args.skip_resnet:
            from cpu_int8 import RESNET_DATA, RESNET_MODEL, RESNET_PROJECT

            proj = tmp / "resnet"
            proj.mkdir()
            (proj / "model.py").write_text(RESNET_MODEL)
            (proj / "data.py").write_text(RESNET_DATA)
            for ratio in (0.2, 0.4, 0.6):
                cfg = yaml.safe_load(RESNET_PROJECT)
                cfg["prune"] = {"method": "structured", "ratio": ratio}
                f = proj / f"prune-{int(ratio * 100)}.yaml"
                f.write_text(yaml.safe_dump(cfg))
                print(f"[resnet] ratio {ratio} ...", file=sys.stderr, flush=True)
                rows.append(row("resnet-50-sized (random, latency only)", run(f, args.target, tmp / f.stem)))
    print(f"\ntarget {args.target}; FP32 accuracy by PyTorch on the evaluation set; INT8 accuracy and p50 latency "
          "on the target's runtime on this host, pruned and unpruned compiled and timed in turn in the same build\n")
    print("| model | MACs removed | params removed | FP32 before | FP32 pruned | FP32 recovered | INT8 | "
          "unpruned INT8 p50 ms | pruned INT8 p50 ms | speed-up |")
    print("|" + "---|" * 10)
    for r in rows:
        rec = "-" if r["fp32_recovered"] is None else f"{r['fp32_recovered']:.2f}"
        print(f"| {r['model']} | {r['macs_removed']:.0%} | {r['params_removed']:.0%} | {r['fp32_before']:.2f} | "
              f"{r['fp32_pruned']:.2f} | {rec} | {r['int8']:.2f} {r['metric']} | {r['unpruned_p50']:.3f} | "
              f"{r['pruned_p50']:.3f} | {r['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
