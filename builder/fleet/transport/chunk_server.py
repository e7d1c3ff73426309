"""Host side of model delivery: answer devices' chunk requests, publish desired deployments.

Devices pull (``agent.protocol``): each ``up/chunkreq`` names an artifact, a payload and a window
of chunk indices; the server answers on that device's ``down/chunks`` topic with binary frames.
The device id comes from the topic (which the broker's ACL confines), never from the message.
Payloads are zstd-compressed once and the compressed form is cached (in memory, bounded, and on
disk when ``cache_dir`` is given), so a fleet pulling one artifact costs one compression.

Embed it in any ``agent.mqtt.MqttClient``: ``ChunkServer(client, lookup).attach()``. Give that client
``max_inflight=64`` or more: paho's default of 20 in-flight QoS 1 messages throttles a device's
window of chunks (agents ask for 64 at a time, topping up every 32).

Threading: a request for a cached payload is answered inline in the network thread (publishing
only queues frames). The first requests for a payload not yet compressed wait for ONE compression
in ONE worker thread (a fleet asking at once used to start a thread and a compression per device),
which then answers all of them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent import protocol as proto
from agent.errors import MqttError
from agent.manifest import MANIFEST_FILE, SIGNATURE_FILE, Manifest
from agent.mqtt import MqttClient, shared_filter
from builder.artifacts.download import compress_payload  # the one download-form policy (level by size)
from builder.atomic_files import atomic_write_bytes
from builder.errors import FleetError

log = logging.getLogger(__name__)

ArtifactLookup = Callable[[str], "Path | None"]


@dataclass(frozen=True)
class CompressedPayload:
    artifact_id: str
    name: str
    data: bytes  # the whole zstd stream
    chunk_bytes: int
    stream_sha256: str

    @property
    def chunk_count(self) -> int:
        return max(1, -(-len(self.data) // self.chunk_bytes))

    def chunk(self, index: int) -> bytes:
        return self.data[index * self.chunk_bytes:(index + 1) * self.chunk_bytes]

    def chunk_sha256(self, index: int) -> str:
        return self.chunk_hashes[index]

    @property
    def chunk_hashes(self) -> tuple[str, ...]:
        """Per-chunk sha256, computed once per cached payload (not per request)."""
        cached = self.__dict__.get("_chunk_hashes")
        if cached is None:
            cached = tuple(hashlib.sha256(self.chunk(i)).hexdigest() for i in range(self.chunk_count))
            object.__setattr__(self, "_chunk_hashes", cached)
        return cached


class ChunkServer:
    """Serves windows of compressed payload chunks to devices that ask for them."""

    def __init__(self, client: MqttClient, lookup: ArtifactLookup, *, chunk_bytes: int = proto.MAX_CHUNK_BYTES,
                 zstd_level: int | None = None, cache_dir: Path | None = None, memory_cache_bytes: int = 512 << 20,
                 qos: int = 1, delay_per_chunk_s: float = 0.0, share_group: str | None = None) -> None:
        if not 0 < chunk_bytes <= proto.MAX_CHUNK_BYTES:
            raise FleetError(f"chunk size {chunk_bytes} is outside 1..{proto.MAX_CHUNK_BYTES} bytes; pick a smaller one")
        self.client = client
        self.lookup = lookup
        self.share_group = share_group  # several servers answer a fleet's requests, each request once
        self.chunk_bytes = chunk_bytes
        self.zstd_level = zstd_level
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory_cache_bytes = memory_cache_bytes
        self.qos = qos
        # Rate limit for tests and demos (simulates a slow link); 0 in production.
        self.delay_per_chunk_s = delay_per_chunk_s
        self._cache: OrderedDict[tuple[str, str], CompressedPayload] = OrderedDict()
        self._recent_requests: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        # payload being compressed -> requests waiting for it (answered by the compressing worker)
        self._waiting: dict[tuple[str, str], list[tuple[str, proto.ChunkRequest]]] = {}
        self.payloads_loaded = 0  # compressed, or read from the disk cache
        self.chunks_sent = 0
        self.requests_served = 0

    # -- wiring -----------------------------------------------------------------------------
    def attach(self) -> None:
        """Subscribe the request handler to every device's ``up/chunkreq`` (the client re-subscribes
        after reconnects); FleetError when the broker refuses the subscription."""
        try:
            topic_filter = proto.all_devices_topic(proto.Up.CHUNK_REQUEST)
            if self.share_group is not None:
                topic_filter = shared_filter(self.share_group, topic_filter)
            self.client.subscribe(topic_filter, self.on_request, qos=1)
        except MqttError as exc:
            raise FleetError(f"the chunk server cannot listen for chunk requests: {exc}") from exc

    def on_request(self, topic: str, payload: bytes) -> None:
        """Handler for ``up/chunkreq`` messages (call it from your own handler if you route messages
        yourself). A malformed request raises ``ProtocolError``: the client's dispatch counts it."""
        device_id, _ = proto.parse_device_topic(topic)
        request = proto.ChunkRequest.from_json(payload)
        with self._lock:  # overlapping subscriptions deliver a message twice: answer each request once
            key = (device_id, request.request_id)
            if key in self._recent_requests:
                return
            self._recent_requests[key] = None
            while len(self._recent_requests) > 4096:
                self._recent_requests.popitem(last=False)
        key = (request.artifact_id, request.payload)
        with self._lock:
            cached = key in self._cache
            if not cached and not self.delay_per_chunk_s:
                waiting = self._waiting.get(key)
                if waiting is not None:  # its compression is under way: answered when it is done
                    waiting.append((device_id, request))
                    return
                self._waiting[key] = []
        if self.delay_per_chunk_s:
            # Rate-limited (tests, demos): serve in a worker so the sleeps never block the network loop.
            threading.Thread(target=self.serve_request, args=(device_id, request), daemon=True,
                             name=f"chunks-{device_id}").start()
        elif not cached:
            # First request (compression takes seconds): one worker compresses, then answers everyone
            # who asked meanwhile.
            threading.Thread(target=self._serve_first, args=(key, device_id, request), daemon=True,
                             name=f"chunks-{request.artifact_id[:12]}").start()
        else:
            # Inline in the network thread: publishing only queues the frames, and handing them to
            # another thread would make the two fight over the GIL (measured: slower).
            self.serve_request(device_id, request)

    def _serve_first(self, key: tuple[str, str], device_id: str, request: proto.ChunkRequest) -> None:
        batch = [(device_id, request)]
        while batch:
            for one_device, one_request in batch:
                try:
                    self.serve_request(one_device, one_request)
                except Exception:  # noqa: BLE001 - one device's failure must not strand the others
                    log.exception("serving %s to %s failed", one_request.payload, one_device)
            with self._lock:
                batch = self._waiting.pop(key, [])
                if batch:
                    self._waiting[key] = []  # more may join while these are answered

    # -- serving ----------------------------------------------------------------------------
    def serve_request(self, device_id: str, request: proto.ChunkRequest) -> int:
        """Publish the requested window to the device; returns the number of chunks sent."""
        topic = proto.device_topic(device_id, proto.Down.CHUNKS)
        try:
            payload = self.compressed(request.artifact_id, request.payload)
        except FleetError as exc:
            header = proto.ChunkHeader(request_id=request.request_id, artifact_id=request.artifact_id,
                                       payload=request.payload, index=0, chunk_count=0, offset=0,
                                       compressed_size=0, sha256="", error=str(exc))
            self.client.publish(topic, proto.encode_chunk_frame(header, b""), qos=self.qos)
            return 0
        sent = 0
        end = min(request.start_index + request.count, payload.chunk_count)
        for index in range(request.start_index, end):
            data = payload.chunk(index)
            header = proto.ChunkHeader(
                request_id=request.request_id, artifact_id=payload.artifact_id, payload=payload.name,
                index=index, chunk_count=payload.chunk_count, offset=index * payload.chunk_bytes,
                compressed_size=len(payload.data), sha256=payload.chunk_sha256(index),
                chunk_bytes=payload.chunk_bytes, stream_sha256=payload.stream_sha256)
            self.client.publish(topic, proto.encode_chunk_frame(header, data), qos=self.qos)
            sent += 1
            if self.delay_per_chunk_s:
                time.sleep(self.delay_per_chunk_s)
        with self._lock:
            self.chunks_sent += sent
            self.requests_served += 1
        return sent

    def compressed(self, artifact_id: str, payload_name: str) -> CompressedPayload:
        """The cached compressed payload; only names listed in the artifact's manifest are served."""
        key = (artifact_id, payload_name)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        directory = self.lookup(artifact_id)
        if directory is None:
            raise FleetError(f"unknown artifact {artifact_id[:12]}")
        manifest = read_manifest(Path(directory))
        if payload_name not in {p.name for p in manifest.payloads}:
            raise FleetError(f"artifact {artifact_id[:12]} has no payload {payload_name!r}")
        data = self._load_or_compress(Path(directory) / payload_name, artifact_id, payload_name)
        with self._lock:
            self.payloads_loaded += 1
        entry = CompressedPayload(artifact_id, payload_name, data, self.chunk_bytes, hashlib.sha256(data).hexdigest())
        with self._lock:
            self._cache[key] = entry
            while sum(len(e.data) for e in self._cache.values()) > self.memory_cache_bytes and len(self._cache) > 1:
                self._cache.popitem(last=False)
        return entry

    def _load_or_compress(self, path: Path, artifact_id: str, name: str) -> bytes:
        cached = self.cache_dir / artifact_id / f"{name}.zst" if self.cache_dir else None
        if cached is not None and cached.is_file():
            return cached.read_bytes()
        data = compress_payload(path, self.zstd_level)
        if cached is not None:
            # Its own temporary name per write: two threads (two devices' first requests) may compress at once.
            atomic_write_bytes(cached, data, make_parents=True)
        return data


def read_manifest(directory: Path) -> Manifest:
    try:
        return Manifest.from_bytes((Path(directory) / MANIFEST_FILE).read_bytes())
    except OSError as exc:
        raise FleetError(f"{directory} is not an artifact directory (no {MANIFEST_FILE}); build or import it first") from exc


def desired_message(artifact_dir: Path, deployment_id: str | None = None) -> proto.DesiredDeployment:
    """The retained desired-deployment message for an artifact directory (manifest + signature inline)."""
    artifact_dir = Path(artifact_dir)
    try:
        manifest_obj = json.loads((artifact_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        signature_obj = json.loads((artifact_dir / SIGNATURE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FleetError(f"{artifact_dir} lacks a readable {MANIFEST_FILE}/{SIGNATURE_FILE}; package the artifact first") from exc
    artifact_id = str(manifest_obj.get("artifact_id", ""))
    return proto.DesiredDeployment(
        deployment_id=deployment_id or uuid.uuid4().hex,  # unique: never the clock (shared within a ms)
        artifact_id=artifact_id, manifest=manifest_obj, signature=signature_obj, ts=proto.now_s())


def publish_desired(client: MqttClient, device_id: str, artifact_dir: Path, deployment_id: str | None = None,
                    timeout_s: float = 10.0) -> proto.DesiredDeployment:
    """Publish (retained, QoS 1) the deployment a device must run; waits for the broker's PUBACK."""
    message = desired_message(artifact_dir, deployment_id)
    delivery = client.publish(proto.device_topic(device_id, proto.Down.DESIRED), message.to_json(), qos=1, retain=True)
    try:
        delivered = delivery.wait(timeout_s)
    except MqttError as exc:
        raise FleetError(f"could not publish the desired deployment for {device_id}: {exc}; is the broker reachable?") from exc
    if not delivered:
        raise FleetError(f"broker did not acknowledge the desired deployment for {device_id} within {timeout_s:.0f} s")
    return message


def clear_desired(client: MqttClient, device_id: str) -> None:
    """Remove the retained desired deployment (the device keeps running what it has)."""
    try:
        client.publish(proto.device_topic(device_id, proto.Down.DESIRED), b"", qos=1, retain=True).wait(10)
    except MqttError as exc:
        raise FleetError(f"could not clear the desired deployment of {device_id}: {exc}") from exc
