"""A chunk pull without threads or disk, for simulated devices: the same windows of
``ChunkRequest``s as ``agent.transfer.ChunkPuller`` (a window of 64, the next half-window asked for
when half has arrived, re-requested from the first missing chunk after a silence), every frame
checked with ``ChunkFrame.verify`` (length + sha256), the zstd stream decompressed and hashed as
it arrives in order, and each payload's size and sha256 checked against the signed manifest.

Pure state: ``next_requests()`` says what to ask for, ``accept()`` takes a frame; the device
publishes and feeds it. Nothing is written: a simulated device has no disk, only the proof that it
received exactly what the manifest promised.
"""
from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from typing import Any

from agent import protocol as proto
from agent.errors import ProtocolError, SignatureError, TransferError
from agent.manifest import Manifest, PayloadEntry


@dataclass
class _PayloadState:
    entry: PayloadEntry
    next_index: int = 0
    requested_upto: int = 0
    chunk_count: int | None = None
    stream_sha256: str | None = None
    buffered: dict[int, bytes] = field(default_factory=dict)
    raw_size: int = 0
    compressed_bytes: int = 0

    def __post_init__(self) -> None:
        import zstandard

        self.decompressor: Any = zstandard.ZstdDecompressor().decompressobj()
        self.payload_hash = hashlib.sha256()

    @property
    def done(self) -> bool:
        return self.chunk_count is not None and self.next_index >= self.chunk_count


class ArtifactPull:
    """One artifact's payloads, pulled one after another; raises ``TransferError`` (server error,
    bad stream) or ``SignatureError`` (payload differs from the signed manifest)."""

    def __init__(self, manifest: Manifest, window_chunks: int = proto.DEFAULT_WINDOW_CHUNKS) -> None:
        self.manifest = manifest
        self.window_chunks = window_chunks
        self._payloads = [_PayloadState(entry) for entry in manifest.payloads]
        self._current = 0
        self.rerequests = 0
        self.frames_rejected = 0

    @property
    def done(self) -> bool:
        return self._current >= len(self._payloads)

    @property
    def bytes_done(self) -> int:
        """Decompressed payload bytes verified so far (what progress reports count)."""
        return sum(p.raw_size for p in self._payloads)

    @property
    def compressed_bytes(self) -> int:
        return sum(p.compressed_bytes for p in self._payloads)

    def next_requests(self) -> list[proto.ChunkRequest]:
        """Requests to publish now: the first window of a payload, or the next half-window."""
        if self.done:
            return []
        p = self._payloads[self._current]
        in_flight = p.requested_upto - p.next_index
        if p.chunk_count is None:
            want = in_flight == 0
        else:
            want = in_flight <= self.window_chunks // 2 and p.requested_upto < p.chunk_count
        if not want:
            return []
        end = p.next_index + self.window_chunks
        if p.chunk_count is not None:
            end = min(end, p.chunk_count)
        count = max(1, end - p.requested_upto)
        request = proto.ChunkRequest(request_id=uuid.uuid4().hex[:16], artifact_id=self.manifest.artifact_id,
                                     payload=p.entry.name, start_index=p.requested_upto, count=count)
        p.requested_upto += count
        return [request]

    def restart_window(self) -> None:
        """After a silence or a reconnect: chunks in flight may be lost; ask again from the first missing."""
        if not self.done:
            p = self._payloads[self._current]
            p.requested_upto = p.next_index
            p.buffered.clear()
            self.rerequests += 1

    def accept(self, frame: proto.ChunkFrame) -> bool:
        """Take one frame; True when it advanced the pull (a verified chunk of the current payload)."""
        if self.done:
            return False
        p = self._payloads[self._current]
        h = frame.header
        if h.artifact_id != self.manifest.artifact_id or h.payload != p.entry.name:
            return False  # a late frame of an earlier payload or transfer
        if h.error:
            raise TransferError(f"server cannot send {h.payload} of {h.artifact_id[:12]}: {h.error}")
        try:
            frame.verify()
        except ProtocolError:
            self.frames_rejected += 1
            p.requested_upto = min(p.requested_upto, max(p.next_index, h.index))
            return False
        if p.stream_sha256 is None:
            p.chunk_count, p.stream_sha256 = h.chunk_count, h.stream_sha256
        elif h.stream_sha256 != p.stream_sha256:
            raise TransferError(f"the server's stream of {p.entry.name} changed during the pull")
        if h.index < p.next_index or h.index in p.buffered:
            return False
        p.buffered[h.index] = bytes(frame.data)
        while p.next_index in p.buffered:
            data = p.buffered.pop(p.next_index)
            p.compressed_bytes += len(data)
            try:
                raw = p.decompressor.decompress(data)
            except Exception as exc:  # noqa: BLE001 - zstandard.ZstdError: mapped to a transfer error
                raise TransferError(f"{p.entry.name}: invalid zstd stream ({exc})") from exc
            p.payload_hash.update(raw)
            p.raw_size += len(raw)
            p.next_index += 1
        if p.done:
            self._finish(p)
            self._current += 1
        return True

    @staticmethod
    def _finish(p: _PayloadState) -> None:
        if not p.decompressor.eof:
            raise TransferError(f"{p.entry.name}: the zstd stream is truncated")
        if p.raw_size != p.entry.size_bytes or p.payload_hash.hexdigest() != p.entry.sha256:
            raise SignatureError(f"payload {p.entry.name} ({p.raw_size} bytes) does not match the signed manifest "
                                 f"({p.entry.size_bytes} bytes, {p.entry.sha256[:12]}…)")
