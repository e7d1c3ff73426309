"""A REAL Mosquitto on a free loopback port, for tests and benchmarks.

    with MosquittoBroker(devices={"dev1": "pw1"}, builder_password="bpw", tls=True) as broker:
        broker.url            # "mqtt://127.0.0.1:PORT"
        broker.tls_url        # "mqtts://localhost:TLSPORT" (certs in broker.certs)
        broker.stop(); broker.start()   # same ports: a broker restart

Without ``devices`` the broker is anonymous and open (``subscribe_allowed``: anonymous, but Mosquitto's
dynamic-security plugin refuses every SUBSCRIBE outside those filters; its ``acl_file`` never
refuses one, it only filters what is delivered). With ``devices`` it uses the fleet's real config
writer (``builder.fleet.transport.broker_config``): password file + pattern ACL. Files live in a 0755 temp
directory because Mosquitto started as root drops to the ``mosquitto`` user (pytest's tmp_path is
0700 and would be unreadable). Everything is removed on ``close()``.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import ipaddress
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
DYNSEC_PLUGINS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                  "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                  "/usr/local/lib/mosquitto_dynamic_security.so")


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).exists()


def dynsec_plugin() -> Path | None:
    """Mosquitto's dynamic-security plugin (Debian/Ubuntu ship it in the mosquitto package), if present."""
    return next((Path(p) for p in DYNSEC_PLUGINS if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class TestCerts:
    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_certs(directory: Path, client_cn: str = "dev1") -> TestCerts:
    """A CA, a server certificate with subjectAltName DNS:localhost + IP:127.0.0.1 (Python's ssl
    ignores the CN), and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)

    def write_key(key, path: Path) -> None:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
        os.chmod(path, 0o644)  # readable by the mosquitto user (test keys only)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgeFleet test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=2))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, san: list | None, server: bool):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + _dt.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server_cert = leaf("localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], True)
    client_key, client_cert = leaf(client_cn, None, False)
    certs = TestCerts(directory / "ca.pem", directory / "server.pem", directory / "server.key",
                      directory / "client.pem", directory / "client.key")
    for cert, path in ((ca_cert, certs.ca_file), (server_cert, certs.server_cert), (client_cert, certs.client_cert)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o644)
    write_key(server_key, certs.server_key)
    write_key(client_key, certs.client_key)
    return certs


class MosquittoBroker:
    """A mosquitto child process on 127.0.0.1; restartable on the same port(s)."""

    def __init__(self, *, devices: Mapping[str, str] | None = None, builder_password: str = "builder-pw",
                 tls: bool = False, require_client_cert: bool = False, port: int | None = None,
                 persistence: bool = False, subscribe_allowed: Sequence[str] | None = None,
                 extra_lines: Sequence[str] = ()) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="edgefleet-mosquitto-"))
        os.chmod(self.workdir, 0o755)
        self.port = port or free_port()
        self.tls_port = free_port() if tls else None
        self.devices = dict(devices or {})
        self.builder_password = builder_password
        self.certs = make_test_certs(self.workdir / "certs") if tls else None
        self.log_file = self.workdir / "mosquitto.log"
        # With persistence, retained messages, sessions and their queued QoS 1 messages survive a
        # restart (saved on SIGTERM), as on a production broker.
        self.persistence_dir = self.workdir / "db" if persistence else None
        self.subscribe_allowed = tuple(subscribe_allowed) if subscribe_allowed is not None else None
        self.extra_lines = tuple(extra_lines)  # appended last: they override the defaults (e.g. max_queued_messages)
        self.config_file = self._write_config(require_client_cert)
        self.process: subprocess.Popen | None = None
        self._atexit_registered = False

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("broker started without tls=True")
        return f"mqtts://localhost:{self.tls_port}"

    def _write_config(self, require_client_cert: bool) -> Path:
        if self.devices or self.certs is not None:
            from builder.fleet.transport.broker_config import TlsFiles, write_broker_config

            tls = (TlsFiles(self.certs.ca_file, self.certs.server_cert, self.certs.server_key, require_client_cert)
                   if self.certs is not None else None)
            if self.devices:
                return write_broker_config(self.workdir / "conf", port=self.port, devices=self.devices,
                                           builder_password=self.builder_password, tls=tls, tls_port=self.tls_port,
                                           log_file=self.log_file, persistence_dir=self.persistence_dir,
                                           extra_lines=self.extra_lines).config_file
            lines = ["allow_anonymous true", f"listener {self.port} 127.0.0.1", f"listener {self.tls_port} 127.0.0.1",
                     f"cafile {tls.ca_file}", f"certfile {tls.cert_file}", f"keyfile {tls.key_file}",
                     "allow_anonymous true"]
            if require_client_cert:
                lines.append("require_certificate true")
        else:
            lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true"]
            if self.subscribe_allowed is not None:
                lines += self._dynsec_lines(self.subscribe_allowed)
        if self.persistence_dir is not None:
            self.persistence_dir.mkdir(mode=0o777, exist_ok=True)
            os.chmod(self.persistence_dir, 0o777)
            lines += ["persistence true", f"persistence_location {self.persistence_dir}/"]
        else:
            lines.append("persistence false")
        lines += [f"log_dest file {self.log_file}", "max_inflight_messages 64", *self.extra_lines]
        path = self.workdir / "mosquitto.conf"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.chmod(path, 0o644)
        return path

    def _dynsec_lines(self, allowed: Sequence[str]) -> list[str]:
        plugin = dynsec_plugin()
        if plugin is None:
            raise RuntimeError("subscribe_allowed needs Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so)")
        config = {"defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True, "subscribe": False,
                                       "unsubscribe": True},
                  "clients": [], "groups": [{"groupname": "anonymous", "roles": [{"rolename": "subscriber"}]}],
                  "roles": [{"rolename": "subscriber", "acls": [{"acltype": "subscribePattern", "topic": topic,
                                                                 "allow": True} for topic in allowed]}],
                  "anonymousGroup": "anonymous"}
        path = self.workdir / "dynamic-security.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        os.chmod(path, 0o644)
        return [f"plugin {plugin}", f"plugin_opt_config_file {path}"]

    def start(self, timeout_s: float = 10.0) -> "MosquittoBroker":
        if self.process is not None and self.process.poll() is None:
            return self
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(self.config_file)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        if not self._atexit_registered:  # never leave a broker behind, even if a test forgets close()
            atexit.register(self.close)
            self._atexit_registered = True
        deadline = time.monotonic() + timeout_s
        ports = [p for p in (self.port, self.tls_port) if p]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"mosquitto exited ({self.process.returncode}): {err} {self.log_text()}")
            if all(_port_open(p) for p in ports):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not open port(s) {ports} in {timeout_s} s: {self.log_text()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None
        deadline = time.monotonic() + 5
        while any(_port_open(p) for p in (self.port, self.tls_port) if p) and time.monotonic() < deadline:
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
