"""agent.toml validation, reconnect backoff, one-line CLI errors."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import config_from_dict, load_config
from agent.connection import backoff_delay_s
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
    out = subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "status", "--config", str(config)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"active_artifact_id: {loaded.manifest.artifact_id}" in out.stdout and "running: False" in out.stdout
