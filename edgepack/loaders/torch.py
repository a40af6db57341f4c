"""PyTorch sources: ``file.py:factory`` (+ optional weights) or a ``torch.export`` ``.pt2`` file."""

from __future__ import annotations

from typing import Any

from edgepack.artifact import TensorSpec
from edgepack.calibration.reader import import_callable
from edgepack.errors import MissingDependencyError, ModelError
from edgepack.project import Project

EMPTY_HINT = "the file was not written completely (an interrupted save, copy or download?); write it again"


def require_torch():
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("torch", "torch", "loading PyTorch models") from e
    return torch


def load_module(project: Project) -> Any:
    """The user's nn.Module in eval mode."""
    torch = require_torch()
    src = project.model
    where = "model.path"
    if src.kind == "pt2":
        path = project.resolve(src.path)
        if not path.is_file():
            raise ModelError(f"{where}: {path} not found", hint="paths are relative to the project folder")
        if path.stat().st_size == 0:
            raise ModelError(f"{where}: {path.name} is empty (0 bytes)", hint=EMPTY_HINT)
        try:
            module = torch.export.load(str(path)).module()
        except Exception as e:
            raise ModelError(f"{where}: cannot load {path.name} with torch.export.load: {e}") from e
    else:
        factory = import_callable(src.path, project.root, where)
        try:
            module = factory()
        except SystemExit as e:  # not edgepack's exit code to give (3 would read as "gate failed")
            raise ModelError(f"{where}: model factory {src.path} called sys.exit({e.code!r})",
                             hint="the factory must build and return an nn.Module, not exit the process "
                                  "(move script code under `if __name__ == '__main__':`)") from e
        except Exception as e:
            raise ModelError(
                f"{where}: {src.path} raised {type(e).__name__}: {e}",
                hint="the factory must build and return an nn.Module with no arguments",
            ) from e
        if not isinstance(module, torch.nn.Module):
            raise ModelError(f"{where}: {src.path} returned {type(module).__name__}, not a torch.nn.Module")
    if src.weights:
        wpath = project.resolve(src.weights)
        if not wpath.is_file():
            raise ModelError(f"model.weights: {wpath} not found", hint="train the model first, or fix the path")
        if wpath.stat().st_size == 0:
            raise ModelError(f"model.weights: {wpath.name} is empty (0 bytes)", hint=EMPTY_HINT)
        try:
            state = torch.load(wpath, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            module.load_state_dict(state, strict=True)
        except Exception as e:
            raise ModelError(f"model.weights: cannot load {wpath.name} into the model: {e}") from e
    return module.eval()


def example_inputs(specs: list[TensorSpec], batch: int = 1, dims: dict[str, int] | None = None) -> tuple:
    torch = require_torch()
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        try:
            shape = s.concrete_shape(batch, dims)
        except KeyError as e:
            raise ModelError(
                f"inputs: '{s.name}' has symbolic dim {e} with no representative size",
                hint=f"declare it under dims in edgepack.yaml, e.g. dims: {{{e.args[0]}: {{max: 128}}}}, "
                     "or use a fixed size",
            ) from None
        dtype = getattr(torch, s.dtype)
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=gen).to(dtype))
        else:
            # ones, not zeros: a valid index for embeddings, and an all-zero attention mask (every token
            # masked) is a degenerate input on which runtimes legitimately disagree
            out.append(torch.ones(shape, dtype=dtype))
    return tuple(out)


WEIGHTS_HINT = ("the weights were saved from a diverged training run (a NaN loss) or corrupted; retrain or restore "
                "a good checkpoint (check with torch.isfinite(t).all() for each tensor of the state_dict)")


def check_weights(module: Any) -> None:
    """Refuse NaN in any tensor of the module, and Inf in its trainable parameters (an Inf buffer can be a
    legitimate constant, such as an attention mask; a NaN never is)."""
    torch = require_torch()
    for kind, named in (("parameters", module.named_parameters()), ("buffers", module.named_buffers())):
        for name, t in named:
            if not t.is_floating_point():
                continue
            t = t.detach()
            if bool(torch.isnan(t).any()):
                raise ModelError(f"the model's weights hold NaN (tensor {name})", hint=WEIGHTS_HINT)
            if kind == "parameters" and bool(torch.isinf(t).any()):
                raise ModelError(f"the model's weights hold Inf (tensor {name})", hint=WEIGHTS_HINT)


def check_forward(module: Any, specs: list[TensorSpec], dims: dict[str, int] | None = None) -> int:
    """Check the weights, run the module once on the declared shapes; return the number of outputs."""
    torch = require_torch()
    check_weights(module)
    with torch.no_grad():
        try:
            out = module(*example_inputs(specs, dims=dims))
        except Exception as e:
            shapes = ", ".join(f"{s.name}{s.shape_str}" for s in specs)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"the model does not accept the declared inputs ({shapes}): {first}",
                hint="fix `inputs` in edgepack.yaml to the shapes the model's forward() takes",
            ) from e
    return len(out) if isinstance(out, (tuple, list)) else 1

