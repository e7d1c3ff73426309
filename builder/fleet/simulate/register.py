"""Simulated devices are registered like real ones: ``builder fleet add-device`` for the first
(it creates the Mosquitto config and the builder's credentials), then the same device folders and
store rows for the rest, with their passwords hashed in one ``mosquitto_passwd`` run. Each device
then connects with what its own ``agent.toml`` says, read by the agent's own config loader."""
from __future__ import annotations

import json
import os
import secrets
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from agent.config import load_config, parse_broker_url
from agent.connection import agent_client_settings
from agent.manifest import load_public_key
from builder.errors import UsageError
from builder.fleet.simulate.device import DeviceIdentity


STATE_FILE = "sim-state.json"  # beside agent.toml: the simulated device's persisted seq and model


def save_states(data_dir: Path, states: Mapping[str, Mapping[str, Any]]) -> None:
    """Persist each device's ``seq``, incarnation and active model, as the agent does: a rerun
    continues the incarnation's sequence instead of restarting at 0 (the host would drop the
    reports as duplicates)."""
    for device_id, state in states.items():
        path = agent_toml_path(data_dir, device_id).with_name(STATE_FILE)
        tmp = path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(dict(state)), encoding="utf-8")
        os.replace(tmp, path)


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def simulated_ids(count: int, prefix: str = "sim-") -> list[str]:
    return [f"{prefix}{index:05d}" for index in range(count)]


def agent_toml_path(data_dir: Path, device_id: str) -> Path:
    from builder.fleet.transport.devices import device_dir

    return device_dir(data_dir, device_id) / "agent.toml"


def register_devices(data_dir: Path, device_ids: Sequence[str], profile: str, *, broker_config_dir: Path,
                     broker_port: int = 1883, broker_url: str | None = None, group: str | None = None) -> list[str]:
    """Register the ids that have no device folder yet; returns them. A running Mosquitto must be
    sent SIGHUP afterwards to load the new users."""
    from builder.fleet.transport import devices as dev
    from builder.fleet.transport.broker_config import add_passwords
    from builder.fleet.transport.store import open_store

    data_dir = Path(data_dir)
    missing = [d for d in device_ids if not agent_toml_path(data_dir, d).is_file()]
    if not missing:
        return []
    passwd = Path(broker_config_dir) / "passwd"
    rest = list(missing)
    if not passwd.is_file():  # the first device creates the config, as `builder fleet add-device` does
        first = rest.pop(0)
        added = dev.add_device(data_dir, first, profile, group=group, broker_url=broker_url,
                               broker_config_dir=broker_config_dir, broker_port=broker_port)
        broker_url = added.broker_url
    url = broker_url or f"mqtt://127.0.0.1:{broker_port}"
    key = dev.default_trusted_key(data_dir)
    if not key.is_file():
        raise UsageError(f"no public signing key at {key}: run `builder keys init` first")
    passwords = {device_id: secrets.token_urlsafe(24) for device_id in rest}
    if passwords:
        add_passwords(passwd, passwords)
    with open_store(data_dir) as store:
        for device_id, password in passwords.items():
            folder = dev.device_dir(data_dir, device_id)
            dev._write_private(folder / dev.PASSWORD_FILE, password + "\n")
            dev._write_private(folder / dev.PUBLIC_KEY_FILE, key.read_bytes(), mode=0o644)
            dev._write_private(folder / "agent.toml", dev.agent_toml_text({
                "device_id": device_id, "broker_url": url, "username": device_id, "password_file": dev.PASSWORD_FILE,
                "mqtt_protocol": "auto", "trusted_key": dev.PUBLIC_KEY_FILE, "data_dir": dev.DEFAULT_AGENT_DATA_DIR,
                "profile": profile}))
            store.register_device(device_id, profile, group)
    return missing


def load_identities(data_dir: Path, device_ids: Sequence[str], broker_url: str | None = None) -> list[DeviceIdentity]:
    """Each device's client settings and trusted key from its agent.toml (``broker_url`` overrides
    where they connect, e.g. another listener of the same broker)."""
    keys: dict[Path, object] = {}
    identities = []
    override = parse_broker_url(broker_url) if broker_url else None
    for device_id in device_ids:
        path = agent_toml_path(data_dir, device_id)
        if not path.is_file():
            raise UsageError(f"device '{device_id}' has no {path}: register it (`builder fleet simulate --register` "
                             "or `builder fleet add-device`)")
        cfg = load_config(path)
        broker = cfg.broker
        if override is not None:
            broker = replace(broker, host=override[0], port=override[1], tls=override[2])
        if cfg.trusted_key not in keys:
            keys[cfg.trusted_key] = load_public_key(cfg.trusted_key)
        state = _read_state(path.with_name(STATE_FILE))
        seq, incarnation = state.get("seq"), state.get("incarnation")
        if not (isinstance(incarnation, str) and incarnation):
            # a first run, or a state from before incarnations: a new incarnation starts at seq 0, as
            # a new agent outbox does (the host tracks seq per incarnation)
            incarnation, seq = uuid.uuid4().hex, 0
        identities.append(DeviceIdentity(device_id=cfg.device_id, client=agent_client_settings(cfg.device_id, broker),
                                         trusted_key=keys[cfg.trusted_key], profile=cfg.profile,
                                         first_seq=seq if isinstance(seq, int) and seq >= 0 else 0, incarnation=incarnation,
                                         active_artifact_id=state.get("active_artifact_id"),
                                         active_model=state.get("active_model")))
    return identities
