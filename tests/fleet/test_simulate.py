"""`builder fleet simulate`: simulated devices against a real Mosquitto (the fleet's own broker
config, each device with its own user) and a real `builder serve` subprocess."""
from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from builder.fleet.simulate.device import Behaviour
from builder.fleet.simulate.fleet import SimulatedFleet
from builder.fleet.simulate.register import STATE_FILE, agent_toml_path, load_identities, register_devices, simulated_ids
from builder.fleet.transport.store import fleet_store_path
from tests.fleet.conftest import PY, REPO, CHILD_ENV, Mosquitto, builder_cli
from tests.support.broker import free_port, mosquitto_available
from tests.support.processes import wait_for

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")]

DEVICES = 6


def _stored(home: Path) -> dict[str, int]:
    with sqlite3.connect(fleet_store_path(home)) as db:
        return dict(db.execute("SELECT device_id, COUNT(*) FROM telemetry WHERE device_id LIKE 'sim-%' GROUP BY device_id"))


@pytest.fixture
def simulated_fleet_world(fleet_home, world_readable_dir: Path, processes):
    home = fleet_home.root
    port = free_port()
    ids = simulated_ids(DEVICES)
    assert register_devices(home, ids, "raspberry-pi-4", broker_config_dir=world_readable_dir / "broker",
                            broker_port=port, group="sim") == ids
    broker = Mosquitto(world_readable_dir / "broker" / "mosquitto.conf", [port]).start()
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--broker", f"mqtt://127.0.0.1:{port}",
                              "--data-dir", str(home), "--no-loop"])
    wait_for(lambda: (home / "serve.json").is_file(), 30, "builder serve to start: " + processes.log("serve"))
    yield {"home": home, "port": port, "ids": ids, "broker": broker}
    broker.stop()


@pytest.mark.timeout(240)
def test_simulated_devices_telemetry_is_stored_and_a_group_push_gets_them_all_active(simulated_fleet_world, fleet_home,
                                                                                     processes) -> None:
    home, ids = simulated_fleet_world["home"], simulated_fleet_world["ids"]
    artifact = fleet_home.artifact("raspberry-pi-4", version="1", width=8)
    identities = load_identities(home, ids)
    assert {i.client.username for i in identities} == set(ids)  # each its own broker user, as add-device wrote

    async def scenario() -> dict:
        fleet = SimulatedFleet(identities, Behaviour(telemetry_interval_s=0.5, chunk_timeout_s=3.0), seed=1)
        await fleet.start(connect_timeout_s=30)
        fleet.start_telemetry()
        await asyncio.sleep(1.5)
        fleet.stop_telemetry()
        await fleet.flush_outbox(5)
        # acked = the host stored it (down/ack), not merely PUBACKed: so the store has them all now
        assert await fleet.wait_acked(timeout_s=30), fleet.totals()
        flushed = fleet.totals()
        stored_at_ack = _stored(home)
        push = await asyncio.to_thread(
            subprocess.run, [PY, "-m", "builder.cli.main", "push", "--group", "sim", "--artifact", artifact,
                             "--benchmark-runs", "3", "--timeout", "10s", "--json", "--data-dir", str(home)],
            cwd=REPO, env=CHILD_ENV, capture_output=True, text=True, timeout=180)
        active_s = await fleet.wait_active(artifact, timeout_s=30)
        totals = fleet.totals()
        await fleet.stop()
        return {"built": flushed.records_built, "flushed": flushed, "stored_at_ack": stored_at_ack, "push": push, "active_s": active_s, "totals": totals,
                "bytes": [d.counters.chunk_bytes_received for d in fleet.devices]}

    result = asyncio.run(scenario())
    flushed = result["flushed"]
    assert flushed.records_unacked == 0 and flushed.acks_received > 0
    assert flushed.records_acked == flushed.records_built
    assert set(result["stored_at_ack"]) == set(ids) and sum(result["stored_at_ack"].values()) == flushed.records_built
    push = result["push"]
    assert result["active_s"] is not None, push.stdout + push.stderr + processes.log("serve")
    assert result["active_s"] is not None
    assert all(b > 0 for b in result["bytes"])  # every device pulled its own chunks
    # every report the devices built reached the store (the install events come on top)
    wait_for(lambda: sum(_stored(home).values()) >= result["built"], 30, "all telemetry stored")
    stored = _stored(home)
    assert set(stored) == set(ids) and sum(stored.values()) >= result["built"]
    assert push.returncode == 0, push.stdout + push.stderr
    outcomes = {o["device_id"]: o["state"] for o in json.loads(push.stdout)["outcomes"]}
    assert outcomes == {device_id: "active" for device_id in ids}


@pytest.mark.timeout(120)
def test_fleet_simulate_command_runs_and_reports(simulated_fleet_world) -> None:
    home = simulated_fleet_world["home"]
    before = sum(_stored(home).values())
    result = builder_cli("fleet", "simulate", "--devices", "3", "--broker", f"127.0.0.1:{simulated_fleet_world['port']}",
                         "--telemetry-interval", "0.5s", "--duration", "2s", "--flush", "4", "--json", home=home,
                         timeout_s=60)
    summary = json.loads(result.stdout)
    totals = summary["totals"]
    assert totals["connected"] == 3 and totals["records_built"] >= 12
    assert totals["records_acked"] == totals["records_built"] and totals["records_unacked"] == 0  # acked = stored
    assert summary["overhead"]["wall_s"] > 0
    wait_for(lambda: sum(_stored(home).values()) - before >= totals["records_built"], 30, "the simulated reports stored")
    # a second run continues each device's seq (persisted like the agent's): nothing is deduplicated away
    stored_once = sum(_stored(home).values())
    again = json.loads(builder_cli("fleet", "simulate", "--devices", "3", "--telemetry-interval", "10s", "--duration", "0.5s",
                                   "--flush", "2", "--json", home=home, timeout_s=60).stdout)["totals"]
    wait_for(lambda: sum(_stored(home).values()) - stored_once >= again["records_built"], 30, "the second run's reports stored")
    assert again["records_acked"] == again["records_built"]
    # each device's incarnation is persisted beside its seq, so the second run continued the same one
    states = [json.loads(agent_toml_path(home, d).with_name(STATE_FILE).read_text()) for d in simulated_ids(3)]
    assert len(states) == 3 and all(s["incarnation"] and s["seq"] >= 6 for s in states)
