"""The tuning search's per-layer sensitivity ranking as Ray tasks: one task per weighted layer.

:func:`edgepack.tuning.rank_layers` builds one :class:`~edgepack.tuning.LayerScorer` (the prepared
model, its ranges, the samples and the FP32 outputs) and hands it to a ``map``; here the scorer is put
in the object store once and each layer is scored by a task, with the very code the serial ranking
runs, so the errors, and so the layers the search keeps in float, are the same. Inside a cluster build
task (:mod:`edgepack.cluster.builds`) this map is set for the build, so a target's ranking fans out
over the cluster from the node that builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgepack.cluster.connect import gather

MAX_RETRIES = 2


def _score_one(scorer: Any, node: str) -> float:
    return scorer(node)


def ray_layer_map(scorer: Any, names: list[str]) -> list[float]:
    """Score ``names`` in parallel on the Ray cluster this process is connected to."""
    import ray

    shared = ray.put(scorer)
    task = ray.remote(_score_one).options(num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")
    refs = [task.remote(shared, n) for n in names]
    return gather(refs)


def cluster_layer_map(address: str) -> Callable[[Any, list[str]], list[float]]:
    """A ``map`` for :func:`edgepack.tuning.rank_layers` that connects to ``address`` first."""
    from edgepack.cluster.connect import connect

    def map_(scorer: Any, names: list[str]) -> list[float]:
        connect(address)
        return ray_layer_map(scorer, names)

    return map_
