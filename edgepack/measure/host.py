"""Where a measurement was taken."""

from __future__ import annotations

import os
import platform
import socket
from functools import lru_cache


@lru_cache(maxsize=1)
def host_info() -> dict[str, object]:
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


def _cpu_times() -> tuple[int, int] | None:
    """(total, steal) jiffies of all CPUs from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
    except OSError:
        return None
    values = [int(v) for v in parts[1:]]
    return sum(values), values[7] if len(values) > 7 else 0


class LoadWatch:
    """The host's load around a measurement: 1-minute load average per logical CPU before and after,
    and the share of CPU time the hypervisor stole in between (a VM's noisy neighbours)."""

    def __init__(self) -> None:
        self.load_before = _load()
        self.times_before = _cpu_times()

    def result(self) -> dict[str, object]:
        after = _cpu_times()
        steal = None
        if self.times_before and after and after[0] > self.times_before[0]:
            steal = round(100.0 * (after[1] - self.times_before[1]) / (after[0] - self.times_before[0]), 2)
        return {"load_per_cpu_before": self.load_before, "load_per_cpu_after": _load(), "cpu_steal_pct": steal}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0] / (os.cpu_count() or 1), 3)
    except OSError:
        return None
