"""`--cluster` overhead: wall time of (a) `compare` over 4 targets of the Fashion-MNIST example and (b) the
EfficientNet-Lite0 per-layer sensitivity ranking (the tuning search's ranking step), each run locally
and on a local Ray cluster (127.0.0.1, no dashboard) of 1 node (2 CPUs) and of 2 nodes (1 CPU each),
one run each, on this machine. Then a projection (labelled as one) of the wall time at 8 and 32 nodes
from the measured per-task times and the serial part.

On one 2-core machine a cluster cannot be faster than the local run: what is measured is its overhead.

    python benchmarks/cluster.py [--samples 16] [--skip-compare] [--skip-ranking] [--json out.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the nodes and this driver on 127.0.0.1
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "examples" / "fashion_mnist"
EFFNET = ROOT / "examples" / "efficientnet_lite0"
TARGETS = ["cpu", "onnx", "android-arm64", "rpi5"]
SHAPES = {"1 node": [2], "2 nodes": [1, 1]}  # CPUs per node: both on this machine's 2 cores
SLOTS_PER_NODE = 2  # for the projection: nodes like this machine, one task per core


class LocalCluster:
    def __init__(self, cpus: list[int]):
        import ray
        from ray.cluster_utils import Cluster

        self.ray = ray
        self.c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus[0], "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        for n in cpus[1:]:
            self.c.add_node(num_cpus=n, node_ip_address="127.0.0.1")
        self.c.wait_for_nodes()
        self.address = self.c.address

    def close(self) -> None:
        self.ray.shutdown()
        self.c.shutdown()


def makespan(tasks: list[float], slots: int) -> float:
    """Longest-first list scheduling of ``tasks`` over ``slots``: the finish time of the last."""
    heap = [0.0] * max(1, slots)
    for t in sorted(tasks, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


def run_compare(cluster: str | None) -> dict:
    from edgepack.compare import compare

    first: dict[str, float] = {}
    last: dict[str, float] = {}
    stages: list[tuple[str, float]] = []

    def on_event(e) -> None:
        key = e[0].split(" @ ")[0]
        now = time.monotonic()
        first.setdefault(key, now)
        last[key] = now
        if e[2] == "done" and e[3] is not None:
            stages.append((e[1], e[3]))

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        t = time.monotonic()
        c = compare(EXAMPLE, TARGETS, Path(tmp), suite="quick", cluster=cluster, on_build_event=on_event)
        wall = time.monotonic() - t
    statuses = {r.target: r.status for r in c.rows}
    tasks = {k: round(last[k] - first[k], 2) for k in first}  # a task's first to last progress event
    own = {t: round(sum(s for n, s in stages if t in n.split()), 2) for t in TARGETS}
    shared = round(sum(s for n, s in stages if not any(t in n.split() for t in TARGETS)), 2)
    return {"wall_s": round(wall, 2), "statuses": statuses, "task_s": tasks, "stage_s_per_target": own,
            "stage_s_shared": shared}


def ranking_inputs(tmp: Path, samples: int):
    import torch

    from edgepack.build.data import read_data
    from edgepack.loaders.resolve import resolve
    from edgepack.project import load_project
    from edgepack.target import load_target

    sys.path.insert(0, str(EFFNET))
    import model as effnet  # noqa: E402  (the example's model.py)

    onnx_path = tmp / "efficientnet-lite0.onnx"
    torch.onnx.export(effnet.build(), (torch.zeros(1, 3, 224, 224),), str(onnx_path), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False)
    project = load_project(EFFNET / "edgepack.yaml")
    data = read_data(resolve(project, tmp / "source"), load_target("onnx"), "calibration")
    return onnx_path, data


def run_ranking(onnx_path: Path, data, samples: int, cluster: str | None, tmp: Path) -> dict:
    from edgepack.tuning import rank_layers

    per_layer: list[float] = []
    map_ = None
    if cluster is None:
        def map_(scorer, names):  # the serial loop's work, one layer after another, each timed
            out = []
            for n in names:
                t0 = time.monotonic()
                out.append(scorer(n))
                per_layer.append(time.monotonic() - t0)
            return out
    else:
        from edgepack.cluster.ranking import cluster_layer_map

        map_ = cluster_layer_map(cluster)
    t = time.monotonic()
    ranked = rank_layers(onnx_path, data, tmp / f"rank-{time.time_ns()}", samples=samples, map=map_)
    wall = time.monotonic() - t
    return {"wall_s": round(wall, 2), "layers": len(ranked), "top5": [n for n, _ in ranked[:5]],
            "per_layer_s": [round(x, 3) for x in per_layer]}


def projection(serial_s: float, tasks: list[float], per_task_overhead_s: float, slots: int) -> float:
    return serial_s + makespan([t + per_task_overhead_s for t in tasks], slots)


def _noop() -> int:
    return os.getpid()


def fixed_costs() -> dict:
    """What --cluster adds whatever the work: connecting, packing the project, putting it in the object
    store, and a task's round trip (a no-op task, median of 5), on a 1-node cluster (2 CPUs)."""
    from edgepack.cluster.connect import connect
    from edgepack.cluster.ship import pack

    lc = LocalCluster([2])
    try:
        t = time.monotonic()
        ray = connect(lc.address)
        connect_s = time.monotonic() - t
        t = time.monotonic()
        payload = pack(EXAMPLE / "edgepack.yaml", [], EXAMPLE / "dist")
        pack_s = time.monotonic() - t
        t = time.monotonic()
        ray.get(ray.put(payload.data))
        put_s = time.monotonic() - t
        task = ray.remote(_noop).options(num_cpus=1)
        ray.get(task.remote())  # a worker started
        trips = []
        for _ in range(5):
            t = time.monotonic()
            ray.get(task.remote())
            trips.append(time.monotonic() - t)
        return {"connect_s": round(connect_s, 3), "pack_s": round(pack_s, 3), "payload_mb": round(len(payload.data) / 1e6, 2),
                "put_s": round(put_s, 3), "task_round_trip_s": round(sorted(trips)[2], 4)}
    finally:
        lc.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16, help="calibration samples per ranking score (edgepack: 32)")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument("--skip-ranking", action="store_true")
    ap.add_argument("--fixed-costs", action="store_true", help="also time connect, pack, put and a task round trip")
    ap.add_argument("--rounds", type=int, default=0, help="then N more rounds of compare local vs 1 node, the order "
                    "alternating (a shared host's load falls on both alike); the overhead is the median's")
    ap.add_argument("--ranking-1cpu", action="store_true", help="also rank on a 1-node, 1-CPU cluster (serial tasks, "
                    "like the local loop): the ranking's overhead")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results: dict = {"host_cpus": os.cpu_count(), "targets": TARGETS, "samples": args.samples,
                     "load_average_at_start": os.getloadavg()[0]}
    if args.fixed_costs:
        results["fixed_costs"] = fixed_costs()
        print("fixed costs", results["fixed_costs"], flush=True)
    if not args.skip_compare:
        results["compare"] = {"local": run_compare(None)}
        print("compare local", results["compare"]["local"], flush=True)
        for name, cpus in SHAPES.items():
            lc = LocalCluster(cpus)
            try:
                results["compare"][name] = run_compare(lc.address)
            finally:
                lc.close()
            print("compare", name, results["compare"][name], flush=True)
    if args.rounds:
        rounds = results["compare_rounds"] = []
        for i in range(args.rounds):
            order = ["1 node", "local"] if i % 2 == 0 else ["local", "1 node"]
            walls = {}
            for which in order:
                if which == "local":
                    walls[which] = run_compare(None)["wall_s"]
                else:
                    lc = LocalCluster(SHAPES["1 node"])
                    try:
                        walls[which] = run_compare(lc.address)["wall_s"]
                    finally:
                        lc.close()
            rounds.append(walls)
            print("round", i, walls, flush=True)
    if args.ranking_1cpu:
        with tempfile.TemporaryDirectory(prefix="bench-rank-") as tmp:
            onnx_path, data = ranking_inputs(Path(tmp), args.samples)
            r = results["ranking_1cpu"] = {"local": run_ranking(onnx_path, data, args.samples, None, Path(tmp))}
            lc = LocalCluster([1])
            try:
                r["1 node, 1 CPU"] = run_ranking(onnx_path, data, args.samples, lc.address, Path(tmp))
            finally:
                lc.close()
            print("ranking 1 CPU", {k: v["wall_s"] for k, v in r.items()}, flush=True)
    if not args.skip_ranking:
        with tempfile.TemporaryDirectory(prefix="bench-rank-") as tmp:
            onnx_path, data = ranking_inputs(Path(tmp), args.samples)
            results["ranking"] = {"local": run_ranking(onnx_path, data, args.samples, None, Path(tmp))}
            print("ranking local", {k: v for k, v in results["ranking"]["local"].items() if k != "per_layer_s"},
                  flush=True)
            for name, cpus in SHAPES.items():
                lc = LocalCluster(cpus)
                try:
                    results["ranking"][name] = run_ranking(onnx_path, data, args.samples, lc.address, Path(tmp))
                finally:
                    lc.close()
                print("ranking", name, results["ranking"][name], flush=True)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results))


def table(r: dict) -> str:
    """Measured walls, and the projection: serial part + the measured tasks list-scheduled over the slots
    of N nodes like this one (a compare task reserves 2 CPUs: 1 per node; a ranking task 1 CPU: 2 per node)."""
    lines = ["| work | local s | 1 node s (overhead vs local) | 2 nodes s (overhead vs local) | tasks | serial part s "
             "| projected 8 nodes s | projected 32 nodes s |", "|---|---|---|---|---|---|---|---|"]
    for key, label in (("compare", f"compare, {len(r['targets'])} targets (Fashion-MNIST CNN)"),
                       ("ranking", f"sensitivity ranking, EfficientNet-Lite0 ({r['samples']} samples)")):
        if key not in r:
            continue
        d = r[key]
        local, one = d["local"]["wall_s"], d["1 node"]["wall_s"]
        cells = [f"{d[s]['wall_s']:.1f} ({(d[s]['wall_s'] / local - 1) * 100:+.0f}%)" for s in SHAPES]
        if key == "ranking":
            tasks, per_node = d["local"]["per_layer_s"], 2
            serial = max(0.0, local - sum(tasks))  # preprocess, ranges, FP32 outputs: before any task
            # what the cluster added per task at 1 node (each slot ran len/2 tasks in turn): kept in the projection
            extra = max(0.0, one - projection(serial, tasks, 0.0, per_node)) / max(1.0, len(tasks) / per_node)
        else:  # projected: each target its own task (room for all at 8 nodes) = the shared stages + its own
            one_task = sum(d["1 node"]["task_s"].values())
            serial = max(0.0, one - one_task)  # plan, reuse, estimates, Ray's start-up: on the driver
            scale = one_task / max(1e-9, d["1 node"]["stage_s_shared"] + sum(d["1 node"]["stage_s_per_target"].values()))
            tasks = [scale * (d["1 node"]["stage_s_shared"] + own) for own in d["1 node"]["stage_s_per_target"].values()]
            per_node, extra = 1, 0.0
        proj = [f"{projection(serial, tasks, extra, n * per_node):.1f}" for n in (8, 32)]
        lines.append(f"| {label} | {local:.1f} | " + " | ".join(cells) + f" | {len(tasks)} x {sum(tasks) / len(tasks):.2f} s "
                     f"mean | {serial:.1f} | " + " | ".join(proj) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
