"""agent.toml validation, reconnect backoff, one-line CLI errors."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import config_from_dict, load_config
from agent.mqtt import backoff_delay_s
from agent.errors import ConfigError

ROOT = Path(__file__).parents[2]


def test_config_valid_and_errors_are_one_clear_line(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    base = {"device_id": "pi-1", "broker_url": "mqtts://broker.example:8883", "trusted_key": "k.pem", "data_dir": "data"}
    cfg = config_from_dict(base, base_dir=tmp_path)
    assert cfg.broker.tls and cfg.broker.port == 8883 and cfg.broker.username == "pi-1"
    assert cfg.data_dir == tmp_path / "data" and cfg.profile is None
    with pytest.raises(ConfigError, match="lacks 'device_id'"):
        config_from_dict({k: v for k, v in base.items() if k != "device_id"}, tmp_path)
    with pytest.raises(ConfigError, match="mqtt://"):
        config_from_dict(dict(base, broker_url="http://x"), tmp_path)
    with pytest.raises(ConfigError, match="device id"):
        config_from_dict(dict(base, device_id="a/b"), tmp_path)
    with pytest.raises(ConfigError, match="ca_file"):
        config_from_dict(dict(base, ca_file="missing.pem"), tmp_path)
    with pytest.raises(ConfigError, match="slowdown_factor"):
        config_from_dict(dict(base, load={"slowdown_factor": 0.5}), tmp_path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        bad = tmp_path / "bad.toml"
        bad.write_text("device_id = ")
        load_config(bad)


def test_example_agent_toml_parses(tmp_path):
    import tomllib

    data = tomllib.loads((ROOT / "deploy" / "agent.toml").read_text())
    password_file = tmp_path / "password"
    password_file.write_text("secret\n")
    cfg = config_from_dict(dict(data, password_file=str(password_file)), tmp_path)
    assert cfg.device_id == "pi-kitchen-01" and cfg.broker.tls and cfg.broker.password == "secret"
    assert cfg.load.slowdown_factor == 1.0 and cfg.http_port == 8765


def test_backoff_is_capped_exponential_with_jitter():
    rng = random.Random(0)
    delays = [[backoff_delay_s(a, 0.5, 30.0, rng) for _ in range(200)] for a in range(10)]
    assert all(0.25 <= d <= 30.0 for row in delays for d in row)
    assert max(delays[0]) <= 0.5 and max(delays[9]) > 10  # grows, then capped
    assert len({round(d, 6) for d in delays[9]}) > 100  # jittered: no thundering herd


def test_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "run", "--config",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("agent: error: cannot read") and len(out.stderr.strip().splitlines()) == 1


def test_agent_status_cli_shows_active_model_when_agent_is_not_running(tmp_path, signing_key):
    import shutil

    from agent.install import Installer
    from agent.manifest import load_public_key
    from tests.agent.conftest import agent_toml, make_artifact

    key, pub = signing_key
    art = make_artifact(tmp_path / "art", key, seed=1)
    shutil.copytree(art, tmp_path / "incoming")
    loaded = Installer(tmp_path / "data", load_public_key(pub), threads=1).install(tmp_path / "incoming")
    config = agent_toml(tmp_path / "agent.toml", "mqtt://127.0.0.1:1", "dev1", "pw", pub, tmp_path / "data")
    status = [sys.executable, "-c", "from agent.cli import app; app()", "status", "--config", str(config)]
    out = subprocess.run(status, capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    table = out.stdout
    assert loaded.manifest.artifact_id[:12] in table and loaded.manifest.artifact_id not in table  # short ids
    assert "running" in table and "no" in table and "{" not in table and "None" not in table  # no Python reprs
    assert all(len(line) <= 80 for line in table.splitlines())
    info = json.loads(subprocess.run(status + ["--json"], capture_output=True, text=True, cwd=ROOT, timeout=60).stdout)
    assert info["active_artifact_id"] == loaded.manifest.artifact_id and info["running"] is False


def test_second_agent_on_one_host_says_its_port_is_taken_in_one_line(tmp_path, signing_key):
    """`agent run` prints one start-up line; a second agent on the same http_port exits with one
    line naming the port and the fix, not an OSError traceback."""
    from tests.agent.conftest import agent_toml
    from tests.support.broker import free_port

    _, pub = signing_key
    port = free_port()
    run = [sys.executable, "-c", "from agent.cli import app; app()", "run", "--config"]
    first_toml = agent_toml(tmp_path / "a1.toml", "mqtt://127.0.0.1:1", "dev1", "pw", pub, tmp_path / "d1", http_port=port)
    second_toml = agent_toml(tmp_path / "a2.toml", "mqtt://127.0.0.1:1", "dev2", "pw", pub, tmp_path / "d2", http_port=port)
    first = subprocess.Popen(run + [str(first_toml)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        line = first.stdout.readline()
        assert line.startswith("agent dev1 (x86-64-host): broker mqtt://127.0.0.1:1, endpoint http://127.0.0.1:") \
            and str(port) in line, line
        second = subprocess.run(run + [str(second_toml)], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"http_port {port}" in lines[0] and "in use" in lines[0] and "--http-port" in lines[0]
    finally:
        first.terminate()
        first.wait(60)


def test_mqtt5_falls_back_to_311_when_the_broker_drops_v5_connects():
    """A fake broker that closes the socket on an MQTT 5 CONNECT (as rumqttd's 3.1.1 port does) and
    accepts 3.1.1: the agent's connection must end up connected with 3.1.1."""
    import socket
    import threading

    from agent.config import BrokerSettings
    from agent.connection import agent_connection

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    levels: list[int] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            data = conn.recv(1024)
            level = data[8] if len(data) > 8 else 0  # fixed header(2) + "\0\4MQTT"(6) -> protocol level
            levels.append(level)
            if level == 5:
                conn.close()
            else:
                conn.sendall(b"\x20\x02\x00\x00")  # CONNACK, accepted
                threading.Thread(target=lambda c=conn: (c.recv(1024), c.close()), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    connection = agent_connection("dev1", BrokerSettings(host="127.0.0.1", port=port, tls=False, protocol="auto",
                                                       reconnect_min_s=0.05, reconnect_max_s=0.1))
    connection.start()
    try:
        assert connection.wait_connected(60)
        assert connection.protocol_in_use == "3.1.1" and levels[:2] == [5, 5] and levels[-1] == 4
    finally:
        connection.stop()
        server.close()
