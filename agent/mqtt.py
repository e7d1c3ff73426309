"""The one MQTT client of the project, used by the agent (``agent/connection.py``) and by the host
(``builder/fleet/link.py``): paho-mqtt 2.x stays private to this module.

Modelled on aiomqtt's client: typed settings (``ClientSettings``, ``Will``, ``TlsSettings``), a
``subscribe`` that waits for the SUBACK and raises ``SubscribeRefusedError`` when the broker refuses
(measured on Mosquitto 2.0: its ``acl_file`` never refuses a SUBSCRIBE, it only filters what is
delivered; its dynamic-security plugin answers a denied filter with 0x80 in MQTT 3.1.1 and 0x87
"Not authorized" in MQTT 5), ``publish`` with QoS and retain returning a ``Delivery`` to wait on, and connect /
disconnect callbacks. Handlers are ``(topic, payload)`` per topic filter, re-subscribed on every
connect. A handler that raises (a ``ProtocolError`` for a malformed message, or a bug) is isolated:
the dispatch counts the error per (device, message kind) in ``handler_errors``, logs it (rate
limited) and goes on, so one bad message can never stop the network thread.

Threads: one network thread of our own drives ``client.loop()``, so reconnects follow a capped
exponential backoff with jitter (paho's built-in reconnect has none) and MQTT 5 can fall back to
3.1.1. All socket I/O happens in that one thread. Without ``loop_start()`` paho 2.x writes a
publish straight to the socket from the *calling* thread (``_packet_queue`` -> ``loop_write``)
while the network thread may be reading it; on a TLS connection that is two threads in one
OpenSSL ``SSL`` object at once, which OpenSSL does not allow (heap corruption: a glibc "free():
corrupted unsorted chunks" abort of an idle TLS agent fits). A ``on_socket_register_write``
callback makes paho only queue the packet and wake the network thread's ``select`` through its
socket pair.
"""
from __future__ import annotations

import enum
import logging
import random
import ssl
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as _paho
from paho.mqtt.enums import CallbackAPIVersion as _CallbackAPIVersion
from paho.mqtt.enums import MQTTProtocolVersion as _MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes as _PacketTypes
from paho.mqtt.properties import Properties as _Properties

from agent.errors import (
    MqttConnectError,
    MqttError,
    ProtocolError,
    PublishError,
    SubscribeRefusedError,
)
from agent.protocol import parse_device_topic

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
MAX_ERROR_KEYS = 10_000  # (device, kind) pairs counted separately; beyond, errors count under ("*", kind)
LOGGED_PER_KEY = 3  # the first errors of a (device, kind) are logged, then every 1000th


def error_key(topic: str) -> tuple[str, str]:
    """(device id, message kind) of a topic, for counting bad messages; ("?", topic) for others."""
    try:
        return parse_device_topic(topic)
    except ProtocolError:
        return "?", topic[:200]


class MqttVersion(enum.Enum):
    """Which MQTT version to speak; ``AUTO`` tries 5 and falls back to 3.1.1 when the broker refuses it."""

    AUTO = "auto"
    V5 = "5"
    V311 = "3.1.1"


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes when the connection drops without a DISCONNECT."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class TlsSettings:
    """TLS with certificate verification; ``ca_file`` None means the system's trust store."""

    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class ClientSettings:
    """Where and how to connect. ``persistent_session`` keeps subscriptions and queued QoS 1
    messages across reconnects (MQTT 5: session expiry ``session_expiry_s``; 3.1.1: clean session off)."""

    host: str
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    tls: TlsSettings | None = None
    will: Will | None = None
    version: MqttVersion = MqttVersion.AUTO
    persistent_session: bool = False
    session_expiry_s: int = 24 * 3600
    keepalive_s: int = 30
    max_inflight: int = 32
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """"Full jitter" capped exponential backoff: uniform(0, min(cap, base * 2**attempt)), at least base/2."""
    uniform = rng.uniform if rng is not None else random.uniform
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 20)))
    return max(base_s / 2, uniform(0, ceiling))


SHARED_PREFIX = "$share/"


def shared_filter(group: str, topic_filter: str) -> str:
    """The MQTT 5 shared subscription ``$share/GROUP/FILTER``: the broker hands each matching
    message to one subscriber of the group, not to all (Mosquitto >= 1.6, EMQX, VerneMQ, HiveMQ,
    AWS IoT Core). The group name may not hold ``/``, ``+`` or ``#``."""
    if not group or any(c in group for c in "/+#"):
        raise ValueError(f"a shared subscription group needs a name without '/', '+' or '#', not {group!r}")
    return f"{SHARED_PREFIX}{group}/{topic_filter}"


def _plain_filter(topic_filter: str) -> str:
    """The filter a message's topic is matched against: without a ``$share/GROUP/`` prefix."""
    if topic_filter.startswith(SHARED_PREFIX):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else topic_filter
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a topic matches a subscription filter (``+`` and ``#`` wildcards; a shared
    subscription's ``$share/GROUP/`` prefix is not part of the match)."""
    return bool(_paho.topic_matches_sub(_plain_filter(topic_filter), topic))


class Delivery:
    """A queued publish; ``wait`` returns True once the broker acknowledged it (QoS >= 1) or it was
    written (QoS 0), False when that did not happen within the timeout."""

    def __init__(self, topic: str, info: Any) -> None:
        self.topic = topic
        self._info = info

    def wait(self, timeout_s: float) -> bool:
        """PublishError when the message cannot go out at all (no connection, queue full)."""
        try:
            self._info.wait_for_publish(timeout=timeout_s)
        except (RuntimeError, ValueError) as exc:
            raise PublishError(f"could not publish to {self.topic}: {exc}") from exc
        return self.published

    @property
    def published(self) -> bool:
        return bool(self._info.is_published())


class MqttClient:
    """One broker connection with per-filter handlers; see the module doc for the threading rules.

    ``start()`` connects in the background and retries forever (the agent); ``connect(timeout_s)``
    returns once connected or raises ``MqttConnectError`` (the host's commands). Either way the
    network thread reconnects after a drop, re-subscribes every filter, then calls ``on_connect``.
    """

    def __init__(self, settings: ClientSettings, *, on_connect: Callable[[], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._lock = threading.Lock()
        self._suback_waiters: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._resubscribe_mids: dict[int, str] = {}
        self._connected = threading.Event()
        self._answered = threading.Event()  # a CONNACK (accepted or refused) on the current attempt
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._version = _MQTTProtocolVersion.MQTTv311 if settings.version == MqttVersion.V311 else _MQTTProtocolVersion.MQTTv5
        self.last_error: str | None = None
        self.refused: str | None = None  # the broker's reason when it refused the last CONNECT
        self.connect_count = 0
        self._fallback_pending = False  # the broker refused MQTT 5: reconnect with 3.1.1
        self._was_connected = False  # a CONNACK succeeded since the last backoff (resets it)
        self._connack_seen = False  # any CONNACK on the current attempt
        self._dropped_before_connack = 0  # MQTT 5 CONNECTs answered by a closed socket
        self.handler_errors: Counter[tuple[str, str]] = Counter()  # (device, kind) -> messages a handler refused
        self._paho = self._make_paho()

    # -- state --------------------------------------------------------------------------------
    @property
    def protocol_in_use(self) -> str:
        return "5" if self._version == _MQTTProtocolVersion.MQTTv5 else "3.1.1"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    # -- set-up -------------------------------------------------------------------------------
    def _make_paho(self) -> _paho.Client:
        s = self.settings
        v5 = self._version == _MQTTProtocolVersion.MQTTv5
        client = _paho.Client(_CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=self._version,
                              clean_session=None if v5 else not s.persistent_session, reconnect_on_failure=False)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            t = s.tls
            client.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None,
                           certfile=str(t.client_cert) if t.client_cert else None,
                           keyfile=str(t.client_key) if t.client_key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        client.max_inflight_messages_set(s.max_inflight)
        # Only queue writes from other threads; the network thread's loop() sends them (see module doc).
        client.on_socket_register_write = lambda client, userdata, sock: None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    # -- subscribe / publish ------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1, timeout_s: float = 5.0) -> None:
        """Call ``handler(topic, payload)`` (in the network thread) for every message matching the filter.

        Before the connection is up, or from the network thread itself, the filter is only
        registered (subscribed on connect). Otherwise this waits for the SUBACK: a refused filter
        raises ``SubscribeRefusedError`` (and is forgotten), no SUBACK in time raises ``MqttError``.
        """
        entry = (topic_filter, qos, handler)
        done = threading.Event()
        codes: list[Any] = []
        with self._lock:
            self._handlers.append(entry)
            if not self.connected or threading.current_thread() is self._thread:
                if self.connected:
                    self._send_resubscribe(topic_filter, qos)
                return
            rc, mid = self._paho.subscribe(topic_filter, qos=qos)
            if rc != _paho.MQTT_ERR_SUCCESS or mid is None:
                return  # the connection just dropped: subscribed again on reconnect
            self._suback_waiters[mid] = (done, codes)
        if not done.wait(timeout_s):
            with self._lock:
                self._suback_waiters.pop(mid, None)
            raise MqttError(f"no SUBACK for {topic_filter} within {timeout_s:g} s from "
                            f"{self.settings.host}:{self.settings.port}")
        refused = [code for code in codes if code.is_failure]
        if refused:
            with self._lock:
                if entry in self._handlers:
                    self._handlers.remove(entry)
            raise SubscribeRefusedError(topic_filter, str(refused[0]), int(refused[0].value))

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Delivery:
        """Queue a message (any thread; never blocks); wait on the returned ``Delivery`` if needed."""
        return Delivery(topic, self._paho.publish(topic, payload, qos=qos, retain=retain))

    def _send_resubscribe(self, topic_filter: str, qos: int) -> None:
        """Subscribe from the network thread: the SUBACK is checked in ``_on_subscribe`` (logged)."""
        rc, mid = self._paho.subscribe(topic_filter, qos=qos)
        if rc == _paho.MQTT_ERR_SUCCESS and mid is not None:
            self._resubscribe_mids[mid] = topic_filter

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background, retrying with backoff until ``stop()``."""
        self._start_thread(connected_socket=False)

    def connect(self, timeout_s: float = 10.0) -> "MqttClient":
        """Connect now: ``MqttConnectError`` when the broker is unreachable, refuses or stays silent."""
        s = self.settings
        try:
            self._connect_once()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise MqttConnectError(f"cannot reach the broker at {s.host}:{s.port} ({exc})", reachable=False) from exc
        self._start_thread(connected_socket=True)
        answered = self._answered.wait(timeout_s)
        refused = self.refused
        if not answered or refused or not self._connected.wait(0.5):
            self.stop()
            if refused:
                raise MqttConnectError(f"the broker at {s.host}:{s.port} refused the connection: {refused}",
                                       reachable=True, refused=refused)
            raise MqttConnectError(f"no answer from the broker at {s.host}:{s.port} within {timeout_s:.0f} s",
                                   reachable=True)
        return self

    def stop(self, final: Will | None = None, timeout_s: float = 10.0) -> None:
        """Publish ``final`` if connected (e.g. a retained "offline" status: a clean DISCONNECT does
        not fire the will), then disconnect and end the network thread."""
        if final is not None and self.connected:
            try:
                self.publish(final.topic, final.payload, qos=final.qos, retain=final.retain).wait(timeout_s)
            except MqttError as exc:  # the connection went meanwhile: the broker publishes the will instead
                log.info("final message to %s not sent: %s", final.topic, exc)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:  # the network thread is gone: this thread may now do the socket I/O itself
            self._paho.disconnect()
            self._paho.loop_write()
        except Exception as exc:  # noqa: BLE001 - best effort on shutdown
            log.debug("disconnect on stop: %s", exc)
        self._connected.clear()

    def _start_thread(self, connected_socket: bool) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(connected_socket,), name="mqtt", daemon=True)
        self._thread.start()

    def _connect_once(self) -> None:
        s = self.settings
        self._connack_seen = False
        self._answered.clear()
        if self._version == _MQTTProtocolVersion.MQTTv5:
            props = None
            if s.persistent_session:
                props = _Properties(_PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = s.session_expiry_s
            self._paho.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=not s.persistent_session,
                               properties=props)
        else:
            self._paho.connect(s.host, s.port, keepalive=s.keepalive_s)

    def _run(self, connected_socket: bool) -> None:
        s = self.settings
        attempt = 0
        while not self._stop.is_set():
            if not connected_socket:
                try:
                    self._connect_once()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    delay = backoff_delay_s(attempt, s.reconnect_min_s, s.reconnect_max_s)
                    log.info("broker %s:%s unreachable (%s); retrying in %.1f s", s.host, s.port, self.last_error, delay)
                    attempt += 1
                    self._stop.wait(delay)
                    continue
            connected_socket = False
            while not self._stop.is_set():
                if self._paho.loop(timeout=0.2) != _paho.MQTT_ERR_SUCCESS:
                    break
            self._connected.clear()
            if self._stop.is_set():
                break
            try:
                self._paho.socket() and self._paho.disconnect()
            except Exception as exc:  # noqa: BLE001 - the socket is already gone
                log.debug("disconnect after a drop: %s", exc)
            if not self._connack_seen and s.version == MqttVersion.AUTO and self._version == _MQTTProtocolVersion.MQTTv5:
                # Some brokers (rumqttd on its 3.1.1 port) drop an MQTT 5 CONNECT without a CONNACK.
                self._dropped_before_connack += 1
                if self._dropped_before_connack >= 2:
                    log.info("broker closes MQTT 5 connections without answering; falling back to MQTT 3.1.1")
                    self._fallback_pending = True
            if self._fallback_pending:
                self._fallback_pending = False
                self._version = _MQTTProtocolVersion.MQTTv311
                self._paho = self._make_paho()
                continue
            delay = backoff_delay_s(attempt, s.reconnect_min_s, s.reconnect_max_s)
            attempt = attempt + 1 if not self._was_connected else 0
            self._was_connected = False
            self._stop.wait(delay)

    # -- paho callbacks (network thread) ------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            self.refused = str(reason_code)
            self.last_error = f"connection refused: {reason_code}"
            self._answered.set()
            # "Unsupported Protocol Version" (MQTT 5 code 132; 3.1.1 code 1): retry with MQTT 3.1.1.
            if self.settings.version == MqttVersion.AUTO and self._version == _MQTTProtocolVersion.MQTTv5 and \
                    getattr(reason_code, "value", None) in (1, 132):
                log.info("broker refuses MQTT 5; falling back to MQTT 3.1.1")
                self._fallback_pending = True
            else:
                log.warning("broker refused the connection: %s (check username/password/certificates)", reason_code)
            return
        self.connect_count += 1
        self._was_connected = True
        self.last_error = self.refused = None
        with self._lock:
            for topic_filter, qos, _ in self._handlers:
                self._send_resubscribe(topic_filter, qos)
        self._connected.set()
        self._answered.set()
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:  # noqa: BLE001 - a handler bug must not kill the network thread
                log.exception("on_connect handler failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        log.info("disconnected from broker: %s", reason_code)
        if was_connected and self.on_disconnect is not None:
            try:
                self.on_disconnect(str(reason_code))
            except Exception:  # noqa: BLE001
                log.exception("on_disconnect handler failed")

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._lock:
            waiter = self._suback_waiters.pop(mid, None)
            resubscribed = self._resubscribe_mids.pop(mid, None)
        if waiter is not None:
            waiter[1].extend(reason_codes)
            waiter[0].set()
        elif resubscribed is not None:
            refused = [code for code in reason_codes if code.is_failure]
            if refused:
                self.last_error = f"subscription to {resubscribed} refused: {refused[0]}"
                log.error("the broker refused the subscription to %s (%s); check the ACL", resubscribed, refused[0])

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            handlers = [handler for flt, _, handler in self._handlers if topic_matches(flt, message.topic)]
        payload = bytes(message.payload)
        for handler in handlers:
            try:
                handler(message.topic, payload)
            except Exception as exc:  # noqa: BLE001 - one bad message or handler must not stop the network thread
                self.count_error(message.topic, exc)

    def count_error(self, topic: str, exc: BaseException) -> None:
        """Count (per device and kind) and log a message a handler could not take; also for handlers
        that decode in a worker thread of their own (the agent's commands)."""
        key = error_key(topic)
        with self._lock:
            if key not in self.handler_errors and len(self.handler_errors) >= MAX_ERROR_KEYS:
                key = ("*", key[1])
            self.handler_errors[key] += 1
            n = self.handler_errors[key]
        if n <= LOGGED_PER_KEY or n % 1000 == 0:
            suffix = f" ({n} so far)" if n > 1 else ""
            if isinstance(exc, ProtocolError):
                log.warning("refused a message from %s on %s: %s%s", key[0], key[1], exc, suffix)
            else:
                log.error("handler for %s failed%s", topic, suffix, exc_info=exc)


class LoopMqttClient:
    """One broker connection driven by an asyncio event loop instead of a thread of its own, so one
    process can hold thousands of them (``builder fleet simulate``). paho's external-loop hooks
    register the socket with the loop (``add_reader``; ``add_writer`` only while paho has bytes to
    send), as aiomqtt does; ``tick()`` (about once a second) sends keep-alives.

    Every method must be called from the loop's thread, and every callback runs there. Unlike
    ``MqttClient`` it does not wait for SUBACKs and speaks one MQTT version (``AUTO`` means 5).
    Reconnects follow the same capped, jittered backoff.
    """

    def __init__(self, settings: ClientSettings, loop: Any, *, on_connect: Callable[[], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None,
                 on_published: Callable[[int], None] | None = None) -> None:
        self.settings = settings
        self.loop = loop  # an asyncio.AbstractEventLoop
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_published = on_published  # mid of a QoS 1 publish the broker acknowledged
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._version = _MQTTProtocolVersion.MQTTv311 if settings.version == MqttVersion.V311 else _MQTTProtocolVersion.MQTTv5
        self._paho = self._make_paho()
        self._connected = False
        self._stopping = False
        self._attempt = 0
        self._reconnect_handle: Any = None
        self.connect_count = 0
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def _make_paho(self) -> _paho.Client:
        s = self.settings
        v5 = self._version == _MQTTProtocolVersion.MQTTv5
        client = _paho.Client(_CallbackAPIVersion.VERSION2, client_id=s.client_id, protocol=self._version,
                              clean_session=None if v5 else not s.persistent_session, reconnect_on_failure=False)
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls is not None:
            t = s.tls
            client.tls_set(ca_certs=str(t.ca_file) if t.ca_file else None,
                           certfile=str(t.client_cert) if t.client_cert else None,
                           keyfile=str(t.client_key) if t.client_key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if s.will is not None:
            client.will_set(s.will.topic, s.will.payload, qos=s.will.qos, retain=s.will.retain)
        client.max_inflight_messages_set(s.max_inflight)
        client.on_socket_open = lambda c, u, sock: self.loop.add_reader(sock, self._read)
        client.on_socket_close = lambda c, u, sock: self.loop.remove_reader(sock)
        client.on_socket_register_write = lambda c, u, sock: self.loop.add_writer(sock, self._write)
        client.on_socket_unregister_write = lambda c, u, sock: self.loop.remove_writer(sock)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    # -- subscribe / publish ------------------------------------------------------------------
    def subscribe(self, topic_filter: str, handler: MessageHandler, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for every message matching the filter; (re)subscribed on
        every connect. Mosquitto's ACL never refuses a SUBSCRIBE anyway (see the module doc)."""
        self._handlers.append((topic_filter, qos, handler))
        if self._connected:
            self._paho.subscribe(topic_filter, qos=qos)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a message; returns its mid (``on_published(mid)`` follows the PUBACK), or None when
        there is no connection (nothing is queued: the caller keeps what it must resend)."""
        if not self._connected:
            return None
        info = self._paho.publish(topic, payload, qos=qos, retain=retain)
        return int(info.mid) if info.rc == _paho.MQTT_ERR_SUCCESS else None

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Connect now (the TCP connect blocks the loop briefly); on failure retry with backoff."""
        self._stopping = False
        self._connect()

    def _connect(self) -> None:
        s = self.settings
        self._reconnect_handle = None
        if self._stopping:
            return
        try:
            if self._version == _MQTTProtocolVersion.MQTTv5:
                props = None
                if s.persistent_session:
                    props = _Properties(_PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                    props.SessionExpiryInterval = s.session_expiry_s
                self._paho.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=not s.persistent_session,
                                   properties=props)
            else:
                self._paho.connect(s.host, s.port, keepalive=s.keepalive_s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._stopping or self._reconnect_handle is not None:
            return
        s = self.settings
        delay = backoff_delay_s(self._attempt, s.reconnect_min_s, s.reconnect_max_s)
        self._attempt += 1
        self._reconnect_handle = self.loop.call_later(delay, self._connect)

    def tick(self) -> None:
        """Keep-alive and keep-alive timeout checks (paho's ``loop_misc``)."""
        if self._paho.socket() is not None:
            self._paho.loop_misc()

    def stop(self, final: Will | None = None) -> None:
        """Publish ``final`` (queued before the DISCONNECT, so it goes first), then disconnect."""
        self._stopping = True
        if self._reconnect_handle is not None:
            self._reconnect_handle.cancel()
            self._reconnect_handle = None
        if final is not None and self._connected:
            self._paho.publish(final.topic, final.payload, qos=final.qos, retain=final.retain)
        if self._paho.socket() is not None:
            self._paho.disconnect()

    def _read(self) -> None:
        self._paho.loop_read()

    def _write(self) -> None:
        self._paho.loop_write()

    # -- paho callbacks (the loop's thread) ---------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self.last_error = f"connection refused: {reason_code}"
            log.warning("%s: broker refused the connection: %s", self.settings.client_id, reason_code)
            return  # the broker closes the socket: _on_disconnect schedules the retry
        self._connected = True
        self._attempt = 0
        self.connect_count += 1
        self.last_error = None
        for topic_filter, qos, _ in self._handlers:
            client.subscribe(topic_filter, qos=qos)
        if self.on_connect is not None:
            try:
                self.on_connect()
            except Exception:  # noqa: BLE001 - a handler bug must not stop the loop
                log.exception("on_connect handler failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected, self._connected = self._connected, False
        if was_connected and self.on_disconnect is not None:
            try:
                self.on_disconnect(str(reason_code))
            except Exception:  # noqa: BLE001
                log.exception("on_disconnect handler failed")
        self._schedule_reconnect()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        if self.on_published is not None:
            self.on_published(mid)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        payload = bytes(message.payload)
        for flt, _, handler in list(self._handlers):
            if _paho.topic_matches_sub(flt, message.topic):
                try:
                    handler(message.topic, payload)
                except Exception:  # noqa: BLE001 - one bad handler must not stop the loop
                    log.exception("handler for %s failed", message.topic)
