"""The fault catalogue's shared checks.

Every case in tests/faults/ is one row: what is done, the exit code expected, the key words of the
one-line message, and the folders that must be left exactly as they were (nothing written outside,
nothing left behind). :func:`expect_fault` checks all of that for a CLI run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from typer.testing import CliRunner

_runner = CliRunner()


def snapshot(*folders: Path) -> dict[str, tuple[int, bytes | None]]:
    """Every entry below ``folders``: path -> (size, link target). Enough to see any write, any
    leftover temp file or folder, and any changed link."""
    seen: dict[str, tuple[int, bytes | None]] = {}
    for top in folders:
        top = Path(top)
        if not top.exists():
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                link = os.readlink(p).encode() if p.is_symlink() else None
                size = p.lstat().st_size if p.is_file() and not p.is_symlink() else -1
                seen[str(p)] = (size, link)
    return seen


def changes(before: dict, after: dict) -> list[str]:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    return [f"+ {p}" for p in added] + [f"- {p}" for p in removed] + [f"~ {p}" for p in changed]


@dataclass
class Outcome:
    exit_code: int
    output: str
    traceback: bool


def cli(*args, env: dict | None = None) -> Outcome:
    """Run edgepack in this process (typer's CliRunner): output is stdout and stderr together."""
    from edgepack.cli.app import app

    res = _runner.invoke(app, [str(a) for a in args], env=env)
    raw = res.exception is not None and not isinstance(res.exception, SystemExit)
    return Outcome(res.exit_code, res.output, raw or "Traceback" in res.output)


def cli_process(*args, env: dict | None = None, cwd: Path | None = None) -> Outcome:
    """Run edgepack as its own process (signals, crashes, read-only mounts)."""
    full = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    p = subprocess.run([sys.executable, "-m", "edgepack.cli.main", *map(str, args)], capture_output=True,
                       text=True, env=full, cwd=cwd)
    out = p.stdout + p.stderr
    return Outcome(p.returncode, out, "Traceback" in out)


@dataclass
class Fault:
    """One row of the catalogue."""

    what: str
    exit_code: int
    words: tuple[str, ...]
    untouched: list[Path] = field(default_factory=list)


def expect_fault(outcome: Outcome, fault: Fault, before: dict | None = None) -> None:
    """The run failed the documented way: its exit code, one `error:` line holding the key words,
    a `hint:` line, no traceback, and (given ``before``) the watched folders exactly as they were."""
    if os.environ.get("EDGEPACK_SHOW_FAULTS"):
        print(f"\n[{fault.what}] exit {outcome.exit_code}\n{outcome.output.strip()}")
    assert not outcome.traceback, f"{fault.what}: raw traceback\n{outcome.output}"
    assert outcome.exit_code == fault.exit_code, f"{fault.what}: exit {outcome.exit_code}\n{outcome.output}"
    errors = [ln for ln in outcome.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, f"{fault.what}: expected one error line\n{outcome.output}"
    for w in fault.words:
        assert w.lower() in errors[0].lower(), f"{fault.what}: {w!r} not in {errors[0]!r}"
    assert any(ln.startswith("hint:") for ln in outcome.output.splitlines()), outcome.output
    if before is not None:
        diff = changes(before, snapshot(*fault.untouched))
        assert not diff, f"{fault.what}: left behind or changed:\n" + "\n".join(diff[:20])
