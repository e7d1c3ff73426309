"""Write a Mosquitto configuration for a fleet: listener(s), per-device users and pattern ACLs.

Every device authenticates with its device id as username, so two pattern lines confine all of
them (see ``agent.protocol``): a device may publish only ``edgefleet/v1/devices/<own id>/up/#``
and read only ``.../<own id>/down/#``; the builder user may read and write everything under
``edgefleet/v1/#``. Mosquitto's ACL denials are silent (a denied publish is still acknowledged),
so test an ACL by what arrives, never by return codes.

Mosquitto started as root drops to the ``mosquitto`` user: the files written here (and every
directory above them) must be readable by that user, so they are written 0644 / dirs 0755.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from agent import protocol as proto
from builder.errors import FleetError

BUILDER_USER = "builder"


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    require_client_cert: bool = False


@dataclass(frozen=True)
class BrokerConfig:
    config_file: Path
    password_file: Path
    acl_file: Path
    port: int
    tls_port: int | None


def acl_text(builder_user: str = BUILDER_USER) -> str:
    """The ACL: the builder user sees everything; each device only its own up/ (write) and down/ (read)."""
    root = proto.TOPIC_ROOT
    return (
        "# EdgeFleet ACL (written by builder.fleet.transport.broker_config). Denials are SILENT to clients.\n"
        f"user {builder_user}\n"
        f"topic readwrite {root}/#\n"
        "\n"
        "# Every other user is a device whose username is its device id.\n"
        f"pattern write {proto.DEVICES_ROOT}/%u/up/#\n"
        f"pattern read {proto.DEVICES_ROOT}/%u/down/#\n"
    )


def write_password_file(path: Path, users: Mapping[str, str], mosquitto_passwd: str | None = None) -> Path:
    """Hash passwords with ``mosquitto_passwd -b`` (never stores them in clear)."""
    tool = mosquitto_passwd or shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists() and shutil.which(tool) is None:
        raise FleetError("mosquitto_passwd not found; install mosquitto (apt-get install mosquitto)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("", encoding="utf-8")
    for user, password in users.items():
        if ":" in user or not user:
            raise FleetError(f"MQTT username {user!r} is invalid (empty or contains ':')")
        result = subprocess.run([tool, "-b", str(tmp), user, password], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise FleetError(f"mosquitto_passwd failed for {user}: {result.stderr.strip() or result.stdout.strip()}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def write_broker_config(dest_dir: Path, *, port: int, devices: Mapping[str, str], builder_password: str,
                        builder_user: str = BUILDER_USER, bind_address: str = "127.0.0.1",
                        tls: TlsFiles | None = None, tls_port: int | None = None,
                        allow_plain_listener: bool = True, tls_bind_address: str | None = None,
                        persistence_dir: Path | None = None,
                        log_file: Path | None = None, extra_lines: tuple[str, ...] = ()) -> BrokerConfig:
    """Write ``mosquitto.conf``, ``passwd`` and ``acl`` into ``dest_dir`` for these devices.

    ``devices`` maps device id -> password. ``tls`` adds a TLS listener on ``tls_port`` (with client
    certificates required when ``tls.require_client_cert``) on ``tls_bind_address`` (default
    ``bind_address``; "0.0.0.0" for devices on the LAN while the plain listener stays on loopback). Re-run to add devices: files are
    rewritten atomically; send the broker SIGHUP to reload them.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(dest_dir, 0o755)
    for device_id in devices:
        proto.validate_device_id(device_id)
        if device_id == builder_user:
            raise FleetError(f"device id {device_id!r} collides with the builder user; rename the device")
    users = dict(devices)
    users[builder_user] = builder_password
    password_file = write_password_file(dest_dir / "passwd", users)
    acl_file = dest_dir / "acl"
    tmp = acl_file.with_name("acl.tmp")
    tmp.write_text(acl_text(builder_user), encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, acl_file)

    lines = [
        "# EdgeFleet broker (written by builder.fleet.transport.broker_config)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        # Chunks are <= 128 KiB; refuse anything much larger than a frame.
        "message_size_limit 262144",
        # Devices pull windows of <= 256 chunks; the default 1000 queue silently drops beyond it.
        "max_queued_messages 1000",
        "max_inflight_messages 64",
    ]
    if persistence_dir is not None:
        Path(persistence_dir).mkdir(parents=True, exist_ok=True)
        os.chmod(persistence_dir, 0o777)
        lines += ["persistence true", f"persistence_location {Path(persistence_dir)}/"]
    else:
        lines.append("persistence false")
    if log_file is not None:
        lines += [f"log_dest file {log_file}", "log_type error", "log_type warning", "log_type notice"]
    else:
        lines.append("log_dest stderr")
    if allow_plain_listener:
        lines.append(f"listener {port} {bind_address}")
    if tls is not None:
        if tls_port is None:
            raise FleetError("a TLS listener needs tls_port")
        lines += [f"listener {tls_port} {tls_bind_address or bind_address}", f"cafile {tls.ca_file}", f"certfile {tls.cert_file}",
                  f"keyfile {tls.key_file}", "tls_version tlsv1.2"]
        if tls.require_client_cert:
            lines += ["require_certificate true"]
    lines += list(extra_lines)
    config_file = dest_dir / "mosquitto.conf"
    tmp = config_file.with_name("mosquitto.conf.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, config_file)
    return BrokerConfig(config_file=config_file, password_file=password_file, acl_file=acl_file,
                        port=port, tls_port=tls_port)


def _passwd_tool(mosquitto_passwd: str | None) -> str:
    tool = mosquitto_passwd or shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        raise FleetError("mosquitto_passwd not found; install mosquitto (apt-get install mosquitto) or omit --broker-config-dir")
    return tool


def _edit_password_file(password_file: Path, user: str, args: list[str], mosquitto_passwd: str | None) -> None:
    """Run ``mosquitto_passwd ARGS`` on a copy of the file, then replace it (readable by Mosquitto)."""
    tool = _passwd_tool(mosquitto_passwd)
    tmp = password_file.with_name(password_file.name + ".tmp")
    shutil.copyfile(password_file, tmp) if password_file.exists() else tmp.write_text("", encoding="utf-8")
    result = subprocess.run([tool, *args[:1], str(tmp), *args[1:]], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise FleetError(f"mosquitto_passwd {args[0]} failed for {user}: {result.stderr.strip() or result.stdout.strip()}")
    os.chmod(tmp, 0o644)
    os.replace(tmp, password_file)


def add_password(password_file: Path, user: str, password: str, mosquitto_passwd: str | None = None) -> Path:
    """Add or replace ONE user in an existing password file, without knowing the other users'
    passwords. Send the broker SIGHUP to reload."""
    if ":" in user or not user:
        raise FleetError(f"MQTT username {user!r} is invalid (empty or contains ':')")
    password_file = Path(password_file)
    _edit_password_file(password_file, user, ["-b", user, password], mosquitto_passwd)
    return password_file


def add_passwords(password_file: Path, users: Mapping[str, str], mosquitto_passwd: str | None = None) -> Path:
    """Add many NEW users at once (one ``mosquitto_passwd -U`` run instead of one per user: 1,000
    simulated devices register in a second). The users must not be in the file yet. SIGHUP reloads."""
    tool = _passwd_tool(mosquitto_passwd)
    password_file = Path(password_file)
    for user in users:
        if ":" in user or not user:
            raise FleetError(f"MQTT username {user!r} is invalid (empty or contains ':')")
    plain = password_file.with_name(password_file.name + ".new")
    fd = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.writelines(f"{user}:{password}\n" for user, password in users.items())
    try:
        # -U hashes every line of a plain-text file; never run it on the real file (it re-hashes hashes).
        result = subprocess.run([tool, "-U", str(plain)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise FleetError(f"mosquitto_passwd -U failed: {result.stderr.strip() or result.stdout.strip()}")
        hashed = plain.read_text(encoding="utf-8")
    finally:
        plain.unlink(missing_ok=True)
    tmp = password_file.with_name(password_file.name + ".tmp")
    old = password_file.read_text(encoding="utf-8") if password_file.exists() else ""
    tmp.write_text(old + ("" if not old or old.endswith("\n") else "\n") + hashed, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, password_file)
    return password_file


def remove_password(password_file: Path, user: str, mosquitto_passwd: str | None = None) -> bool:
    """Delete ONE user from a password file. Returns False when the user was not there. Send the
    broker SIGHUP to reload."""
    password_file = Path(password_file)
    try:
        lines = password_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    if not any(line.split(":", 1)[0] == user for line in lines):
        return False
    _edit_password_file(password_file, user, ["-D", user], mosquitto_passwd)
    return True
