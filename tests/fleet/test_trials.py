"""On-device trials (`builder optimize --measure-on`): a real Mosquitto with the fleet's ACL, a real
`agent run` subprocess, digits-CNN artifacts signed with the data dir's key. The trial's payloads
go to a scratch folder: the active model, its A/B slots and the retained desired state stay as
they were, and the scratch folder is gone afterwards."""
from __future__ import annotations

import hashlib
import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from agent import protocol as proto
from tests.fleet.conftest import CHILD_ENV, PY, REPO, agent_http_url, infer, start_agent, wait_for
from tests.support.broker import MosquittoBroker, mosquitto_available

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed (apt-get install mosquitto)")]

DEVICE = "pi-01"
DEVICE_PASSWORD = "pw-pi-01"
BUILDER_PASSWORD = "pw-builder"
PROFILE = "x86-64-host"
MODEL = "builder.zoo.digits_cnn:trained"


@pytest.fixture
def trial_fleet(tmp_path: Path, fleet_home, processes):
    """Broker + builder credentials in the data dir + one running agent (no model yet)."""
    from builder.fleet.transport.link import save_builder_credentials

    broker = MosquittoBroker(devices={DEVICE: DEVICE_PASSWORD}, builder_password=BUILDER_PASSWORD).start()
    save_builder_credentials(fleet_home.root, "builder", BUILDER_PASSWORD, broker.url)
    data_dir = tmp_path / "agent-data"
    toml = tmp_path / "agent.toml"
    values = {"device_id": DEVICE, "broker_url": broker.url, "password": DEVICE_PASSWORD,
              "trusted_key": str(fleet_home.keys.public), "data_dir": str(data_dir), "profile": PROFILE,
              "telemetry_interval_s": 60.0}  # start_agent adds http_port, threads, reconnect and chunk timeouts
    toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    start_agent(processes, "agent", toml, data_dir)
    agent_http_url(data_dir, timeout_s=120)
    yield {"home": fleet_home.root, "fleet_home": fleet_home, "broker": broker, "data_dir": data_dir,
           "processes": processes}
    processes.stop_all()
    broker.close()


def _trials(fleet, **settings):
    from builder.fleet.rollout.trial import DeviceTrials, TrialSettings
    from builder.fleet.transport.link import resolve_endpoint

    endpoint = resolve_endpoint(fleet["home"], fleet["broker"].url)
    return DeviceTrials(endpoint, fleet["home"], DEVICE, TrialSettings(**{"runs": 30, "warmup": 3, "timeout_s": 120.0,
                                                                          **settings})).open()


def _deploy(trials, home: Path, artifact_id: str) -> None:
    """Make ``artifact_id`` the device's active model (retained desired, chunks from ``trials``' server)."""
    from builder.artifacts.registry import Registry
    from builder.fleet.transport.chunk_server import publish_desired

    trials.offer(artifact_id)
    publish_desired(trials.link.mqtt, DEVICE, Registry(home).manifest_dir(artifact_id))
    wait_for(lambda: trials.link.command(DEVICE, proto.StatusArgs(), timeout_s=30).result.get("active_artifact_id") == artifact_id,
             120, f"{DEVICE} to run {artifact_id[:12]}", interval_s=0.5)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _retained_desired(trials) -> dict:
    seen: list[bytes] = []
    done = threading.Event()

    def on_message(topic: str, payload: bytes) -> None:
        seen.append(payload)
        done.set()

    trials.link.subscribe(proto.device_topic(DEVICE, proto.Down.DESIRED), on_message)
    assert done.wait(10), "no retained desired deployment"
    return json.loads(seen[-1])


@pytest.mark.slow
def test_trial_measures_a_candidate_without_touching_the_active_model(trial_fleet) -> None:
    from builder.fleet.transport.store import open_store

    home, data_dir = trial_fleet["home"], trial_fleet["data_dir"]
    active = trial_fleet["fleet_home"].artifact(PROFILE, version="1", width=8)
    candidate = trial_fleet["fleet_home"].artifact(PROFILE, version="2", width=32)
    with _trials(trial_fleet) as trials:
        _deploy(trials, home, active)
        slots_before = _tree_digest(data_dir / "slots")
        pointer_before = (data_dir / "active.json").read_text()
        desired_before = _retained_desired(trials)

        measurement = trials.measure(candidate)

        assert measurement.artifact_id == candidate and measurement.result["artifact_id"] == candidate
        assert 0 < measurement.p50_ms <= measurement.p95_ms
        assert measurement.result["runs"] == 30 and measurement.result["trial"] is True
        assert measurement.result["download_bytes"] > 0 and measurement.result["session_load_ms"] > 0
        assert measurement.result["peak_rss_delta_bytes"] >= 0
        assert measurement.result["power_w"] is None and measurement.result["power_source"] == "not measured"
        status = trials.link.command(DEVICE, proto.StatusArgs(), timeout_s=30).result
        assert status["active_artifact_id"] == active and status["trial"] is None
        assert _tree_digest(data_dir / "slots") == slots_before
        assert (data_dir / "active.json").read_text() == pointer_before
        assert _retained_desired(trials)["artifact_id"] == desired_before["artifact_id"] == active
        assert not any((data_dir / "trials").iterdir())  # scratch folder deleted
        assert not (data_dir / "incoming" / candidate).exists()
    assert infer(agent_http_url(data_dir))["artifact_id"] == active  # still serving the active model
    with open_store(home) as store:  # the result feeds the per-device calibration
        row = store.latest_benchmark(DEVICE, candidate)
    assert row is not None and row.p50_ms == pytest.approx(measurement.p50_ms)


@pytest.mark.slow
def test_tampered_broken_and_concurrent_trials_are_refused_while_the_active_model_serves(trial_fleet) -> None:
    from builder.artifacts.registry import Registry
    from builder.errors import FleetError
    from builder.fleet.transport.chunk_server import desired_message

    home, data_dir = trial_fleet["home"], trial_fleet["data_dir"]
    fleet_home = trial_fleet["fleet_home"]
    active = fleet_home.artifact(PROFILE, version="1", width=8)
    candidate = fleet_home.artifact(PROFILE, version="2", width=16)
    broken = fleet_home.artifact(PROFILE, version="3", width=8, broken=True)  # wrong expected outputs
    url = None
    with _trials(trial_fleet, timeout_s=60.0) as trials:
        _deploy(trials, home, active)
        url = agent_http_url(data_dir)

        signed = desired_message(Registry(home).manifest_dir(candidate))
        manifest = dict(signed.manifest, model_version="99")  # changed after signing
        tampered = proto.TrialRequest(artifact_id=candidate, manifest=manifest, signature=signed.signature, runs=5)
        with pytest.raises(FleetError, match="refused: manifest signature does not verify"):
            trials.send(tampered)
        assert infer(url)["artifact_id"] == active

        with pytest.raises(FleetError, match="failed: .*differs from the expected output"):
            trials.measure(broken)
        assert infer(url)["artifact_id"] == active
        assert not any((data_dir / "trials").iterdir())

        # One trial at a time: a slowed-down long trial is running when a second one arrives.
        assert trials.link.command(DEVICE, proto.SetLoadArgs(slowdown_factor=40.0), timeout_s=30).ok
        first: dict = {}
        long_request = proto.TrialRequest(artifact_id=candidate, manifest=signed.manifest, signature=signed.signature,
                                          runs=2000, timeout_s=60.0)
        runner = threading.Thread(target=lambda: first.update(m=trials.send(long_request)), daemon=True)
        runner.start()
        wait_for(lambda: trials.link.command(DEVICE, proto.StatusArgs(), timeout_s=30).result.get("trial") == candidate, 60,
                 "the first trial to start", interval_s=0.1)
        second = trials.link.command(DEVICE, proto.TrialRequest(
            artifact_id=candidate, manifest=signed.manifest, signature=signed.signature, runs=5), timeout_s=30)
        assert not second.ok and second.result["busy"] is True and "one at a time" in second.error
        assert infer(url)["artifact_id"] == active  # serving while a trial runs
        runner.join(180)
        assert first["m"].p50_ms > 0
        assert trials.link.command(DEVICE, proto.SetLoadArgs(slowdown_factor=1.0), timeout_s=30).ok
    assert not any((data_dir / "trials").iterdir())
    assert infer(url)["artifact_id"] == active


def _builder(*args: str, home: Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    env = dict(CHILD_ENV, EDGEFLEET_HOME=str(home), PYTHONPATH=str(REPO))
    return subprocess.run([PY, "-m", "builder.cli.main", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s)


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory) -> Path:
    from builder.zoo.digits_cnn import write_npz

    return write_npz(tmp_path_factory.mktemp("data") / "digits-test.npz")


@pytest.mark.slow
def test_optimize_measure_on_reports_measured_latencies(trial_fleet, digits_npz, tmp_path) -> None:
    """With `builder serve` running for the data dir: optimize finds the broker through it (no
    --broker) and leaves the chunks to it."""
    from builder.fleet.transport.store import open_store

    home, out, processes = trial_fleet["home"], tmp_path / "opt", trial_fleet["processes"]
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--broker", trial_fleet["broker"].url,
                              "--no-loop", "--data-dir", str(home)])
    wait_for(lambda: (home / "serve.json").is_file(), 60, "builder serve to start: " + processes.log("serve"))
    result = _builder("optimize", MODEL, "--input-shape", "1x1x8x8", "--profile", PROFILE, "--data", str(digits_npz),
                      "--trials", "2", "--population", "2", "--eval-samples", "100", "--no-ladder", "--out", str(out),
                      "--measure-on", DEVICE, "--trial-runs", "20", home=home)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["measure_on"] == DEVICE
    measured = [c for c in report["candidates"] if c["latency_source"] == f"measured on {DEVICE}"]
    assert measured, report["candidates"]
    for row in measured:
        assert row["device_latency_ms"] == row["measured_p50_ms"] > 0
        assert row["measured_p95_ms"] >= row["measured_p50_ms"]
        assert row["trial_artifact_id"]
    assert report["calibration"]["source"].startswith(f"measured on {DEVICE}")
    assert report["calibration"]["samples"] == len(measured)
    assert "(measured)" in result.stdout
    with open_store(home) as store:
        for row in measured:
            bench = store.latest_benchmark(DEVICE, row["trial_artifact_id"])
            assert bench is not None and bench.p50_ms == pytest.approx(row["measured_p50_ms"])
        wait_for(lambda: any(r.event == "trial" for r in store.telemetry(DEVICE)), 30, "serve to store the trial telemetry")
    assert not any((trial_fleet["data_dir"] / "trials").iterdir())
    with _trials(trial_fleet) as trials:  # serve answers chunk requests: a second server would double them
        assert trials.chunk_server is None


@pytest.mark.slow
def test_optimize_measure_on_unknown_or_offline_device_is_one_line_before_the_search(trial_fleet, digits_npz, tmp_path) -> None:
    from builder.fleet.transport.store import open_store

    home = trial_fleet["home"]
    with open_store(home) as store:
        store.register_device("pi-02", PROFILE)  # known, but no agent runs
    for device, words in (("ghost-7", ("unknown device 'ghost-7'", "builder fleet add-device ghost-7")),
                          ("pi-02", ("device 'pi-02' is offline", "agent run"))):
        started = time.monotonic()
        result = _builder("optimize", MODEL, "--input-shape", "1x1x8x8", "--profile", PROFILE, "--data", str(digits_npz),
                          "--trials", "2", "--no-ladder", "--out", str(tmp_path / device), "--measure-on", device,
                          "--broker", trial_fleet["broker"].url, home=home)
        assert result.returncode != 0
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("builder: error:"), result.stderr
        assert all(w in lines[0] for w in words), lines[0]
        assert not (tmp_path / device / "report.json").exists() and not (tmp_path / device / "study.db").exists()
        assert time.monotonic() - started < 60
