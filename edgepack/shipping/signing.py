"""Ed25519 signatures over a bundle's manifest.json.

The manifest already holds every file's sha256 and size, so signing its exact bytes covers the whole
bundle: `verify_files` ties the files to the manifest, the signature ties the manifest to a key.
The signature is a detached ``signature.json`` next to manifest.json inside the tar (the manifest
cannot list its own signature). Keys are PEM files: PKCS#8 private key (mode 0600), SPKI public key.
A key is named by its id, ``sha256:`` + the hex sha256 of the 32 raw public-key bytes.
"""

from __future__ import annotations

import base64
import io
import hashlib
import json
import os
import stat
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgepack.bundle import MANIFEST, SIGNATURE, open_bundle
from edgepack.errors import BundleError, ConfigError, MissingDependencyError, SignatureError

ALGORITHM = "ed25519"
FORMAT = "edgepack-signature-v1"
PUBKEY_ENV = "EDGEPACK_PUBKEY"


def _crypto():
    """The `cryptography` serialization and Ed25519 modules, or a MissingDependencyError naming the extra."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise MissingDependencyError("cryptography", "ship", "bundle signatures") from e
    return serialization, ed25519


def key_id(public_key) -> str:
    serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _short(kid: str) -> str:
    return kid[: len("sha256:") + 16]


def generate_keypair(private_path: Path, public_path: Path, force: bool = False) -> str:
    """Write a new Ed25519 key pair. The private file is created with mode 0600 from the start
    (never world-readable, not even for a moment); existing files are kept unless ``force``."""
    serialization, ed25519 = _crypto()
    for p in (private_path, public_path):
        if p.exists() and not force:
            raise ConfigError(f"{p} already exists", hint="pass --force to overwrite it, or choose another --out")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.unlink(missing_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(pub)
    return key_id(key.public_key())


def load_private_key(path: Path):
    serialization, ed25519 = _crypto()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: private key not found", hint="`edgepack keygen` writes a key pair")
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN PUBLIC KEY"):
        raise ConfigError(f"{path}: is a public key; signing needs the private key",
                          hint="pass the .key file `edgepack keygen` wrote; the .pub file goes to devices")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key ({e})",
                          hint="`edgepack keygen` writes one; encrypted keys are not supported") from e
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:  # like ssh: a private key others can read is treated as leaked
        raise ConfigError(f"{path}: private key is readable by other users (mode {mode:o})",
                          hint=f"chmod 600 {path}")
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: is a {type(key).__name__}, edgepack signs with Ed25519 keys",
                          hint="`edgepack keygen` writes an Ed25519 key pair")
    return key


def load_public_key(path: Path):
    serialization, ed25519 = _crypto()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: public key not found", hint=f"pass --pubkey FILE or set ${PUBKEY_ENV}")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: not a PEM public key ({e})", hint="use the .pub file `edgepack keygen` wrote") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: is a {type(key).__name__}, not an Ed25519 public key")
    return key


def signature_document(manifest_bytes: bytes, private_key) -> dict[str, Any]:
    """What goes into signature.json. Only ``signature`` is signed data's proof; the other fields
    say how to check it (``signed_at`` is informational and not itself covered)."""
    return {
        "format": FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signed_file": MANIFEST,
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode(),
        "signed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def read_signature(root: Path, where: str) -> dict[str, Any] | None:
    """signature.json of an extracted bundle (None when unsigned); unreadable counts as invalid."""
    p = root / SIGNATURE
    if not p.is_file():
        return None
    try:
        doc = json.loads(p.read_text())
        if not isinstance(doc, dict) or not isinstance(doc.get("signature"), str) or not isinstance(doc.get("key_id"), str):
            raise ValueError("missing 'signature' or 'key_id'")
    except (ValueError, UnicodeDecodeError) as e:
        raise SignatureError(f"{where}: signature.json is unreadable ({e})", reason="invalid") from e
    if doc.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{where}: signature algorithm {doc.get('algorithm')!r} is not supported (only {ALGORITHM})",
                             reason="invalid")
    return doc


def verify_signature(root: Path, pubkey: Path, where: str) -> dict[str, Any]:
    """Check an extracted bundle's signature against the trusted public key; distinct errors for
    unsigned, signed by another key, and manifest changed after signing."""
    trusted = load_public_key(pubkey)
    trusted_id = key_id(trusted)
    doc = read_signature(root, where)
    if doc is None:
        raise SignatureError(f"{where}: the bundle is not signed (no signature.json) and a trusted key is configured ({pubkey})",
                             hint="sign it where it was built: `edgepack sign BUNDLE --key KEY` (or build with --sign KEY)",
                             reason="missing")
    if doc["key_id"] != trusted_id:
        raise SignatureError(f"{where}: signed with key {_short(doc['key_id'])}..., not with the trusted key "
                             f"{_short(trusted_id)}... ({pubkey})",
                             hint="use the public key of whoever signed it, or have it signed with the fleet's key",
                             reason="wrong-key")
    manifest_bytes = (root / MANIFEST).read_bytes()
    try:
        trusted.verify(base64.b64decode(doc["signature"], validate=True), manifest_bytes)
    except Exception as e:  # InvalidSignature, or a malformed base64 string
        raise SignatureError(f"{where}: manifest.json does not match its signature (modified after signing)",
                             hint="do not edit a signed bundle; fetch it again or rebuild and sign it",
                             reason="modified") from e
    return {"verified": True, "key_id": trusted_id, "pubkey": str(pubkey), "signed_at": doc.get("signed_at")}


def signature_info(root: Path, pubkey: Path | None, where: str) -> dict[str, Any]:
    """Verified signature facts when a key is given; otherwise what the bundle claims, marked unverified."""
    if pubkey is not None:
        return verify_signature(root, pubkey, where)
    doc = read_signature(root, where)
    if doc is None:
        return {"verified": False, "signed": False}
    return {"verified": False, "signed": True, "key_id": doc["key_id"], "signed_at": doc.get("signed_at")}


def sign_bundle(bundle: Path, key: Path | Any) -> dict[str, Any]:
    """Sign a bundle file in place: check its integrity first (never vouch for a corrupt bundle),
    then rewrite the tar with signature.json after manifest.json, atomically (temp file + rename)."""
    private_key = load_private_key(key) if isinstance(key, (str, Path)) else key
    bundle = Path(bundle)
    if bundle.is_dir():
        raise ConfigError(f"{bundle}: is a folder; `edgepack sign` signs a .edgepack file")
    with open_bundle(bundle, verify=True) as opened:
        manifest_bytes = (opened.root / MANIFEST).read_bytes()
    doc = signature_document(manifest_bytes, private_key)
    data = (json.dumps(doc, indent=2) + "\n").encode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{bundle.name}.", suffix=".partial", dir=bundle.parent)
    except OSError as e:
        raise ConfigError(f"{bundle}: cannot sign in place: {bundle.parent} is not writable ({e.strerror or e})",
                          hint="copy the bundle to a writable folder and sign it there") from e
    os.close(fd)
    try:
        with tarfile.open(bundle, "r:") as tin, tarfile.open(tmp, "w") as tout:
            for info in tin.getmembers():
                if info.name.lstrip("./") == SIGNATURE:
                    continue  # re-signing replaces the old signature
                tout.addfile(info, tin.extractfile(info) if info.isfile() else None)
                if info.name.lstrip("./") == MANIFEST:
                    _add_bytes(tout, SIGNATURE, data, info)
        os.chmod(tmp, stat.S_IMODE(bundle.stat().st_mode))
        os.replace(tmp, bundle)
    except tarfile.TarError as e:
        Path(tmp).unlink(missing_ok=True)
        raise BundleError(f"{bundle}: cannot rewrite the archive: {e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"bundle": str(bundle), "key_id": doc["key_id"], "signed_at": doc["signed_at"],
            "manifest_sha256": doc["manifest_sha256"]}


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, like: tarfile.TarInfo) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = like.mtime
    tar.addfile(info, io.BytesIO(data))


def verify_bundle(bundle: Path, pubkey: Path | None) -> dict[str, Any]:
    """`edgepack verify`: integrity of every file, plus the signature when a key is given. Runs no model."""
    bundle = Path(bundle)
    with open_bundle(bundle, verify=True) as opened:
        m = opened.manifest
        sig = signature_info(opened.root, pubkey, str(bundle))
    return {"bundle": str(bundle), "name": m.name, "version": m.version, "target": m.target,
            "build_id": m.build_id, "files_checked": len(m.files), "signature": sig}
