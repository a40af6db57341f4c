"""The comparison as Markdown, as PNG plots (matplotlib) and as one self-contained HTML file.

The HTML embeds its plots as base64 PNGs and its style inline: it opens with no network. Every
figure carries its provenance (``measured (where)``, ``host proxy``, ``bundle`` or ``estimate``).
"""

from __future__ import annotations

import html
import io
from typing import Any

from edgepack.compare.model import Cell, Comparison, Row
from edgepack.errors import MissingDependencyError


def fmt_cell(cell: Cell, nd: int = 3, unit: str = "") -> str:
    if cell.value is None:
        return "n/a"
    return f"{cell.value:.{nd}f}{unit}"


def tag(source: str) -> str:
    """The short provenance shown in a table cell; the full one is in the JSON, the tooltip and the details."""
    if source.startswith("measured on the host, not"):
        return "host, not device"
    if source.startswith("measured"):
        return "measured (host)"
    if source.startswith("host proxy"):
        return "host proxy"
    return source


def short_source(cell: Cell) -> str:
    """An even shorter tag, for text tables."""
    if cell.value is None:
        return ""
    t = tag(cell.source)
    return {"measured (host)": "meas.", "estimate": "est.", "host proxy": "proxy",
            "host, not device": "host≠device"}.get(t, t)


def accuracy_text(row: Row) -> str:
    if row.accuracy.value is None:
        return "n/a"
    delta = f" ({row.accuracy_delta.value:+.2f})" if row.accuracy_delta.value is not None else ""
    return f"{row.accuracy.value:.2f}{delta}"


def error_text(row: Row) -> str:
    return f"{row.estimate_error_pct:+.1f}%" if row.estimate_error_pct is not None else ""


def budget_text(row: Row) -> str:
    if row.budget is None:
        return ""
    return {True: "meets", False: "fails", None: "unknown"}[row.budget["meets"]]


def to_markdown(c: Comparison) -> str:
    lines = [f"# {c.project} {c.version}: target comparison", "",
             f"Host: {c.host['cpu']} ({', '.join(c.host['isa'])}), {c.host['logical_cpus']} logical CPUs. "
             "`meas.` = measured on this host, `est.` = roofline estimate, `proxy` = host stand-in runtime.", ""]
    head = ["target", "device", "backend", "precision", "accuracy (Δ vs FP32)", "p50 ms", "p90 ms", "throughput/s",
            "size MB", "peak MB", "estimate p50 ms (error)", "status", "reason"]
    if c.budget:
        head.insert(-2, "budget")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in c.rows:
        est = f"{r.estimate['p50_ms']:.3f}" if r.estimate else "n/a"
        if r.estimate_error_pct is not None:
            est += f" ({error_text(r)} vs measured)"
        cells = [r.target, r.device, r.backend, r.precision,
                 f"{accuracy_text(r)} {short_source(r.accuracy) if r.accuracy.value is not None else ''}".strip(),
                 f"{fmt_cell(r.p50_ms)} {short_source(r.p50_ms)}", f"{fmt_cell(r.p90_ms)}",
                 f"{fmt_cell(r.throughput_per_s, 1)}", f"{fmt_cell(r.size_mb)} {short_source(r.size_mb)}",
                 f"{fmt_cell(r.peak_memory_mb, 2)} {short_source(r.peak_memory_mb)}", est]
        if c.budget:
            cells.append(budget_text(r) + (" (cheapest)" if r.target == c.cheapest else ""))
        cells += [r.status, r.reason or ""]
        lines.append("| " + " | ".join(x.replace("|", "/") for x in cells) + " |")
    if c.budget:
        lines += ["", f"Budget: {budget_line(c)}"]
    for n in c.notes:
        lines += ["", f"Note: {n}"]
    return "\n".join(lines) + "\n"


def budget_line(c: Comparison) -> str:
    b = c.budget or {}
    parts = [f"{k} {b[k]}" for k in ("max_latency_ms", "max_drop", "max_size_mb") if b.get(k) is not None]
    meets = ", ".join(b.get("meeting", [])) or "none"
    cheapest = f"cheapest: {c.cheapest}" if c.cheapest else "no priced target meets it"
    return f"{', '.join(parts)} (latency is p50). Meeting it: {meets}; {cheapest}."


def _require_matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise MissingDependencyError("matplotlib", "report", "the plots of the HTML report") from e
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def pareto(points: list[tuple[str, float, float]]) -> list[str]:
    """Names on the front: no other point is both faster (lower latency) and at least as accurate."""
    front = []
    for name, lat, acc in points:
        dominated = any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for n2, l2, a2 in points if n2 != name)
        if not dominated:
            front.append(name)
    return front


def scatter_png(c: Comparison) -> bytes:
    plt = _require_matplotlib()
    fig, ax = plt.subplots(figsize=(8, 5.6), dpi=110)
    known = [(r.target, r.p50_ms.value, r.accuracy.value) for r in c.rows
             if r.p50_ms.value is not None and r.accuracy.value is not None]
    unknown = [r for r in c.rows if r.p50_ms.value is not None and r.accuracy.value is None]
    front = set(pareto(known))
    by = {r.target: r for r in c.rows}
    accs = [a for _, _, a in known] or [r.fp32_accuracy.value for r in c.rows if r.fp32_accuracy.value is not None]
    low = (min(accs) - 1.0) if accs else 0.0
    offsets = [(6, 4), (6, -11), (-8, 9), (-8, -14)]
    for i, (name, lat, acc) in enumerate(sorted(known, key=lambda k: k[1])):
        est = by[name].p50_ms.source == "estimate"
        ax.scatter([lat], [acc], s=70, marker="o", facecolors="none" if est else "tab:blue", edgecolors="tab:blue")
        ax.annotate(name, (lat, acc), textcoords="offset points", xytext=offsets[i % len(offsets)], fontsize=8,
                    ha="right" if offsets[i % len(offsets)][0] < 0 else "left")
    if len(front) > 0:
        pts = sorted((lat, acc) for name, lat, acc in known if name in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "--", color="tab:orange", marker="o", markersize=13,
                markerfacecolor="none", markeredgecolor="tab:orange", label="Pareto front", zorder=1)
    for i, r in enumerate(sorted(unknown, key=lambda r: r.p50_ms.value)):
        ax.scatter([r.p50_ms.value], [low], s=60, marker="x", color="tab:gray")
        ax.annotate(r.target, (r.p50_ms.value, low), textcoords="offset points", xytext=(4, 6 if i % 2 else -12),
                    fontsize=8, color="tab:gray")
    if known or unknown:
        top = max([a for _, _, a in known] + [low])
        ax.set_ylim(low - 0.6, top + 0.6)
    ax.scatter([], [], marker="o", color="tab:blue", label="latency measured")
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="tab:blue", label="latency estimated")
    if unknown:
        ax.scatter([], [], marker="x", color="tab:gray", label="accuracy not measured (bottom row)")
    lats = [r.p50_ms.value for r in c.rows if r.p50_ms.value]
    if lats and max(lats) / min(lats) > 10:
        from matplotlib.ticker import FuncFormatter, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("p50 latency, ms (log scale)")
    else:
        ax.set_xlabel("p50 latency, ms")
    metric = next((r.metric for r in c.rows if r.metric), None) or "accuracy"
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{c.project}: latency vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return _png(fig, plt)


def size_png(c: Comparison) -> bytes:
    plt = _require_matplotlib()
    rows = [r for r in c.rows if r.size_mb.value is not None]
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(len(rows), 2) + 1.2), dpi=110)
    y = list(range(len(rows)))
    for i, r in enumerate(rows):
        est = r.size_mb.source == "estimate"
        ax.barh(i, r.size_mb.value, color="white" if est else "tab:green", edgecolor="tab:green",
                hatch="//" if est else None)
        ax.text(r.size_mb.value, i, f" {r.size_mb.value:.3f} MB{' (est.)' if est else ''}", va="center", fontsize=8)
    ax.set_yticks(y, [r.target for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("model size, MB (10^6 bytes); hatched = estimate (weights only)")
    ax.set_title(f"{c.project}: size per target")
    ax.margins(x=0.25)
    return _png(fig, plt)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def esc(v: Any) -> str:
    return html.escape(str(v))
