"""The device side: install a bundle into a root folder, switch to it atomically, roll back.

Layout of ROOT (every switch is a rename, so a kill at any point leaves a usable root)::

    versions/<name>-<version>-<target>-<build12>/
        bundle/           the extracted bundle, byte for byte (`edgepack validate` re-checks it)
        validation.json   the report of `validate` run on this device before the switch
        install.json      where it came from, when, the signature it carried
    current  -> versions/...   symlink, replaced with os.replace (the application loads current/bundle)
    previous -> versions/...   the version `rollback` returns to
    state.json            a cache (last attempt, device id); `status` takes the truth from the links
    device-status.json    the report for fleet tools (`edgepack fleet report` reads a folder of them)
    trusted.pub           the fleet's public key: every install and rollback requires its signature
    allow-unsigned        optional, empty: this device also installs bundles nobody signed (an opt-out;
                          without it and without a trusted key, install refuses every bundle)
    switch.json           present only while `current`/`previous` are being switched: the intended
                          links, so that a switch killed half way is finished by the next command
                          (the atomic writes, links, lock and journal live in :mod:`edgepack.shipping.switch`)

Steps, in order, each one a test crash point (``EDGEPACK_TEST_CRASH_AT=<step>`` exits with 137 there):
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.bundle import SIGNATURE, attach_validation, open_bundle, read_archive
from edgepack.errors import AcceptanceError, BundleError, ConfigError, DiskFullError, EdgepackError, InstallError, SignatureError
from edgepack.shipping.device import check_target
from edgepack.shipping.switch import (JOURNAL, crash, finish_switch, fsync_dir, locked, read_json, resolve, switch,
                                      write_json)

STEPS = ("locked", "fetched", "extracted", "verified", "validated", "placed", "journal-written", "previous-linked",
         "current-linked", "state-written")
ROLLBACK_STEPS = ("rollback-journal-written", "rollback-previous-linked", "rollback-current-linked")
DEVICE_ENV = "EDGEPACK_DEVICE_ID"
TRUSTED = "trusted.pub"
ALLOW_UNSIGNED = "allow-unsigned"
STATE = "state.json"
DEVICE_STATUS = "device-status.json"
__doc__ += "``" + " -> ".join(STEPS) + "``; rollback: ``" + " -> ".join(ROLLBACK_STEPS) + "``.\n"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare_root(root: Path) -> None:
    try:
        (root / "versions").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InstallError(f"cannot use {root} as the install root: {e.strerror or e}",
                           hint="choose a writable folder with --root (e.g. /var/lib/edgepack)") from e


def _cleanup(root: Path) -> None:
    """Remove what an interrupted install left: staging folders, temp links, downloads."""
    for p in (root / "versions").glob(".staging-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in (root / "versions").glob(".trash-*"):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("current.tmp", "previous.tmp"):
        (root / name).unlink(missing_ok=True)
    shutil.rmtree(root / ".downloads", ignore_errors=True)
    finish_switch(root)


def unsigned_allowed(root: Path, flag: bool = False) -> bool:
    """The documented opt-out: --allow-unsigned, or an ``allow-unsigned`` file in the root."""
    return flag or (root / ALLOW_UNSIGNED).is_file()


def trusted_key(root: Path, pubkey: Path | None) -> Path | None:
    """The key a device requires: --pubkey / $EDGEPACK_PUBKEY, else ROOT/trusted.pub when provisioned."""
    if pubkey is not None:
        return Path(pubkey)
    p = root / TRUSTED
    return p if p.is_file() else None


def version_id(manifest) -> str:
    return f"{manifest.name}-{manifest.version}-{manifest.target}-{manifest.build_id.split(':')[-1][:12]}"


def _fetch(source: str, root: Path, pubkey: Path | None, plain_http: bool | None) -> tuple[Path, str | None]:
    """A local bundle as is; a registry reference is pulled (and verified) into ROOT/.downloads."""
    path = Path(source)
    if path.exists():
        return path, None
    if "/" in source and (":" in source or "@" in source) and not source.startswith((".", "/")):
        from edgepack.shipping.registry import pull

        res = pull(source, root / ".downloads", pubkey, plain_http)
        return Path(res["bundle"]), res["pinned"]
    raise ConfigError(f"{source}: no such bundle file, and not a registry reference",
                      hint="give a .edgepack file or REGISTRY/REPO:TAG (or @sha256:...)")


def _extract(bundle: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    if bundle.is_dir():
        shutil.copytree(bundle, dest, dirs_exist_ok=True)
        return
    try:
        manifest = read_archive(bundle, dest, str(bundle))  # checked before a byte is written; the caller removes staging
        attach_validation(bundle, dest, manifest)  # validation files shipped apart, when beside the bundle
    except DiskFullError as e:
        raise DiskFullError(f"{e.message}; the active version is unchanged") from e


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """The validation figures worth keeping in status files."""
    g, h, lat = report.get("golden") or {}, report.get("holdout") or {}, report.get("latency") or {}
    return {"passed": report.get("passed"), "validated_at": report.get("validated_at"),
            "within_tolerance": g.get("within_tolerance"), "top1_agreement": g.get("top1_agreement"),
            "holdout_top1": h.get("value"), "build_holdout_top1": h.get("build_value"),
            "p50_ms": lat.get("p50_ms"), "build_p50_ms": lat.get("build_p50_ms")}


def install(source: str, root: Path, pubkey: Path | None = None, force: bool = False, runs: int | None = None,
            threads: int | None = None, device_id: str | None = None, plain_http: bool | None = None,
            keep: int = 2, allow_unsigned: bool = False) -> dict[str, Any]:
    """Fetch, verify, check the target, extract, validate here, and only then switch `current`.
    Any failure leaves the active version as it was, and is recorded in the status file.

    Safe by default: without a trusted key (--pubkey, $EDGEPACK_PUBKEY, ROOT/trusted.pub) nothing is
    installed unless unsigned bundles are allowed (``allow_unsigned`` or ROOT/allow-unsigned)."""
    from edgepack.validation import validate

    root = Path(root).resolve()
    _prepare_root(root)
    with locked(root):
        crash("locked")
        _cleanup(root)
        key = trusted_key(root, pubkey)
        attempt: dict[str, Any] = {"action": "install", "source": source, "at": _now()}
        staging = root / "versions" / f".staging-{os.getpid()}"
        try:
            if key is None and not unsigned_allowed(root, allow_unsigned):
                raise SignatureError(
                    f"{root}: no trusted key is configured, so the bundle's signature cannot be checked; "
                    "this device installs only signed bundles",
                    hint=f"copy the fleet's public key to {root / TRUSTED} (or pass --pubkey); to accept unsigned "
                         f"bundles here, pass --allow-unsigned or create {root / ALLOW_UNSIGNED}",
                    reason="missing")
            bundle, pinned = _fetch(source, root, key, plain_http)
            attempt["pinned"] = pinned
            crash("fetched")
            _extract(bundle, staging / "bundle")
            crash("extracted")
            from edgepack.shipping.signing import signature_info

            with open_bundle(staging / "bundle", verify=True) as opened:
                m = opened.manifest
                sig = signature_info(opened.root, key, source)
            attempt["version"] = version_id(m)
            if not m.acceptance.passed and not force:
                raise AcceptanceError(f"{source}: this bundle failed its acceptance gates at build time: "
                                      f"{'; '.join(m.acceptance.reasons)}",
                                      hint="rebuild it within its budget, or install it anyway with --force")
            notes = check_target(m, force)
            crash("verified")
            final, reuse = _destination(root, staging / "bundle", version_id(m))
            try:
                report = validate(staging / "bundle", threads, staging / "validation.json", runs)
            except EdgepackError as e:
                if (staging / "validation.json").is_file():  # keep the evidence of a failed validation
                    os.replace(staging / "validation.json", root / "failed-validation.json")
                    e.hint = f"{e.hint}; the report is kept in {root / 'failed-validation.json'}"
                raise
            crash("validated")
            report = {k: v for k, v in report.items() if k != "report"} | {"bundle": str(final / "bundle")}
            write_json(staging / "validation.json", report)
            write_json(staging / "install.json", {"source": source, "pinned": pinned, "installed_at": _now(),
                                                   "signature": sig, "target_notes": notes})
            _place(staging, final, reuse)
            crash("placed")
            old = resolve(root / "current")
            switch(root, final, old if old is not None and old != final else None,
                    ("journal-written", "previous-linked", "current-linked"))
        except EdgepackError as e:
            e.message = e.message.replace(str(staging / "bundle"), source)  # name what the user gave
            shutil.rmtree(staging, ignore_errors=True)
            _record(root, attempt | {"result": "failed", "error": e.message, "exit_code": e.exit_code}, device_id)
            raise
        finally:
            shutil.rmtree(root / ".downloads", ignore_errors=True)
        _record(root, attempt | {"result": "installed"}, device_id)
        crash("state-written")
        _prune(root, keep)
        return status(root) | {"installed": version_id(m), "validation_report": report, "signature": sig,
                               "target_notes": notes}


def _identity(bundle: Path) -> str:
    """The bytes that can differ between two bundles with the same files: manifest and signature."""
    h = hashlib.sha256((bundle / "manifest.json").read_bytes())
    if (bundle / SIGNATURE).is_file():
        h.update((bundle / SIGNATURE).read_bytes())
    return h.hexdigest()


def _intact(bundle: Path) -> bool:
    try:
        with open_bundle(bundle, verify=True):
            return True
    except BundleError:
        return False


def _destination(root: Path, bundle: Path, vid: str) -> tuple[Path, bool]:
    """Where a validated bundle goes, and whether an identical intact copy is already there.
    Placed folders are never changed in place (a link may point at them): the same build with
    another manifest or signature (a rebuild, a new signing key) gets its own folder."""
    ident = _identity(bundle)
    for final in (root / "versions" / vid, root / "versions" / f"{vid}.{ident[:8]}"):
        if not final.exists():
            return final, False
        if _intact(final / "bundle") and _identity(final / "bundle") == ident:
            return final, True
    if final in (resolve(root / "current"), resolve(root / "previous")):
        raise InstallError(f"{final}: an installed copy of this bundle is damaged and in use",
                           hint="roll back or install another version first; then this one can be reinstalled")
    final.rename(final.with_name(f".trash-{os.getpid()}"))
    return final, False


def _place(staging: Path, final: Path, reuse: bool) -> None:
    """Move the validated folder into versions/ with one rename; an identical copy already there
    only takes the new reports."""
    if reuse:
        for name in ("validation.json", "install.json"):
            os.replace(staging / name, final / name)
        shutil.rmtree(staging)
        return
    staging.rename(final)
    fsync_dir(final.parent)


def rollback(root: Path, pubkey: Path | None = None, device_id: str | None = None) -> dict[str, Any]:
    """Swap `current` and `previous` after re-checking the previous bundle's files (and signature)."""
    from edgepack.shipping.signing import signature_info

    root = Path(root).resolve()
    if not (root / "versions").is_dir():
        raise InstallError(f"{root}: nothing is installed here")
    with locked(root):
        _cleanup(root)
        cur, prev = resolve(root / "current"), resolve(root / "previous")
        if prev is None or prev == cur:
            raise InstallError(f"{root}: there is no previous version to roll back to",
                               hint="`edgepack status` shows what is installed; install the version you want instead")
        key = trusted_key(root, pubkey)
        attempt = {"action": "rollback", "source": prev.name, "version": prev.name, "at": _now()}
        try:
            with open_bundle(prev / "bundle", verify=True) as opened:
                signature_info(opened.root, key, str(prev))
        except EdgepackError as e:
            _record(root, attempt | {"result": "failed", "error": e.message, "exit_code": e.exit_code}, device_id)
            raise
        switch(root, prev, cur, ROLLBACK_STEPS)
        _record(root, attempt | {"result": "rolled back"}, device_id)
        return status(root)


def _prune(root: Path, keep: int) -> None:
    """Delete old version folders beyond the ``keep`` newest; current and previous always stay."""
    linked = {resolve(root / "current"), resolve(root / "previous")}
    others = sorted((p for p in (root / "versions").iterdir() if not p.name.startswith(".") and p not in linked),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for p in others[max(0, keep - len(linked - {None})):]:
        shutil.rmtree(p, ignore_errors=True)


def _describe(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    m = read_json(folder / "bundle" / "manifest.json") or {}
    inst = read_json(folder / "install.json") or {}
    report = read_json(folder / "validation.json") or {}
    return {"id": folder.name, "name": m.get("name"), "version": m.get("version"), "target": m.get("target"),
            "build_id": m.get("build_id"), "path": str(folder / "bundle"), "installed_at": inst.get("installed_at"),
            "source": inst.get("source"), "pinned": inst.get("pinned"),
            "signed_by": (inst.get("signature") or {}).get("key_id"),
            "signature_verified": (inst.get("signature") or {}).get("verified", False),
            "validation": _summary(report)}


def status(root: Path, verify: bool = False) -> dict[str, Any]:
    """What runs here, from the links (state.json is only a cache). ``verify`` re-checks the active
    bundle's files against its manifest."""
    root = Path(root).resolve()
    if not (root / "versions").is_dir():
        raise InstallError(f"{root}: nothing is installed here", hint="`edgepack install BUNDLE --root DIR` first")
    if (root / JOURNAL).exists():  # a switch was killed half way: finish it, unless a command is running
        with contextlib.suppress(InstallError, OSError), locked(root):
            finish_switch(root)
    cur, prev = resolve(root / "current"), resolve(root / "previous")
    state = read_json(root / STATE) or {}
    result: dict[str, Any] = {
        "device_id": state.get("device_id") or os.environ.get(DEVICE_ENV) or socket.gethostname(),
        "hostname": socket.gethostname(), "root": str(root.resolve()), "reported_at": _now(),
        "active": _describe(cur), "previous": _describe(prev) if prev != cur else None,
        "last_attempt": state.get("last_attempt"),
        "versions_on_disk": sorted(p.name for p in (root / "versions").iterdir() if not p.name.startswith(".")),
        "interrupted": any((root / "versions").glob(".staging-*")) or (root / "current.tmp").is_symlink()
        or (root / JOURNAL).exists(),
        "unsigned_allowed": unsigned_allowed(root), "trusted_key": (root / TRUSTED).is_file(),
        "state_cache": "ok" if state.get("current") == (cur.name if cur else None) else "stale (links are the truth)",
    }
    if (root / "current").is_symlink() and cur is None:
        result["problem"] = "the current link points at a missing version"
    if verify and cur is not None:
        with open_bundle(cur / "bundle", verify=True):
            result["active"]["integrity"] = "ok"
    return result


def _record(root: Path, attempt: dict[str, Any], device_id: str | None) -> None:
    """Update the state cache and the device status file (both atomically)."""
    state = read_json(root / STATE) or {}
    state["device_id"] = device_id or state.get("device_id") or os.environ.get(DEVICE_ENV) or socket.gethostname()
    cur = resolve(root / "current")
    state["current"] = cur.name if cur else None
    prev = resolve(root / "previous")
    state["previous"] = prev.name if prev else None
    state["last_attempt"] = attempt
    state["history"] = (state.get("history") or [])[-19:] + [attempt]
    write_json(root / STATE, state)
    write_json(root / DEVICE_STATUS, status(root))
