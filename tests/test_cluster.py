"""`--cluster`: builds and the sensitivity ranking as tasks on a real Ray cluster on 127.0.0.1 (a head and
a second node, one CPU each, no dashboard), against the same work done locally."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgepack.cli.app import app
from tests.backends.contract import samples, tiny_onnx
from tests.conftest import edit_yaml

# a head bound to 127.0.0.1: the driver and both nodes name themselves by the loopback address too
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
runner = CliRunner()
# on two one-CPU nodes the targets go to two tasks in turn: (cpu, onnx) sharing their export and
# android-arm64 (the slowest build) alone, so neither task waits on the other much
TARGETS = ["cpu", "android-arm64", "onnx"]


@pytest.fixture(scope="module")
def cluster():
    """A head and a second node on 127.0.0.1, one CPU each; this process is the driver."""
    pytest.importorskip("ray")
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    try:
        yield c.address
    finally:
        ray.shutdown()
        c.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_digests(bundle: Path, tmp: Path) -> dict[str, str]:
    """sha256 of each model file, less what depends on the process rather than the build: an exported
    ONNX graph's per-node metadata (source paths, torch's per-process module hash) and OpenVINO's .xml
    (layer names from a process-wide counter; its weights are the .bin). Two local runs differ there too."""
    import onnx

    from edgepack.bundle import read_archive

    read_archive(bundle, tmp)
    found = {}
    for f in sorted((tmp / "model").rglob("*")):
        if f.suffix == ".xml" or not f.is_file():
            continue
        if f.suffix == ".onnx":
            m = onnx.load(str(f))
            for n in m.graph.node:
                del n.metadata_props[:]
            data = m.SerializeToString(deterministic=True)
        else:
            data = f.read_bytes()
        found[f.name] = hashlib.sha256(data).hexdigest()
    return found


def test_nothing_imports_ray_without_cluster():
    code = ("import sys; from edgepack.cli.app import app; import edgepack.compare, edgepack.build, edgepack.tuning; "
            "print('ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_an_unreachable_address_fails_fast_with_its_exit_code(trained_project, tmp_path, monkeypatch):
    """Fast by construction, not by a clock: one TCP connection with a 5 s timeout is all that is tried;
    Ray's own connect (which retries for minutes) is never reached."""
    from edgepack.cluster import connect

    tried = []
    real = socket.create_connection

    def create_connection(where, timeout=None, *a, **k):
        tried.append(timeout)
        return real(where, timeout, *a, **k)

    monkeypatch.setattr(socket, "create_connection", create_connection)
    if "ray" in sys.modules:
        monkeypatch.setattr(sys.modules["ray"], "init", lambda *a, **k: pytest.fail("ray.init was reached"))
    r = runner.invoke(app, ["compare", "-p", str(trained_project), "-t", "onnx", "--out", str(tmp_path),
                            "--cluster", f"127.0.0.1:{free_port()}", "-q"], env={"EDGEPACK_CLUSTER": ""})
    assert r.exit_code == 18, r.output
    assert "error: --cluster 127.0.0.1:" in r.output and "hint: start one with `ray start --head`" in r.output
    assert tried == [connect.CONNECT_TIMEOUT_S] and connect.CONNECT_TIMEOUT_S <= 5.0
    bad = runner.invoke(app, ["build", "-p", str(trained_project), "-t", "onnx", "--out", str(tmp_path)],
                        env={"EDGEPACK_CLUSTER": "not-an-address"})
    assert bad.exit_code == 2 and "expected HOST:PORT" in bad.output
    assert not list(tmp_path.glob("*.edgepack"))


def test_ship_packs_the_project_once_without_bundles_or_scratch(trained_project, tmp_path):
    from edgepack.cluster.ship import pack, unpack

    out = tmp_path / "dist"
    out.mkdir()
    (out / "old.edgepack").write_bytes(b"x")
    a, b = pack(trained_project / "edgepack.yaml", [], out), pack(trained_project / "edgepack.yaml", [], out)
    assert a.digest == b.digest and a.files == b.files >= 5
    names = zipfile.ZipFile(__import__("io").BytesIO(a.data)).namelist()
    assert "project/edgepack.yaml" in names and not any(n.endswith(".edgepack") for n in names)
    root = unpack(a.data, tmp_path / "in")
    assert (root / a.project_file).read_bytes() == (trained_project / "edgepack.yaml").read_bytes()


@pytest.fixture(scope="module")
def local_and_cluster(cluster, trained_project, built, tmp_path_factory):
    """The targets compared here and on the cluster. What is not a build on the cluster is done once:
    the local side starts from the session's cpu and onnx bundles (the same project built here, taken
    by compare's own reuse rule, else rebuilt) and builds android-arm64; the cluster side starts from
    the local side's FP32 export and host calibrations, which compare makes in this process with or
    without a cluster (cached by content and host), so what it does is the three builds as tasks."""
    from edgepack.api import compare
    from edgepack.compare.model import WORK

    local_out = tmp_path_factory.mktemp("local")
    for t in ("cpu", "onnx"):
        shutil.copy2(built[0] / f"digits-1.2.3-{t}.edgepack", local_out)
    local = compare(trained_project, TARGETS, local_out, suite="quick", workers=1)
    print("local rows reused:", {r.target: r.reused for r in local.rows})
    cluster_out = tmp_path_factory.mktemp("on-cluster")
    for f in (local_out / WORK).iterdir():
        if f.name.startswith("export-"):
            shutil.copytree(f, cluster_out / WORK / f.name)
        elif f.name.startswith("host-calibration-") and f.suffix == ".json":
            (cluster_out / WORK).mkdir(exist_ok=True)
            shutil.copy2(f, cluster_out / WORK)
    events: list = []
    on_cluster = compare(trained_project, TARGETS, cluster_out, suite="quick", cluster=cluster,
                         on_build_event=events.append)
    return local, on_cluster, events


def test_compare_on_the_cluster_gives_the_local_rows(local_and_cluster, tmp_path):
    from edgepack.bundle import read_archive

    local, on_cluster, events = local_and_cluster
    a, b = {r.target: r for r in local.rows}, {r.target: r for r in on_cluster.rows}
    assert list(a) == list(b) == TARGETS
    for t in TARGETS:
        assert (a[t].status, a[t].backend, a[t].precision) == (b[t].status, b[t].backend, b[t].precision), t
    bundles = {t: [c.out / f"{c.project}-{c.version}-{t}.edgepack" for c in (local, on_cluster)] for t in TARGETS}
    assert all(p.is_file() for pair in bundles.values() for p in pair)
    digests = {t: [model_digests(p, tmp_path / t / str(i)) for i, p in enumerate(pair)] for t, pair in bundles.items()}
    print("model files identical, local vs cluster:", {t: a == b for t, (a, b) in digests.items()})
    for t, (a, b) in digests.items():  # every backend here quantizes deterministically: the same model files
        assert a == b and a, t
    # each measurement says which node took it; locally there is no node to name
    for t in ("cpu", "onnx"):
        wa, wb = (read_archive(p, None).measurements.compiled.latency.where for p in bundles[t])
        assert "ray_node" not in wa and re.fullmatch(r"[0-9a-f]{56}", wb["ray_node"]), wb
        assert wa["cpu"] == wb["cpu"]
    # the progress came from the cluster's tasks, labelled with the node and worker
    assert {t for e in events for t in e[0].split(" @ ")[0].split(", ")} == set(TARGETS)
    assert all(re.search(r" @ .+/[0-9a-f]{6} pid \d+$", e[0]) for e in events)


def test_a_killed_worker_is_retried_and_every_row_comes_back_once(cluster, trained_project, tmp_path):
    """Two projects x one target on the cluster; the first worker seen building is killed by its PID."""
    from edgepack.compare import compare_projects

    other = tmp_path / "other"
    __import__("shutil").copytree(trained_project, other)
    edit_yaml(other, "name: digits", "name: digits-b")
    killed: list[int] = []

    def on_event(e):
        m = re.search(r" pid (\d+)$", e[0])
        if m and not killed and e[1] != "task":  # inside the build, past the task's first line
            killed.append(int(m.group(1)))
            os.kill(killed[0], signal.SIGKILL)
            print(f"killed worker pid {killed[0]} while it ran '{e[1]}' for {e[0]}")

    out = tmp_path / "dist"
    found = compare_projects([trained_project, other], ["onnx"], out, suite="quick", cluster=cluster,
                             on_build_event=on_event)
    assert killed
    assert [(c.project, [(r.target, r.status) for r in c.rows]) for c in found] == [
        ("digits", [("onnx", "measured")]), ("digits-b", [("onnx", "measured")])]
    bundles = sorted(p.name for p in out.rglob("*.edgepack"))
    assert bundles == ["digits-1.2.3-onnx.edgepack", "digits-b-1.2.3-onnx.edgepack"]
    assert not [p for p in out.rglob("*.part")]
    print("rows:", [(c.project, r.target, r.status) for c in found for r in c.rows], "bundles:", bundles)


def test_the_parallel_ranking_matches_the_serial_one(cluster, tmp_path):
    from edgepack.cluster.ranking import cluster_layer_map
    from edgepack.tuning import rank_layers

    art = tiny_onnx(tmp_path / "m")
    data = samples(16)
    serial = rank_layers(art.path, data, tmp_path / "serial")
    parallel = rank_layers(art.path, data, tmp_path / "parallel", map=cluster_layer_map(cluster))
    assert [n for n, _ in parallel] == [n for n, _ in serial] and len(serial) >= 2
    assert all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for (_, a), (_, b) in zip(serial, parallel))


def test_build_on_the_cluster_through_the_cli(cluster, trained_project, tmp_path):
    r = runner.invoke(app, ["build", "-p", str(trained_project), "-t", "onnx", "--out", str(tmp_path),
                            "--format", "json", "-q"], env={"EDGEPACK_CLUSTER": cluster})
    assert r.exit_code == 0, r.output
    bundle = tmp_path / "digits-1.2.3-onnx.edgepack"
    assert bundle.is_file() and hashlib.sha256(bundle.read_bytes()).hexdigest()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


HELD_FACTORY = """

def held():
    \"\"\"The digits CNN, once {go} exists (at most 10 minutes on): the task stays in its 'load model'
    stage until the test lets it go, so Ctrl-C always lands while it builds.\"\"\"
    import pathlib
    import time

    until = time.monotonic() + 600
    while not pathlib.Path({go!r}).exists() and time.monotonic() < until:
        time.sleep(0.05)
    return build()
"""


def test_ctrl_c_cancels_the_cluster_build_and_leaves_no_bundle(cluster, project, tmp_path):
    """Ctrl-C on the driver while a task builds: exit 130, nothing in --out (no bundle, no partial file).
    The model's factory holds the task in 'load model' until the test ends, so the task cannot finish
    (and its bundle come back) before the signal: the outcome never depends on the host's speed."""
    go = tmp_path / "go"
    with (project / "model.py").open("a") as f:
        f.write(HELD_FACTORY.format(go=str(go)))
    edit_yaml(project, "path: model.py:build", "path: model.py:held")
    out = tmp_path / "dist"
    proc = subprocess.Popen([sys.executable, "-c", "from edgepack.cli.main import main; main()", "build", "-p",
                             str(project), "-t", "onnx", "--out", str(out), "--cluster", cluster],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env={**os.environ, "EDGEPACK_CLUSTER": ""})
    seen = []
    try:
        for line in proc.stderr:  # the task's 'load model' start: it is now waiting in the factory
            seen.append(line)
            if "[onnx @ " in line and "load model" in line:
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()
        assert proc.wait() == 130, "".join(seen) + rest
        assert "interrupted" in rest and "kept" not in rest, rest
        assert list(out.iterdir()) == []
    finally:
        go.touch()  # a task the cancel missed finishes instead of waiting out its 10 minutes


def _rank_inside_a_task(path: str, workdir: str) -> list:
    """What a build task does: the cluster's map set for the build, rank_layers called as the search calls it."""
    from edgepack.cluster.ranking import ray_layer_map
    from edgepack.tuning import layer_map, rank_layers

    layer_map.set(ray_layer_map)
    return rank_layers(Path(path), samples(16), Path(workdir))


def test_a_build_task_ranks_its_layers_as_tasks_with_the_serial_result(cluster, tmp_path):
    import ray

    from edgepack.cluster.connect import connect
    from edgepack.tuning import rank_layers

    art = tiny_onnx(tmp_path / "m")
    serial = rank_layers(art.path, samples(16), tmp_path / "serial")
    connect(cluster)
    nested = ray.get(ray.remote(_rank_inside_a_task).options(num_cpus=1).remote(str(art.path), str(tmp_path / "in")))
    assert [n for n, _ in nested] == [n for n, _ in serial]


def test_targets_are_grouped_into_as_many_tasks_as_the_cluster_runs_at_once():
    from types import SimpleNamespace

    from edgepack.cluster.builds import plan_jobs

    def fake(*cpus):
        return SimpleNamespace(nodes=lambda: [{"NodeID": str(i), "Alive": True, "Resources": {"CPU": c}}
                                              for i, c in enumerate(cpus)])

    items = [(t, 0, t, 2, t) for t in ("cpu", "onnx", "android-arm64", "rpi5")]
    one = plan_jobs(fake(2), items, None)
    assert [(j.specs, j.threads) for j in one] == [(("cpu", "onnx", "android-arm64", "rpi5"), 2)]
    eight = plan_jobs(fake(*[2] * 8), items, None)
    assert [j.specs for j in eight] == [("cpu",), ("onnx",), ("android-arm64",), ("rpi5",)]
    small = plan_jobs(fake(1, 1), items + [("x", 1, "onnx", 2, "b/onnx")], None)  # 2 slots of 1 CPU
    assert [(j.payload, j.specs, j.threads) for j in small] == [
        (0, ("cpu", "android-arm64"), 1), (0, ("onnx", "rpi5"), 1), (1, ("onnx",), 1)]


def test_compare_notes_rows_measured_on_different_cpu_models():
    from types import SimpleNamespace

    from edgepack.compare.run import cpu_note

    def plan(name, cpu):
        latency = SimpleNamespace(where={"cpu": cpu})
        m = SimpleNamespace(measurements=SimpleNamespace(compiled=SimpleNamespace(proxy=None, latency=latency)))
        return SimpleNamespace(manifest=m, profile=SimpleNamespace(name=name))

    c = SimpleNamespace(notes=[])
    cpu_note([c], [plan("cpu", "AMD EPYC"), plan("onnx", "AMD EPYC")])
    assert c.notes == []
    cpu_note([c], [plan("cpu", "AMD EPYC"), plan("onnx", "Intel Xeon")])
    assert c.notes == ["rows measured on different CPU models: AMD EPYC: cpu; Intel Xeon: onnx"]


class _Doubler:
    def run(self, feeds):
        return [feeds["x"] * 2]


def test_run_all_stays_serial_without_a_cluster_and_shards_only_a_large_set(tmp_path):
    """No cluster: run_all runs here and imports nothing of Ray; with a sharding set (as a cluster build
    task sets it) only a set of two shards or more, of a model named by its files, goes to it."""
    from edgepack.measure import accuracy as acc

    code = ("import sys, numpy as np; from edgepack.measure import accuracy as acc; "
            "from tests.test_cluster import _Doubler; from pathlib import Path; "
            "data = [{'x': np.full((1, 2), i, np.float32)} for i in range(600)]; "
            "m = acc.ModelFiles('onnxruntime', Path('m.onnx'), (Path('m.onnx'),), Path('.')); "
            "out = acc.run_all(_Doubler(), data, m); "
            "print([float(o[0][0, 0]) for o in out] == [2.0 * i for i in range(600)], 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "False"]
    calls = []
    token = acc.sharding.set(acc.Sharding(lambda m, s, k: calls.append((m, len(s), k)) or [[0]] * len(s), 4))
    try:
        m = acc.ModelFiles("onnxruntime", tmp_path / "m.onnx", (), tmp_path)
        small = [{"x": np.ones((1, 2), np.float32)}] * 7
        assert acc.run_all(_Doubler(), small, m)[0][0].tolist() == [[2.0, 2.0]] and not calls
        assert acc.run_all(_Doubler(), small + small[:1])[0][0].tolist() == [[2.0, 2.0]] and not calls  # no model
        assert acc.run_all(_Doubler(), small + small[:1], m) == [[0]] * 8 and calls == [(m, 8, 4)]
    finally:
        acc.sharding.reset(token)


def _evaluate_inside_a_task(path: str, data, shard_samples: int) -> tuple[list, list]:
    """What a build task does: the cluster's sharding set for the build, run_all called as measure() calls it."""
    from edgepack.backends import get_backend
    from edgepack.cluster.evaluation import ray_shard_outputs
    from edgepack.measure import accuracy as acc

    calls = []

    def spy(model, samples, k):
        calls.append((len(samples), k))
        return ray_shard_outputs(model, samples, k)

    token = acc.sharding.set(acc.Sharding(spy, shard_samples))
    try:
        runner, _ = get_backend("onnxruntime").host_runner(Path(path), 1)
        model = acc.ModelFiles("onnxruntime", Path(path), (Path(path),), Path(path).parent)
        return acc.run_all(runner, data, model), calls
    finally:
        acc.sharding.reset(token)


def test_a_large_evaluation_set_runs_in_shards_with_the_serial_outputs_and_score(cluster, tmp_path):
    """Forced over a lowered threshold: 4 shard tasks (8, 8, 8, 4 samples), nested in a task as in a
    build; the merged outputs equal the serial run's exactly, so the score (counts) does too."""
    import ray

    from edgepack.backends import get_backend
    from edgepack.cluster.connect import connect
    from edgepack.cluster.evaluation import shards_of
    from edgepack.measure import accuracy as acc

    art = tiny_onnx(tmp_path / "m")
    data = samples(28)
    data.labels = [int(i) % 5 for i in range(28)]
    serial = acc.run_all(get_backend("onnxruntime").host_runner(art.path, 2)[0], data)
    connect(cluster)
    sharded, calls = ray.get(ray.remote(_evaluate_inside_a_task).options(num_cpus=1).remote(str(art.path), data, 8))
    assert calls == [(28, 8)] and len(shards_of(28, 8)) == 4
    assert len(sharded) == len(serial) == 28
    assert all(len(a) == len(b) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))
               for a, b in zip(sharded, serial))
    reference = serial[::-1]  # any fixed reference: the fidelity counts must match too
    for metric in ("top1", "fidelity"):
        assert acc.score(metric, sharded, data.labels, reference) == acc.score(metric, serial, data.labels, reference)
    print("sharded == serial:", acc.score("top1", sharded, data.labels, reference))


def test_a_tuning_search_on_the_cluster_builds_its_rounds_as_tasks_with_the_serial_result(
        cluster, sensitive_project, tmp_path):
    """The tuning test model's `cpu` search, serial here and inside a build task on the cluster (each
    round's candidates built as tasks on both nodes): the same steps, the same layers kept, the same build."""
    import json

    from edgepack.api import build
    from edgepack.bundle import read_archive

    serial = build(sensitive_project, ["cpu"], tmp_path / "local", max_tuning_minutes=5)[0].manifest.tuning
    r = runner.invoke(app, ["build", "-p", str(sensitive_project), "-t", "cpu", "--out", str(tmp_path / "cl"),
                            "--max-tuning-minutes", "5", "--format", "json", "-q"], env={"EDGEPACK_CLUSTER": cluster})
    assert r.exit_code == 0, r.output
    read_archive(next((tmp_path / "cl").glob("*.edgepack")), tmp_path / "x")
    tuned = json.loads((tmp_path / "x" / "manifest.json").read_text())["tuning"]
    assert tuned["parallel"]["builds"] >= 2 and any("built_on_node" in s for s in tuned["steps"])
    assert [s["step"] for s in tuned["steps"]] == [s["step"] for s in serial["steps"]]
    assert [s["meets_budget"] for s in tuned["steps"]] == [s["meets_budget"] for s in serial["steps"]]
    assert tuned["chosen"] == serial["chosen"]
    assert tuned["kept_in_higher_precision"] == serial["kept_in_higher_precision"]
    print("steps:", [(s["step"], s["accuracy"], s.get("built_on_node")) for s in tuned["steps"]],
          "parallel:", tuned["parallel"])
