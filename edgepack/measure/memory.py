"""Peak memory of inference, measured in a fresh child process.

The child imports the backend's runtime, resets the kernel's peak-RSS counter, records its RSS,
loads the model and runs the given samples; the figure is peak RSS minus that baseline. Linux only
(``/proc/self/status``); elsewhere the measurement says it was not taken.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def measure_peak_memory(backend: str, model_path: Path, sample: dict[str, np.ndarray], threads: int,
                        runs: int = 20, timeout: float = 300) -> dict:
    if not Path("/proc/self/status").exists():
        return {"measured": False, "reason": "needs Linux /proc to read peak RSS"}
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "sample.npz"
        np.savez(npz, **sample)
        cmd = [sys.executable, "-m", "edgepack.measure.memory", backend, str(model_path), str(npz),
               str(threads), str(runs)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"measured": False, "reason": f"memory probe failed: {tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["how"] = {"method": "fresh process; peak RSS (VmHWM) after load + runs minus RSS after runtime import",
                     "runs": runs, "threads": threads}
    return result


def _child(backend_name: str, model_path: str, npz: str, threads: int, runs: int) -> dict:
    from edgepack.backends import get_backend

    backend = get_backend(backend_name)
    backend.check_environment(compile=False)
    data = np.load(npz)
    sample = {k: data[k] for k in data.files}
    cleared = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        cleared = False
    base = _status_kb("VmRSS")
    runner, _ = backend.host_runner(Path(model_path), threads)
    for _ in range(runs):
        runner.run(sample)
    peak = _status_kb("VmHWM")
    return {"measured": True, "peak_mb": round((peak - base) / 1024.0, 2),
            "baseline_rss_mb": round(base / 1024.0, 2), "peak_counter_reset": cleared}


if __name__ == "__main__":
    name, path, npz_file, n_threads, n_runs = sys.argv[1:6]
    print(json.dumps(_child(name, path, npz_file, int(n_threads), int(n_runs))))
