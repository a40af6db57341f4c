"""Shared CLI pieces: consoles, output formats, typed options."""

from __future__ import annotations

import json
from enum import Enum
from typing import Any

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Format(str, Enum):
    human = "human"
    json = "json"


def print_json(data: Any) -> None:
    # plain print: rich would wrap long lines and break the JSON
    print(json.dumps(data, indent=2, default=str))


def fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)
