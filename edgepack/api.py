"""The façade: build(), validate(), inspect(), compare(). No printing and no CLI code here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepack.build import BuildResult, build, raise_for_acceptance
from edgepack.validation import validate


def inspect(bundle: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a bundle as a dict (files verified against their sha256 by default)."""
    from edgepack.bundle import open_bundle

    with open_bundle(Path(bundle), verify=verify) as opened:
        return opened.manifest.model_dump(mode="json")


__all__ = ["BuildResult", "build", "inspect", "raise_for_acceptance", "validate"]

from edgepack.compare import Budget, Comparison, compare  # noqa: E402  (added with `edgepack compare`)

__all__ += ["Budget", "Comparison", "compare"]
