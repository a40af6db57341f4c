"""`edgepack build-engine`: on a Jetson, build (or find) the TensorRT engine for this device."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgepack.cli.common import Format, out, print_json
from edgepack.cli.options import FormatOpt
from edgepack.errors import ConfigError


def build_engine(
    bundle: Path = typer.Argument(..., help="A bundle built for a TensorRT (jetson-*) target."),
    format: FormatOpt = Format.human,
) -> None:
    """Build the TensorRT engine for this device from the bundle's QDQ ONNX and cache it under its
    compatibility key (what `validate` would do first; for install scripts)."""
    import json

    from edgepack.backends import tensorrt_device as dev
    from edgepack.bundle import open_bundle

    with open_bundle(bundle) as opened:
        m = opened.manifest
        if m.runtime.backend != "tensorrt":
            raise ConfigError(f"{bundle}: built for backend '{m.runtime.backend}', not tensorrt",
                              hint="build-engine is for bundles of jetson-* targets")
        model_dir = opened.file(m.runtime.model_file).parent
        cfg = json.loads((model_dir / "builder.json").read_text())
        key = dev.device_key(dla_core=cfg.get("dla_core"))
        engine, notes = dev.ensure_engine(model_dir=model_dir, device=key,
                                          build=lambda o, e, t: dev.build_engine(o, e, t, builder_cfg=cfg))
        engine = engine if not str(engine).startswith(str(opened.root)) else \
            dev.copy_to_cache(engine=engine, model_dir=model_dir, device=key)
    result = {"bundle": str(bundle), "key": key.folder, "engine": str(engine), "notes": notes}
    if format == Format.json:
        print_json(result)
    else:
        for n in notes:
            out.print(escape(n))
        out.print(f"engine for {key.folder}: {escape(str(engine))}")
