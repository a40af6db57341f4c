"""Fuzz: 500 randomly mutated copies of a signed bundle (byte flips, member renames, header edits,
manifest field edits, truncation, compression) through `verify`, `validate` and `install`, each with
the trusted key. Counted: tampered bundles accepted, writes outside the install root, raw tracebacks,
all of which must be 0. A mutant may be accepted only when every file it holds is byte-identical to
the original's (a flipped bit in a tar header's mtime changes nothing that matters).
Seed: $EDGEPACK_FUZZ_SEED (default below); count: $EDGEPACK_FUZZ_COUNT (default 500)."""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import random
import tarfile
import tempfile
from pathlib import Path

from tests.faults import crafting as c
from tests.faults.helpers import cli, snapshot

SEED = int(os.environ.get("EDGEPACK_FUZZ_SEED", "20261201"))
COUNT = int(os.environ.get("EDGEPACK_FUZZ_COUNT", "500"))
HOSTILE_NAMES = ["../evil", "/etc/evil", "model/../../evil", "manifest.json", "signature.json", "model",
                 "a\x1b[2Jb", "./labels.json", "model/model.onnx/x", "x" * 300, ""]
HOSTILE_VALUES = ["../../x", "/etc/passwd", "a/b", "x\x1b[2J\nPASS", "", "." , "..", "1" * 200, None, 10 ** 15, -1,
                  "sha256:" + "0" * 64]
FIELDS = ["name", "version", "target", "build_id", "runtime.model_file", "validation.inputs_file",
          "validation.outputs_file", "validation.holdout_file", "files.0.path", "files.0.bytes", "files.1.sha256",
          "measurements.compiled.accuracy.value", "profile.device.name", "schema_version", "labels"]


def _content(data: bytes) -> dict[str, bytes] | None:
    """Regular files of a tar by normalised name, as a lenient reader sees them; None if unreadable."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            out = {}
            for m in tar.getmembers():
                if m.isreg():
                    out[m.name.removeprefix("./")] = tar.extractfile(m).read()
            return out
    except Exception:
        return None


def _mutate(rng: random.Random, src: bytes, items) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip-manifest", "rename", "header", "field", "field", "truncate", "append",
                       "duplicate", "gzip", "drop"])
    if kind == "flip":
        b = bytearray(src)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "flip-manifest":
        start = src.find(b'"schema_version"')
        b = bytearray(src)
        for _ in range(rng.randint(1, 3)):
            b[start + rng.randrange(4000)] ^= 1 << rng.randrange(8)
        return kind, bytes(b)
    if kind == "truncate":
        return kind, src[: rng.randrange(len(src))]
    if kind == "append":
        return kind, src + bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
    if kind == "gzip":
        return kind, gzip.compress(src)
    new = [(c._copy(i), d) for i, d in items]
    k = rng.randrange(len(new))
    info, data = new[k]
    if kind == "rename":
        info.name = rng.choice(HOSTILE_NAMES + [n for n, _ in ((i.name, 0) for i, _ in items)])
    elif kind == "header":
        what = rng.choice(["type", "size", "linkname", "mode"])
        if what == "type":
            info.type = rng.choice([tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                                    tarfile.DIRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE])
            info.linkname = rng.choice(["/etc/shadow", "../x", "labels.json"])
        elif what == "size":
            data = data[: max(0, len(data) - rng.randint(1, 64))] if rng.random() < 0.5 else data + b"\0" * 512
        elif what == "linkname":
            info.linkname = "/etc/passwd"
        else:
            info.mode = rng.choice([0o4755, 0o777, 0o6777])
    elif kind == "duplicate":
        new.append((c._copy(info), data + (b" " if rng.random() < 0.5 else b"")))
    elif kind == "drop":
        del new[k]
    elif kind == "field":
        k = next(j for j, (i, _) in enumerate(new) if i.name == "manifest.json")
        m = json.loads(new[k][1])
        try:
            c.set_field(m, rng.choice(FIELDS), rng.choice(HOSTILE_VALUES))
        except (KeyError, IndexError, TypeError):
            pass
        if rng.random() < 0.5:  # an editor who knows the sealing rule (no key, so no signature)
            try:
                m["build_id"] = c.seal_of(items, m)
            except Exception:
                pass
        new[k] = (new[k][0], json.dumps(m).encode())
    buf = Path(tempfile.mkstemp(suffix=".tar")[1])
    try:
        c.write(buf, new)
        return kind, buf.read_bytes()
    finally:
        buf.unlink()


def test_fuzz_mutated_bundles(signed, fault_keys, tmp_path, capsys):
    from edgepack import errors

    documented = {cls.exit_code for cls in vars(errors).values()
                  if isinstance(cls, type) and issubclass(cls, errors.EdgepackError) and cls is not errors.EdgepackError}
    rng = random.Random(SEED)
    src = signed.read_bytes()
    items = c.members(signed)
    original = _content(src)
    pub = fault_keys / "a.pub"
    sandbox = tmp_path / "sandbox"
    (sandbox / "roots").mkdir(parents=True)
    tmp = Path(tempfile.gettempdir())
    tmp_before = {p.name for p in tmp.glob("edgepack-bundle-*")}
    counts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    problems: list[str] = []
    for n in range(COUNT):
        kind, data = _mutate(rng, src, items)
        kinds[kind] += 1
        bad = sandbox / "mutant.edgepack"
        bad.write_bytes(data)
        outside = lambda: {k: v for k, v in snapshot(sandbox).items()  # noqa: E731
                           if not k.startswith(str(sandbox / "roots") + os.sep)}
        before = outside()
        root = sandbox / "roots" / str(n)
        runs = {"verify": cli("verify", bad, "--pubkey", pub),
                "validate": cli("validate", bad, "--pubkey", pub, "--runs", "1", "--report", sandbox / "report.json"),
                "install": cli("install", bad, "--root", root, "--pubkey", pub, "--runs", "1")}
        (sandbox / "report.json").unlink(missing_ok=True)
        if outside() != before:
            problems.append(f"#{n} {kind}: wrote outside the root")
            counts["writes outside"] += 1
        identical = _content(data) == original
        for command, res in runs.items():
            counts[f"{command} exit {res.exit_code}"] += 1
            if res.traceback:
                counts["raw tracebacks"] += 1
                problems.append(f"#{n} {kind} {command}: traceback\n{res.output[-800:]}")
            elif res.exit_code == 0 and not identical:
                counts["tampered accepted"] += 1
                problems.append(f"#{n} {kind} {command}: a tampered bundle was accepted")
            elif res.exit_code not in documented | {0}:
                problems.append(f"#{n} {kind} {command}: undocumented exit {res.exit_code}: {res.output[-300:]}")
        if runs["install"].exit_code == 0:
            counts["accepted (identical content)"] += 1
            installed = root / "current" / "bundle"
            got = {p.relative_to(installed).as_posix(): p.read_bytes() for p in installed.rglob("*") if p.is_file()}
            if got != original:
                counts["tampered installed"] += 1
                problems.append(f"#{n} {kind}: the installed files differ from the original")
        else:
            assert not (root / "current").exists() or problems
    leaked = {p.name for p in tmp.glob("edgepack-bundle-*")} - tmp_before
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}: {COUNT} mutants ({dict(sorted(kinds.items()))})")
        print("fuzz counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"fuzz: tampered accepted {counts['tampered accepted'] + counts['tampered installed']}, "
              f"writes outside the root {counts['writes outside']}, raw tracebacks {counts['raw tracebacks']}, "
              f"temp folders left {len(leaked)}")
    assert not problems, "\n".join(problems[:10])
    assert not leaked, leaked
