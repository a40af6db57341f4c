"""Fuzz: mutated copies of a signed bundle (byte flips, member renames, header edits, manifest field
edits, truncation, compression, ...) through `verify`, `validate` and `install`, each with the trusted
key. Counted: tampered bundles accepted, writes outside the install root, raw tracebacks, all of which
must be 0. A mutant may be accepted only when every file it holds is byte-identical to the original's
(a flipped bit in a tar header's mtime changes nothing that matters).

The mutants are a catalogue, not 500 draws of the same few kinds: every kind of edit, and within a kind
every variant that takes its own path through the reader (each hostile member name, each header edit:
member type, size, link target, mode; each manifest field set to no value, a number, escape sequences,
a path out and one more hostile value, resealed or not; each member dropped, each duplicated), with
the members, positions and bytes drawn from a seeded generator; plus the kinds whose effect depends on
where the edit lands (bit flips, truncation, appended bytes) drawn several times. Compressing is
deterministic, so it is one mutant. Against 500 draws of the old mix (seed 20261201; 1362 lines of
edgepack/ reached, traced per line) the catalogue alone reaches the same 1362 lines with the same
exit codes and error checks (the names and values quoted in the messages differ).
On top of it, $EDGEPACK_FUZZ_COUNT (default 25) mutants drawn from the whole mix at random.
Seed: $EDGEPACK_FUZZ_SEED (default below)."""

from __future__ import annotations

import collections
import gzip
import io
import json
import os
import random
import shutil
import tarfile
import tempfile
from pathlib import Path

from tests.faults import crafting as c
from tests.faults.helpers import cli, snapshot

SEED = int(os.environ.get("EDGEPACK_FUZZ_SEED", "20261201"))
COUNT = int(os.environ.get("EDGEPACK_FUZZ_COUNT", "25"))
HOSTILE_NAMES = ["../evil", "/etc/evil", "model/../../evil", "manifest.json", "signature.json", "model",
                 "a\x1b[2Jb", "./labels.json", "model/model.onnx/x", "x" * 300, ""]
HOSTILE_VALUES = ["../../x", "/etc/passwd", "a/b", "x\x1b[2J\nPASS", "", "." , "..", "1" * 200, None, 10 ** 15, -1,
                  "sha256:" + "0" * 64]
EVERY_FIELD = [None, -1, "x\x1b[2J\nPASS", "../../x"]  # the catalogue sets each of these on every field
FIELDS = ["name", "version", "target", "build_id", "runtime.model_file", "validation.inputs_file",
          "validation.outputs_file", "validation.holdout_file", "files.0.path", "files.0.bytes", "files.1.sha256",
          "measurements.compiled.accuracy.value", "profile.device.name", "schema_version", "labels"]
KINDS = ["flip", "flip-manifest", "rename", "header", "field", "field", "truncate", "append", "duplicate", "gzip",
         "drop"]  # the random mix (field edits twice as likely)
LINK_TYPES = [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE,
              tarfile.CONTTYPE]
LINK_TARGETS = ["/etc/shadow", "../x", "labels.json"]


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


def _tar(new) -> bytes:
    buf = Path(tempfile.mkstemp(suffix=".tar")[1])
    try:
        c.write(buf, new)
        return buf.read_bytes()
    finally:
        buf.unlink()


def _flip(rng: random.Random, src: bytes) -> bytes:
    b = bytearray(src)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def _flip_manifest(rng: random.Random, src: bytes) -> bytes:
    start = src.find(b'"schema_version"')
    b = bytearray(src)
    for _ in range(rng.randint(1, 3)):
        b[start + rng.randrange(4000)] ^= 1 << rng.randrange(8)
    return bytes(b)


def _truncate(rng: random.Random, src: bytes) -> bytes:
    return src[: rng.randrange(len(src))]


def _append(rng: random.Random, src: bytes) -> bytes:
    return src + bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))


def _edit(items, k: int, edit) -> bytes:
    """The bundle rewritten with member ``k`` (a copy) through ``edit(new, k)``, which may change the list."""
    new = [(c._copy(i), d) for i, d in items]
    edit(new, k)
    return _tar(new)


def _rename(items, k: int, name: str) -> bytes:
    def edit(new, k):
        new[k][0].name = name
    return _edit(items, k, edit)


def _header(rng: random.Random, items, k: int, what: str, value=None) -> bytes:
    def edit(new, k):
        info, data = new[k]
        if what == "type":
            info.type = value
            info.linkname = rng.choice(LINK_TARGETS)
        elif what == "size":  # the data shorter, or longer by a block of zeros
            data = data[: max(0, len(data) - rng.randint(1, 64))] if value == "shorter" else data + b"\0" * 512
        elif what == "linkname":
            info.linkname = "/etc/passwd"
        else:
            info.mode = value
        new[k] = (info, data)
    return _edit(items, k, edit)


def _duplicate(items, k: int, changed: bool) -> bytes:
    def edit(new, k):
        info, data = new[k]
        new.append((c._copy(info), data + (b" " if changed else b"")))
    return _edit(items, k, edit)


def _drop(items, k: int) -> bytes:
    def edit(new, k):
        del new[k]
    return _edit(items, k, edit)


def _field(items, field: str, value, reseal: bool) -> bytes:
    """A manifest field set to a hostile value; ``reseal``: by an editor who knows the sealing rule (no key,
    so no signature), which works only while the manifest still validates."""
    def edit(new, k):
        k = next(j for j, (i, _) in enumerate(new) if i.name == "manifest.json")
        m = json.loads(new[k][1])
        try:
            c.set_field(m, field, value)
        except (KeyError, IndexError, TypeError):
            pass
        if reseal:
            try:
                m["build_id"] = c.seal_of(items, m)
            except Exception:
                pass
        new[k] = (new[k][0], json.dumps(m).encode())
    return _edit(items, 0, edit)


def _mutate(rng: random.Random, src: bytes, items) -> tuple[str, bytes]:
    """One mutant of a kind drawn from the whole mix, all of its parameters drawn too."""
    kind = rng.choice(KINDS)
    if kind in ("flip", "flip-manifest", "truncate", "append"):
        return kind, {"flip": _flip, "flip-manifest": _flip_manifest, "truncate": _truncate,
                      "append": _append}[kind](rng, src)
    if kind == "gzip":
        return kind, gzip.compress(src)
    k = rng.randrange(len(items))
    if kind == "rename":
        return kind, _rename(items, k, rng.choice(HOSTILE_NAMES + [i.name for i, _ in items]))
    if kind == "header":
        what = rng.choice(["type", "size", "linkname", "mode"])
        value = {"type": lambda: rng.choice(LINK_TYPES), "size": lambda: rng.choice(["shorter", "longer"]),
                 "mode": lambda: rng.choice([0o4755, 0o777, 0o6777])}.get(what, lambda: None)()
        return kind, _header(rng, items, k, what, value)
    if kind == "duplicate":
        return kind, _duplicate(items, k, rng.random() < 0.5)
    if kind == "drop":
        return kind, _drop(items, k)
    return kind, _field(items, rng.choice(FIELDS), rng.choice(HOSTILE_VALUES), rng.random() < 0.5)


def mutants(src: bytes, items, seed: int = SEED, count: int = COUNT):
    """(kind, bytes): the catalogue (module docstring), then ``count`` draws from the whole mix."""
    rng = random.Random(seed)
    names = [i.name for i, _ in items]
    yield "gzip", gzip.compress(src)  # deterministic: every compressed copy takes the same path
    for k in range(len(items)):  # each member missing; each one twice, the copy equal or not
        yield "drop", _drop(items, k)
        yield "duplicate", _duplicate(items, k, changed=k % 2 == 1)
    for name in HOSTILE_NAMES + names:  # each hostile name, and each member's name on some member
        yield "rename", _rename(items, rng.randrange(len(items)), name)
    for t in LINK_TYPES:  # each member type that is not a regular file
        yield "header", _header(rng, items, rng.randrange(len(items)), "type", t)
    for what, value in [("size", "shorter"), ("size", "longer"), ("linkname", None), ("mode", 0o4755),
                        ("mode", 0o777), ("mode", 0o6777)]:
        yield "header", _header(rng, items, rng.randrange(len(items)), what, value)
    for i, field in enumerate(FIELDS):  # each field: no value, a number, escapes, a path out, and one more value
        rest = [v for v in HOSTILE_VALUES if v not in EVERY_FIELD]  # in turn over the fields, so each is used
        for r, value in enumerate([*EVERY_FIELD, rest[i % len(rest)]]):
            yield "field", _field(items, field, value, reseal=(i + r) % 2 == 1)
    for kind, n, how in [("flip", 24, _flip), ("flip-manifest", 12, _flip_manifest), ("truncate", 12, _truncate),
                         ("append", 6, _append)]:  # where they land decides what they break: drawn several times
        for _ in range(n):
            yield kind, how(rng, src)
    for _ in range(count):
        yield _mutate(rng, src, items)


def test_fuzz_mutated_bundles(signed, fault_keys, tmp_path, capsys):
    from edgepack import errors

    documented = {cls.exit_code for cls in vars(errors).values()
                  if isinstance(cls, type) and issubclass(cls, errors.EdgepackError) and cls is not errors.EdgepackError}
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
    for n, (kind, data) in enumerate(mutants(src, items)):
        kinds[kind] += 1
        bad = sandbox / "mutant.edgepack"
        bad.write_bytes(data)
        root = sandbox / "roots" / str(n)
        # everything in the sandbox but this mutant's root (earlier roots are removed once checked, so
        # the walk stays small; a write into one of them would show here, as would one anywhere else)
        def outside(mine: str = str(root)) -> dict:
            return {k: v for k, v in snapshot(sandbox).items() if k != mine and not k.startswith(mine + os.sep)}

        before = outside()
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
        shutil.rmtree(root, ignore_errors=True)
    leaked = {p.name for p in tmp.glob("edgepack-bundle-*")} - tmp_before
    total = sum(kinds.values())
    with capsys.disabled():
        print(f"\nfuzz seed {SEED}: {total} mutants ({dict(sorted(kinds.items()))})")
        print("fuzz counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        print(f"fuzz: tampered accepted {counts['tampered accepted'] + counts['tampered installed']}, "
              f"writes outside the root {counts['writes outside']}, raw tracebacks {counts['raw tracebacks']}, "
              f"temp folders left {len(leaked)}")
    assert set(kinds) == set(KINDS), kinds  # every kind of edit ran
    assert counts["accepted (identical content)"] and counts["install exit 7"], counts  # both outcomes were reached
    assert not problems, "\n".join(problems[:10])
    assert not leaked, leaked
