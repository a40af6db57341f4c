"""Where a measurement was taken."""

from __future__ import annotations

import os
import platform
import socket
from functools import lru_cache


# set by a build task on a Ray cluster (edgepack.cluster.builds): the node's id, recorded in `where`
RAY_NODE_ENV = "EDGEPACK_RAY_NODE"


def host_info() -> dict[str, object]:
    """This machine (cached), and on a Ray cluster the node a build task runs on."""
    node = {"ray_node": os.environ[RAY_NODE_ENV]} if os.environ.get(RAY_NODE_ENV) else {}
    return {**_machine(), **node}


@lru_cache(maxsize=1)
def _machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if cpu and flags:
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "neon", "asimd") if f in flags]
    return {
        "kind": "host",
        "hostname": socket.gethostname(),
        "cpu": cpu,
        "isa": isa,
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _cpu_times() -> tuple[int, int, int] | None:
    """(total, busy, steal) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in parts[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return sum(values), sum(values) - idle, values[7] if len(values) > 7 else 0


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadWatch:
    """The host's load around a measurement: the share of all CPUs that other processes kept busy
    during it (measured, not averaged: /proc/stat minus this process's own CPU time), the CPU time
    the hypervisor stole, and the 1-minute load average per CPU before and after."""

    def __init__(self) -> None:
        self.load_before = _load()
        self.times_before = _cpu_times()
        self.own_before = _own_cpu_s()

    def result(self) -> dict[str, object]:
        after, own = _cpu_times(), _own_cpu_s()
        steal = others = None
        if self.times_before and after and after[0] > self.times_before[0]:
            total = after[0] - self.times_before[0]
            steal = round(100.0 * (after[2] - self.times_before[2]) / total, 2)
            own_jiffies = (own - self.own_before) * os.sysconf("SC_CLK_TCK")
            busy = after[1] - self.times_before[1]
            others = round(max(0.0, busy - own_jiffies) / total, 3)
        return {"load_per_cpu_before": self.load_before, "load_per_cpu_after": _load(), "cpu_steal_pct": steal,
                "others_cpu_share": others}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return None
