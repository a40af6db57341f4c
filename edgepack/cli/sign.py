"""`edgepack keygen`, `edgepack sign`, `edgepack verify`: Ed25519 signatures over a bundle's manifest."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from edgepack.cli.common import clean, Format, out, print_json
from edgepack.cli.options import BundleArg, CheckKeyOpt, FormatOpt

UNSIGNED_NOTE = ("unsigned: the manifest's figures are not protected (its build id catches accidental edits only; "
                 "sign with `edgepack sign`)")


def keygen(
    out_prefix: Path = typer.Option(Path("edgepack"), "--out", "-o",
                                    help="Writes OUT.key (private, mode 0600) and OUT.pub (public)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
    format: FormatOpt = Format.human,
) -> None:
    """Make an Ed25519 key pair: the private key signs on the build machine, the public one goes to devices."""
    from edgepack.shipping.signing import generate_keypair

    private, public = out_prefix.with_name(out_prefix.name + ".key"), out_prefix.with_name(out_prefix.name + ".pub")
    kid = generate_keypair(private_path=private, public_path=public, force=force)
    if format == Format.json:
        print_json({"private_key": str(private), "public_key": str(public), "key_id": kid})
        return
    out.print(f"private key {escape(str(private))} (keep it secret: mode 0600)")
    out.print(f"public key  {escape(str(public))} (copy it to devices, e.g. ROOT/trusted.pub)")
    out.print(f"key id      {kid}")


def sign(
    bundle: Path = typer.Argument(..., help="The .edgepack bundle to sign in place."),
    key: Path = typer.Option(..., "--key", "-k", help="Ed25519 private key from `edgepack keygen`."),
    format: FormatOpt = Format.human,
) -> None:
    """Sign a bundle's manifest (which holds every file's sha256); re-signing replaces the signature."""
    from edgepack.shipping.signing import sign_bundle

    result = sign_bundle(bundle=bundle, key=key)
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    out.print(f"signed {escape(str(bundle))} with key {result['key_id']}")


def verify(
    bundle: BundleArg,
    pubkey: CheckKeyOpt = None,
    format: FormatOpt = Format.human,
) -> None:
    """Check every file against the manifest and, with a key, the manifest against its signature.
    Runs no model (that is `edgepack validate`)."""
    from edgepack.shipping.signing import verify_bundle

    result = verify_bundle(bundle=bundle, pubkey=pubkey)
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    sig = result["signature"]
    out.print(f"[green]OK[/] {escape(result['name'])} {result['version']} ({result['target']}): "
              f"{result['files_checked']} files match their sha256")
    if sig["verified"]:
        out.print(f"  signature valid, key {sig['key_id']}")
    elif sig.get("signed"):
        out.print(f"  [yellow]signed by key {escape(sig['key_id'])}, not checked[/] (pass --pubkey to check it): "
                  "until it is, the manifest's figures are not protected")
    else:
        out.print(f"  [yellow]{UNSIGNED_NOTE}[/]")
