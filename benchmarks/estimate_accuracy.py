"""How far to trust `edgepack compare`'s estimates: roofline estimate vs measured p50 on this host.

For the Fashion-MNIST example and a ResNet-50-sized model (transformers ResNetConfig, random weights),
`edgepack compare --targets cpu,onnx` builds (or reuses) the bundles, measures them on this host and
estimates them the way it estimates devices that are not here. Three calibrations, none fitted on the
model being estimated:

  suite        what `compare` uses: overhead + efficiency fitted on the generated reference CNNs
  other+tiny   fitted on the *other* model plus the smallest reference CNN (which pins the overhead)
  other only   efficiency fitted on the other model alone (no overhead term)

    python benchmarks/estimate_accuracy.py [--suite standard|quick] [--skip-resnet] [--work DIR] [--same-session]

The bundles' p50 was measured when they were built; on a shared machine load drifts between that moment
and the calibration. `--same-session` times the models again, interleaved with the reference models in
the same rounds, and reports that error too (the estimator's error with less drift).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_int8 import EXAMPLE, RESNET_DATA, RESNET_MODEL, RESNET_PROJECT  # noqa: E402


def _resnet_project(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "edgepack.yaml").write_text(RESNET_PROJECT)
    (root / "model.py").write_text(RESNET_MODEL)
    (root / "data.py").write_text(RESNET_DATA)
    return root


def run(label: str, project: Path, out: Path, suite: str) -> dict:
    from edgepack.api import compare

    def progress(phase: str, status: str, detail: str) -> None:
        print(f"[{label}] {phase} {status} {detail}", file=sys.stderr, flush=True)

    c = compare(project, ["cpu", "onnx"], out, suite=suite, progress=progress)
    return {"label": label, "comparison": c, "project": project}


def cross(rows: dict, cals: dict) -> list[dict]:
    """Per (model, runtime): the estimates under the three calibrations and their errors."""
    from edgepack.measure.estimate import fit

    out = []
    for (model, runtime), r in rows.items():
        other = next(((m, rt) for (m, rt) in rows if rt == runtime and m != model), None)
        measured = r.p50_ms.value
        roof = r.estimate["roofline_ms"]
        entry = {"model": model, "runtime": runtime, "gmacs": r.estimate["model"]["gmacs"], "measured": measured,
                 "p90": r.p90_ms.value, "suite": r.estimate["p50_ms"], "roofline": roof,
                 "bound": r.estimate["bound"]}
        if other is not None:
            o = rows[other]
            tiny = next(p for p in cals[runtime]["points"] if p["model"] == "ref-tiny")
            both = fit([(other[0], o.estimate["roofline_ms"], o.p50_ms.value),
                        ("ref-tiny", tiny["roofline_ms"], tiny["measured_ms"])], runtime, "host")
            alone = fit([(other[0], o.estimate["roofline_ms"], o.p50_ms.value)], runtime, "host")
            entry["other+tiny"] = both.latency_ms(roof)
            entry["other only"] = alone.latency_ms(roof)
            entry["other"] = other[0]
        out.append(entry)
    return out


def same_session(runs: list[dict], work: Path, suite: str) -> list[dict]:
    """Time the bundles' models again, interleaved with the reference models in the same rounds, fit the
    suite, estimate the models: the estimator's error without the run-to-run drift of a shared machine."""
    import contextlib

    import numpy as np

    from edgepack.backends import get_backend
    from edgepack.bundle import open_bundle
    from edgepack.compare.rows import fp32_counts
    from edgepack.loaders.resolve import Resolved
    from edgepack.measure.calibrate import ROUNDS, host_peaks, load_suite, time_rounds
    from edgepack.measure.estimate import fit, roofline_ms
    from edgepack.project import load_project
    from edgepack.target import load_target

    found = []
    for target in ("cpu", "onnx"):
        prof = load_target(target)
        backend = get_backend(prof.backend)
        options = backend.options(prof.backend_options, target)
        threads = prof.measurement.threads
        peaks, _ = host_peaks(prof.precision, threads)
        print(f"[same session] {target}: compiling the reference models", file=sys.stderr, flush=True)
        suite_runners = load_suite(prof, backend, options, work / "same-session", threads, suite, peaks)
        with contextlib.ExitStack() as stack:
            user = []
            for r in runs:
                row = next(x for x in r["comparison"].rows if x.target == target)
                opened = stack.enter_context(open_bundle(Path(row.bundle)))
                m = opened.manifest
                runner = backend.load(opened.file(m.runtime.model_file), threads)
                project = load_project(r["project"])
                rng = np.random.default_rng(0)
                sample = {s.name: rng.standard_normal(s.concrete_shape(1)).astype(np.float32)
                          for s in project.input_specs()}
                counts = fp32_counts(Resolved(project), r["comparison"].out / ".edgepack-compare", 1, lambda *a: None)
                user.append((r["label"], runner, sample, roofline_ms(counts, peaks)["roofline_ms"]))
            print(f"[same session] {target}: {ROUNDS} interleaved timing rounds", file=sys.stderr, flush=True)
            p50s = time_rounds([(n, x, s) for n, x, s, _ in suite_runners + user], threads)
        cal = fit([(n, roof, float(np.median(p50s[n]))) for n, _, _, roof in suite_runners],
                  f"{backend.name} {prof.precision}", "host")
        for name, _, _, roof in user:
            found.append({"model": name, "runtime": cal.runtime, "measured": float(np.median(p50s[name])),
                          "estimate": cal.latency_ms(roof), "efficiency": cal.efficiency,
                          "overhead": cal.overhead_ms})
    return found


def err(est: float | None, measured: float) -> str:
    return f"{est:.3f} ({100 * (est - measured) / measured:+.1f}%)" if est is not None else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="standard", choices=["standard", "quick"])
    ap.add_argument("--skip-resnet", action="store_true")
    ap.add_argument("--work", type=Path, help="keep bundles and the calibration cache here (reused next time)")
    ap.add_argument("--same-session", action="store_true",
                    help="also time the models again interleaved with a fresh suite calibration (lower drift)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if not (EXAMPLE / "weights.pt").exists():
            subprocess.run([sys.executable, "train.py"], cwd=EXAMPLE, check=True)
        # one out folder for both models: one calibration cache, so both are estimated with the same fit
        runs = [run("fashion-cnn (example)", EXAMPLE, work / "dist", args.suite)]
        if not args.skip_resnet:
            proj = _resnet_project(work / "resnet50")
            runs.append(run("resnet-50-sized (random weights)", proj, work / "dist", args.suite))
        rows, cals = {}, {}
        for r in runs:
            for row in r["comparison"].rows:
                if row.estimate_error_pct is not None:
                    rows[(r["label"], f"{row.backend} {row.precision}")] = row
            for cal in r["comparison"].calibrations:
                cals.setdefault(cal["runtime"], cal)
        from edgepack.measure.host import host_info

        h = host_info()
        first = runs[0]["comparison"]
        print(f"\nhost: {h['cpu']} ({', '.join(h['isa'])}), {h['logical_cpus']} logical CPUs; p50 of batch-1 runs "
              f"measured by the build; estimates in ms (error vs measured)\n")
        print("| model | runtime | GMAC | bound | measured p50 ms | estimate: suite | estimate: other model + ref-tiny "
              "| estimate: other model only |")
        print("|" + "---|" * 8)
        for e in cross(rows, cals):
            print(f"| {e['model']} | {e['runtime']} | {e['gmacs']} | {e['bound']} | {e['measured']:.3f} | "
                  f"{err(e['suite'], e['measured'])} | {err(e.get('other+tiny'), e['measured'])} | "
                  f"{err(e.get('other only'), e['measured'])} |")
        print("\ncalibrations on the reference suite (in-sample fit):")
        for cal in cals.values():
            pts = ", ".join(f"{p['model']} {p['measured_ms']:.3f}->{p['fitted_ms']:.3f} ({p['error_pct']:+.1f}%)"
                            for p in cal["points"])
            print(f"  {cal['runtime']}: efficiency {cal['efficiency']:.3f}, overhead {cal['overhead_ms']:.3f} ms; {pts}")
            hp = cal["host_peaks"]
            print(f"    host peaks: int8 {hp['peak_int8_tops']['value']} TOPS ({hp['peak_int8_tops']['source']}); "
                  f"bandwidth {hp['memory_bandwidth_gbs']['value']} GB/s ({hp['memory_bandwidth_gbs']['source']})")
        for n in first.notes:
            print(f"note: {n}")
        if args.same_session:
            print("\nsame session: each model's p50 re-timed in the same interleaved rounds as the reference models "
                  "(median of the rounds' p50s); estimate from the suite fit of that session\n")
            print("| model | runtime | re-timed p50 ms | estimate ms (error) | efficiency | overhead ms |")
            print("|" + "---|" * 6)
            for e in same_session(runs, work, args.suite):
                print(f"| {e['model']} | {e['runtime']} | {e['measured']:.3f} | {err(e['estimate'], e['measured'])} | "
                      f"{e['efficiency']:.3f} | {e['overhead']:.3f} |")


if __name__ == "__main__":
    main()
