"""The host's MQTT connection (builder credentials), shared by `builder serve`, `builder push` and
`builder fleet rollback`.

MQTT 3.1.1 on purpose: every broker speaks it (rumqttd, the embedded broker, serves MQTT 5 only on
a separate listener), and the host needs nothing from v5, except `builder serve` workers that share
the fleet's load through shared subscriptions (``$share/…``, an MQTT 5 feature: docs/scale.md). Where the broker is comes from
``--broker`` or from the ``serve.json`` a running `builder serve` leaves in the data directory.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from agent import protocol as proto
from agent.errors import MqttConnectError, MqttError, ProtocolError
from agent.mqtt import ClientSettings, MqttClient, MqttVersion, TlsSettings, Will
from builder.errors import FleetError, UsageError

log = logging.getLogger(__name__)

SERVE_STATE_FILE = "serve.json"
CREDENTIALS_FILE = "broker-credentials.json"
# Host-only topic (devices' ACL gives them no access): `builder serve` announces itself here,
# retained, with a last will, so `builder push` can tell whether anyone serves chunks.
SERVE_TOPIC = f"{proto.TOPIC_ROOT}/host/serve"

MessageCallback = Callable[[str, bytes], None]


@dataclass(frozen=True)
class BrokerEndpoint:
    """How the host reaches the broker. The URL may carry ``user:password@``."""

    url: str
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    @property
    def host(self) -> str:
        return self._parsed()[0]

    @property
    def port(self) -> int:
        return self._parsed()[1]

    @property
    def tls(self) -> bool:
        return self._parsed()[2]

    def _parsed(self) -> tuple[str, int, bool]:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise UsageError(f"broker URL {self.url!r} must look like mqtt://host:1883 or mqtts://host:8883")
        tls = parsed.scheme == "mqtts"
        return parsed.hostname, parsed.port or (8883 if tls else 1883), tls

    def public_url(self) -> str:
        """The URL without credentials (safe to print and to write into agent.toml)."""
        host, port, tls = self._parsed()
        return f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"

    def with_url_credentials(self) -> "BrokerEndpoint":
        parsed = urlparse(self.url)
        return BrokerEndpoint(self.public_url(), self.username or (unquote(parsed.username) if parsed.username else None),
                              self.password or (unquote(parsed.password) if parsed.password else None),
                              self.ca_file, self.client_cert, self.client_key)


def _write_private_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, default=str)
    os.replace(tmp, path)


def save_builder_credentials(data_dir: Path, username: str, password: str, broker_url: str | None = None,
                             ca_file: Path | None = None) -> Path:
    """The builder's own broker credentials (mode 0600; Mosquitto keeps only their hash)."""
    path = Path(data_dir) / CREDENTIALS_FILE
    _write_private_json(path, {"username": username, "password": password, "broker_url": broker_url,
                               "ca_file": str(ca_file) if ca_file else None})
    return path


def load_builder_credentials(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / CREDENTIALS_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        raise FleetError(f"{path} is unreadable ({exc}); re-run `builder fleet add-device` or pass --broker") from exc


def write_serve_state(data_dir: Path, endpoint: BrokerEndpoint, embedded: bool) -> Path:
    """Tell other builder commands where the running serve's broker is (credentials included: 0600)."""
    path = Path(data_dir) / SERVE_STATE_FILE
    data = asdict(endpoint)
    data.update(pid=os.getpid(), embedded=embedded, started_at=time.time())
    _write_private_json(path, data)
    return path


def read_serve_state(data_dir: Path) -> dict[str, Any] | None:
    path = Path(data_dir) / SERVE_STATE_FILE
    if not path.is_file():
        return None
    try:
        data = dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return None
    pid = int(data.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None  # a serve that died without cleaning up
    except PermissionError:
        pass
    return data


def resolve_endpoint(data_dir: Path, broker_url: str | None = None, username: str | None = None,
                     password: str | None = None, ca_file: Path | None = None) -> BrokerEndpoint:
    """``--broker`` (with saved builder credentials filled in), else the running serve's broker."""
    creds = load_builder_credentials(data_dir) or {}
    if broker_url:
        endpoint = BrokerEndpoint(broker_url, username, password, ca_file).with_url_credentials()
        return BrokerEndpoint(endpoint.url, endpoint.username or creds.get("username"),
                              endpoint.password or creds.get("password"),
                              endpoint.ca_file or (Path(creds["ca_file"]) if creds.get("ca_file") else None))
    state = read_serve_state(data_dir)
    if state is None:
        raise FleetError(f"no `builder serve` is running for data dir {data_dir} and no --broker was given; "
                         "start `builder serve` (same --data-dir) or pass --broker mqtt://HOST:PORT")
    return BrokerEndpoint(state["url"], state.get("username"), state.get("password"),
                          Path(state["ca_file"]) if state.get("ca_file") else None,
                          Path(state["client_cert"]) if state.get("client_cert") else None,
                          Path(state["client_key"]) if state.get("client_key") else None)


class FleetLink:
    """The host's connection: the shared ``agent.mqtt.MqttClient`` with the builder's credentials,
    FleetError at this boundary, request/reply for commands. ``mqtt`` is that client, for parts
    that serve on the same connection (the chunk server)."""

    def __init__(self, endpoint: BrokerEndpoint, client_id: str | None = None, *,
                 will: tuple[str, bytes] | None = None, version: MqttVersion = MqttVersion.V311) -> None:
        self.endpoint = endpoint
        self.client_id = client_id or f"edgefleet-builder-{uuid.uuid4().hex[:8]}"
        self.reconnects = 0
        self._replies: dict[str, tuple[threading.Event, list[proto.CommandReply]]] = {}
        self._reply_callbacks: dict[str, Callable[[proto.CommandReply], None]] = {}
        self._lock = threading.Lock()
        self._watching_replies = False
        self.mqtt = MqttClient(host_client_settings(endpoint, self.client_id, will, version),
                               on_disconnect=self._on_disconnect)

    # -- connection -------------------------------------------------------------------------
    def connect(self, timeout_s: float = 10.0) -> "FleetLink":
        ep = self.endpoint
        try:
            self.mqtt.connect(timeout_s)
        except MqttConnectError as exc:
            if not exc.reachable:
                raise FleetError(f"cannot reach the broker at {ep.public_url()} ({exc.__cause__}); is it running? "
                                 "(start `builder serve` or pass the right --broker)") from exc
            if exc.refused:
                raise FleetError(f"the broker at {ep.public_url()} refused the builder: {exc.refused}; "
                                 "check the builder username/password (broker-credentials.json) or certificates") from exc
            raise FleetError(f"no answer from the broker at {ep.public_url()} within {timeout_s:.0f} s") from exc
        return self

    def close(self) -> None:
        self.mqtt.stop()

    def __enter__(self) -> "FleetLink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self.mqtt.connected

    def _on_disconnect(self, reason: str) -> None:
        self.reconnects += 1
        log.info("broker connection lost (%s); reconnecting", reason)

    # -- subscribe / publish ----------------------------------------------------------------
    def subscribe(self, topic_filter: str, callback: MessageCallback, qos: int = 1, wait_s: float = 5.0) -> None:
        """Call ``callback(topic, payload)`` for every message matching the filter (in the network
        thread); FleetError when the broker refuses the filter or does not acknowledge it."""
        try:
            self.mqtt.subscribe(topic_filter, callback, qos=qos, timeout_s=wait_s)
        except MqttError as exc:
            raise FleetError(f"{exc} (broker {self.endpoint.public_url()})") from exc

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout_s: float = 10.0) -> None:
        """Publish and wait for the broker's acknowledgement (QoS ≥ 1); never from the network thread."""
        delivery = self.mqtt.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            return
        try:
            delivered = delivery.wait(timeout_s)
        except MqttError as exc:
            raise FleetError(f"{exc}; is the broker reachable?") from exc
        if not delivered:
            raise FleetError(f"the broker did not acknowledge {topic} within {timeout_s:.0f} s")

    def publish_nowait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message without waiting for its acknowledgement (safe in the network thread)."""
        self.mqtt.publish(topic, payload, qos=qos, retain=retain)

    # -- commands ---------------------------------------------------------------------------
    def watch_replies(self) -> None:
        """Subscribe once to every device's replies (needed before ``command``)."""
        with self._lock:
            if self._watching_replies:
                return
            self._watching_replies = True
        try:
            self.subscribe(proto.all_devices_topic(proto.Up.REPLY), self._on_reply)
        except FleetError:
            with self._lock:
                self._watching_replies = False
            raise

    def _on_reply(self, topic: str, payload: bytes) -> None:
        try:
            reply = proto.CommandReply.from_json(payload)
        except ProtocolError as exc:
            log.warning("ignoring bad reply on %s: %s", topic, exc)
            return
        with self._lock:
            waiter = self._replies.get(reply.request_id)
            callback = self._reply_callbacks.pop(reply.request_id, None)
        if waiter is not None:
            waiter[1].append(reply)
            waiter[0].set()
        if callback is not None:
            callback(reply)

    def send_command(self, device_id: str, args: proto.CommandArgs,
                     on_reply: Callable[[proto.CommandReply], None]) -> str:
        """Send a command without waiting: ``on_reply(reply)`` runs in the network thread when the
        reply arrives (the caller keeps its own deadline; ``forget_command`` drops a late one)."""
        self.watch_replies()
        request_id = uuid.uuid4().hex
        with self._lock:
            self._reply_callbacks[request_id] = on_reply
        message = proto.Command.of(request_id, args, ts=proto.now_s())
        self.publish_nowait(proto.device_topic(device_id, proto.Down.COMMAND), message.to_json(), qos=1)
        return request_id

    def forget_command(self, request_id: str) -> None:
        with self._lock:
            self._reply_callbacks.pop(request_id, None)

    def command(self, device_id: str, args: proto.CommandArgs, timeout_s: float = 60.0) -> proto.CommandReply:
        """Send a command (its typed arguments) and wait for the reply carrying its request id."""
        self.watch_replies()
        request_id = uuid.uuid4().hex
        event: threading.Event = threading.Event()
        box: list[proto.CommandReply] = []
        with self._lock:
            self._replies[request_id] = (event, box)
        try:
            message = proto.Command.of(request_id, args, ts=proto.now_s())
            self.publish(proto.device_topic(device_id, proto.Down.COMMAND), message.to_json(), qos=1)
            if not event.wait(timeout_s):
                raise FleetError(f"{device_id} did not answer '{args.COMMAND}' within {timeout_s:.0f} s; is it online? "
                                 "(see `builder fleet status`)")
            return box[0]
        finally:
            with self._lock:
                self._replies.pop(request_id, None)


def host_client_settings(endpoint: BrokerEndpoint, client_id: str, will: tuple[str, bytes] | None = None,
                         version: MqttVersion = MqttVersion.V311) -> ClientSettings:
    """MQTT 3.1.1 (5 for shared subscriptions), clean session (see the module doc), 64 QoS 1 messages in flight (paho's default
    of 20 throttles a device's window of chunks), reconnect within 0.5..10 s."""
    tls = TlsSettings(endpoint.ca_file, endpoint.client_cert, endpoint.client_key) if endpoint.tls else None
    return ClientSettings(host=endpoint.host, port=endpoint.port, client_id=client_id, username=endpoint.username,
                          password=endpoint.password, tls=tls, will=Will(will[0], will[1]) if will else None,
                          version=version, persistent_session=False, keepalive_s=30, max_inflight=64,
                          reconnect_min_s=0.5, reconnect_max_s=10.0)
