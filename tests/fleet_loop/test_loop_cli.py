"""`builder fleet policy set|show|remove` and `builder fleet events` through the real CLI app."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from builder.cli.main import typer_app
from builder.errors import UsageError
from builder.fleet.transport.store import DeploymentEvent, open_store


def invoke(*args: str):
    return CliRunner().invoke(typer_app, list(args))


def test_policy_set_show_remove_and_events(tmp_path: Path) -> None:
    data = str(tmp_path / "home")
    good = tmp_path / "p.toml"
    good.write_text("[objective]\nlatency_p95_ms = 12\nwindow_s = 1\n[pacing]\nviolate_windows = 2\n")
    res = invoke("fleet", "policy", "set", "--device", "pi", "--file", str(good), "--data-dir", data)
    assert res.exit_code == 0, res.output
    assert "device:pi" in res.output
    shown = json.loads(invoke("fleet", "policy", "show", "--json", "--data-dir", data).output)
    assert shown["device:pi"]["latency_p95_ms"] == 12.0 and shown["device:pi"]["pacing"]["violate_windows"] == 2

    with open_store(Path(data)) as store:
        store.register_device("pi", profile="raspberry-pi-4")
        store.add_event(DeploymentEvent("pi", 5.0, "loop.step_down", artifact_id="abc",
                                        detail={"reason": "p95 over", "numbers": {"baseline_p95_ms": 20}}))
        store.add_event(DeploymentEvent("pi", 6.0, "active", artifact_id="abc"))
    loop_only = json.loads(invoke("fleet", "events", "--json", "--data-dir", data).output)
    assert [e["kind"] for e in loop_only] == ["loop.step_down"]
    everything = json.loads(invoke("fleet", "events", "--all", "--device", "pi", "--json", "--data-dir", data).output)
    assert [e["kind"] for e in everything] == ["loop.step_down", "active"]
    table = invoke("fleet", "events", "--data-dir", data)
    assert table.exit_code == 0 and "p95 over" in table.output

    assert invoke("fleet", "policy", "remove", "--device", "pi", "--data-dir", data).exit_code == 0
    again = invoke("fleet", "policy", "remove", "--device", "pi", "--data-dir", data)
    assert isinstance(again.exception, UsageError)  # the app wrapper turns it into exit code 2


def test_bad_policy_file_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    data = str(tmp_path / "home")
    bad = tmp_path / "bad.toml"
    bad.write_text("[objective]\nlatency_p95_ms = 10\n[pacing]\ncooldown = 5\n")
    res = invoke("fleet", "policy", "set", "--group", "g", "--file", str(bad), "--data-dir", data)
    assert isinstance(res.exception, UsageError)
    assert "unknown key pacing.cooldown" in str(res.exception)
    assert json.loads(invoke("fleet", "policy", "show", "--json", "--data-dir", data).output) == {}
