"""The build spine: ``plan`` (target names -> TargetPlan), ``context`` (the typed BuildContext), ``source``
(load -> prune -> export), ``data``, ``search`` (compile to the accuracy budget), ``measuring``,
``manifest`` + ``gates`` (the bundle's manifest), ``pipeline`` (the order of it all) and ``parallel``
(targets in worker processes). ``build`` and ``compare`` both stand on it."""

from edgepack.build.context import BuildContext, BuildResult, Outcome, TargetFailure
from edgepack.build.pipeline import build, raise_for_acceptance
from edgepack.build.plan import TargetPlan, plan_targets

__all__ = ["BuildContext", "BuildResult", "Outcome", "TargetFailure", "TargetPlan", "build", "plan_targets",
           "raise_for_acceptance"]
