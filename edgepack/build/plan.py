"""Target names -> :class:`TargetPlan` (profile, backend, validated options): one step for ``build`` and ``compare``."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from edgepack import __version__
from edgepack.backends import get_backend
from edgepack.backends.base import Backend
from edgepack.errors import ConfigError, EdgepackError
from edgepack.target import TargetProfile, load_target

# what every build records besides the backends' own packages: the loaders, the exporter, the reference runtime
CORE_PACKAGES = ("torch", "onnx", "onnxruntime", "transformers", "tokenizers")


@dataclass(frozen=True)
class TargetPlan:
    spec: str                    # the name as given (a profile name or a path)
    profile: TargetProfile
    backend: Backend | None      # None when it cannot be built here (see ``problem``)
    options: BaseModel | None
    problem: str | None = None   # why it cannot be built on this machine

    @property
    def buildable(self) -> bool:
        return self.problem is None


def profile_for(spec: str, targets_dirs: list[Path] | None = None, precision: str | None = None) -> TargetProfile:
    """The profile named ``spec`` (unknown names are a ConfigError), with the project's ``precision:``
    forced on it when one is given (``select_precision: fixed``)."""
    profile = load_target(spec, targets_dirs)
    if precision is not None:
        profile = profile.model_copy(update={"precision": precision, "select_precision": "fixed"})
    return profile


def plan_target(spec: str, profile: TargetProfile) -> TargetPlan:
    """Check the profile's backend: registered, offering the profile's precision, options valid,
    toolchain installed. A backend problem is raised."""
    backend = get_backend(profile.backend, needed_by=f"target '{profile.name}' ({profile.source})")
    backend.check_profile(profile)  # its precision and tensor types are ones the backend offers
    options = backend.options(profile.backend_options, f"{profile.source}: backend_options")
    backend.check_environment(compile=True)
    return TargetPlan(spec, profile, backend, options)


def plan_targets(specs: list[str], targets_dirs: list[Path] | None = None, strict: bool = True,
                 precision: str | None = None) -> list[TargetPlan]:
    """One plan per distinct profile. ``strict`` (build) raises the first backend problem; otherwise
    (compare) the plan records it and the target is estimated instead of built."""
    if not specs:
        raise ConfigError("no target given", hint="pass --target NAME (see `edgepack targets list`)")
    plans: list[TargetPlan] = []
    seen: set[str] = set()
    for spec in specs:
        profile = profile_for(spec, targets_dirs, precision)
        try:
            plan = plan_target(spec, profile)
        except EdgepackError as e:
            if strict:
                raise
            plan = TargetPlan(spec, profile, None, None, e.message)
        if profile.name not in seen:
            seen.add(profile.name)
            plans.append(plan)
    return plans


def toolchain_versions(plans: list[TargetPlan]) -> dict[str, str]:
    """edgepack, numpy, the core packages installed here, and each planned backend's own toolchain
    versions (as its ``versions()`` reports them)."""
    out = {"edgepack": __version__, "numpy": np.__version__}
    for pkg in CORE_PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    for plan in plans:
        if plan.backend is not None:
            out.update(backend_versions(plan.backend))
    return out


def backend_versions(backend: Backend) -> dict[str, str]:
    """What the manifest records of one backend: its ``versions()`` (runtime package, packages, toolchain)."""
    return {k: str(v) for k, v in backend.versions(True).items()}
