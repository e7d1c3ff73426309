"""Pull an artifact over MQTT in windows of chunks, verify everything, resume after interruptions.

Order of checks: the manifest's signature against the trusted key (before a single byte is asked
for), free disk space, each chunk's length and sha256 as it arrives, then each decompressed
payload's size and sha256 from the signed manifest (decompressed and hashed on the fly, in a
second thread). ``stream_sha256`` only identifies the compressed stream a partial file belongs to.

Chunks are appended to ``<downloads>/<artifact>/<payload>.zst.part`` only once verified and in
order, so the partial file's length says where to resume (after a lost connection, a broker
restart or an agent restart). ``.meta.json`` beside it records which compressed stream it is.
"""
from __future__ import annotations

import hashlib
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
from typing import Any, BinaryIO, Callable

from agent import protocol as proto
from agent.errors import ProtocolError, SignatureError, TransferError
from agent.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest, PayloadEntry, sha256_file, verify_signature

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
        # Frames are queued only while a pull runs: an idle puller (a second one shares the chunks
        # topic for trials) must not pile up another transfer's frames in memory.
        self._pulling = threading.Event()
        self.cancel = threading.Event()
        self.request_topic = proto.device_topic(device_id, proto.Up.CHUNK_REQUEST)
        self.rerequests = 0
        # Of the last pull: compressed bytes received, and seconds from each payload's first chunk
        # request to its last chunk verified (the chunk phase, excluding signature check and fsync).
        self.stats: dict[str, float] = {}

    def on_frame(self, topic: str, payload: bytes) -> None:
        if self._pulling.is_set():
            self._frames.put(payload)

    # -- whole artifact ---------------------------------------------------------------------
    def pull_artifact(self, desired: proto.DesiredDeployment, manifest: Manifest, dest_dir: Path) -> Path:
        """Download, decompress and verify every payload into ``dest_dir`` (with manifest + signature)."""
        self._pulling.set()
        try:
            return self._pull_artifact(desired, manifest, dest_dir)
        finally:
            self._pulling.clear()

    def _pull_artifact(self, desired: proto.DesiredDeployment, manifest: Manifest, dest_dir: Path) -> Path:
        check_free_disk(self.downloads_dir, manifest)
        work = self.downloads_dir / manifest.artifact_id
        work.mkdir(parents=True, exist_ok=True)
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = manifest.total_size_bytes
        done_before = 0
        self.stats = {"compressed_bytes": 0, "chunks": 0, "chunk_phase_s": 0.0}
        started = time.monotonic()
        for entry in manifest.payloads:
            final = dest_dir / entry.name
            if not (final.is_file() and final.stat().st_size == entry.size_bytes and sha256_file(final) == entry.sha256):
                def on_fraction(frac: float, base: int = done_before, size: int = entry.size_bytes) -> None:
                    self._progress(base + int(frac * size), total)

                self._pull_payload(manifest.artifact_id, entry, work, final, on_fraction)
            done_before += entry.size_bytes
            self._progress(done_before, total)
        self.stats["pull_s"] = round(time.monotonic() - started, 4)
        _write_json(dest_dir / MANIFEST_FILE, dict(desired.manifest))
        _write_json(dest_dir / SIGNATURE_FILE, dict(desired.signature))
        _fsync_dir(dest_dir)
        shutil.rmtree(work, ignore_errors=True)
        return dest_dir

    def _progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(Progress(done, total))

    # -- one payload's compressed stream ------------------------------------------------------
    def _pull_payload(self, artifact_id: str, entry: PayloadEntry, work: Path, final: Path,
                      on_fraction: Callable[[float], None]) -> None:
        """Pull one payload's zstd stream; chunks are hashed, decompressed and hashed again as they
        arrive in order (no second pass over the data), so the payload is verified when the last
        chunk lands. The compressed ``.part`` file is kept only for resuming."""
        name = entry.name
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
        sink = _PayloadSink(final)
        try:
            sink.replay(part)  # a resumed download: re-feed what is already verified
            self._receive(artifact_id, name, part, meta_path, sink, on_fraction, next_index,
                          chunk_bytes, chunk_count, compressed_size, stream_sha)
        except BaseException:
            sink.abort()
            raise
        try:
            sink.finish(entry)
        except (SignatureError, TransferError):
            _remove_stream(work, name)  # never resume from a stream that produced a bad payload
            raise

    def _receive(self, artifact_id: str, name: str, part: Path, meta_path: Path, sink: "_PayloadSink",
                 on_fraction: Callable[[float], None], next_index: int, chunk_bytes: int | None,
                 chunk_count: int | None, compressed_size: int | None, stream_sha: str | None) -> None:
        """Request windows and append verified chunks in order until the stream is complete."""
        self._drain_stale_frames()
        phase_started = time.monotonic()
        received_chunks = received_bytes = 0
        buffered: dict[int, bytes | memoryview] = {}
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
                        sink.reset()
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
                    data = buffered.pop(next_index)
                    out.write(data)
                    sink.feed(data)
                    received_chunks += 1
                    received_bytes += len(data)
                    next_index += 1
                    last_activity = time.monotonic()
                    on_fraction(next_index / chunk_count)
            out.flush()
        self.stats["chunk_phase_s"] = round(self.stats.get("chunk_phase_s", 0.0) + time.monotonic() - phase_started, 4)
        self.stats["chunks"] = self.stats.get("chunks", 0) + received_chunks
        self.stats["compressed_bytes"] = self.stats.get("compressed_bytes", 0) + received_bytes

    def _drain_stale_frames(self) -> None:
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                return


class _PayloadSink:
    """Decompresses the verified compressed chunks and hashes the output in its own thread.

    zstd and hashlib release the GIL on large buffers, so this overlaps with receiving the next
    chunks. Every chunk was already checked against its sha256; the decompressed payload is checked
    against the signed manifest in ``finish``.
    """

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + ".tmp")
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(maxsize=64)
        self._thread: threading.Thread | None = None
        self._out: BinaryIO | None = None
        self.reset()

    def reset(self) -> None:
        import zstandard

        self._join()
        if self._out is not None:
            self._out.close()
        self._error: BaseException | None = None
        self._payload_hash = hashlib.sha256()
        self._size = 0
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._out = open(self.tmp, "wb")
        self._thread = threading.Thread(target=self._work, args=(self._out,), name="decompress", daemon=True)
        self._thread.start()

    def _work(self, out: BinaryIO) -> None:
        while True:
            data = self._queue.get()
            if data is None:
                return
            if self._error is not None:
                continue
            try:
                raw = self._dobj.decompress(data)
                if raw:
                    self._payload_hash.update(raw)
                    self._size += len(raw)
                    out.write(raw)
            except Exception as exc:  # noqa: BLE001 - reported by feed()/finish() in the caller's thread
                self._error = exc

    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise TransferError(f"{self.final.name}: invalid zstd stream ({self._error}); will download again") from self._error

    def replay(self, part: Path) -> None:
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                self.feed(block)

    def feed(self, data: bytes | memoryview) -> None:
        self._raise_if_failed()
        self._queue.put(data)

    def abort(self) -> None:
        self._join()
        if self._out is not None:
            self._out.close()
        self.tmp.unlink(missing_ok=True)

    def finish(self, entry: PayloadEntry) -> None:
        """Check size and sha256 against the signed manifest, fsync, and move into place."""
        self._join()
        out = self._out
        assert out is not None  # opened by reset()
        try:
            self._raise_if_failed()
            if not self._dobj.eof:
                raise TransferError(f"{entry.name}: the zstd stream is truncated; will download again")
            out.flush()
            os.fsync(out.fileno())
            if self._size != entry.size_bytes or self._payload_hash.hexdigest() != entry.sha256:
                raise SignatureError(f"payload {entry.name} ({self._size} bytes, sha256 {self._payload_hash.hexdigest()[:12]}…) "
                                     f"does not match the signed manifest ({entry.size_bytes} bytes, {entry.sha256[:12]}…)")
        except BaseException:
            out.close()
            self.tmp.unlink(missing_ok=True)
            raise
        out.close()
        os.replace(self.tmp, self.final)


def _remove_stream(work: Path, name: str) -> None:
    (work / f"{name}.zst.part").unlink(missing_ok=True)
    (work / f"{name}.meta.json").unlink(missing_ok=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return value
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
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

