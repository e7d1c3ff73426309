"""`builder fleet add-device`: register a device, give it broker credentials, write its agent.toml.

With ``broker_config_dir`` the device gets a Mosquitto user (hashed password in ``passwd``) and is
confined by the fleet's pattern ACL (``builder.fleet.broker_config``): the ACL has no per-device
lines, so adding a device only adds a user. The first device also creates the config, the builder
user and its credentials (saved 0600 in the data dir). Without it the device is set up for the
embedded broker, which has no authentication (laptop and demo only).
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol as proto
from agent.errors import ProtocolError
from builder.errors import FleetError, UsageError
from builder.fleet.link import load_builder_credentials, read_serve_state, save_builder_credentials
from builder.fleet.store import open_store

DEFAULT_AGENT_DATA_DIR = "/var/lib/edgefleet"
KEY_DIR_NAME = "keys"
PUBLIC_KEY_FILE = "signing_key.pub.pem"


@dataclass(frozen=True)
class BrokerTls:
    """TLS listener for a newly created Mosquitto config (server side)."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


@dataclass(frozen=True)
class AddedDevice:
    device_id: str
    profile: str
    group: str | None
    agent_toml: Path
    broker_url: str
    credentials: str  # "mosquitto user" | "none (embedded broker)"
    broker_config_file: Path | None


def default_trusted_key(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_DIR_NAME / PUBLIC_KEY_FILE


def add_password(password_file: Path, user: str, password: str, mosquitto_passwd: str | None = None) -> None:
    """Add (or replace) one user in an existing Mosquitto password file, atomically, without
    needing the other users' passwords."""
    tool = mosquitto_passwd or shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        raise FleetError("mosquitto_passwd not found; install mosquitto (apt-get install mosquitto) or omit --broker-config-dir")
    password_file = Path(password_file)
    tmp = password_file.with_name(f".{password_file.name}.{os.getpid()}.tmp")
    shutil.copyfile(password_file, tmp)
    try:
        result = subprocess.run([tool, "-b", str(tmp), user, password], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise FleetError(f"mosquitto_passwd failed for {user}: {result.stderr.strip() or result.stdout.strip()}")
        os.chmod(tmp, 0o644)  # Mosquitto drops to its own user and must read it
        os.replace(tmp, password_file)
    finally:
        tmp.unlink(missing_ok=True)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def agent_toml_text(settings: dict[str, Any]) -> str:
    lines = ["# agent.toml written by `builder fleet add-device` (see deploy/agent.toml for every option)"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items() if value is not None]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def add_device(data_dir: Path, device_id: str, profile: str, *, group: str | None = None,
               broker_url: str | None = None, broker_config_dir: Path | None = None, broker_port: int = 1883,
               tls: BrokerTls | None = None, agent_ca_file: Path | None = None, trusted_key: Path | None = None,
               agent_data_dir: str = DEFAULT_AGENT_DATA_DIR, agent_toml: Path | None = None,
               telemetry_interval_s: float | None = None, http_port: int | None = None,
               extra_agent_settings: dict[str, Any] | None = None) -> AddedDevice:
    """Register ``device_id`` and write its agent.toml; see the module docstring for credentials."""
    from builder.profiles import get_profile

    try:
        proto.validate_device_id(device_id)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from exc
    get_profile(profile)  # ProfileError names the known ones
    data_dir = Path(data_dir)
    serve_state = read_serve_state(data_dir)
    password: str | None = None
    config_file: Path | None = None
    protocol = "auto"
    if broker_config_dir is not None:
        from builder.fleet.broker_config import BUILDER_USER, TlsFiles, write_broker_config

        if device_id == BUILDER_USER:
            raise UsageError(f"device id '{device_id}' is the builder's broker user; choose another id")
        password = secrets.token_urlsafe(24)
        broker_config_dir = Path(broker_config_dir)
        public_url = broker_url or (f"mqtts://localhost:{tls.port}" if tls else f"mqtt://127.0.0.1:{broker_port}")
        if not (broker_config_dir / "passwd").is_file():
            creds = load_builder_credentials(data_dir)
            builder_password = creds["password"] if creds else secrets.token_urlsafe(24)
            tls_files = (TlsFiles(tls.ca_file, tls.cert_file, tls.key_file, tls.require_client_cert) if tls else None)
            config = write_broker_config(broker_config_dir, port=broker_port, devices={device_id: password},
                                         builder_password=builder_password, tls=tls_files,
                                         tls_port=tls.port if tls else None)
            save_builder_credentials(data_dir, BUILDER_USER, builder_password, public_url, tls.ca_file if tls else None)
            config_file = config.config_file
        else:
            add_password(broker_config_dir / "passwd", device_id, password)
            config_file = broker_config_dir / "mosquitto.conf"
        credentials = "mosquitto user (pattern ACL: own topics only)"
    else:
        if serve_state is None and broker_url is None:
            raise UsageError("no broker to point the agent at: start `builder serve` first (embedded broker), "
                             "or pass --broker-url, or --broker-config-dir for Mosquitto")
        public_url = broker_url or str(serve_state["url"])  # type: ignore[index]
        if serve_state is not None and serve_state.get("embedded") and broker_url is None:
            protocol = "3.1.1"  # rumqttd speaks MQTT 5 only on another listener
        credentials = "none (embedded broker: no authentication, no ACL)"
    settings: dict[str, Any] = {
        "device_id": device_id,
        "broker_url": public_url,
        "username": device_id,
        "password": password,
        "ca_file": str(agent_ca_file) if agent_ca_file else (str(tls.ca_file) if tls else None),
        "mqtt_protocol": protocol,
        "trusted_key": str(trusted_key or default_trusted_key(data_dir)),
        "data_dir": agent_data_dir,
        "profile": profile,
        "telemetry_interval_s": telemetry_interval_s,
        "http_port": http_port,
    }
    settings.update(extra_agent_settings or {})
    path = Path(agent_toml) if agent_toml else data_dir / "devices" / device_id / "agent.toml"
    _write_private(path, agent_toml_text(settings))
    with open_store(data_dir) as store:
        store.register_device(device_id, profile, group)
    return AddedDevice(device_id, profile, group, path, public_url, credentials, config_file)
