"""Connecting the driver (this process) to a Ray cluster, failing fast when there is none.

``--cluster ADDRESS`` (or ``$EDGEPACK_CLUSTER``): ``HOST:PORT`` of a head's GCS (``ray start --head``
prints it), ``ray://HOST:10001`` for Ray Client, or ``auto`` (Ray's own discovery: ``$RAY_ADDRESS``,
then a cluster started on this machine). Ray is imported here and only here, on the first
connection: without ``--cluster`` nothing imports it.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

from edgepack.errors import ClusterError, ConfigError, MissingDependencyError

ENV = "EDGEPACK_CLUSTER"
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = ("127.", "localhost", "::1", "[::1]")


def cluster_address(flag: str | None) -> str | None:
    """The address from the flag, else ``$EDGEPACK_CLUSTER``; None (or empty): run locally."""
    value = flag if flag is not None else os.environ.get(ENV)
    value = (value or "").strip()
    return value or None


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe before Ray is asked; None for ``auto`` without ``$RAY_ADDRESS``."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if not env or env == "auto":
            return None
        address = env
    rest = address[len("ray://"):] if address.startswith("ray://") else address
    if "://" in rest:
        raise ConfigError(f"--cluster {address}: unknown scheme",
                          hint="use HOST:PORT (the head's GCS, port 6379 by default), ray://HOST:10001 or auto")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--cluster {address}: expected HOST:PORT, ray://HOST:PORT or auto",
                          hint="e.g. --cluster 127.0.0.1:6379 (what `ray start --head` prints)")
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connection to the head: Ray's own connect retries for minutes on a dead address."""
    where = host_port(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=timeout):
            pass
    except OSError as e:
        raise ClusterError(f"--cluster {address}: no Ray head answers at {where[0]}:{where[1]} "
                           f"({e.strerror or type(e).__name__})") from e


def connect(address: str) -> Any:
    """Connect once per process (later calls reuse the connection); returns the ``ray`` module."""
    probe(address)
    where = host_port(address)
    if where is not None and where[0].startswith(LOOPBACK) and "ray" not in __import__("sys").modules:
        # a head bound to 127.0.0.1 only: keep Ray from swapping the loopback address for this host's
        # LAN address (where nothing listens); only affects how this driver names itself
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError as e:
        raise MissingDependencyError("ray", "cluster", "running on a Ray cluster (--cluster)") from e
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    except ConnectionError as e:
        raise ClusterError(f"--cluster {address}: {str(e).splitlines()[0] if str(e) else 'no Ray cluster found'}") from e
    except Exception as e:  # noqa: BLE001 - Ray's many connection failures get one error and hint
        raise ClusterError(f"--cluster {address}: could not connect: {type(e).__name__}: {e}") from e
    return ray


def nodes(ray: Any) -> list[dict[str, Any]]:
    """The cluster's live nodes: id, address and CPUs."""
    return [{"id": n["NodeID"], "address": n.get("NodeManagerAddress"), "cpus": n.get("Resources", {}).get("CPU", 0)}
            for n in ray.nodes() if n.get("Alive")]


def gather(refs: list[Any]) -> list[Any]:
    """``ray.get`` of a round of tasks, in order; on any error, or Ctrl-C, every task of the round still
    running is cancelled first, so nothing keeps running on the cluster for a caller that gave up."""
    import ray

    try:
        return list(ray.get(refs))
    except BaseException:
        for r in refs:
            ray.cancel(r, force=True)
        raise
