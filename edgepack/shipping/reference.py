"""OCI references, ``REGISTRY/REPO[:TAG][@sha256:DIGEST]``, parsed as docker does, registry required."""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgepack.errors import ConfigError

LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")


@dataclass(frozen=True)
class Ref:
    """``REGISTRY/REPO[:TAG][@DIGEST]``; the registry is always explicit (no Docker Hub default)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s

    @property
    def loopback(self) -> bool:
        host = self.registry.rsplit(":", 1)[0] if not self.registry.startswith("[") else self.registry.split("]")[0] + "]"
        return host in LOOPBACK

    def with_tag(self, tag: str) -> Ref:
        return Ref(self.registry, self.repository, tag, None)

    def pinned(self, digest: str) -> Ref:
        return Ref(self.registry, self.repository, None, digest)


def parse_ref(text: str) -> Ref:
    """Parse a reference the way docker does, but insist on a registry host for clarity."""
    rest, digest = (text.split("@", 1) + [None])[:2] if "@" in text else (text, None)
    host, sep, path = rest.partition("/")
    if not sep or not ("." in host or ":" in host or host == "localhost"):
        raise ConfigError(f"'{text}' does not name a registry",
                          hint="write REGISTRY/REPO[:TAG] or REGISTRY/REPO@sha256:..., e.g. 127.0.0.1:5000/models/digits:1.2.3-onnx")
    repo, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        repo, tag = path.rsplit(":", 1)
    if not _REPO.match(repo):
        raise ConfigError(f"'{text}': repository '{repo}' is not valid (lowercase letters, digits, . _ - and /)")
    if tag is not None and not TAG_RE.match(tag):
        raise ConfigError(f"'{text}': tag '{tag}' is not valid (letters, digits, _ . -, at most 128)")
    if digest is not None and not _DIGEST.match(digest):
        raise ConfigError(f"'{text}': digest '{digest}' is not valid", hint="pin with @sha256:<64 hex digits>")
    return Ref(host, repo, tag, digest)


def tag_for(version: str, target: str) -> str:
    """The default tag `<version>-<target>` (semver '+build' becomes '_build': '+' is not allowed in tags)."""
    return re.sub(r"[^\w.-]", "_", f"{version}-{target}")[:128]
