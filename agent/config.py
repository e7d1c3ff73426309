"""``agent.toml``: everything the agent needs, validated once at start-up into a frozen AgentConfig.

Example (see ``deploy/agent.toml`` for every option)::

    device_id = "pi-kitchen-01"
    broker_url = "mqtts://broker.example.org:8883"
    username = "pi-kitchen-01"          # defaults to device_id (the ACL needs username == id)
    password = "..."                    # or password_file = "/etc/edgefleet/password"
    ca_file = "/etc/edgefleet/ca.pem"
    trusted_key = "/etc/edgefleet/signing_key.pub.pem"
    data_dir = "/var/lib/edgefleet"
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

from agent.errors import ConfigError, ProtocolError
from agent.protocol import validate_device_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class BrokerSettings:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    protocol: str = "auto"  # "auto" (MQTT 5, fall back to 3.1.1) | "5" | "3.1.1"
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0


@dataclass(frozen=True)
class LoadSettings:
    """Artificial load for tests and demos: every inference takes ``slowdown_factor`` times as long
    (the agent sleeps the difference), and ``cpu_burn_threads`` threads spin ``cpu_burn_duty`` of
    the time. Both also settable at run time with the ``set_load`` command."""

    slowdown_factor: float = 1.0
    cpu_burn_threads: int = 0
    cpu_burn_duty: float = 0.5


@dataclass(frozen=True)
class AgentConfig:
    device_id: str
    broker: BrokerSettings
    trusted_key: Path
    data_dir: Path
    profile: str | None = None  # None: detected at start-up
    telemetry_interval_s: float = 30.0
    http_port: int = 8765  # 0: any free port (tests); bound to 127.0.0.1 only
    threads: int = 0  # runtime threads, 0 = runtime default
    window_chunks: int = 64  # chunks in flight (<= 256), 8 MiB at 128 KiB
    chunk_timeout_s: float = 10.0
    telemetry_buffer_max_bytes: int = 8 << 20
    telemetry_buffer_max_age_s: float = 7 * 24 * 3600.0
    telemetry_window: int = 100  # reports sent and not yet acknowledged by the host
    telemetry_resend_s: float = 10.0  # an unacknowledged report is sent again after this (doubling, <= 300 s)
    rollback_after_errors: int = 3  # consecutive run-time failures of the active model
    latency_regression_factor: float = 3.0  # field p50 over this many times the install-time p50 -> rollback; 0 = off
    latency_min_requests: int = 20
    load: LoadSettings = field(default_factory=LoadSettings)
    install_pause_s: float = 0.0  # test hook: pause between health check and switch (kill-during-install tests)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigError(f"broker_url {url!r} must look like mqtt://host:1883 or mqtts://host:8883")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def _path(value: Any, base: Path) -> Path | None:
    if value in (None, ""):
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path)


def config_from_dict(data: Mapping[str, Any], base_dir: Path = Path(".")) -> AgentConfig:
    """Validate a parsed agent.toml; relative paths are relative to the file's directory."""
    def need(key: str) -> Any:
        if key not in data or data[key] in (None, ""):
            raise ConfigError(f"agent.toml lacks {key!r}; add it (see deploy/agent.toml)")
        return data[key]

    try:
        device_id = validate_device_id(str(need("device_id")))
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from exc
    host, port, tls = parse_broker_url(str(need("broker_url")))
    password = data.get("password")
    password_file = _path(data.get("password_file"), base_dir)
    if password is None and password_file is not None:
        try:
            password = password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read password_file {password_file}: {exc.strerror}") from exc
    ca_file = _path(data.get("ca_file"), base_dir)
    client_cert, client_key = _path(data.get("client_cert"), base_dir), _path(data.get("client_key"), base_dir)
    for label, path in (("ca_file", ca_file), ("client_cert", client_cert), ("client_key", client_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{label} {path} does not exist; fix the path in agent.toml")
    if (client_cert is None) != (client_key is None):
        raise ConfigError("client_cert and client_key go together; set both or neither")
    protocol = str(data.get("mqtt_protocol", "auto"))
    if protocol not in ("auto", "5", "3.1.1"):
        raise ConfigError(f"mqtt_protocol {protocol!r} must be 'auto', '5' or '3.1.1'")
    broker = BrokerSettings(host=host, port=port, tls=tls, username=str(data.get("username") or device_id),
                            password=None if password is None else str(password), ca_file=ca_file,
                            client_cert=client_cert, client_key=client_key, protocol=protocol,
                            keepalive_s=int(data.get("keepalive_s", 30)),
                            reconnect_min_s=float(data.get("reconnect_min_s", 0.5)),
                            reconnect_max_s=float(data.get("reconnect_max_s", 30.0)))
    load_data = data.get("load", {}) or {}
    try:
        load = LoadSettings(slowdown_factor=float(load_data.get("slowdown_factor", 1.0)),
                            cpu_burn_threads=int(load_data.get("cpu_burn_threads", 0)),
                            cpu_burn_duty=float(load_data.get("cpu_burn_duty", 0.5)))
        cfg = AgentConfig(
            device_id=device_id, broker=broker, trusted_key=_path(need("trusted_key"), base_dir),  # type: ignore[arg-type]
            data_dir=_path(need("data_dir"), base_dir),  # type: ignore[arg-type]
            profile=data.get("profile") or None,
            telemetry_interval_s=float(data.get("telemetry_interval_s", 30.0)),
            http_port=int(data.get("http_port", 8765)), threads=int(data.get("threads", 0)),
            window_chunks=int(data.get("window_chunks", 64)),
            chunk_timeout_s=float(data.get("chunk_timeout_s", 10.0)),
            telemetry_buffer_max_bytes=int(data.get("telemetry_buffer_max_bytes", 8 << 20)),
            telemetry_buffer_max_age_s=float(data.get("telemetry_buffer_max_age_s", 7 * 24 * 3600.0)),
            telemetry_window=int(data.get("telemetry_window", 100)),
            telemetry_resend_s=float(data.get("telemetry_resend_s", 10.0)),
            rollback_after_errors=int(data.get("rollback_after_errors", 3)),
            latency_regression_factor=float(data.get("latency_regression_factor", 3.0)),
            latency_min_requests=int(data.get("latency_min_requests", 20)),
            load=load, install_pause_s=float(data.get("install_pause_s", 0.0)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"agent.toml has a value of the wrong type: {exc}") from exc
    if not 1 <= cfg.window_chunks <= 256:
        raise ConfigError("window_chunks must be in 1..256")
    if cfg.telemetry_interval_s <= 0:
        raise ConfigError("telemetry_interval_s must be > 0")
    if not 1 <= cfg.telemetry_window <= 1000 or cfg.telemetry_resend_s <= 0:
        raise ConfigError("telemetry_window must be in 1..1000 and telemetry_resend_s > 0")
    if load.slowdown_factor < 1.0 or not 0.0 <= load.cpu_burn_duty <= 1.0:
        raise ConfigError("load.slowdown_factor must be >= 1 and load.cpu_burn_duty in 0..1")
    return cfg


def load_config(path: Path) -> AgentConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}; pass --config with the agent.toml path") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    return config_from_dict(data, base_dir=path.resolve().parent)

