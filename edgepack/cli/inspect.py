"""`edgepack inspect`: what a bundle holds and what was measured where."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import clean, Format, fmt, out, print_json
from edgepack.cli.options import BundleArg, FormatOpt


def inspect(
    bundle: BundleArg,
    format: FormatOpt = Format.human,
) -> None:
    """Show a bundle's manifest: source, target, stages, measurements, gates, files."""
    from edgepack.api import inspect as run_inspect

    m = run_inspect(bundle=bundle)
    if format == Format.json:
        print_json(m)
        return
    m = clean(m)  # manifest and report fields are untrusted
    rt, meas = m["runtime"], m["measurements"]
    out.print(f"[bold]{escape(m['name'])} {m['version']}[/] for [bold]{m['target']}[/] "
              f"({escape(m['profile']['device']['name'])}), {rt['backend']} {rt['precision']} {rt['format']}")
    out.print(f"build {m['build_id']}  created {m['created_at']}  edgepack {m['edgepack_version']}")
    out.print(f"source {m['source']['kind']} {escape(m['source']['path'])} ({m['source']['digest'][:19]}...)")
    t = Table(title="measurements (same run, same data and threads)")
    for col in ("model", "accuracy", "p50 ms", "p90 ms", "p99 ms", "size bytes", "peak MB", "where"):
        t.add_column(col)
    for key in ("reference", "compiled"):
        r = meas[key]
        acc = f"{r['accuracy']['value']:.2f} {r['accuracy']['metric']} (n={r['accuracy']['samples']})" if r["accuracy"] else "-"
        lat = r["latency"]
        where = f"{lat['where']['kind']}: {lat['where']['cpu']}, {lat['how']['threads']} threads, batch {lat['how']['batch']}"
        t.add_row(escape(r["model"]), acc, fmt(lat["p50_ms"]), fmt(lat["p90_ms"]), fmt(lat["p99_ms"]),
                  str(r["size"]["bytes"]), fmt(r["peak_memory"].get("peak_mb"), 1), escape(where))
    out.print(t)
    per = (meas["compiled"].get("accuracy") or {}).get("per_output")
    if per:
        ref_per = {p["output"]: p for p in (meas["reference"].get("accuracy") or {}).get("per_output") or []}
        pt = Table(title="metrics per output (the gating one is marked *)")
        for col in ("output", "metric", "fp32", "compiled", "form"):
            pt.add_column(col)
        gate = meas["compiled"]["accuracy"].get("output")
        for p in per:
            mark = " *" if p["output"] == gate and p["metric"] == meas["compiled"]["accuracy"]["metric"] else ""
            pt.add_row(escape(p["output"]) + mark, escape(p["metric"]),
                       fmt((ref_per.get(p["output"]) or {}).get("value"), 4), fmt(p["value"], 4),
                       escape(p.get("form", "")))
        out.print(pt)
    if meas.get("target_fp32"):
        tf = meas["target_fp32"]
        out.print(f"fp32 on the target's runtime ({escape(tf['model'])}): p50 {tf['latency']['p50_ms']:.3f} ms, "
                  f"p90 {tf['latency']['p90_ms']:.3f} ms; compiled speed-up over it "
                  f"{meas['comparison'].get('speedup_p50_vs_target_fp32', 'n/a')}x")
    c = meas["comparison"]
    speed = f"{c['speedup_p50']:.2f}x" if "speedup_p50" in c else c.get("speedup", "n/a")
    out.print(f"accuracy delta {fmt(c.get('accuracy_delta_points'), 2)} points, speed-up p50 {escape(str(speed))}, "
              f"size ratio {c['size_ratio']:.1%}")
    it = c.get("in_turn")
    if it:
        n = it["noise"]
        out.print(f"speed-ups timed in turn in one window: p50 {escape(', '.join(f'{k} {v:.4f} ms' for k, v in it['p50_ms'].items()))}"
                  f" ({n['tries']} window(s), round-to-round spread {n['checks'][-1]['worst']:.1%}, limit {n['limit']:.0%})")
        if n["noisy"]:
            out.print(f"[yellow]noisy: the ratios never settled (host load {n['checks'][-1]['load_per_cpu_after']} per "
                      "CPU); treat the speed-ups as approximate[/]")
    if meas["compiled"].get("proxy"):
        out.print(f"[yellow]compiled model measured on a {escape(meas['compiled']['proxy'])}[/]")
    for k, v in meas["device"].items():
        if isinstance(v, str):
            out.print(f"device {k}: {escape(v)}")
    ev = meas["data"]["evaluation"]
    out.print(f"evaluation data {escape(ev['source'])}: {ev['samples']} samples, {ev['fingerprint'][:23]}...")
    out.print(escape(validation_line(m["validation"])))
    acc = m["acceptance"]
    verdict = "[green]passed[/]" if acc["passed"] else "[red]FAILED[/]: " + escape("; ".join(acc["reasons"]))
    out.print(f"acceptance {verdict}  gates {acc['gates'] or 'none set'}")
    if (m.get("coverage") or {}).get("summary"):
        out.print(f"quantization coverage: {escape(m['coverage']['summary'])}")
    if m.get("precision_choice"):
        _precision_choice(m["precision_choice"])
    if m.get("timings"):
        top = sorted(m["timings"]["stages"], key=lambda r: -r["seconds"])[:4]
        out.print(f"build time {fmt(m['timings']['total_seconds'], 1)} s; most: "
                  + escape(", ".join(f"{r['stage']} {r['seconds']:.1f} s" for r in top)))
    if m.get("warnings"):
        for w in m["warnings"]:
            out.print(f"[yellow]warning:[/] {escape(w)}")
    if m.get("prune"):
        for line in prune_lines(m["prune"]):
            out.print(escape(line))
    t = m.get("tuning")
    if m.get("conversion"):
        _conversion(m["conversion"], (m["runtime"].get("io") or {}), m)
    if t and t.get("kind") != "fallback ladder":
        kept = ", ".join(f"{k['layer']} ({fmt(k['sensitivity'], 3)})" for k in t["kept_in_higher_precision"]) or "none"
        verdict = "[green]met[/]" if t["budget_met"] else "[red]not met[/]"
        out.print(f"accuracy budget {verdict}: {escape(t['stopped'])}; calibration "
                  f"{t['chosen']['calibration_method']}; recipe {t['chosen'].get('recipe', 'default')}; "
                  f"kept in higher precision: {escape(kept)}")
        if t.get("why"):
            out.print(f"chosen: {escape(t['why'])}")
        tt = Table(title="tuning steps (accuracy on the target's runtime, host latency)")
        for col in ("step", "calibration", "recipe", "layers in float", "accuracy", "drop", "p50 ms", "seconds",
                    "meets budget"):
            tt.add_column(col)
        for s in t["steps"]:
            scored = f" ({s['scored_on_samples']} samples)" if s.get("scored_on_samples") else ""
            tt.add_row(escape(s["step"]), s["calibration_method"], s.get("recipe", "default"),
                       str(s["kept_in_higher_precision"]), fmt(s["accuracy"], 2) + scored, fmt(s["drop_points"], 2),
                       fmt(s["p50_ms_host"]), fmt(s.get("seconds"), 1), "yes" if s["meets_budget"] else "no")
        out.print(tt)
        for f in t.get("failed_steps") or []:
            out.print(f"[yellow]tuning step failed:[/] {escape(f['step'])}: {escape(f['error'])}")
    st = Table(title="stages")
    for col in ("stage", "seconds", "config"):
        st.add_column(col)
    for s in m["stages"]:
        cfg = ", ".join(f"{k}={v}" for k, v in s["config"].items() if not isinstance(v, dict))
        st.add_row(s["name"], fmt(s["seconds"], 2), escape(cfg[:120]))
    out.print(st)
    ft = Table(title="files")
    ft.add_column("path")
    ft.add_column("bytes", justify="right")
    ft.add_column("sha256")
    for f in m["files"]:
        ft.add_row(f["path"], str(f["bytes"]), f["sha256"][:16])
    out.print(ft)


def validation_line(v: dict) -> str:
    """What the bundle ships for `validate`, and where."""
    where = (f"apart, in {v['artifact']['file']} ({v['artifact']['bytes'] / 1e6:.2f} MB)" if v.get("artifact")
             else "inside the bundle")
    budget = f"; counts cut to a {v['budget_bytes'] / 1e6:.2f} MB budget" if v.get("budget_bytes") else ""
    return (f"validation files: {v['samples']} golden + {v['holdout_samples']} holdout samples, "
            f"{v.get('inputs_form') or 'tensors'}, {where}{budget}")


def precision_line(pc: dict) -> str:
    """One line: the precision bundled, how it was chosen, and the runner-up."""
    head = f"precision {pc['chosen']} ({pc['policy']}" + (f", objective {pc['objective']}" if pc.get("objective") else "")
    return head + f"): {pc.get('why') or ''}"


def _precision_choice(pc: dict) -> None:
    out.print(escape(precision_line(pc)))
    if not pc.get("candidates"):
        return
    t = Table(title="precision candidates (timed in turn in one window on the target's runtime)")
    for col in ("candidate", "precision", "accuracy", "drop", "meets budget", "p50 ms", "p90 ms", "size MB", ""):
        t.add_column(col)
    for c in pc["candidates"]:
        t.add_row(escape(c["candidate"]), escape(c["precision"]), fmt(c["accuracy"], 2), fmt(c["drop_points"], 2),
                  "yes" if c["meets_budget"] else "no", fmt(c["p50_ms"], 4), fmt(c["p90_ms"], 4),
                  f"{c['size_bytes'] / 1e6:.3f}", "chosen" if c["candidate"] == pc["chosen"] else
                  ("runner-up" if c["candidate"] == pc.get("runner_up") else ""))
    out.print(t)


def prune_lines(p: dict) -> list[str]:
    """The prune section in a few lines: what was removed, what it cost, what it bought."""
    before, after = p["before"], p["after"]
    lines = [f"pruned ({p['method']}): MACs {before['macs']:,} -> {after['macs']:,}, "
             f"params {before['params']:,} -> {after['params']:,}"]
    if p.get("channels"):
        lines.append("  channels " + ", ".join(f"{n} {a}->{b}" for n, (a, b) in p["channels"].items()))
    a = p.get("accuracy_fp32") or {}
    if a:
        rec = f", after recovery {a['after_recovery']:.2f}" if "after_recovery" in a else ""
        lines.append(f"  fp32 {a['metric']}: before {a['before_pruning']:.2f}, pruned {a['after_pruning']:.2f}{rec}")
    e = p.get("latency_effect")
    if e:
        pruned = e.get("pruned_precision", e["precision"])
        what = e["precision"] if pruned == e["precision"] else f"{e['precision']} unpruned vs {pruned} pruned:"
        lines.append(f"  {what} p50 unpruned {e['unpruned_p50_ms']:.3f} ms -> pruned {e['pruned_p50_ms']:.3f} ms "
                     f"({e['speedup_p50']:.2f}x, {e['where']}, timed in turn)")
    return lines + latency_search_lines(p.get("latency_search"))


def latency_search_lines(s: dict | None) -> list[str]:
    """The latency goal's search: the goal, where the per-layer times came from, the trade curve."""
    if not s:
        return []
    g = s["goal"]
    goal = f"{g['target_latency']}x" if g.get("target_latency") is not None else f"{g['target_latency_ms']} ms"
    lines = [f"  latency goal {goal} of unpruned p50 {g['unpruned_p50_ms']:.3f} ms on {s['target']}: "
             f"{'reached' if s['reached'] else 'NOT reached'}{' (estimated)' if s['estimated'] else ''}",
             f"  per-layer times: {s['table']['source']}{' (cached)' if s['table'].get('cached') else ''}",
             "  trade curve (round: latency ratio measured/predicted, fp32 accuracy before recovery, MACs removed):"]
    for pt in s["trade_curve"]:
        measured = "-" if pt.get("measured_ratio") is None else f"{pt['measured_ratio']:.3f}"
        acc = "-" if pt.get("fp32_accuracy") is None else f"{pt['fp32_accuracy']:.2f}"
        lines.append(f"    {pt['round']}: {measured} / {pt['predicted_ratio']:.3f}, {acc}, {pt['macs_removed']:.0%}"
                     + (" [noisy]" if pt.get("noisy") else ""))
    if s.get("allocation"):
        lines.append("  allocation (channels kept): " + ", ".join(f"{n} {k}/{c}" for n, (c, k) in s["allocation"].items()))
    if s.get("layers_block"):
        lines.append(f"  as a prune.layers block: {s['layers_block']}")
    return lines


def _conversion(c: dict, io: dict, manifest: dict) -> None:
    """The converter's outcome: quantization level reached (and the ladder), float-op report, I/O."""
    from edgepack.backends import describe_conversion

    out.print(f"quantization level [bold]{escape(c['reached'])}[/] ({escape(c['level_means'])}): {escape(c['why'])}")
    if c.get("ladder") and len(c["ladder"]) > 1:
        lt = Table(title="fallback ladder (accuracy on the target's runtime, host latency)")
        for col in ("level", "outcome", "accuracy", "drop", "p50 ms"):
            lt.add_column(col)
        for s in c["ladder"]:
            lt.add_row(s["level"], escape(s["outcome"] + (f": {s['reason']}" if s.get("reason") else "")),
                       fmt(s.get("accuracy"), 2), fmt(s.get("drop_points"), 2), fmt(s.get("p50_ms_host")))
        out.print(lt)
    rep = c["float_op_report"]
    for line in describe_conversion(manifest):
        out.print(f"float-op report: {escape(line)}")
    if rep["float_ops"]:
        ft = Table(title="ops not in integer")
        for col in ("op", "count", "share of MACs", "why"):
            ft.add_column(col)
        for f in rep["float_ops"]:
            ft.add_row(f["op"], str(f["count"]), f"{f['macs_share']:.1%}", escape(f["why"]))
        out.print(ft)
    for kind in ("inputs", "outputs"):
        for e in io.get(kind, []):
            q = e.get("quantization")
            qs = f", scale {q['scale']:.6g}, zero point {q['zero_point']}" if q else ""
            out.print(f"{kind[:-1]} {escape(e['name'])}: {e['dtype']} {e['shape']}"
                      f"{' ' + e['layout'] if e.get('layout') else ''}{qs}")

