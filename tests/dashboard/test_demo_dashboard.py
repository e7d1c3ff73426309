"""`make demo` ends with the fleet's dashboard: served from the fleet stage's data dir until Ctrl-C
at a terminal, only named (with the command) under --no-wait or without a terminal."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from builder.demo.dashboard import offer_dashboard, start_dashboard
from builder.fleet.transport.store import open_store


def test_the_demo_dashboard_serves_the_fleet_data_dir_and_stops(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with open_store(home) as store:
        store.register_device("pi-01", "raspberry-pi-4", "kitchen")
    dashboard = start_dashboard(home, tmp_path / "logs" / "dashboard.log")
    try:
        with urllib.request.urlopen(dashboard.url + "api/devices", timeout=5) as answer:
            body = json.loads(answer.read())
        assert "pi-01" in json.dumps(body)
        assert dashboard.token_file.is_file()
    finally:
        dashboard.stop()
    assert dashboard.proc.returncode is not None


def test_without_wait_the_demo_only_names_the_dashboard_command(tmp_path: Path) -> None:
    said: list[str] = []
    offer_dashboard(tmp_path / "home", tmp_path / "dashboard.log", said.append, wait=False)
    assert len(said) == 1 and "builder serve --http 127.0.0.1:8080" in said[0]
    assert not (tmp_path / "dashboard.log").exists()
