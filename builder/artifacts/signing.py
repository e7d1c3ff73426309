"""Ed25519 signing keys and manifest signatures (the verifying half lives in ``agent.manifest``)."""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from agent.manifest import canonical_json, public_key_id
from builder.errors import UsageError, VerificationError

PRIVATE_KEY_FILE = "signing_key.pem"
PUBLIC_KEY_FILE = "signing_key.pub.pem"


@dataclass(frozen=True)
class KeyPaths:
    private: Path
    public: Path


def key_paths(key_dir: Path) -> KeyPaths:
    return KeyPaths(Path(key_dir) / PRIVATE_KEY_FILE, Path(key_dir) / PUBLIC_KEY_FILE)


def init_keys(key_dir: Path, force: bool = False) -> KeyPaths:
    """Create a key pair; the private key file is mode 0600 from the moment it exists."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    paths = key_paths(key_dir)
    if paths.private.exists() and not force:
        raise UsageError(f"a signing key already exists at {paths.private}; pass --force to replace it (agents trusting the old key will refuse new artifacts)")
    Path(key_dir).mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = paths.private.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, paths.private)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    tmp_pub = paths.public.with_suffix(".tmp")
    tmp_pub.write_bytes(pub)
    os.replace(tmp_pub, paths.public)
    return paths


def load_private_key(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UsageError(f"no signing key at {path}; run `builder keys init` first") from exc
    except ValueError as exc:
        raise UsageError(f"{path} is not a PEM private key; run `builder keys init --force` to make a new one") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{path} is not an Ed25519 key; run `builder keys init --force`")
    return key


def sign_manifest_dict(manifest: dict, private_key) -> dict:
    """Return the signature document (``manifest.sig`` content) for a manifest dict."""
    signature = private_key.sign(canonical_json(manifest))
    return {
        "alg": "ed25519",
        "key_id": public_key_id(private_key.public_key()),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def signature_bytes(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode("utf-8")


def ensure_signed(doc: dict) -> None:
    if doc.get("alg") != "ed25519" or not doc.get("signature"):
        raise VerificationError("signature document is incomplete")
