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


def plan_target(spec: str, targets_dirs: list[Path] | None = None, precision: str | None = None) -> TargetPlan:
    """Load the profile (unknown names are a ConfigError), then check its backend: registered, offering
    the profile's precision, options valid, toolchain installed. A backend problem is raised.
    ``precision`` (the project's ``precision:``) is forced on the profile: ``select_precision: fixed``."""
    profile = load_target(spec, targets_dirs)
    if precision is not None:
        profile = profile.model_copy(update={"precision": precision, "select_precision": "fixed"})
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
        if strict:
            plan = plan_target(spec, targets_dirs, precision)
        else:
            profile = load_target(spec, targets_dirs)
            if precision is not None:
                profile = profile.model_copy(update={"precision": precision, "select_precision": "fixed"})
            try:
                plan = plan_target(spec, targets_dirs, precision)
            except EdgepackError as e:
                plan = TargetPlan(spec, profile, None, None, e.message)
        if plan.profile.name not in seen:
            seen.add(plan.profile.name)
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
    versions = getattr(backend, "versions", None)
    found = dict(versions(True) if versions else backend.check_environment(compile=True))
    for pkg in getattr(backend, "packages", ()):
        if pkg not in found:
            try:
                found[pkg] = version(pkg)
            except PackageNotFoundError:
                pass
    return {k: str(v) for k, v in found.items()}
