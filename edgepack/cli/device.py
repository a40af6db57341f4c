"""`edgepack install`, `edgepack rollback`, `edgepack status`: the device side of shipping."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from edgepack.cli.common import clean, Format, fmt, out, print_json
from edgepack.cli.options import DeviceIdOpt, DeviceKeyOpt, FormatOpt, PlainHttpOpt, RootOpt, RunsOpt, ThreadsOpt


def install(
    source: Annotated[str, typer.Argument(help="A .edgepack file, or REGISTRY/REPO:TAG / REGISTRY/REPO@sha256:...")],
    root: RootOpt,
    pubkey: DeviceKeyOpt = None,
    force: bool = typer.Option(False, "--force", help="Install even if the bundle's target does not match this machine, or its build "
                                                "failed its acceptance gates."),
    runs: RunsOpt = None,
    threads: ThreadsOpt = None,
    device_id: DeviceIdOpt = None,
    keep: int = typer.Option(2, "--keep", min=2, help="Version folders to keep (current and previous at least)."),
    plain_http: PlainHttpOpt = False,
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned",
                                        help="Install without a trusted key (unsigned or unverifiable bundles). "
                                             "Permanently for this root: create ROOT/allow-unsigned."),
    format: FormatOpt = Format.human,
) -> None:
    """Verify the signature, check the target, validate on this device, then switch `current`
    atomically. A failure leaves the active version untouched. Without a trusted key
    (--pubkey, ROOT/trusted.pub) only --allow-unsigned installs anything."""
    from edgepack.shipping.install import install as run_install

    result = run_install(source=source, root=root, pubkey=pubkey, force=force, runs=runs, threads=threads,
                         device_id=device_id, plain_http=True if plain_http else None, keep=keep,
                         allow_unsigned=allow_unsigned)
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    for n in result["target_notes"]:
        out.print(f"[yellow]note:[/] {escape(n)}")
    out.print(f"[green]installed[/] {escape(result['installed'])}")
    _print_status(result)


def rollback(
    root: RootOpt,
    pubkey: DeviceKeyOpt = None,
    device_id: DeviceIdOpt = None,
    format: FormatOpt = Format.human,
) -> None:
    """Make the previous version active again (and the current one the previous)."""
    from edgepack.shipping.install import rollback as run_rollback

    result = run_rollback(root=root, pubkey=pubkey, device_id=device_id)
    if format == Format.json:
        print_json(result)
        return
    result = clean(result)  # manifest and report fields are untrusted
    out.print("[green]rolled back[/]")
    _print_status(result)


def status(
    root: RootOpt,
    verify: bool = typer.Option(False, "--verify", help="Also re-check the active bundle's files against their sha256."),
    format: FormatOpt = Format.human,
) -> None:
    """The active and previous versions here, their validation results and the last attempt."""
    from edgepack.shipping.install import status as run_status

    result = run_status(root=root, verify=verify)
    if format == Format.json:
        print_json(result)
    else:
        _print_status(clean(result))  # manifest and report fields are untrusted
    if result.get("problem"):  # a monitoring script reads the exit code
        from edgepack.errors import InstallError

        raise InstallError(f"{root}: {result['problem']}",
                           hint="`edgepack rollback` or install a version; `edgepack status --format json` has details")


def _version_line(label: str, v: dict[str, Any] | None) -> str:
    if not v:
        return f"{label:<9}-"
    val = v["validation"]
    verdict = "[green]pass[/]" if val.get("passed") else "[red]FAIL[/]" if val.get("passed") is False else "-"
    signed = "signed" if v.get("signature_verified") else "unsigned" if not v.get("signed_by") else "signature not checked"
    if not v.get("signature_verified"):
        signed += ": figures not protected"
    return (f"{label:<9}{escape(str(v['name']))} {v['version']} ({v['target']}) {v['build_id'][:19]}  validation {verdict}, "
            f"holdout top1 {fmt(val.get('holdout_top1'), 2)}, p50 {fmt(val.get('p50_ms'))} ms  {escape('[' + signed + ']')}")


def _print_status(s: dict[str, Any]) -> None:
    out.print(f"device   {escape(str(s['device_id']))}  root {escape(s['root'])}")
    out.print(_version_line("active", s["active"]))
    if (s["active"] or {}).get("integrity") == "ok":
        out.print("         every file of the active bundle matches its sha256")
    out.print(_version_line("previous", s["previous"]))
    last = s.get("last_attempt")
    if last:
        line = f"last     {last['action']} {escape(str(last.get('version') or last['source']))}: {last['result']} at {last['at']}"
        if last.get("error"):
            line += f" ({escape(last['error'])})"
        out.print(line)
    if s.get("interrupted"):
        out.print("[yellow]an install was interrupted; the next install or rollback cleans up after it[/]")
    if s.get("problem"):
        out.print(f"[red]problem:[/] {escape(s['problem'])}")
