"""The fleet view: read the ``device-status.json`` files devices write and say who runs what.

edgepack does not collect them: the device-management tool already on the fleet does (Mender or
balena artifacts/inventory, a Greengrass component's output, or `rsync`/`scp` from a cron job into
one folder). This module only reads such a folder; it is deliberately small.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.errors import ConfigError


def _age_hours(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    try:
        t = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return round((now - t).total_seconds() / 3600, 1)


def _row(path: Path, data: dict[str, Any], now: datetime, stale_hours: float) -> dict[str, Any]:
    active = data.get("active") or {}
    val = active.get("validation") or {}
    prev = data.get("previous") or {}
    last = data.get("last_attempt") or {}
    age = _age_hours(data.get("reported_at"), now)
    return {
        "device": data.get("device_id") or path.stem, "file": str(path),
        "name": active.get("name"), "version": active.get("version"), "target": active.get("target"),
        "build_id": active.get("build_id"),
        "validation": "pass" if val.get("passed") else ("FAIL" if val.get("passed") is False else "-"),
        "holdout_top1": val.get("holdout_top1"), "p50_ms": val.get("p50_ms"),
        "signed": bool(active.get("signature_verified")),
        "previous": prev.get("version"),
        "last_attempt": last.get("result"), "last_error": last.get("error") if last.get("result") == "failed" else None,
        "last_attempt_version": last.get("version") or last.get("source"),
        "reported_at": data.get("reported_at"), "age_hours": age,
        "stale": age is not None and age > stale_hours,
        "problem": data.get("problem") or ("an install was interrupted" if data.get("interrupted") else None),
    }


def report(folder: Path, stale_hours: float = 24.0) -> dict[str, Any]:
    """One row per status file (``*.json`` in ``folder``, or ``device-status.json`` in subfolders,
    as an rsync of whole device roots leaves them), plus counts per running version."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder of device status files",
                          hint="collect each device's ROOT/device-status.json into one folder first")
    now = datetime.now(timezone.utc)
    rows, unreadable = [], []
    for p in sorted(set(folder.glob("*.json")) | set(folder.rglob("device-status.json"))):
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            unreadable.append(str(p))
            continue
        if not isinstance(data, dict) or "active" not in data or "device_id" not in data:
            unreadable.append(str(p))
            continue
        rows.append(_row(p, data, now, stale_hours))
    rows.sort(key=lambda r: (str(r["name"]), str(r["device"])))
    versions = Counter(f"{r['name']} {r['version']} ({r['target']})" if r["version"] else "nothing installed"
                       for r in rows)
    return {"devices": rows, "versions": dict(versions.most_common()), "unreadable": unreadable,
            "failed_last_attempt": sum(r["last_attempt"] == "failed" for r in rows),
            "failing_validation": sum(r["validation"] == "FAIL" for r in rows),
            "stale": sum(r["stale"] for r in rows), "stale_after_hours": stale_hours}
