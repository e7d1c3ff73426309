"""The re-compression loop end to end: a real Mosquitto, `FleetServer` with the loop's serve hook, a
real `agent run` subprocess serving a digits CNN, field traffic from a load generator, and the
agent's slowdown switched on and off by remote command."""
from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import pytest

from agent import protocol as proto
from builder.zoo.digits_ladder import SLOWDOWN, THROTTLE_POLICY
from tests.support.broker import MosquittoBroker, free_port, mosquitto_available
from tests.support.processes import AGENT_CMD, CHILD_ENV, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")]

REPO = Path(__file__).resolve().parents[2]
DEVICE = "pi-1"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    from builder.artifacts.signing import init_keys, load_private_key
    from builder.fleet.loop.service import PusherActions, ServeLoopHook
    from builder.fleet.transport.link import BrokerEndpoint
    from builder.fleet.transport.serve import FleetServer, ServeSettings
    from builder.zoo.digits_ladder import build_digits_ladder

    root = tmp_path_factory.mktemp("loop-e2e")
    home = root / "home"
    keys = init_keys(home / "keys")
    t0 = time.monotonic()
    rungs = build_digits_ladder(home, load_private_key(keys.private), root / "build")
    build_s = time.monotonic() - t0
    broker = MosquittoBroker(devices={DEVICE: "pw-pi"}, builder_password="pw-builder").start()
    hook = ServeLoopHook(home)
    server = FleetServer(ServeSettings(data_dir=home, broker=BrokerEndpoint(broker.url, "builder", "pw-builder")),
                         telemetry_hooks=[hook]).start()
    server.store.register_device(DEVICE, "x86-64-host")  # as `builder fleet add-device` does: pushes refuse unknown devices
    port = free_port()
    agent_dir = root / "agent"
    toml = root / "agent.toml"
    toml.write_text("\n".join([
        f'device_id = "{DEVICE}"', f'broker_url = "{broker.url}"', 'password = "pw-pi"',
        f'trusted_key = "{keys.public}"', f'data_dir = "{agent_dir}"', f"http_port = {port}", "threads = 1",
        "telemetry_interval_s = 1.0", "reconnect_min_s = 0.2", "reconnect_max_s = 1.0", "chunk_timeout_s = 5.0",
        'profile = "x86-64-host"']) + "\n")
    log = open(root / "agent.log", "ab")
    agent = subprocess.Popen(AGENT_CMD + ["run", "--config", str(toml)], cwd=REPO, env=CHILD_ENV, stdout=log,
                             stderr=subprocess.STDOUT)
    pusher = PusherActions(home, benchmark_runs=5)
    try:
        wait_for(lambda: server.store.find_device(DEVICE) is not None, 30, "the agent to say hello")
        yield {"home": home, "rungs": rungs, "server": server, "url": f"http://127.0.0.1:{port}", "root": root,
               "build_s": build_s, "pusher": pusher}
    finally:
        pusher.close()
        hook.close()
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        log.close()
        server.stop()
        broker.close()


def windows_since(store, since: float):
    return [r for r in store.telemetry(DEVICE, since=since) if r.requests > 0 and r.p95_ms is not None]


def test_throttle_steps_down_then_recovers_without_oscillation(world) -> None:
    from builder.fleet.loop.policy import PolicyStore, load_policy_file, scope_for
    from builder.fleet.loop.service import LoopStateStore, count_changes, loop_events, summarize_events
    from builder.fleet.transport.store import open_store
    from builder.zoo.digits_ladder import LoadGenerator, calibrate_ladder_on_device, throttled_objective_ms

    home, rungs, server = world["home"], world["rungs"], world["server"]
    wide, broken, narrow = (r.artifact_id for r in rungs)
    labels = {r.artifact_id: r.label for r in rungs}
    store = open_store(home)
    load = LoadGenerator(world["url"], rate_hz=50).start()
    try:
        # Unthrottled: the ladder's estimates become each rung's field p50 on this device (a ladder
        # calibrated on a reference unit); the device ends on the wide rung.
        def push(device_id: str, artifact_id: str) -> None:
            outcome = world["pusher"].push(device_id, artifact_id)
            assert outcome.ok, outcome.reason

        start = time.time()
        def throttle(factor: float) -> None:
            reply = server.link.command(DEVICE, proto.SetLoadArgs(slowdown_factor=factor), timeout_s=15)
            assert reply.ok, reply.error

        rungs = calibrate_ladder_on_device(home, store, DEVICE, rungs, push, throttle, SLOWDOWN)
        est = {r.label: r.metrics["device_latency_ms"] for r in rungs}
        wide_start = time.time()
        wait_for(lambda: len(windows_since(store, wide_start)) >= 3, 30, "3 more field windows on the wide rung")
        base = [w.p95_ms for w in windows_since(store, wide_start)]
        # Halfway (in log space) between the two rungs' p95 predicted for the device slowed down SLOWDOWN times.
        objective = throttled_objective_ms(rungs, SLOWDOWN)
        policy_file = world["root"] / "policy.toml"
        policy_file.write_text(THROTTLE_POLICY.format(objective=objective, slowdown=SLOWDOWN))
        PolicyStore(store).set(scope_for(device_id=DEVICE), load_policy_file(policy_file), now=time.time())

        # Throttle on: the loop must try the broken rung (refused by the device, rolled back, marked
        # bad), then the narrow one, which brings p95 back under the objective.
        throttle_at = time.time()
        reply = server.link.command(DEVICE, proto.SetLoadArgs(slowdown_factor=SLOWDOWN), timeout_s=15)
        assert reply.ok, reply.error
        wait_for(lambda: any(e.kind == "loop.accept" and e.artifact_id == narrow for e in loop_events(store, DEVICE)),
                 90, "the loop to step down to the narrow rung and keep it")
        events = loop_events(store, DEVICE)
        first_down = next(e for e in events if e.kind == "loop.step_down")
        windows_to_react = len([w for w in windows_since(store, throttle_at) if w.ts <= first_down.ts])
        accepted = next(e for e in events if e.kind == "loop.accept" and e.artifact_id == narrow)
        wait_for(lambda: len([w for w in windows_since(store, accepted.ts) if w.model_id == narrow]) >= 5, 20,
                 "5 windows on the narrow rung")
        after = [w.p95_ms for w in windows_since(store, accepted.ts) if w.model_id == narrow]
        assert statistics.median(after) <= objective

        # Throttle off: sustained headroom, then back up to the wide rung.
        off_at = time.time()
        from typer.testing import CliRunner

        from builder.cli.main import typer_app
        off = CliRunner().invoke(typer_app, ["fleet", "load", "--device", DEVICE, "--slowdown", "1", "--data-dir", str(home)])
        assert off.exit_code == 0 and '"slowdown_factor": 1.0' in off.output, off.output
        wait_for(lambda: any(e.kind == "loop.accept" and e.artifact_id == wide and e.ts > off_at
                             for e in loop_events(store, DEVICE)), 60, "the loop to step back up to the wide rung")
        events = loop_events(store, DEVICE)
        up = next(e for e in events if e.kind == "loop.step_up")
        windows_to_step_up = len([w for w in windows_since(store, off_at) if w.ts <= up.ts])
        time.sleep(5)  # a few more windows: nothing else may happen
        events = loop_events(store, DEVICE)
    except AssertionError:
        for w in windows_since(store, start):
            print(f"{w.ts - start:6.1f} {labels.get(w.model_id, w.model_id)} n={w.requests} p50={w.p50_ms} p95={w.p95_ms}")
        print("\n".join(summarize_events(loop_events(store, DEVICE), labels)))
        print((world["root"] / "agent.log").read_text(errors="replace")[-3000:])
        raise
    finally:
        load.stop()

    print("\n".join(summarize_events(events, labels)))
    print(f"build {world['build_s']:.1f} s; field p95 unthrottled {est}; wide p95 {statistics.median(base):.3f} ms; objective {objective} ms; "
          f"windows to react {windows_to_react}; windows to step up {windows_to_step_up}; changes {count_changes(events)}")
    changes = count_changes(events)
    ups = [e for e in events if e.kind == "loop.step_up"]
    # Expected: 2 step downs, 1 rollback, 1 step up. On a shared 2-core box a burst of load right
    # after the step up can break the objective for 3 windows: then the step up is undone and retried
    # once after twice the headroom (backoff) -- allowed once, never more.
    assert changes.get("step_down") == 2 and 1 <= changes.get("step_up", 0) <= 2, changes
    assert changes.get("rollback") == 1 + (len(ups) - 1), changes
    if len(ups) == 2:
        assert ups[1].detail["numbers"]["headroom_windows"] >= 10
    downs = [e.artifact_id for e in events if e.kind == "loop.step_down"]
    assert downs == [broken, narrow]  # the broken rung was tried once, never again
    assert any(e.kind == "loop.push_failed" and e.artifact_id == broken for e in events)
    assert broken in LoopStateStore(store).load(DEVICE).state.bad_rungs
    assert 3 <= windows_to_react <= 6  # K = 3 violating windows (+ the window the throttle landed in)
    assert all(u.ts > off_at for u in ups) and up.detail["numbers"]["headroom_windows"] >= 5
    assert store.device(DEVICE).active_artifact_id == wide
    store.close()
