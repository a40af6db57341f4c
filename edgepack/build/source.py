"""The model as every backend reads it: load (PyTorch, Hugging Face, ONNX) -> optional pruning -> export
to ONNX, once per opset; and for backends that convert from PyTorch, a ``torch.export`` program."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edgepack.artifact import ModelArtifact, ModelFormat, StageRecord, digest_paths, sha256_file
from edgepack.backends.base import Backend
from edgepack.build.context import BuildContext, Progress, Stage
from edgepack.build.pruning import prune_module
from edgepack.bundle import Source
from edgepack.errors import ConfigError
from edgepack.loaders.resolve import Resolved, representative_dims
from edgepack.project import Project
from edgepack.target import TargetProfile


def source_of(project: Project, project_file: Path | None = None) -> Source:
    """The digests a bundle records of what it was built from: model (file or folder), weights, project file."""
    src = project.model
    path = project.resolve(src.path.split(":")[0] if src.kind == "callable" else src.location)
    if path.is_dir():  # a Hugging Face folder: config, weights, tokenizer files
        digest = "sha256:" + digest_paths([p for p in path.rglob("*") if p.is_file()], path)
    else:
        digest = "sha256:" + sha256_file(path) if path.is_file() else "missing"
    weights = project.resolve(src.weights) if src.weights else None
    wdig = "sha256:" + sha256_file(weights) if weights and weights.is_file() else None
    pdig = "sha256:" + sha256_file(project_file) if project_file and project_file.is_file() else None
    return Source(kind=src.kind, path=src.location, digest=digest, weights_digest=wdig, project_digest=pdig)


def exported(ctx: BuildContext, profile: TargetProfile) -> ModelArtifact:
    """The FP32 ONNX at the profile's opset (made once per opset, then reused by every target)."""
    key = profile.max_opset
    per_target = _pruned_per_target(ctx)
    if per_target:  # pruned to a latency on this target: each target has its own allocation
        key = (key, "pruned for", profile.name)
    if key not in ctx.exports:
        art = _load_onnx(ctx, key) if ctx.project.model.kind == "onnx" else _export_torch(ctx, profile.max_opset, profile)
        project = ctx.project
        if project.dim_ranges():  # for backends that need static shapes (TensorRT profiles)
            art = replace(art, details={**art.details, "dim_ranges": project.dim_ranges()})
        hf = ctx.resolved.hf
        if hf is not None and hf.model_type:
            art = replace(art, details={**art.details, "model_type": hf.model_type})
        ctx.exports[key] = art
    return ctx.exports[key]


def _load_onnx(ctx: BuildContext, opset: int) -> ModelArtifact:
    from edgepack.loaders.onnx import load_onnx

    project = ctx.project
    with Stage(ctx.progress, "load onnx") as st:
        art, info = load_onnx(project.resolve(project.model.path), project.input_specs(), ctx.scratch / f"load-{opset}")
        st.detail = f"opset {art.details.get('opset')}" + (f", {info['producer']}" if info["producer"] else "")
        record = StageRecord("load", {"source": project.model.path, "kind": "onnx", **info}, ctx.source.digest,
                             art.digest, st.elapsed)
    return ModelArtifact(art.format, art.path, art.inputs, art.outputs, art.files, (record,), "fp32", art.details)


def load_torch(resolved: Resolved, progress: Progress) -> tuple[Any, list[str]]:
    """The project's PyTorch module (a file.py:factory, a .pt2 program or a Hugging Face folder), checked
    by one forward pass at the dims' representative sizes, and its output names."""
    from edgepack.loaders.torch import check_forward, load_module

    project, hf = resolved.project, resolved.hf
    with Stage(progress, "load model") as st:
        if project.model.kind == "hf":
            from edgepack.loaders import hf as hf_loader

            module = hf_loader.load_module(project, hf)
        else:
            module = load_module(project)
        n_out = check_forward(module, project.input_specs(), representative_dims(project))
        st.detail = f"{sum(p.numel() for p in module.parameters()):,} parameters"
    default_names = [hf.output] if hf is not None else ["output"]
    names = project.outputs or (default_names if n_out == 1 else [f"output_{i}" for i in range(n_out)])
    if len(names) != n_out:
        raise ConfigError(f"key 'outputs' names {len(names)} outputs, the model returns {n_out}")
    return module, list(names)


def _pruned_per_target(ctx: BuildContext) -> bool:
    prune = ctx.project.prune
    return prune is not None and prune.latency_goal


def _export_torch(ctx: BuildContext, opset: int, profile: TargetProfile | None = None) -> ModelArtifact:
    from edgepack.stages.export_onnx import export

    project = ctx.project
    specs = project.input_specs()
    module, names = load_torch(ctx.resolved, ctx.progress)
    unpruned = module
    ctx.modules["unpruned"] = unpruned
    if project.prune:
        module = prune_module(ctx, module, specs, profile, names)
    ctx.modules["model"] = module
    with Stage(ctx.progress, "export onnx") as st:
        where = f"export-{opset}" + (f"-{profile.name}" if profile is not None and _pruned_per_target(ctx) else "")
        art = export(module, specs, names, ctx.scratch / where, opset, ctx.source.digest, dims=project.dims)
        if project.prune and project.prune.method == "sparse-2of4":
            art = replace(art, details={**art.details, "sparsity": "2:4"})
        st.detail = f"opset {art.details['opset']}, {art.size_bytes / 1e6:.2f} MB"
    if project.prune:
        ctx.exports[("unpruned", opset)] = export(unpruned, specs, names, ctx.scratch / f"unpruned-{opset}", opset,
                                                  ctx.source.digest)
    return art


def compile_source(ctx: BuildContext, profile: TargetProfile, backend: Backend, options: object,
                   onnx_art: ModelArtifact, which: str = "model") -> ModelArtifact:
    """What ``backend.compile`` reads: the exported ONNX, or for backends that convert from PyTorch a
    ``torch.export`` program of the same (pruned) module at static shapes."""
    if backend.consumes == ModelFormat.ONNX:
        return onnx_art if which == "model" else ctx.exports[("unpruned", profile.max_opset)]
    from edgepack.stages.export_torch import export_program, static_specs

    project = ctx.project
    # static shapes: the project's dims (the data is padded to their max), then the profile's static_dims
    dims = {k: v.max or v.opt for k, v in project.dims.items() if (v.max or v.opt)}
    dims.update(getattr(options, "static_dims", {}) or {})
    specs = static_specs(project.input_specs(), 1, dims, f"target '{profile.name}' ({backend.name})")
    if project.model.kind == "onnx":  # converted by onnx2tf from the file, at these shapes
        return replace(onnx_art, inputs=tuple(specs))
    key = ("torch", which, tuple(s.shape for s in specs)) + ((profile.name,) if _pruned_per_target(ctx) else ())
    if key not in ctx.exports:
        with Stage(ctx.progress, f"export torch program{' (unpruned)' if which != 'model' else ''}") as st:
            names = [o.name for o in onnx_art.outputs]
            ctx.exports[key] = export_program(ctx.modules[which], specs, names,
                                              ctx.scratch / f"torch-{which}-{len(ctx.exports)}", ctx.source.digest)
            st.detail = ", ".join(f"{s.name} {s.shape_str}" for s in specs)
    return ctx.exports[key]
