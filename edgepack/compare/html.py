"""The HTML page of a comparison: inline style, plots as data URIs, no script, nothing fetched."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

from edgepack.compare.model import Cell, Comparison, Row
from edgepack.errors import ConfigError
from edgepack.compare.report import (accuracy_text, budget_line, budget_text, error_text, esc, fmt_cell, scatter_png,
                                     size_png, tag)

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:20px;color:#1d2330}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde}h3{font-size:14px;margin:14px 0 4px}
.sub{color:#5a6275;font-size:13px}table{border-collapse:collapse;font-size:12px;margin-top:8px}
th,td{border:1px solid #d7dbe6;padding:4px 7px;text-align:left;vertical-align:top}th{background:#eef1f7}
td.why{min-width:200px;max-width:340px}td.dev{max-width:150px}
td.num{text-align:right;white-space:nowrap}.src{white-space:normal}.src{display:block;font-size:10.5px;color:#6b7385}
.est{color:#8a5a00}.meas{color:#17663a}.failed{color:#a01d1d}.meets{background:#e6f6ea}.fails{background:#fbeaea}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.plots img{width:calc(50% - 10px);
min-width:420px;border:1px solid #dde}
details{margin:6px 0;font-size:13px}summary{cursor:pointer;font-weight:600}pre{background:#f6f7fb;padding:8px;
overflow-x:auto;font-size:11.5px}.legend span{margin-right:14px}
"""


def _cell(cell: Cell, nd: int = 3, unit: str = "") -> str:
    klass = "est" if cell.source == "estimate" else ("meas" if cell.source.startswith("measured") else "")
    title = esc(cell.source + (f"; {cell.note}" if cell.note else ""))
    src = tag(cell.source) if cell.value is not None else ""
    return f'<td class="num {klass}" title="{title}">{esc(fmt_cell(cell, nd, unit))}<span class="src">{esc(src)}</span></td>'


def _row_html(r: Row, with_budget: bool) -> str:
    acc_src = r.accuracy.source if r.accuracy.value is not None else (r.accuracy.note or "not measured")
    klass = {True: "meets", False: "fails"}.get(r.budget["meets"], "") if r.budget else ""
    est = "n/a"
    if r.estimate:
        est = f"{r.estimate['p50_ms']:.3f} ms"
        if r.estimate_error_pct is not None:
            est += f"<span class='src'>error vs measured: <b>{esc(error_text(r))}</b></span>"
        else:
            est += "<span class='src'>estimate</span>"
    cells = [f"<td><b>{esc(r.target)}</b>{' (reused)' if r.reused else ''}</td>", f"<td class='dev'>{esc(r.device)}</td>",
             f"<td>{esc(r.backend)} {esc(r.precision)}</td>",
             f"<td class='num' title='{esc(acc_src)}'>{esc(accuracy_text(r))}<span class='src'>{esc(tag(acc_src) if r.accuracy.value is not None else 'not measured')}</span></td>",
             _cell(r.p50_ms), _cell(r.p90_ms), _cell(r.throughput_per_s, 1), _cell(r.size_mb), _cell(r.peak_memory_mb, 2),
             f"<td class='num'>{est}</td>",
             f"<td class='num'>{'$' + format(r.price_usd, ',.0f') if r.price_usd is not None else 'n/a'}</td>"]
    if with_budget:
        cells.append(f"<td>{esc(budget_text(r))}</td>")
    status_class = "failed" if r.status == "failed" else ("meas" if r.status == "measured" else "est")
    cells.append(f"<td class='why {status_class}'><b>{esc(r.status)}</b><span class='src'>{esc(r.reason or '')}</span></td>")
    return f"<tr class='{klass}'>" + "".join(cells) + "</tr>"


def _details(r: Row) -> str:
    parts = [f"<details><summary>{esc(r.target)}: {esc(r.device)} ({esc(r.status)})</summary>"]
    if r.reason:
        parts.append(f"<p>{esc(r.reason)}</p>")
    if r.bundle:
        parts.append(f"<p>Bundle: <code>{esc(r.bundle)}</code>{' (reused: matched source, project file, profile and data)' if r.reused else ''}</p>")
    if r.p50_ms.note:
        parts.append(f"<p>Latency: {esc(r.p50_ms.note)}.</p>")
    if r.estimate:
        e = r.estimate
        parts.append(
            f"<p>Estimate: p50 {e['p50_ms']:.4f} ms = overhead {e['overhead_ms']:.4f} ms + roofline {e['roofline_ms']:.5f} ms "
            f"/ efficiency {e['efficiency']:.3f} ({esc(e['bound'])}-bound; calibrated on "
            f"{esc(', '.join(e['calibration']['fitted_on']) or 'nothing')} with {esc(e['calibration']['runtime'])} on "
            f"{esc(e['calibration']['where'])}). Peaks used: {esc(json.dumps(e['peaks']))}. Model: "
            f"{e['model']['gmacs']} GMAC, {e['model']['params']:,} parameters, {e['model']['layers']} costed layers.</p>")
    dev = r.details.get("device", {})
    figs = [(k, v) for k, v in dev.items() if isinstance(v, dict) and "value" in v]
    if figs:
        parts.append("<table><tr><th>figure</th><th>value</th><th>source</th></tr>" + "".join(
            f"<tr><td>{esc(k)}</td><td class='num'>{esc(v['value'])}</td><td>{esc(v['source'])}</td></tr>" for k, v in figs)
            + "</table>")
    plain = {k: v for k, v in dev.items() if not isinstance(v, dict) or "value" not in v}
    if plain:
        parts.append(f"<pre>{esc(json.dumps(plain, indent=1))}</pre>")
    if r.details.get("host_latency"):
        h = r.details["host_latency"]
        parts.append(f"<p>On this host ({esc(h['runtime'])}): p50 {h['p50_ms']} ms, p90 {h['p90_ms']} ms; "
                     f"{esc(h['note'])}.</p>")
    parts.append("</details>")
    return "".join(parts)


def _calibration(c: Comparison) -> str:
    if not c.calibrations:
        return "<p>No calibration: estimates are uncalibrated roofline figures (lower bounds).</p>"
    out = []
    for cal in c.calibrations:
        hp = cal.get("host_peaks", {})
        out.append(f"<h3>{esc(cal['runtime'])} on {esc(cal['where'])}: efficiency {cal['efficiency']:.3f}, "
                   f"overhead {cal['overhead_ms']:.3f} ms</h3>")
        out.append("<table><tr><th>reference model</th><th>roofline ms</th><th>measured p50 ms</th>"
                   "<th>fitted ms</th><th>error</th></tr>" + "".join(
                       f"<tr><td>{esc(p['model'])}</td><td class='num'>{p['roofline_ms']}</td><td class='num'>"
                       f"{p['measured_ms']}</td><td class='num'>{p['fitted_ms']}</td><td class='num'>{p['error_pct']:+.1f}%"
                       f"</td></tr>" for p in cal["points"]) + "</table>")
        figs = [(k, hp[k]) for k in ("peak_int8_tops", "peak_fp32_tflops", "memory_bandwidth_gbs") if k in hp]
        out.append("<p class='sub'>Host peaks: " + "; ".join(f"{esc(k)} {v['value']} ({esc(v['source'])})"
                                                             for k, v in figs) + "</p>")
    return "".join(out)


def render(c: Comparison, images: dict[str, str], created: str) -> str:
    with_budget = c.budget is not None
    head = ["target", "device", "runtime", "accuracy (Δ vs FP32)", "p50 ms", "p90 ms", "throughput /s",
            "size MB", "peak memory MB", "estimate p50", "price"] + (["budget"] if with_budget else []) + ["status"]
    table = ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"
             + "".join(_row_html(r, with_budget) for r in c.rows) + "</table>")
    measured = [r for r in c.rows if r.estimate_error_pct is not None]
    trust = ("<table><tr><th>target</th><th>measured p50 ms</th><th>estimate p50 ms</th><th>error</th></tr>" + "".join(
        f"<tr><td>{esc(r.target)}</td><td class='num'>{r.p50_ms.value}</td><td class='num'>{r.estimate['p50_ms']}</td>"
        f"<td class='num'><b>{esc(error_text(r))}</b></td></tr>" for r in measured) + "</table>"
             if measured else "<p>No target was measured on this host: the estimates are not checked in this run.</p>")
    budget = f"<h2>Budget</h2><p>{esc(budget_line(c))}</p>" if with_budget else ""
    notes = "".join(f"<li>{esc(n)}</li>" for n in c.notes)
    h = c.host
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(c.project)} {esc(c.version)}: edgepack compare</title>
<style>{STYLE}</style></head><body>
<h1>{esc(c.project)} {esc(c.version)}: target comparison</h1>
<div class="sub">edgepack compare, {esc(created)}. Host: {esc(h['cpu'])} ({esc(', '.join(h['isa']))}),
{esc(h['logical_cpus'])} logical CPUs, {esc(h['os'])}. Bundles in <code>{esc(c.out)}</code>.</div>
<p class="legend"><span class="meas">measured (where)</span><span class="est">estimate (roofline, calibrated on
this host)</span><span>host proxy: a host runtime standing in for the device's</span><span>bundle: file sizes in the
bundle</span></p>
<h2>Targets</h2>{table}{budget}
<h2>How far to trust the estimates</h2>
<p>For every target measured here, the estimate is made the same way as for the devices that are not here
(calibrated on generated reference models, not on this model) and shown beside the measurement.</p>{trust}
<h2>Plots</h2><div class="plots">
<img alt="latency vs accuracy with the Pareto front" src="data:image/png;base64,{images['scatter']}">
<img alt="size per target" src="data:image/png;base64,{images['size']}"></div>
<h2>Per-target details</h2>{''.join(_details(r) for r in c.rows)}
<h2>Calibration on this host</h2>{_calibration(c)}
<h2>Notes</h2><ul>{notes or '<li>none</li>'}
<li>Model: {esc(json.dumps(c.model)) if c.model else 'not counted'}</li></ul>
</body></html>
"""


def write_html(c: Comparison, path: Path, pngs: bool = True) -> dict[str, Path]:
    """Write the self-contained report to ``path`` (and the plots as PNG files next to it)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"--html {path}: the report file must end in .html")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--html {path}: cannot create its folder: {e.strerror}") from e
    scatter, size = scatter_png(c), size_png(c)
    written = {"html": path}
    if pngs:
        stem = path.with_suffix("")
        for key, data in (("latency_accuracy", scatter), ("size", size)):
            p = stem.parent / f"{stem.name}-{key.replace('_', '-')}.png"
            p.write_bytes(data)
            written[key] = p
    path.write_text(render(c, {"scatter": base64.b64encode(scatter).decode(), "size": base64.b64encode(size).decode()},
                           datetime.now(timezone.utc).isoformat(timespec="seconds")), encoding="utf-8")
    return written
