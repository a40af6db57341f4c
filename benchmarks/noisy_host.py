"""Speed-ups on a busy build host: each project built for `cpu` and `onnx` on an idle machine, then
again with CPU-burning processes on every core; prints the in-turn speed-ups, the noise checks and
whether the loaded figure is within 15% of the idle one or flagged noisy (never silently wrong).

    python benchmarks/noisy_host.py [--burners 2] [--skip-resnet]

Projects: the Fashion-MNIST example (train it first: `make example`) and a ResNet-50-sized model
(transformers ResNetConfig defaults, random weights), the same as benchmarks/cpu_int8.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_int8  # noqa: E402  (the ResNet-50-sized project's files)

EDGEPACK = [sys.executable, "-m", "edgepack.cli.main"]


def _resnet(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "edgepack.yaml").write_text(cpu_int8.RESNET_PROJECT)
    (root / "model.py").write_text(cpu_int8.RESNET_MODEL)
    (root / "data.py").write_text(cpu_int8.RESNET_DATA)
    return root


def _build(project: Path, out: Path) -> dict[str, dict]:
    p = subprocess.run([*EDGEPACK, "build", "--project", str(project), "-t", "cpu", "-t", "onnx", "--out", str(out),
                        "--quiet", "--format", "json"], capture_output=True, text=True)
    if p.returncode not in (0, 3):
        raise SystemExit(p.stderr[-2000:])
    rows = {}
    for h in json.loads(p.stdout):
        with tarfile.open(h["bundle"]) as tar:
            c = json.load(tar.extractfile("manifest.json"))["measurements"]["comparison"]
        last = c["in_turn"]["noise"]["checks"][-1]
        rows[h["target"]] = {"speedup": c["speedup_p50"], "noisy": c["noisy"], "spread": last["worst"],
                             "others": last["others_cpu_share"], "windows": c["in_turn"]["noise"]["tries"]}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burners", type=int, default=2)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="noisy-host-"))
    projects = {"example": Path(__file__).resolve().parents[1] / "examples" / "fashion_mnist"}
    if not args.skip_resnet:
        projects["ResNet-50-sized"] = _resnet(tmp / "resnet")
    print("| model | target | idle speed-up | loaded speed-up | loaded/idle | loaded: noisy | round spread | "
          "others' CPU share | windows | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, project in projects.items():
        idle = _build(project, tmp / f"{name}-idle")
        burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
        try:
            busy = _build(project, tmp / f"{name}-busy")
        finally:
            for b in burners:
                b.kill()
        for target in idle:
            i, b = idle[target], busy[target]
            ratio = b["speedup"] / i["speedup"]
            ok = abs(ratio - 1) <= 0.15 or b["noisy"]
            print(f"| {name} | {target} | {i['speedup']:.3f}x | {b['speedup']:.3f}x | {ratio:.2f} | {b['noisy']} | "
                  f"{b['spread']:.1%} | {b['others']} | {b['windows']} | {'ok' if ok else 'SILENTLY WRONG'} |")


if __name__ == "__main__":
    main()
