"""Pull an artifact over MQTT in windows of chunks, verify everything, resume after interruptions.

Order of checks: the manifest's signature against the trusted key (before a single byte is asked
for), free disk space, each chunk's length and sha256 as it arrives, the whole compressed stream's
sha256, then each decompressed payload's size and sha256 from the signed manifest.

Chunks are appended to ``<downloads>/<artifact>/<payload>.zst.part`` only once verified and in
order, so the partial file's length says where to resume (after a lost connection, a broker
restart or an agent restart). ``.meta.json`` beside it records which compressed stream it is.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from agent import protocol as proto
from agent.errors import ProtocolError, SignatureError, TransferError
from agent.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, sha256_file, verify_artifact_dir, verify_signature

log = logging.getLogger(__name__)

DISK_MARGIN_BYTES = 16 << 20


class TransferCancelled(TransferError):
    """A newer desired deployment replaced the one being pulled."""


@dataclass(frozen=True)
class Progress:
    bytes_done: int
    bytes_total: int

    @property
    def percent(self) -> float:
        return round(100.0 * self.bytes_done / self.bytes_total, 2) if self.bytes_total else 100.0


def verify_desired(desired: proto.DesiredDeployment, public_key: Any) -> Manifest:
    """Signature first: a tampered or foreign manifest is refused before any download."""
    manifest = verify_signature(desired.manifest_bytes(), dict(desired.signature), public_key)
    if manifest.artifact_id != desired.artifact_id:
        raise SignatureError("desired deployment names a different artifact than its signed manifest")
    for entry in manifest.payloads:
        if "/" in entry.name or "\\" in entry.name or entry.name in ("", ".", "..") or entry.name.startswith("."):
            raise SignatureError(f"payload name {entry.name!r} is not a plain file name")
    return manifest


def check_free_disk(directory: Path, manifest: Manifest) -> None:
    """Room for the compressed download plus the decompressed payloads (compressed <= raw, roughly)."""
    directory.mkdir(parents=True, exist_ok=True)
    need = 2 * manifest.total_size_bytes + DISK_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < need:
        raise TransferError(f"not enough disk for artifact {manifest.artifact_id[:12]}: need {need >> 20} MiB, "
                            f"{free >> 20} MiB free in {directory}; free space or use a smaller model")


class ChunkPuller:
    """Requests windows of chunks and assembles payloads. ``on_frame`` is fed from the MQTT thread."""

    def __init__(self, device_id: str, downloads_dir: Path, publish: Callable[[str, bytes], Any],
                 is_connected: Callable[[], bool], connect_count: Callable[[], int], *,
                 window_chunks: int = proto.DEFAULT_WINDOW_CHUNKS, timeout_s: float = 10.0,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        self.device_id = device_id
        self.downloads_dir = Path(downloads_dir)
        self.publish = publish
        self.is_connected = is_connected
        self.connect_count = connect_count
        self.window_chunks = window_chunks
        self.timeout_s = timeout_s
        self.on_progress = on_progress
        self._frames: queue.Queue[bytes] = queue.Queue()
        self.cancel = threading.Event()
        self.request_topic = proto.device_topic(device_id, proto.Up.CHUNK_REQUEST)
        self.rerequests = 0

    def on_frame(self, topic: str, payload: bytes) -> None:
        self._frames.put(payload)

    # -- whole artifact ---------------------------------------------------------------------
    def pull_artifact(self, desired: proto.DesiredDeployment, manifest: Manifest, dest_dir: Path) -> Path:
        """Download, decompress and verify every payload into ``dest_dir`` (with manifest + signature)."""
        check_free_disk(self.downloads_dir, manifest)
        work = self.downloads_dir / manifest.artifact_id
        work.mkdir(parents=True, exist_ok=True)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = manifest.total_size_bytes
        done_before = 0
        for entry in manifest.payloads:
            final = dest_dir / entry.name
            if not (final.is_file() and final.stat().st_size == entry.size_bytes and sha256_file(final) == entry.sha256):
                part = self._pull_stream(manifest.artifact_id, entry.name, work,
                                         lambda frac, base=done_before, size=entry.size_bytes: self._progress(base + int(frac * size), total))
                _decompress(part, final)
                try:
                    from agent.manifest import verify_payload_file

                    verify_payload_file(final, entry)
                except SignatureError:
                    final.unlink(missing_ok=True)
                    _remove_stream(work, entry.name)  # never resume from a stream that produced a bad payload
                    raise
            done_before += entry.size_bytes
            self._progress(done_before, total)
        _write_json(dest_dir / MANIFEST_FILE, dict(desired.manifest))
        _write_json(dest_dir / SIGNATURE_FILE, dict(desired.signature))
        _fsync_dir(dest_dir)
        shutil.rmtree(work, ignore_errors=True)
        return dest_dir

    def _progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(done, total))

    # -- one payload's compressed stream ------------------------------------------------------
    def _pull_stream(self, artifact_id: str, name: str, work: Path, on_fraction: Callable[[float], None]) -> Path:
        part = work / f"{name}.zst.part"
        meta_path = work / f"{name}.meta.json"
        meta = _read_json(meta_path)
        chunk_bytes = meta.get("chunk_bytes")
        chunk_count = meta.get("chunk_count")
        compressed_size = meta.get("compressed_size")
        stream_sha = meta.get("stream_sha256")
        next_index = 0
        if chunk_bytes and part.exists():
            next_index = min(part.stat().st_size // chunk_bytes, chunk_count)
            if next_index == chunk_count and part.stat().st_size != compressed_size:
                next_index = chunk_count - 1
            with open(part, "r+b") as fh:  # drop a torn tail: resume from the last verified chunk
                fh.truncate(next_index * chunk_bytes)
            if next_index:
                log.info("resuming %s/%s at chunk %d of %d", artifact_id[:12], name, next_index, chunk_count)
        else:
            part.write_bytes(b"")
        self._drain_stale_frames()
        buffered: dict[int, bytes] = {}
        requested_upto = next_index
        last_activity = time.monotonic()
        seen_connects = self.connect_count()
        with open(part, "ab") as out:
            while chunk_count is None or next_index < chunk_count:
                if self.cancel.is_set():
                    raise TransferCancelled(f"transfer of {artifact_id[:12]} replaced by a newer deployment")
                if self.connect_count() != seen_connects:  # reconnected: in-flight chunks may be lost
                    seen_connects = self.connect_count()
                    requested_upto = next_index
                    buffered.clear()
                    last_activity = time.monotonic()
                in_flight = requested_upto - next_index
                want_more = chunk_count is None and in_flight == 0 or \
                    chunk_count is not None and in_flight <= self.window_chunks // 2 and requested_upto < chunk_count
                if want_more and self.is_connected():
                    end = next_index + self.window_chunks
                    if chunk_count is not None:
                        end = min(end, chunk_count)
                    request = proto.ChunkRequest(request_id=uuid.uuid4().hex[:16], artifact_id=artifact_id, payload=name,
                                                 start_index=requested_upto, count=max(1, end - requested_upto))
                    self.publish(self.request_topic, request.to_json())
                    requested_upto = requested_upto + request.count
                try:
                    raw = self._frames.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() - last_activity > self.timeout_s:
                        log.info("no chunk for %.0f s; re-requesting %s from chunk %d", self.timeout_s, name, next_index)
                        self.rerequests += 1
                        requested_upto = next_index
                        buffered.clear()
                        last_activity = time.monotonic()
                    continue
                try:
                    frame = proto.decode_chunk_frame(raw)
                except ProtocolError as exc:
                    log.warning("dropping malformed chunk frame: %s", exc)
                    continue
                h = frame.header
                if h.artifact_id != artifact_id or h.payload != name:
                    continue  # a late frame of an earlier transfer
                if h.error:
                    raise TransferError(f"server cannot send {name} of {artifact_id[:12]}: {h.error}")
                if chunk_count is None or h.stream_sha256 != stream_sha:
                    if stream_sha is not None and h.stream_sha256 != stream_sha:
                        log.info("server's compressed stream of %s changed; restarting its download", name)
                        out.truncate(0)
                        next_index, requested_upto = 0, 0
                        buffered.clear()
                    chunk_bytes, chunk_count = h.chunk_bytes, h.chunk_count
                    compressed_size, stream_sha = h.compressed_size, h.stream_sha256
                    _write_json(meta_path, {"chunk_bytes": chunk_bytes, "chunk_count": chunk_count,
                                            "compressed_size": compressed_size, "stream_sha256": stream_sha})
                try:
                    frame.verify()
                except ProtocolError as exc:
                    log.warning("%s; re-requesting from chunk %d", exc, next_index)
                    requested_upto = min(requested_upto, max(next_index, h.index))
                    continue
                if h.index < next_index or h.index in buffered:
                    continue
                buffered[h.index] = frame.data
                while next_index in buffered:
                    out.write(buffered.pop(next_index))
                    next_index += 1
                    last_activity = time.monotonic()
                    on_fraction(next_index / chunk_count)
            out.flush()
            os.fsync(out.fileno())
        if stream_sha and sha256_file(part) != stream_sha:
            _remove_stream(work, name)
            raise TransferError(f"compressed stream of {name} does not match its sha256; will download again")
        return part

    def _drain_stale_frames(self) -> None:
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                return


def _decompress(src: Path, dest: Path) -> None:
    import zstandard

    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            zstandard.ZstdDecompressor().copy_stream(fin, fout, read_size=1 << 20, write_size=1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
    except zstandard.ZstdError as exc:
        tmp.unlink(missing_ok=True)
        _remove_stream(src.parent, src.name[:-len(".zst.part")])
        raise TransferError(f"{src.name} is not a valid zstd stream ({exc}); will download again") from exc
    os.replace(tmp, dest)


def _remove_stream(work: Path, name: str) -> None:
    (work / f"{name}.zst.part").unlink(missing_ok=True)
    (work / f"{name}.meta.json").unlink(missing_ok=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify_incoming(directory: Path, public_key: Any) -> Manifest:
    return verify_artifact_dir(directory, public_key)
