"""The artifact manifest: the signed description of a built model, read by both sides.

Lives in ``agent/`` because the device must parse and verify it without the builder. The format
is specified in ``docs/artifact.md`` so a non-Python agent can implement it:

- ``manifest.json`` is UTF-8 JSON. Its *canonical bytes* (what is signed) are
  ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()``.
- ``manifest.sig`` is JSON ``{"alg": "ed25519", "key_id": ..., "signature": base64}`` where the
  signature covers the canonical bytes and ``key_id`` is the first 16 hex digits of the sha256 of
  the raw 32-byte public key.
- ``artifact_id`` is the sha256 (hex) of the lines ``f"{name}:{sha256}\n"`` of every payload,
  sorted by name: it names the content, whatever the metadata says.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from agent.errors import ProtocolError, SignatureError

if TYPE_CHECKING:  # annotations only: the functions import cryptography where they use it
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SAMPLE_FILE = "sample.npz"  # inputs (keys "in:<name>") and expected outputs ("out:<name>") for the health check
HASH_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output; dynamic dimensions are strings (e.g. "batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str  # numpy dtype name: "float32", "int64", ...

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TensorSpec":
        return cls(name=str(data["name"]), shape=tuple(data["shape"]), dtype=str(data["dtype"]))


@dataclass(frozen=True)
class PayloadEntry:
    """One file of the artifact. ``role`` is "model" (what the runtime loads), "sample" or "aux"."""

    name: str
    sha256: str
    size_bytes: int
    role: str = "model"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PayloadEntry":
        return cls(name=str(data["name"]), sha256=str(data["sha256"]), size_bytes=int(data["size_bytes"]),
                   role=str(data.get("role", "model")))


@dataclass(frozen=True)
class Target:
    """Where the artifact runs: profile, runtime, providers in order of preference, precision, format."""

    profile: str
    runtime: str  # "onnxruntime" | "onnxruntime-tensorrt" | "litert"
    execution_providers: tuple[str, ...]
    precision: str  # "fp32" | "fp16" | "int8" | "mixed"
    format: str  # "onnx" | "ort" | "tflite"
    runtime_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Target":
        return cls(profile=str(data["profile"]), runtime=str(data["runtime"]),
                   execution_providers=tuple(data.get("execution_providers", ())),
                   precision=str(data["precision"]), format=str(data["format"]),
                   runtime_options=dict(data.get("runtime_options", {})))


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    artifact_id: str
    model_name: str
    model_version: str
    target: Target
    payloads: tuple[PayloadEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)
    # Tolerance of the on-device health check against the expected outputs in the sample payload.
    verify_tolerance: Mapping[str, float] = field(default_factory=lambda: {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.99})
    builder_version: str = ""
    created_at: str = ""  # ISO 8601 UTC

    @property
    def model_payload(self) -> PayloadEntry:
        for entry in self.payloads:
            if entry.role == "model":
                return entry
        raise ProtocolError(f"manifest {self.artifact_id[:12]} lists no payload with role 'model'")

    @property
    def sample_payload(self) -> PayloadEntry | None:
        return next((e for e in self.payloads if e.role == "sample"), None)

    @property
    def total_size_bytes(self) -> int:
        return sum(e.size_bytes for e in self.payloads)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target"]["runtime_options"] = dict(self.target.runtime_options)
        return {str(k): _jsonable(v) for k, v in data.items()}

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        try:
            version = int(data["schema_version"])
            if version != MANIFEST_SCHEMA_VERSION:
                raise ProtocolError(f"manifest schema version {version} is not supported (this agent reads {MANIFEST_SCHEMA_VERSION}); upgrade the agent")
            return cls(
                schema_version=version,
                artifact_id=str(data["artifact_id"]),
                model_name=str(data["model_name"]),
                model_version=str(data["model_version"]),
                target=Target.from_dict(data["target"]),
                payloads=tuple(PayloadEntry.from_dict(p) for p in data["payloads"]),
                inputs=tuple(TensorSpec.from_dict(t) for t in data["inputs"]),
                outputs=tuple(TensorSpec.from_dict(t) for t in data["outputs"]),
                recipe=dict(data.get("recipe", {})),
                metrics=dict(data.get("metrics", {})),
                verify_tolerance=dict(data.get("verify_tolerance", {"atol": 1e-3, "rtol": 1e-3, "min_cosine": 0.99})),
                builder_version=str(data.get("builder_version", "")),
                created_at=str(data.get("created_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"manifest is malformed ({type(exc).__name__}: {exc}); rebuild the artifact") from exc

    @classmethod
    def from_bytes(cls, raw: bytes) -> "Manifest":
        try:
            return cls.from_dict(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"manifest is not valid JSON ({exc})") from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def canonical_json(obj: Any) -> bytes:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_artifact_id(payloads: tuple[PayloadEntry, ...] | list[PayloadEntry]) -> str:
    lines = "".join(f"{p.name}:{p.sha256}\n" for p in sorted(payloads, key=lambda p: p.name))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def key_id(public_key_raw: bytes) -> str:
    return hashlib.sha256(public_key_raw).hexdigest()[:16]


def load_public_key(pem_or_path: bytes | str | Path) -> Ed25519PublicKey:
    """Ed25519 public key from PEM bytes or a PEM file path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(pem_or_path, (str, Path)):
        try:
            pem = Path(pem_or_path).read_bytes()
        except OSError as exc:
            raise SignatureError(f"cannot read trusted public key {pem_or_path}: {exc.strerror}; copy the builder's public key there") from exc
    else:
        pem = pem_or_path
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise SignatureError("trusted public key is not a PEM public key; use the file `builder keys init` wrote") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError("trusted public key is not Ed25519; use the file `builder keys init` wrote")
    return key


def public_key_id(public_key: Ed25519PublicKey) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key_id(raw)


def verify_signature(manifest_bytes: bytes, signature_doc: Mapping[str, Any] | bytes,
                     public_key: Ed25519PublicKey) -> Manifest:
    """Check the Ed25519 signature over the manifest's canonical bytes; return the parsed manifest.

    The bytes are re-canonicalised first, so a re-indented but unchanged manifest still verifies and
    any change of content does not.
    """
    from cryptography.exceptions import InvalidSignature

    doc: Mapping[str, Any]
    if isinstance(signature_doc, (bytes, bytearray)):
        try:
            doc = json.loads(bytes(signature_doc).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SignatureError("signature file is not valid JSON") from exc
    else:
        doc = signature_doc
    if doc.get("alg") != "ed25519":
        raise SignatureError(f"unsupported signature algorithm {doc.get('alg')!r}; expected ed25519")
    expected_kid = public_key_id(public_key)
    if doc.get("key_id") != expected_kid:
        raise SignatureError(f"manifest signed by key {doc.get('key_id')}, but this device trusts key {expected_kid}")
    try:
        signature = base64.b64decode(doc["signature"], validate=True)
    except (KeyError, ValueError) as exc:
        raise SignatureError("signature is missing or not base64") from exc
    manifest = Manifest.from_bytes(manifest_bytes)
    try:
        public_key.verify(signature, canonical_json(json.loads(manifest_bytes.decode("utf-8"))))
    except InvalidSignature as exc:
        raise SignatureError(f"manifest signature does not verify for artifact {manifest.artifact_id[:12]}: tampered or signed by another key") from exc
    if compute_artifact_id(manifest.payloads) != manifest.artifact_id:
        raise SignatureError("artifact_id does not match the payload list; the manifest is inconsistent")
    return manifest


def verify_payload_file(path: Path, entry: PayloadEntry) -> None:
    """Raise SignatureError unless the file has the size and sha256 the manifest records."""
    if not path.is_file():
        raise SignatureError(f"payload {entry.name} is missing")
    size = path.stat().st_size
    if size != entry.size_bytes:
        raise SignatureError(f"payload {entry.name} is {size} bytes, manifest says {entry.size_bytes}")
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise SignatureError(f"payload {entry.name} sha256 {actual[:12]}… does not match manifest {entry.sha256[:12]}…")


def verify_artifact_dir(directory: Path, public_key: Ed25519PublicKey) -> Manifest:
    """Verify signature, then every payload, of an artifact directory; return the manifest."""
    directory = Path(directory)
    try:
        manifest_bytes = (directory / MANIFEST_FILE).read_bytes()
        sig = (directory / SIGNATURE_FILE).read_bytes()
    except OSError as exc:
        raise SignatureError(f"artifact {directory} lacks {MANIFEST_FILE} or {SIGNATURE_FILE}") from exc
    manifest = verify_signature(manifest_bytes, sig, public_key)
    for entry in manifest.payloads:
        verify_payload_file(directory / entry.name, entry)
    return manifest
