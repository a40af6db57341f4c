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


# The peak is reached by the first run (a runtime allocates its buffers then): a ResNet-50 measured
# 168.1/171.1/168.4/168.3/168.1 MB on ONNX Runtime FP32 and 102.4/102.4/102.1/102.1/102.1 MB on
# OpenVINO INT8 after 1/3/5/20/50 runs. Five runs, to be safe.
RUNS = 5


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


class Probe:
    """A peak-memory probe running in a fresh child process; :meth:`result` waits for it. Started while
    untimed work goes on (a peak RSS does not depend on what else runs), it must be collected before any
    latency is timed, so that it never competes with a timing for the CPUs."""

    def __init__(self, backend: str, model_path: Path, sample: dict[str, np.ndarray], threads: int,
                 runs: int = RUNS, timeout: float = 300):
        self.runs, self.threads, self.timeout = runs, threads, timeout
        self._result: dict | None = None
        self.proc: subprocess.Popen | None = None
        if not Path("/proc/self/status").exists():
            self._result = {"measured": False, "reason": "needs Linux /proc to read peak RSS"}
            return
        self._tmp = tempfile.TemporaryDirectory()
        tmp = Path(self._tmp.name)
        npz = tmp / "sample.npz"
        np.savez(npz, **sample)
        cmd = [sys.executable, "-m", "edgepack.measure.memory", backend, str(model_path), str(npz),
               str(threads), str(runs)]
        # closed by _done, when the probe is collected (it outlives this call)
        self._out, self._err = open(tmp / "stdout", "w+"), open(tmp / "stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=self._err, text=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self._result is None and self.proc.poll() is None

    def result(self) -> dict:
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> dict:
        assert self.proc is not None
        try:
            self.proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return self._done({"measured": False, "reason": f"memory probe took over {self.timeout:.0f} s"})
        self._out.seek(0)
        self._err.seek(0)
        out, err = self._out.read(), self._err.read()
        if self.proc.returncode != 0:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            return self._done({"measured": False, "reason": f"memory probe failed: {tail}"})
        result = json.loads(out.strip().splitlines()[-1])
        result["how"] = {"method": "fresh process; peak RSS (VmHWM) after load + runs minus RSS after runtime import",
                         "runs": self.runs, "threads": self.threads}
        return self._done(result)

    def _done(self, result: dict) -> dict:
        self._out.close()
        self._err.close()
        self._tmp.cleanup()
        return result

    def cancel(self) -> None:
        """Stop a probe whose figure is no longer wanted (a failed build)."""
        if self.proc is not None and self._result is None:
            self.proc.kill()
            self.proc.wait()
            self._result = self._done({"measured": False, "reason": "memory probe cancelled"})


def start_peak_memory(backend: str, model_path: Path, sample: dict[str, np.ndarray], threads: int,
                      runs: int = RUNS, timeout: float = 300) -> Probe:
    """Start the probe in the background (see :class:`Probe`)."""
    return Probe(backend, model_path, sample, threads, runs, timeout)


def measure_peak_memory(backend: str, model_path: Path, sample: dict[str, np.ndarray], threads: int,
                        runs: int = RUNS, timeout: float = 300) -> dict:
    return Probe(backend, model_path, sample, threads, runs, timeout).result()


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
