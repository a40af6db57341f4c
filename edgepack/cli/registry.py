"""`edgepack push` and `edgepack pull`: bundles as OCI artifacts in any OCI registry."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgepack.cli.common import clean, Format, err, out, print_json
from edgepack.cli.options import BundleArg, FormatOpt, PlainHttpOpt, TrustedKeyOpt


def _plain(flag: bool) -> bool | None:
    return True if flag else None


def push(
    bundle: BundleArg,
    ref: str = typer.Argument(..., help="REGISTRY/REPO[:TAG]; the tag defaults to <version>-<target>."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Another tag for the same artifact; repeatable."),
    plain_http: PlainHttpOpt = False,
    format: FormatOpt = Format.human,
) -> None:
    """Upload a bundle as an OCI artifact; prints the digest to pin devices to."""
    from edgepack.shipping.registry import push as run_push

    result = run_push(bundle=bundle, ref_text=ref, extra_tags=list(tag), plain_http=_plain(plain_http))
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    ann = result["annotations"]
    if ann.get("dev.edgepack.acceptance") == "failed":
        err.print("[yellow]warning:[/] this bundle failed its acceptance gates (see `edgepack inspect`)")
    if "dev.edgepack.signed-by" not in ann:
        err.print("[yellow]note:[/] the bundle is not signed; devices with a trusted key will refuse it")
    out.print(f"pushed {escape(result['ref'])} ({result['size_bytes']} bytes)")
    for t in result["tags"][1:]:
        out.print(f"  also tagged {escape(t)}")
    out.print(f"digest {result['digest']}")
    out.print(f"pin    {escape(result['pinned'])}")


def pull(
    ref: str = typer.Argument(..., help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:..."),
    out_dir: Path = typer.Option(Path("."), "--out", "-o", help="Folder to write the bundle into."),
    pubkey: TrustedKeyOpt = None,
    plain_http: PlainHttpOpt = False,
    format: FormatOpt = Format.human,
) -> None:
    """Download a bundle; the file appears only after its digest, files and signature check out."""
    from edgepack.shipping.registry import pull as run_pull

    result = run_pull(ref_text=ref, dest=out_dir, pubkey=pubkey, plain_http=_plain(plain_http))
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    out.print(f"pulled {escape(result['name'])} {result['version']} ({result['target']}) -> {escape(result['bundle'])}")
    out.print(f"digest {result['digest']}")
    if result["signature"]:
        out.print(f"signature valid, key {result['signature']['key_id']}")
