"""Pruning inside the build: prune (and recover) the torch module before export; the record goes into
the manifest's ``prune`` section."""

from __future__ import annotations

import copy
from typing import Any

from edgepack.artifact import StageRecord
from edgepack.build.context import BuildContext, Stage
from edgepack.build.data import finetune_data


def prune_module(ctx: BuildContext, module: Any, specs: list, profile: Any = None, names: list[str] | None = None) -> Any:
    """Prune (and recover) ``module``; a latency goal is searched on ``profile``'s target."""
    from edgepack.stages import prune as pr

    cfg = ctx.project.prune
    ev = ctx.evaluation
    ev_x, ev_y = ev.stacked(), ev.labels
    with Stage(ctx.progress, f"prune ({cfg.method})") as st:
        before = pr.evaluate(module, ev_x, ev_y, None)
        ref_logits = before.pop("logits")
        teacher = module
        ignore = cfg.ignore if cfg.ignore is not None else pr.default_ignore(module)
        masks = None
        if cfg.method == "structured" and cfg.latency_goal:
            from edgepack.build.prune_latency import search

            pruned, record = search(ctx, module, specs, names or ["output"], profile, ignore)
        elif cfg.method == "structured":
            pruned, record = pr.structured(module, specs, cfg.importance, ignore, cfg.ratio, cfg.target_macs,
                                           cfg.target_params, cfg.layers, cfg.round_to)
        else:
            pruned = copy.deepcopy(module)
            masks = pr.masks_2of4(pruned, ignore)
            pr.apply_masks(pruned, masks)
            counts = pr.count(module, specs)
            eligible = [n for n, m in pruned.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
            record = {"method": "sparse-2of4", "ignored": ignore, "layers_sparse": sorted(masks),
                      "layers_dense": [n for n in eligible if n not in masks and n not in ignore],
                      "before": counts, "after": counts,
                      "note": "2 of every 4 consecutive input weights are zero; dense runtimes gain nothing, "
                              "TensorRT's sparse tensor-core kernels use it when the engine is built with sparsity"}
        after = pr.evaluate(pruned, ev_x, ev_y, ref_logits)
        after.pop("logits")
        record["accuracy_fp32"] = {"metric": before["metric"] if ev_y is not None else "fidelity",
                                   "before_pruning": before["value"] if ev_y is not None else 100.0,
                                   "after_pruning": after["value"], "samples": len(ev)}
        st.detail = (f"{record.get('macs_removed', 0):.0%} of MACs removed, accuracy "
                     f"{record['accuracy_fp32']['before_pruning']:.2f} -> {after['value']:.2f}")
    if cfg.finetune:
        ft = cfg.finetune
        with Stage(ctx.progress, f"fine-tune pruned model ({ft.epochs} epochs)") as st:
            data = finetune_data(ctx, ft.data)
            xs = data.stacked()
            pr.check_training_data(xs, specs)
            record["finetune"] = pr.finetune(
                pruned, teacher, xs, data.labels, ft.epochs, ft.lr, ft.batch_size, cfg.seed, masks,
                lambda e, loss: ctx.progress(f"epoch {e}/{ft.epochs}: loss {loss:.4f}", "note", None, ""))
            record["finetune"]["data"] = data.describe()
            rec = pr.evaluate(pruned, ev_x, ev_y, ref_logits)
            rec.pop("logits")
            record["accuracy_fp32"]["after_recovery"] = rec["value"]
            st.detail = f"accuracy {rec['value']:.2f}"
    if masks:
        subs = dict(pruned.named_modules())
        record["sparsity_check"] = {"zero_share_per_layer": {n: round(float((subs[n].weight == 0).float().mean()), 4)
                                                             for n in masks}}
    if ctx.settings.prune_flags:
        record["set_by_flags"] = dict(ctx.settings.prune_flags)  # the project file's prune block was overridden
    ctx.prune = record
    ctx.stages.append(StageRecord("prune", {k: v for k, v in record.items() if k != "finetune"}, None, None, 0.0))
    return pruned.eval()
