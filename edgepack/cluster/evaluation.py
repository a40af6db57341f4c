"""A large evaluation set as Ray tasks: split into shards of consecutive samples, each run by a task that
loads the model itself, and merged in sample order.

:func:`edgepack.measure.accuracy.run_all` hands the model (:class:`~edgepack.measure.accuracy.ModelFiles`)
and the samples to :func:`ray_shard_outputs` when :data:`~edgepack.measure.accuracy.sharding` is set (a
cluster build task sets it for its build, :mod:`edgepack.cluster.builds`) and the set holds at least two
shards. The model's files go to the object store once per set, as bytes (each node fetches them once);
each task writes them into a temporary folder it removes, loads them with the backend's ``host_runner``
and returns its shard's outputs. What comes back is the outputs, not scores: the caller scores the
merged set once, so a figure is counts over the whole set (not an average of per-shard averages) and
equals the serial run's.

A shard task times nothing: it reserves one CPU and runs the model with one thread on it, so it never
takes cores from a timing another task on its node reserved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepack.cluster.connect import gather

MAX_RETRIES = 2


def shards_of(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive shards of ``size`` samples over ``n`` (the last one may be shorter)."""
    size = max(1, int(size))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def relative_to_root(path: Path, root: Path) -> str:
    path, root = Path(path).resolve(), Path(root).resolve()
    return path.relative_to(root).as_posix() if root in path.parents else path.name


def model_bytes(model: Any) -> tuple[dict[str, bytes], str]:
    """The model's files as {path relative to its root: bytes}, and the model file's key."""
    files = {relative_to_root(p, model.root): Path(p).read_bytes() for p in (*model.files, model.path)}
    return files, relative_to_root(model.path, model.root)


def run_shard(backend: str, files: dict[str, bytes], model_file: str, samples: list) -> list[list[np.ndarray]]:
    """Runs on a worker: the model's files into a temporary folder, loaded by the backend with one thread,
    run over ``samples`` in order."""
    import tempfile

    from edgepack.backends import get_backend

    with tempfile.TemporaryDirectory(prefix="edgepack-shard-") as tmp:
        root = Path(tmp)
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        runner, _ = get_backend(backend).host_runner(root / model_file, 1)
        outputs = [runner.run(s) for s in samples]
        del runner
    return outputs


def ray_shard_outputs(model: Any, samples: list, shard_samples: int) -> list[list[np.ndarray]]:
    """Every sample's outputs, in order, from shards run as parallel tasks on the Ray cluster this
    process is connected to (a :class:`~edgepack.measure.accuracy.Sharding`'s ``run``)."""
    import ray

    files, key = model_bytes(model)
    shared = ray.put(files)
    task = ray.remote(run_shard).options(num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")
    refs = [task.remote(model.backend, shared, key, samples[a:b]) for a, b in shards_of(len(samples), shard_samples)]
    parts = gather(refs)
    # plain writable arrays (not views of the object store), merged in sample order
    return [[np.array(o) for o in outs] for part in parts for outs in part]
