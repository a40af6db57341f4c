"""Pruning on the PyTorch model, before export: structured channel pruning with torch-pruning
(dependency-aware, so every coupled layer shrinks together), or 2:4 semi-structured weight sparsity
for Ampere/Orin sparse tensor cores; then optional recovery fine-tuning (labels, or distillation
from the unpruned model when there are none)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np

from edgepack.artifact import TensorSpec
from edgepack.errors import CalibrationError, ConfigError, MissingDependencyError, ModelError
from edgepack.loaders.torch import example_inputs, require_torch


def _tp():
    try:
        import torch_pruning
    except ImportError as e:
        raise MissingDependencyError("torch-pruning", "prune", "structured pruning") from e
    return torch_pruning


def count(module: Any, specs: list[TensorSpec]) -> dict[str, int]:
    tp = _tp()
    macs, params = tp.utils.count_ops_and_params(module, example_inputs(specs))
    return {"macs": int(macs), "params": int(params)}


def find_modules(module: Any, names: list[str], what: str) -> list[Any]:
    by_name = dict(module.named_modules())
    missing = [n for n in names if n not in by_name]
    if missing:
        known = [n for n, m in module.named_modules() if n and not list(m.children())]
        raise ConfigError(f"prune.{what}: no module named {missing}", hint=f"leaf modules: {', '.join(known[:20])}")
    return [by_name[n] for n in names]


def default_ignore(module: Any) -> list[str]:
    """The last Linear (the classifier): its outputs are the classes and must stay."""
    torch = require_torch()
    linears = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    return linears[-1:]


def structured(module: Any, specs: list[TensorSpec], importance: str, ignore: list[str], ratio: float | None,
               target_macs: float | None, target_params: float | None,
               layers: dict[str, float] | None = None, round_to: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Remove whole channels. ``ratio`` is per layer; a MACs/params target is met by bisecting the ratio.

    ``layers`` fixes the share of output channels removed from named layers (torch-pruning's
    ``pruning_ratio_dict``); the uniform ratio, or the one the bisection finds, applies to the others.
    ``round_to`` keeps every pruned layer's channel count a multiple of N (SIMD/tensor-core widths)."""
    tp = _tp()
    torch = require_torch()
    layers = layers or {}
    clash = sorted(set(layers) & set(ignore))
    if clash:
        raise ConfigError(f"prune.layers and prune.ignore both name {clash}", hint="a layer is either kept whole or pruned")
    find_modules(module, list(layers), "layers")  # unknown names fail before any pruning

    def prune_copy(r: float) -> Any:
        m = copy.deepcopy(module)
        try:
            fixed = dict(zip(find_modules(m, list(layers), "layers"), layers.values()))
            pruner = tp.pruner.MetaPruner(m, example_inputs(specs), importance=tp.importance.MagnitudeImportance(
                p=1 if importance == "l1" else 2), pruning_ratio=r, pruning_ratio_dict=fixed or None,
                ignored_layers=find_modules(m, ignore, "ignore"), round_to=round_to)
            pruner.step()
        except (ConfigError, MissingDependencyError):
            raise
        except Exception as e:
            raise ModelError(f"torch-pruning could not trace the model's dependencies: {type(e).__name__}: {e}",
                             hint="list layers it cannot handle under prune.ignore, or prune the model yourself") from e
        for name, sub in m.named_modules():
            size = getattr(sub, "out_channels", None) or getattr(sub, "out_features", None)
            if isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)) and size == 0:
                raise ConfigError(f"pruning ratio {r:.2f} would remove every channel of layer '{name}'",
                                  hint="use a smaller ratio or add the layer to prune.ignore")
        return m

    before = count(module, specs)
    if ratio is not None or (target_macs is None and target_params is None):
        used = ratio or 0.0  # only the named layers are pruned when no amount is given
        pruned = prune_copy(used)
    else:
        key, goal = ("macs", target_macs) if target_macs is not None else ("params", target_params)
        if layers:
            fixed_only = 1 - count(prune_copy(0.0), specs)[key] / before[key]
            if fixed_only > goal + 0.05:
                raise ConfigError(f"prune.layers alone remove {fixed_only:.0%} of {key}, more than "
                                  f"prune.target_{key} {goal:.0%}",
                                  hint="lower the ratios under prune.layers, or raise the target")
        lo, hi, pruned, used = 0.0, 0.95, None, None
        for _ in range(10):  # bisect the per-layer ratio until the removed share reaches the goal
            mid = (lo + hi) / 2
            cand = prune_copy(mid)
            removed = 1 - count(cand, specs)[key] / before[key]
            if removed >= goal:
                pruned, used, hi = cand, mid, mid
            else:
                lo = mid
        if pruned is None:
            raise ConfigError(f"prune.target_{key}: removing {goal:.0%} of {key} is out of reach here "
                              f"(at most {removed:.0%} with every other layer pruned at 95%)",
                              hint="lower the target, or prune more of the layers under prune.layers/prune.ignore")
    after = count(pruned, specs)
    return pruned, {"method": "structured", "tool": f"torch-pruning {getattr(tp, '__version__', '')}".strip(),
                    "importance": importance, "ratio_per_layer": round(used, 4), "ignored": ignore,
                    "layer_ratios": dict(layers), "round_to": round_to, "channels": _channels(module, pruned),
                    "before": before, "after": after,
                    "macs_removed": round(1 - after["macs"] / before["macs"], 4),
                    "params_removed": round(1 - after["params"] / before["params"], 4)}


def _channels(before: Any, after: Any) -> dict[str, list[int]]:
    """Output channels/features of every Conv/Linear whose width changed: name -> [before, after]."""
    def widths(m: Any) -> dict[str, int]:
        return {n: getattr(s, "out_channels", None) or getattr(s, "out_features", None)
                for n, s in m.named_modules() if type(s).__name__ in ("Conv1d", "Conv2d", "Linear")}
    a = widths(after)
    return {n: [w, a[n]] for n, w in widths(before).items() if n in a and a[n] != w}


def masks_2of4(module: Any, ignore: list[str]) -> dict[str, Any]:
    """Keep the 2 largest-magnitude weights in every group of 4 consecutive input weights."""
    torch = require_torch()
    masks = {}
    for name, sub in module.named_modules():
        if name in ignore or not isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        w = sub.weight.detach()
        flat = w.reshape(w.shape[0], -1) if isinstance(sub, torch.nn.Linear) else w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        if flat.shape[1] % 4:
            continue  # no whole groups of 4 along the input: TensorRT runs such a layer dense anyway
        groups = flat.abs().reshape(flat.shape[0], -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(2, dim=2).indices, True)
        mask = keep.reshape(flat.shape)
        if not isinstance(sub, torch.nn.Linear):
            mask = mask.reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2)
        masks[name] = mask.reshape(w.shape)
    return masks


def apply_masks(module: Any, masks: dict[str, Any]) -> None:
    torch = require_torch()
    subs = dict(module.named_modules())
    with torch.no_grad():
        for name, mask in masks.items():
            subs[name].weight.mul_(mask)


def finetune(module: Any, teacher: Any, xs: dict[str, np.ndarray], labels: list[int] | None, epochs: int, lr: float,
             batch_size: int, seed: int, masks: dict[str, Any] | None,
             on_epoch: Callable[[int, float], None]) -> dict[str, Any]:
    """Recovery training: cross-entropy on labels, or distillation (KL at T=2) from ``teacher``."""
    torch = require_torch()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    names = list(xs)
    tensors = [torch.from_numpy(np.ascontiguousarray(xs[n])) for n in names]
    y = torch.as_tensor(labels) if labels is not None else None
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    n = len(tensors[0])
    losses = []
    for epoch in range(epochs):
        module.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            batch = [t[idx] for t in tensors]
            out = module(*batch)
            out = out[0] if isinstance(out, (tuple, list)) else out
            if y is not None:
                loss = torch.nn.functional.cross_entropy(out, y[idx])
            else:
                with torch.no_grad():
                    ref = teacher(*batch)
                    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
                loss = torch.nn.functional.kl_div(torch.log_softmax(out / 2, -1), torch.softmax(ref / 2, -1),
                                                  reduction="batchmean") * 4
            opt.zero_grad()
            loss.backward()
            opt.step()
            if masks:
                apply_masks(module, masks)
            total += float(loss.detach()) * len(idx)
        losses.append(round(total / n, 5))
        on_epoch(epoch + 1, losses[-1])
    module.eval()
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "objective": "cross-entropy on labels" if y is not None else "distillation from the unpruned model (KL, T=2)",
            "samples": n, "loss_per_epoch": losses}


def evaluate(module: Any, xs: dict[str, np.ndarray], labels: list[int] | None, reference: np.ndarray | None) -> dict:
    """FP32 top-1 (labels) or top-1 agreement with ``reference`` logits, in percent."""
    torch = require_torch()
    with torch.no_grad():
        outs = []
        n = len(next(iter(xs.values())))
        for i in range(0, n, 256):
            o = module(*[torch.from_numpy(np.ascontiguousarray(v[i : i + 256])) for v in xs.values()])
            outs.append((o[0] if isinstance(o, (tuple, list)) else o).numpy())
    logits = np.concatenate(outs)
    pred = logits.reshape(len(logits), -1).argmax(1)
    if labels is not None:
        return {"metric": "top1", "value": round(100.0 * float(np.mean(pred == np.asarray(labels))), 3), "logits": logits}
    # without labels the unpruned model is the reference: measured against itself it agrees fully
    ref = pred if reference is None else reference.reshape(len(reference), -1).argmax(1)
    return {"metric": "fidelity", "value": round(100.0 * float(np.mean(pred == ref)), 3), "logits": logits}


def check_training_data(xs: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    for s in specs:
        a = xs.get(s.name)
        if a is None or a.ndim != len(s.shape) or any(isinstance(d, int) and d != n for d, n in zip(s.shape, a.shape)):
            got = None if a is None else tuple(a.shape)
            raise CalibrationError(f"prune.finetune.data: input '{s.name}' has shape {got}, expected {s.shape_str}")

