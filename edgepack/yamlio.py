"""Read a YAML file into a pydantic model; every problem becomes a ConfigError naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from edgepack.errors import ConfigError, close_match

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found", hint="give the path with --project, or run `edgepack init`")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line})",
                          hint="save the file as UTF-8 (most editors: 'Save with encoding')") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the file: {e.strerror}") from e
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from e


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (best effort, for the close-match hint)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or current is None:
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            # unions and lists: look inside the annotation for a pydantic model
            return []
        ann = fields[part].annotation
        current = _first_model(ann)
    fields = getattr(current, "model_fields", {}) or {}
    return [f.alias or name for name, f in fields.items()]


def _first_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def format_validation(path: Path, model: type[BaseModel], err: PydanticValidationError) -> ConfigError:
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")  # unknown keys first
    first = errors[0]
    loc = tuple(first.get("loc", ()))
    key = ".".join(str(p) for p in loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        match = close_match(str(loc[-1]), allowed) if loc else None
        hint = f"did you mean '{match}'?" if match else (f"allowed keys here: {', '.join(allowed)}" if allowed else None)
        more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
        return ConfigError(f"{path}: unknown key '{key}'{more}", hint=hint)
    msg = first.get("msg", "invalid value")
    more = f" (and {len(err.errors()) - 1} more problem(s))" if len(err.errors()) > 1 else ""
    return ConfigError(f"{path}: key '{key}': {msg}{more}")


def load_model(path: Path, model: type[M], data: Any = None, context: dict[str, Any] | None = None) -> M:
    data = read_yaml(path) if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=context)
    except PydanticValidationError as e:
        raise format_validation(path, model, e) from e
