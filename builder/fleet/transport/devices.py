"""`builder fleet add-device`: register a device, give it broker credentials, write its agent.toml.

With ``broker_config_dir`` the device gets a Mosquitto user (hashed password in ``passwd``) and is
confined by the fleet's pattern ACL (``builder.fleet.transport.broker_config``): the ACL has no per-device
lines, so adding a device only adds a user. The first device also creates the config, the builder
user and its credentials (saved 0600 in the data dir). Without it the device is set up for the
embedded broker, which has no authentication (laptop and demo only).

What it writes is a device folder (``DATA_DIR/devices/ID/``, or beside ``--out``) meant to be copied
as a whole to ``/etc/edgefleet/`` on the device: ``agent.toml`` (paths relative to itself, so the
same file works there and in a test on the host), ``password`` (0600), the builder's public
``signing_key.pub.pem`` and the broker CA ``ca.pem``. An id that is already registered is refused
unless ``force``: overwriting it would change the password of a running device.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import protocol as proto
from agent.errors import ProtocolError
from builder.errors import UsageError
from builder.fleet.transport.link import load_builder_credentials, read_serve_state, save_builder_credentials
from builder.fleet.transport.store import open_store

DEFAULT_AGENT_DATA_DIR = "/var/lib/edgefleet"
KEY_DIR_NAME = "keys"
PUBLIC_KEY_FILE = "signing_key.pub.pem"
PASSWORD_FILE = "password"
CA_FILE = "ca.pem"
DEVICE_FILE = "device.json"  # host-side record of where the device's broker user lives (remove-device)


@dataclass(frozen=True)
class BrokerTls:
    """TLS listener for a newly created Mosquitto config (server side)."""

    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False
    listen: str = "0.0.0.0"  # devices dial it over the LAN; the plain listener stays on 127.0.0.1


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def agent_toml_text(settings: dict[str, Any]) -> str:
    lines = ["# agent.toml written by `builder fleet add-device` (see deploy/agent.toml for every option).",
             "# Relative paths are relative to this file: copy this whole folder to /etc/edgefleet/ on the device."]
    lines += [f"{key} = {_toml_value(value)}" for key, value in settings.items() if value is not None]
    return "\n".join(lines) + "\n"


def _write_private(path: Path, text: str | bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode("utf-8") if isinstance(text, str) else text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def device_dir(data_dir: Path, device_id: str) -> Path:
    return Path(data_dir) / "devices" / device_id


def _refuse_existing(data_dir: Path, device_id: str, agent_toml: Path, store_url: str | None) -> None:
    """A registered id (or one whose agent.toml exists) is not silently overwritten."""
    with open_store(data_dir, store_url) as store:
        known = store.find_device(device_id)
    if (known is not None and known.registered) or agent_toml.exists():
        raise UsageError(f"device '{device_id}' is already registered; pass --force to replace its password and "
                         f"agent.toml (the running device must get the new ones), or `builder fleet remove-device "
                         f"{device_id}` first")


def add_device(data_dir: Path, device_id: str, profile: str, *, group: str | None = None, store_url: str | None = None,
               broker_url: str | None = None, broker_config_dir: Path | None = None, broker_port: int = 1883,
               tls: BrokerTls | None = None, agent_ca_file: Path | None = None, trusted_key: Path | None = None,
               agent_data_dir: str = DEFAULT_AGENT_DATA_DIR, agent_toml: Path | None = None,
               telemetry_interval_s: float | None = None, http_port: int | None = None,
               extra_agent_settings: dict[str, Any] | None = None, force: bool = False) -> AddedDevice:
    """Register ``device_id`` and write its device folder; see the module docstring."""
    from builder.profiles import get_profile

    try:
        proto.validate_device_id(device_id)
    except ProtocolError as exc:
        raise UsageError(str(exc)) from exc
    get_profile(profile)  # ProfileError names the known ones
    if http_port is not None and not 0 <= http_port <= 65535:
        raise UsageError(f"--http-port {http_port} is not a TCP port (0..65535; 0 = any free port)")
    data_dir = Path(data_dir)
    path = Path(agent_toml) if agent_toml else device_dir(data_dir, device_id) / "agent.toml"
    serve_state = read_serve_state(data_dir)
    if broker_config_dir is None and serve_state is None and broker_url is None:
        raise UsageError("no broker to point the agent at: start `builder serve` first (embedded broker), "
                         "or pass --broker-url, or --broker-config-dir for Mosquitto")
    if not force:
        _refuse_existing(data_dir, device_id, path, store_url)
    key_source = Path(trusted_key) if trusted_key else default_trusted_key(data_dir)
    if not key_source.is_file():
        raise UsageError(f"no public signing key at {key_source}: run `builder keys init` first (the device installs "
                         "only artifacts signed by it), or pass --trusted-key")
    ca_source = Path(agent_ca_file) if agent_ca_file else (Path(tls.ca_file) if tls else None)
    if ca_source is not None and not ca_source.is_file():
        raise UsageError(f"--ca-file {ca_source} does not exist")
    password: str | None = None
    config_file: Path | None = None
    protocol = "auto"
    if broker_config_dir is not None:
        from builder.fleet.transport.broker_config import BUILDER_USER, TlsFiles, add_password, write_broker_config

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
                                         tls_port=tls.port if tls else None,
                                         tls_bind_address=tls.listen if tls else None)
            save_builder_credentials(data_dir, BUILDER_USER, builder_password, public_url, tls.ca_file if tls else None)
            config_file = config.config_file
        else:
            add_password(broker_config_dir / "passwd", device_id, password)
            config_file = broker_config_dir / "mosquitto.conf"
        credentials = "mosquitto user (pattern ACL: own topics only)"
    else:
        public_url = broker_url or str(serve_state["url"])  # type: ignore[index]
        if serve_state is not None and serve_state.get("embedded") and broker_url is None:
            protocol = "3.1.1"  # rumqttd speaks MQTT 5 only on another listener
        credentials = "none (embedded broker: no authentication, no ACL)"
    # Paths relative to agent.toml: the folder is copied as a whole to /etc/edgefleet on the device.
    settings: dict[str, Any] = {
        "device_id": device_id,
        "broker_url": public_url,
        "username": device_id,
        "password_file": PASSWORD_FILE if password is not None else None,
        "ca_file": CA_FILE if ca_source is not None else None,
        "mqtt_protocol": protocol,
        "trusted_key": PUBLIC_KEY_FILE,
        "data_dir": agent_data_dir,
        "profile": profile,
        "telemetry_interval_s": telemetry_interval_s,
        "http_port": http_port,
    }
    settings.update(extra_agent_settings or {})
    folder = path.parent
    if password is not None:
        _write_private(folder / PASSWORD_FILE, password + "\n")
    else:
        (folder / PASSWORD_FILE).unlink(missing_ok=True)
    _write_private(folder / PUBLIC_KEY_FILE, key_source.read_bytes(), mode=0o644)
    if ca_source is not None:
        _write_private(folder / CA_FILE, ca_source.read_bytes(), mode=0o644)
    _write_private(device_dir(data_dir, device_id) / DEVICE_FILE, json.dumps({
        "device_id": device_id, "agent_toml": str(path),
        "broker_config_dir": str(broker_config_dir) if broker_config_dir is not None else None}, indent=1))
    _write_private(path, agent_toml_text(settings))
    with open_store(data_dir, store_url) as store:
        store.register_device(device_id, profile, group)
    return AddedDevice(device_id, profile, group, path, public_url, credentials, config_file)


@dataclass(frozen=True)
class RemovedDevice:
    device_id: str
    removed: tuple[str, ...]  # what was removed, in words
    broker_config_file: Path | None  # a running Mosquitto must reload (SIGHUP)


def remove_device(data_dir: Path, device_id: str, broker_config_dir: Path | None = None,
                  store_url: str | None = None) -> RemovedDevice:
    """Undo `add-device`: the Mosquitto user (so the device can no longer connect), the device
    folder, and the store's row, telemetry and events. The pattern ACL has no per-device line."""
    data_dir = Path(data_dir)
    folder = device_dir(data_dir, device_id)
    record: dict[str, Any] = {}
    try:
        record = json.loads((folder / DEVICE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    with open_store(data_dir, store_url) as store:
        known = store.find_device(device_id)
    if known is None and not folder.exists():
        raise UsageError(f"unknown device '{device_id}'; `builder fleet status` lists the devices")
    removed: list[str] = []
    config_dir = Path(broker_config_dir) if broker_config_dir else (
        Path(record["broker_config_dir"]) if record.get("broker_config_dir") else None)
    config_file = None
    if config_dir is not None:
        from builder.fleet.transport.broker_config import remove_password

        if remove_password(config_dir / "passwd", device_id):
            removed.append(f"Mosquitto user in {config_dir / 'passwd'}")
        config_file = config_dir / "mosquitto.conf"
    agent_toml = Path(record["agent_toml"]) if record.get("agent_toml") else None
    if agent_toml is not None and agent_toml.parent != folder and agent_toml.exists():
        for name in (agent_toml.name, PASSWORD_FILE, PUBLIC_KEY_FILE, CA_FILE):  # written with --out elsewhere
            (agent_toml.parent / name).unlink(missing_ok=True)
        removed.append(f"{agent_toml} and the files beside it")
    if folder.exists():
        shutil.rmtree(folder)
        removed.append(f"device folder {folder}")
    if known is not None:
        with open_store(data_dir, store_url) as store:
            store.remove_device(device_id)
        removed.append("store row, telemetry and events")
    return RemovedDevice(device_id, tuple(removed), config_file)
