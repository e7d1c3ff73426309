"""The agent's MQTT connection: paho-mqtt 2.x (callback API v2), MQTT 5 with 3.1.1 fallback, TLS,
username/password, persistent session, reconnect with capped exponential backoff and jitter,
retained status with a last will "offline".

Its own thread drives ``client.loop()`` so the backoff (with jitter, which paho's built-in
reconnect lacks) is under our control. Handlers are registered per topic before ``start()``.

All socket I/O happens in that one thread. Without ``loop_start()`` paho 2.x writes a publish
straight to the socket from the *calling* thread (``_packet_queue`` -> ``loop_write``) while the
MQTT thread may be reading it; on a TLS connection that is two threads in one OpenSSL ``SSL``
object at once, which OpenSSL does not allow (heap corruption: a glibc "free(): corrupted unsorted
chunks" abort of an idle TLS agent fits). A ``on_socket_register_write`` callback makes paho only
queue the packet and wake the MQTT thread's ``select`` through its socket pair.
"""
from __future__ import annotations

import logging
import random
import ssl
import threading
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from agent.config import BrokerSettings

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
SESSION_EXPIRY_S = 24 * 3600


def backoff_delay_s(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """"Full jitter" capped exponential backoff: uniform(0, min(cap, base * 2**attempt)), at least base/2."""
    rng = rng or random
    ceiling = min(cap_s, base_s * (2 ** min(attempt, 20)))
    return max(base_s / 2, rng.uniform(0, ceiling))


class MqttConnection:
    def __init__(self, client_id: str, settings: BrokerSettings, *, will_topic: str | None = None,
                 will_payload: bytes = b"", on_connected: Callable[[], None] | None = None) -> None:
        self.client_id = client_id
        self.settings = settings
        self.will_topic = will_topic
        self.will_payload = will_payload
        self.on_connected = on_connected
        self._handlers: list[tuple[str, int, MessageHandler]] = []
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._protocol = MQTTProtocolVersion.MQTTv311 if settings.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        self.protocol_in_use = "5" if self._protocol == MQTTProtocolVersion.MQTTv5 else "3.1.1"
        self.last_error: str | None = None
        self.connect_count = 0
        self._fallback_pending = False  # the broker refused MQTT 5: reconnect with 3.1.1
        self._was_connected = False  # a CONNACK succeeded since the last backoff (resets it)
        self._connack_seen = False  # any CONNACK on the current attempt
        self._dropped_before_connack = 0  # MQTT 5 CONNECTs answered by a closed socket
        self.client = self._make_client()

    # -- set-up -------------------------------------------------------------------------------
    def _make_client(self) -> mqtt.Client:
        v5 = self._protocol == MQTTProtocolVersion.MQTTv5
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self._protocol,
                             clean_session=None if v5 else False, reconnect_on_failure=False)
        s = self.settings
        if s.username:
            client.username_pw_set(s.username, s.password)
        if s.tls:
            client.tls_set(ca_certs=str(s.ca_file) if s.ca_file else None,
                           certfile=str(s.client_cert) if s.client_cert else None,
                           keyfile=str(s.client_key) if s.client_key else None,
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if self.will_topic:
            client.will_set(self.will_topic, self.will_payload, qos=1, retain=True)
        client.max_inflight_messages_set(32)
        # Only queue writes from other threads; the MQTT thread's loop() sends them (see module doc).
        client.on_socket_register_write = lambda client, userdata, sock: None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Register before start(); (re)subscribed on every connect."""
        self._handlers.append((topic, qos, handler))

    # -- state --------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    # -- loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def stop(self, final_topic: str | None = None, final_payload: bytes = b"") -> None:
        """Publish a final retained message (e.g. status offline) if connected, then disconnect."""
        if final_topic and self.connected:
            try:
                self.client.publish(final_topic, final_payload, qos=1, retain=True).wait_for_publish(10)
            except (RuntimeError, ValueError):
                pass
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:  # the MQTT thread is gone: this thread may now do the socket I/O itself
            self.client.disconnect()
            self.client.loop_write()
        except Exception:  # noqa: BLE001 - best effort on shutdown
            pass

    def _connect_once(self, first: bool) -> None:
        s = self.settings
        if self._protocol == MQTTProtocolVersion.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            self.client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=False, properties=props)
        else:
            self.client.connect(s.host, s.port, keepalive=s.keepalive_s)

    def _run(self) -> None:
        attempt = 0
        first = True
        while not self._stop.is_set():
            try:
                self._connack_seen = False
                self._connect_once(first)
                first = False
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = backoff_delay_s(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s)
                log.info("broker %s:%s unreachable (%s); retrying in %.1f s", self.settings.host, self.settings.port,
                         self.last_error, delay)
                attempt += 1
                self._stop.wait(delay)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.2)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            self._connected.clear()
            if self._stop.is_set():
                break
            try:
                self.client.socket() and self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass
            if not self._connack_seen and self.settings.protocol == "auto" and \
                    self._protocol == MQTTProtocolVersion.MQTTv5:
                # Some brokers (rumqttd on its 3.1.1 port) drop an MQTT 5 CONNECT without a CONNACK.
                self._dropped_before_connack += 1
                if self._dropped_before_connack >= 2:
                    log.info("broker closes MQTT 5 connections without answering; falling back to MQTT 3.1.1")
                    self._fallback_pending = True
            if self._fallback_pending:
                self._fallback_pending = False
                self._protocol = MQTTProtocolVersion.MQTTv311
                self.protocol_in_use = "3.1.1"
                self.client = self._make_client()
                continue
            delay = backoff_delay_s(attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s)
            attempt = attempt + 1 if not self._was_connected else 0
            self._was_connected = False
            self._stop.wait(delay)

    # -- callbacks (network thread) -----------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connack_seen = True
        if reason_code.is_failure:
            self.last_error = f"connection refused: {reason_code}"
            # "Unsupported Protocol Version" (MQTT 5 code 132; 3.1.1 code 1): retry with MQTT 3.1.1.
            if self.settings.protocol == "auto" and self._protocol == MQTTProtocolVersion.MQTTv5 and \
                    getattr(reason_code, "value", None) in (1, 132):
                log.info("broker refuses MQTT 5; falling back to MQTT 3.1.1")
                self._fallback_pending = True
            else:
                log.warning("broker refused the connection: %s (check username/password/certificates)", reason_code)
            return
        self.connect_count += 1
        self._was_connected = True
        self.last_error = None
        for topic, qos, _ in self._handlers:
            client.subscribe(topic, qos=qos)
        self._connected.set()
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:  # noqa: BLE001 - a handler bug must not kill the network thread
                log.exception("on_connected handler failed")

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        log.info("disconnected from broker: %s", reason_code)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        for topic, _, handler in self._handlers:
            if mqtt.topic_matches_sub(topic, message.topic):
                try:
                    handler(message.topic, message.payload)
                except Exception:  # noqa: BLE001
                    log.exception("handler for %s failed", message.topic)
