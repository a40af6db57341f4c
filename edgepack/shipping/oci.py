"""What an edgepack bundle looks like as an OCI artifact, and the checks on what a registry serves.

One artifact per bundle: the bundle tar is the single layer (``application/vnd.edgepack.bundle.v1.tar``),
the bundle's manifest.json is the config blob, and the headline figures are manifest annotations, so
a registry UI shows name, version, target, accuracy and latency without downloading anything.
A manifest read back from a registry is untrusted: :func:`bundle_layer` checks it before a byte of the
bundle is fetched, and :func:`file_name` never takes a path from it. The transport is
:mod:`edgepack.shipping.registry`.
"""

from __future__ import annotations

import re
from typing import Any

from edgepack.bundle import SUFFIX
from edgepack.errors import BundleError
from edgepack.shipping.reference import Ref

ARTIFACT_TYPE = "application/vnd.edgepack.bundle.v1"
MEDIA_BUNDLE = "application/vnd.edgepack.bundle.v1.tar"
MEDIA_VALIDATION = "application/vnd.edgepack.validation.v1.tar"  # <bundle>.validation, when shipped apart
MEDIA_CONFIG = "application/vnd.edgepack.manifest.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def annotations(manifest, signature: dict[str, Any] | None) -> dict[str, str]:
    """What a registry UI shows: OCI's standard keys plus edgepack's headline figures (strings only)."""
    m = manifest
    comp = m.measurements.compiled
    ann = {
        "org.opencontainers.image.title": m.name,
        "org.opencontainers.image.version": m.version,
        "org.opencontainers.image.created": m.created_at,
        "org.opencontainers.image.description":
            f"{m.name} {m.version} for {m.target} ({m.runtime.backend} {m.runtime.precision})",
        "dev.edgepack.name": m.name, "dev.edgepack.version": m.version, "dev.edgepack.target": m.target,
        "dev.edgepack.backend": m.runtime.backend, "dev.edgepack.precision": m.runtime.precision,
        "dev.edgepack.build-id": m.build_id,
        "dev.edgepack.latency-p50-ms": f"{comp.latency['p50_ms']:.4g}",
        "dev.edgepack.size-bytes": str(comp.size["bytes"]),
        "dev.edgepack.acceptance": "passed" if m.acceptance.passed else "failed",
    }
    if comp.accuracy:
        ann["dev.edgepack.accuracy"] = f"{comp.accuracy['value']:.4g} {comp.accuracy.get('metric', '')}".strip()
    if comp.proxy:
        ann["dev.edgepack.measured-on"] = comp.proxy
    if signature and signature.get("key_id"):
        ann["dev.edgepack.signed-by"] = signature["key_id"]
    return ann


def bundle_layer(oci: Any, ref: Ref) -> dict[str, Any]:
    """The one bundle layer of an OCI manifest, its digest and size checked (the registry is untrusted)."""
    from edgepack.bundle import max_bundle_bytes

    if not isinstance(oci, dict) or not isinstance(oci.get("config") or {}, dict) \
            or not isinstance(oci.get("layers") or [], list):
        raise BundleError(f"{ref}: the registry's manifest is not an OCI image manifest")
    kind = oci.get("artifactType") or (oci.get("config") or {}).get("mediaType")
    layers = [la for la in oci.get("layers") or [] if isinstance(la, dict) and la.get("mediaType") == MEDIA_BUNDLE]
    if kind not in (ARTIFACT_TYPE, MEDIA_CONFIG) or len(layers) != 1:
        raise BundleError(f"{ref} is not an edgepack bundle (artifact type {str(kind)[:80]!r})",
                          hint="push bundles with `edgepack push`; pull other artifacts with oras or docker")
    layer = layers[0]
    size, digest = layer.get("size"), layer.get("digest")
    if not isinstance(digest, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise BundleError(f"{ref}: the bundle layer's digest {str(digest)[:80]!r} is not a sha256 digest")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_bundle_bytes():
        raise BundleError(f"{ref}: the registry names a bundle of {str(size)[:40]} bytes "
                          f"(a positive size up to {max_bundle_bytes():,} is accepted)",
                          hint="raise $EDGEPACK_MAX_BUNDLE_BYTES if this bundle is expected to be that large")
    if not isinstance(layer.get("annotations") or {}, dict) or not isinstance(oci.get("annotations") or {}, dict):
        raise BundleError(f"{ref}: the registry's manifest has malformed annotations")
    return layer


def file_name(layer: dict[str, Any], oci: dict[str, Any]) -> str:
    """The bundle's own file name when it is a plain name; never a path from the registry."""
    title = (layer.get("annotations") or {}).get("org.opencontainers.image.title", "")
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*" + re.escape(SUFFIX), title):
        return title
    a = oci.get("annotations") or {}
    return re.sub(r"[^\w.+-]", "_", f"{a.get('dev.edgepack.name', 'bundle')}-{a.get('dev.edgepack.version', '0')}-"
                                     f"{a.get('dev.edgepack.target', 'unknown')}") + SUFFIX


def validation_layer(oci: dict[str, Any], manifest: Any) -> dict[str, Any] | None:
    """The layer holding the bundle's separate validation files: only one whose digest and size are the
    ones the (verified) bundle manifest records, so the registry cannot substitute another file."""
    art = manifest.validation.artifact
    if art is None:
        return None
    for la in oci.get("layers") or []:
        if isinstance(la, dict) and la.get("mediaType") == MEDIA_VALIDATION and la.get("digest") == art.sha256 \
                and la.get("size") == art.bytes:
            return la
    return None
