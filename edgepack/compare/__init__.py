"""`edgepack compare`: ``model`` (budgets, cells, rows), ``run`` (plan, reuse or build, on the build spine),
``rows`` (manifest figures and roofline estimates), ``report`` (Markdown, plots) and ``html``."""

from edgepack.compare.model import Budget, Cell, Comparison, Row, estimate_for, host_is_device_class
from edgepack.compare.run import compare, compare_projects, reusable
from edgepack.measure.estimate import error_pct

__all__ = ["Budget", "Cell", "Comparison", "Row", "compare", "compare_projects", "error_pct", "estimate_for", "host_is_device_class",
           "reusable"]
