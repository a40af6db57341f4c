"""`edgepack doctor`: which toolchains are installed here, and whether each can build and run."""

from __future__ import annotations

import importlib

from rich.markup import escape
from rich.table import Table

from edgepack.cli.common import Format, out, print_json
from edgepack.cli.options import FormatOpt
from edgepack.errors import EdgepackError


def doctor(format: FormatOpt = Format.human) -> None:
    """Check each backend's toolchain (build side and runtime side) and PyTorch."""
    from edgepack.backends import get_backend, registered_backends

    rows = []
    for name in sorted(registered_backends()):
        try:
            backend = get_backend(name)
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not hide the others
            rows.append({"backend": name, "role": "load", "ok": False, "detail": f"{type(e).__name__}: {e}", "hint": ""})
            continue
        for role, compile_side in (("build", True), ("run", False)):
            try:
                versions = backend.check_environment(compile=compile_side)
                rows.append({"backend": name, "role": role, "ok": True,
                             "detail": ", ".join(f"{k} {v}" for k, v in versions.items()), "hint": ""})
            except EdgepackError as e:
                rows.append({"backend": name, "role": role, "ok": False, "detail": e.message, "hint": e.hint})
    try:
        torch = importlib.import_module("torch")
        rows.append({"backend": "(pytorch models)", "role": "load", "ok": True, "detail": f"torch {torch.__version__}",
                     "hint": ""})
    except ImportError:
        rows.append({"backend": "(pytorch models)", "role": "load", "ok": False, "detail": "torch is not installed",
                     "hint": "pip install torch (needed to build from PyTorch models; not for validate)"})
    from edgepack.toolchains import TOOLCHAINS, executable

    when_needed = {"onnx2tf": "only for ONNX sources on tflite targets",
                   "quark": "optional: the onnx target's adaround recovery is skipped without it"}

    for name, spec in TOOLCHAINS.items():
        exe = executable(name)
        rows.append({"backend": f"({name} toolchain)", "role": "build", "ok": exe is not None,
                     "detail": str(exe) if exe else f"not installed: {spec['purpose']}",
                     "hint": "" if exe else f"edgepack toolchain install {name} ({when_needed.get(name, 'optional')})"})
    if format == Format.json:
        print_json(rows)
        return
    t = Table(title="edgepack doctor")
    for col in ("backend", "role", "status", "detail / hint"):
        t.add_column(col)
    for r in rows:
        status = "[green]ok[/]" if r["ok"] else "[red]missing[/]"
        detail = r["detail"] + (f" -> {r['hint']}" if r["hint"] else "")
        t.add_row(r["backend"], r["role"], status, escape(detail))
    out.print(t)
