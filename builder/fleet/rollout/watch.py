"""Progress and retained status of every device, on one subscription each, routed by
(device id, deployment id) to whoever follows that pair.

The device id comes from the topic (which the broker's ACL confines), the deployment id from the
message: a device is only ever judged on progress it published about the deployment sent to it.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from typing import Any, Callable

from agent import protocol as proto
from agent.errors import ProtocolError
from builder.errors import FleetError
from builder.fleet.transport.link import SERVE_TOPIC, FleetLink

log = logging.getLogger(__name__)

ProgressRoute = Callable[[str, proto.TransferProgress], None]  # (device_id, progress), network thread
# Host-only topic: a message published here after subscribing comes back after the retained
# messages of those subscriptions (the broker queues them first), so its return means "all seen".
BARRIER_TOPIC = f"{proto.TOPIC_ROOT}/host/barrier"


class DeviceWatch:
    """Subscribes once to every device's progress and status (and serve's announcement)."""

    def __init__(self, link: FleetLink) -> None:
        self.link = link
        self._lock = threading.Lock()
        self._routes: dict[tuple[str, str], ProgressRoute] = {}
        self._status: dict[str, proto.DeviceStatus] = {}
        self._status_seen = threading.Condition(self._lock)
        self._serve_state: dict[str, Any] | None = None
        self._serve_seen = threading.Event()
        self._barriers: dict[str, threading.Event] = {}
        self.misrouted = 0  # progress of a (device, deployment) nobody follows
        self._barrier_topic = f"{BARRIER_TOPIC}/{uuid.uuid4().hex}"
        # Serve's announcement first, and the devices' retained statuses at QoS 0: the broker sends
        # every retained status at once on subscribe, and at QoS 1 all beyond its per-client
        # in-flight + queue limits (the fleet's Mosquitto: 64 + 1000) were dropped, with serve's
        # announcement and the barrier behind them (a push to 1,000 of 1,400 devices refused with
        # "no builder serve is running"; measured: 1,064 of 1,200). QoS 0 ones are written straight out.
        link.subscribe(SERVE_TOPIC, self._on_serve)
        link.subscribe(proto.all_devices_topic(proto.Up.PROGRESS), self._on_progress)
        link.subscribe(proto.all_devices_topic(proto.Up.STATUS), self._on_status, qos=0)
        link.subscribe(self._barrier_topic, self._on_barrier)
        link.watch_replies()

    # -- network thread -----------------------------------------------------------------------
    def _on_progress(self, topic: str, payload: bytes) -> None:
        try:
            device_id, _ = proto.parse_device_topic(topic)
            progress = proto.TransferProgress.from_json(payload)
        except ProtocolError:
            return
        with self._lock:
            route = self._routes.get((device_id, progress.deployment_id))
            if route is None:
                self.misrouted += 1
        if route is not None:
            route(device_id, progress)

    def _on_status(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            device_id, _ = proto.parse_device_topic(topic)
            status = proto.DeviceStatus.from_json(payload)
        except ProtocolError:
            return
        with self._lock:
            self._status[device_id] = status
            self._status_seen.notify_all()

    def _on_serve(self, topic: str, payload: bytes) -> None:
        try:
            self._serve_state = dict(json.loads(payload)) if payload else {"state": "offline"}
        except (ValueError, TypeError):
            self._serve_state = {"state": "unknown"}
        self._serve_seen.set()

    def _on_barrier(self, topic: str, payload: bytes) -> None:
        with self._lock:
            event = self._barriers.get(payload.decode("ascii", "replace"))
        if event is not None:
            event.set()

    # -- callers ------------------------------------------------------------------------------
    def require_serve(self, wait_s: float = 3.0, settle_s: float = 10.0) -> None:
        """Refuse early when nobody serves chunks (the device would wait forever). Without serve's
        announcement yet, wait for the barrier first (up to ``settle_s``; it comes back as soon as
        the broker has sent every retained message), then up to ``wait_s`` for one still on its way."""
        if not self._serve_seen.is_set():
            settled = self.settle(settle_s)
            self._serve_seen.wait(0.2 if settled else wait_s)
        if not self._serve_state or self._serve_state.get("state") != "online":
            raise FleetError("no `builder serve` is running on this broker, so nobody would send the model's chunks; "
                             "start `builder serve` (same --data-dir / --broker) and push again")

    def settle(self, wait_s: float = 3.0) -> bool:
        """Wait until the broker has sent every retained status (one round trip on this watch's
        host topic, subscribed after the status filter); then ``status_now`` answers for the whole fleet without a wait per device."""
        token = uuid.uuid4().hex
        event = threading.Event()
        with self._lock:
            self._barriers[token] = event
        try:
            self.link.publish(self._barrier_topic, token.encode("ascii"), qos=1)
            return event.wait(wait_s)
        except FleetError as exc:
            log.warning("status barrier failed (%s); waiting %.1f s instead", exc, wait_s)
            time.sleep(wait_s)
            return False
        finally:
            with self._lock:
                self._barriers.pop(token, None)

    def status_now(self, device_id: str) -> proto.DeviceStatus | None:
        with self._lock:
            return self._status.get(device_id)

    def status(self, device_id: str, wait_s: float = 2.0) -> proto.DeviceStatus | None:
        """The device's retained status (None if it never connected)."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            while device_id not in self._status and time.monotonic() < deadline:
                self._status_seen.wait(max(0.0, deadline - time.monotonic()))
            return self._status.get(device_id)

    def route(self, device_id: str, deployment_id: str, callback: ProgressRoute) -> None:
        """Call ``callback(device_id, progress)`` (network thread) for this pair's progress only."""
        with self._lock:
            self._routes[(device_id, deployment_id)] = callback

    def follow(self, device_id: str, deployment_id: str) -> "queue.Queue[proto.TransferProgress]":
        """The progress of one (device, deployment), in a queue."""
        q: queue.Queue[proto.TransferProgress] = queue.Queue()
        self.route(device_id, deployment_id, lambda _device, progress: q.put(progress))
        return q

    def unfollow(self, device_id: str, deployment_id: str) -> None:
        with self._lock:
            self._routes.pop((device_id, deployment_id), None)
