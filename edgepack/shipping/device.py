"""Is this machine the device a bundle was built for? Checked before anything is installed.

Kept to what can be known without running the model: the CPU architecture a profile's ISA list
implies, and what the bundle's backend knows against this machine (its ``check_host``: for TensorRT
bundles, whether TensorRT is here and, for Jetson profiles, whether this is an L4T system at all).
`validate` then checks the rest by running the model; `--force` overrides.
"""

from __future__ import annotations

import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgepack.errors import WrongTargetError

TEGRA_RELEASE = Path("/etc/nv_tegra_release")
X86_ISA = {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "sse4_2", "avx"}
ARM_ISA = {"neon", "asimd", "sve", "dotprod", "i8mm"}
X86_MACHINES = {"x86_64", "amd64", "i686", "i386"}
ARM_MACHINES = {"aarch64", "arm64", "armv7l", "armv8l"}


@dataclass(frozen=True)
class Host:
    """The facts the check reads; tests make their own."""

    machine: str
    cpu_flags: frozenset[str] = field(default_factory=frozenset)
    tensorrt: bool = False
    l4t: bool = False


def this_host() -> Host:
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return Host(machine=platform.machine().lower(), cpu_flags=frozenset(flags),
                tensorrt=importlib.util.find_spec("tensorrt") is not None, l4t=TEGRA_RELEASE.is_file())


def check_target(manifest, force: bool = False, host: Host | None = None) -> list[str]:
    """Raise WrongTargetError when the bundle cannot be for this machine; return notes otherwise.
    With ``force`` the refusal becomes a note (validation still runs)."""
    host = host or this_host()
    profile = manifest.profile
    device = profile.get("device", {})
    name = f"'{manifest.target}' ({device.get('name', 'unknown device')})"
    problems, notes = _backend_problems(manifest, host), []
    isa = set(device.get("isa") or [])
    arch = "x86-64" if isa & X86_ISA else "arm" if isa & ARM_ISA else None
    machines = X86_MACHINES if arch == "x86-64" else ARM_MACHINES if arch == "arm" else None
    if machines and host.machine not in machines:
        problems.append(f"the bundle is for {name}, an {arch} CPU ({', '.join(sorted(isa))}), "
                        f"and this machine is {host.machine}")
    elif machines and host.cpu_flags and (missing := sorted(isa - host.cpu_flags)):
        notes.append(f"this CPU lacks {', '.join(missing)} that profile {manifest.target} assumes: "
                     "validation decides whether it runs correctly; latency may differ from the manifest's")
    if problems and not force:
        raise WrongTargetError("; ".join(problems))
    return notes + [f"--force: {p}" for p in problems]


def _backend_problems(manifest, host: Host) -> list[str]:
    """What the bundle's backend knows against this machine (its ``check_host``)."""
    from edgepack.backends import get_backend, registered_backends
    from edgepack.errors import ConfigError

    name = manifest.runtime.backend
    known = registered_backends()
    if name not in known:
        installed = ", ".join(sorted(known)) or "none"
        return [f"the bundle runs on backend '{name}', which is not installed here (installed backends: {installed})"]
    try:
        backend = get_backend(name)
    except ConfigError as e:
        return [f"the bundle runs on backend '{name}', which cannot be loaded here: {e}"]
    return list(backend.check_host(manifest, host))
