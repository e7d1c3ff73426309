"""The embedded MQTT broker `builder serve` starts when no ``--broker`` is given.

It is rumqttd, bundled in the ``iotcore`` wheel (the ``broker`` extra), run in a child process.
Chosen over ``amqtt`` (lost QoS1 messages under connection churn with its auth plugins) and over
requiring a Mosquitto binary (not pip-installable) — see README "Deploy to a fleet" for the numbers.

It is for a laptop or a demo only: rumqttd has no ACLs, so every client can read and publish every
topic. That is why it binds 127.0.0.1 by default. Production points ``--broker`` at Mosquitto or a
broker cluster with per-device credentials and pattern ACLs.

Three rumqttd defaults would break a fleet silently, so the config written here overrides them:

* ``max_payload_size`` defaults to 20 KiB and bigger publishes are dropped without an error; chunks
  are up to 128 KiB plus framing, so the limit is raised (1 MiB).
* the router keeps each topic's messages in an in-memory log of ``max_segment_count`` segments of
  ``max_segment_size`` bytes; a subscriber that lags further behind than that loses QoS1 messages
  silently (measured: 66 of 200 × 128 KiB lost with a 2 × 2 MiB log). The log is sized far above the
  largest burst a device pulls (one window of chunks).
* it binds 0.0.0.0 unless told otherwise.
"""
from __future__ import annotations

import logging
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import FleetError

log = logging.getLogger(__name__)

MIB = 1 << 20


@dataclass(frozen=True)
class EmbeddedBrokerSettings:
    """Where the embedded broker listens and how big its limits are.

    ``port`` / ``v5_port`` of 0 pick a free port. The v3.1.1 listener is the one advertised in
    ``url``; rumqttd speaks MQTT 5 only on its own listener (``v5_url``).
    """

    host: str = "127.0.0.1"
    port: int = 1883
    v5_port: int = 0
    max_payload_bytes: int = MIB
    log_segment_bytes: int = 32 * MIB
    log_segment_count: int = 4
    max_inflight_count: int = 100
    max_connections: int = 10_000
    connection_timeout_ms: int = 60_000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (another process may still take it: a small race)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def rumqttd_config(settings: EmbeddedBrokerSettings, port: int, v5_port: int) -> str:
    """The rumqttd TOML for these settings (one v3.1.1 and one v5 listener, both on ``host``)."""

    def listener(section: str, name: str, listen_port: int) -> str:
        lines = [
            f"[{section}]",
            f'name = "{name}"',
            f'listen = "{settings.host}:{listen_port}"',
            "next_connection_delay_ms = 1",
            f"[{section}.connections]",
            f"connection_timeout_ms = {settings.connection_timeout_ms}",
            f"max_payload_size = {settings.max_payload_bytes}",
            f"max_inflight_count = {settings.max_inflight_count}",
        ]
        if section.startswith("v4"):
            lines.append("dynamic_filters = true")
        return "\n".join(lines)

    return "\n".join([
        "id = 0",
        "[router]",
        "id = 0",
        f"max_connections = {settings.max_connections}",
        "max_outgoing_packet_count = 200",
        f"max_segment_size = {settings.log_segment_bytes}",
        f"max_segment_count = {settings.log_segment_count}",
        "",
        listener("v4.1", "v4-1", port),
        "",
        listener("v5.1", "v5-1", v5_port),
        "",
    ])


class EmbeddedBroker:
    """A started-on-demand rumqttd; use as a context manager or call ``start()`` / ``stop()``."""

    def __init__(self, settings: EmbeddedBrokerSettings | None = None, config_dir: Path | None = None) -> None:
        self.settings = settings or EmbeddedBrokerSettings()
        self._config_dir = config_dir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._broker: Any = None
        self.port = 0
        self.v5_port = 0

    @property
    def url(self) -> str:
        return f"mqtt://{self.settings.host}:{self.port}"

    @property
    def v5_url(self) -> str:
        return f"mqtt://{self.settings.host}:{self.v5_port}"

    @property
    def is_running(self) -> bool:
        return self._broker is not None and bool(self._broker.is_running)

    def start(self, timeout_s: float = 10.0) -> "EmbeddedBroker":
        try:
            from iotcore import Broker
        except ImportError as exc:
            raise FleetError("the embedded broker needs the 'iotcore' package; install it with "
                             "`pip install 'edgefleet[broker]'` or pass --broker mqtt://HOST:PORT") from exc
        host = self.settings.host
        self.port = self.settings.port or free_port(host)
        self.v5_port = self.settings.v5_port or free_port(host)
        if self._config_dir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="edgefleet-broker-")
            config_dir = Path(self._tempdir.name)
        else:
            config_dir = self._config_dir
            config_dir.mkdir(parents=True, exist_ok=True)
        config_path = config_dir / "rumqttd.toml"
        config_path.write_text(rumqttd_config(self.settings, self.port, self.v5_port), encoding="utf-8")
        try:
            broker = Broker(config_path=str(config_path))
            broker.start(timeout=timeout_s)
        except OSError as exc:
            self._cleanup()
            raise FleetError(f"cannot start the embedded broker on {host}:{self.port} ({exc}); "
                             "pick another port with --port or stop what uses it") from exc
        except RuntimeError as exc:
            self._cleanup()
            raise FleetError(f"the embedded broker did not start ({exc}); run with --broker to use "
                             "an external one") from exc
        self._broker = broker
        log.info("embedded broker (rumqttd via iotcore) on %s (MQTT 5 on %s)", self.url, self.v5_url)
        return self

    def stop(self) -> None:
        """Stop the broker process and release its ports. Safe to call twice."""
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
