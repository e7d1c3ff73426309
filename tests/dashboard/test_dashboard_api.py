"""The dashboard's JSON API against a real fleet store and registry (Starlette's TestClient, no broker)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("sse_starlette")

from starlette.testclient import TestClient

from builder.errors import FleetError
from builder.fleet.dashboard.api import DashboardConfig, build_app
from builder.fleet.dashboard.server import parse_http_address, resolve_token
from builder.fleet.transport.store import (
    BenchmarkRow,
    DeploymentEvent,
    FleetStore,
    TelemetryRow,
    open_store,
)
from tests.dashboard.fill import fill_fleet, write_optimize_report

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path) -> Any:
    """A registry with one signed artifact (a stand-in payload: the API reads the record, not the model)."""
    from agent.manifest import Target, TensorSpec
    from builder.artifacts.packaging import package_artifact
    from builder.artifacts.registry import Registry
    from builder.artifacts.signing import init_keys, load_private_key

    keys = init_keys(home / "keys")
    work = home / "work"
    work.mkdir(parents=True)
    (work / "model.onnx").write_bytes(b"not really onnx" * 10)
    package_artifact(work / "artifact", {"model.onnx": (work / "model.onnx", "model")}, model_name="digits-cnn",
                     model_version="3", target=Target(profile="raspberry-pi-4", runtime="onnxruntime",
                                                      execution_providers=("CPUExecutionProvider",), precision="int8",
                                                      format="onnx"),
                     inputs=[TensorSpec("x", (1, 1, 8, 8), "float32")], outputs=[TensorSpec("y", (1, 10), "float32")],
                     private_key=load_private_key(keys.private), metrics={"verification": {"max_abs": 0.01}})
    reg = Registry(home)
    reg.add_artifact(work / "artifact")
    return reg


class FakeActions:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, device_id: str, artifact_id: str | None) -> dict[str, Any]:
        self.calls.append((device_id, artifact_id))
        if device_id == "dev-0002":
            raise FleetError("dev-0002 is offline; a rollback needs the device online")
        return {"device_id": device_id, "state": "rolled_back" if artifact_id is None else "active", "ok": True}


@pytest.fixture
def client(home: Path, registry: Any):
    store = open_store(home)
    now = time.time()
    fill_fleet(store, 30, now)
    store.add_event(DeploymentEvent("dev-0000", now - 50, "desired", "dep-1", "art-0"))
    store.add_event(DeploymentEvent("dev-0000", now - 40, "active", "dep-1", "art-0"))
    store.add_event(DeploymentEvent("dev-0000", now - 30, "loop.step_down", None, "art-0",
                                    {"reason": "p95 3.0 ms over the objective 2.0 ms"}))
    store.add_benchmark(BenchmarkRow("dev-0000", now - 45, "art-0", 1.5, 2.5, power_w=2.0, power_source="ina219"))
    from builder.fleet.loop.policy import Policy, PolicyStore

    PolicyStore(store).set("group:g1", Policy(latency_p95_ms=10.0), now)
    PolicyStore(store).set("device:dev-0004", Policy(latency_p95_ms=3.0), now)
    actions = FakeActions()
    app = build_app(store, registry, DashboardConfig(TOKEN, reads_open=True, stream_poll_s=0.05), actions)
    with TestClient(app) as c:
        c.actions = actions  # type: ignore[attr-defined]
        c.store = store  # type: ignore[attr-defined]
        yield c
    store.close()


def test_devices_filtered_sorted_paged(client: TestClient) -> None:
    page = client.get("/api/devices", params={"per_page": 10}).json()
    assert page["total"] == 30 and page["pages"] == 3 and len(page["devices"]) == 10
    assert page["groups"] == ["g0", "g1", "g2"]
    assert page["counts"] == {"online": 19, "offline": 10, "unregistered": 1}
    first = page["devices"][0]
    assert first["device_id"] == "dev-0000" and first["state"] == "online" and first["group"] == "g0"
    assert first["profile"] == "jetson-orin-nano" and first["model"] == "m@0" and first["artifact_id"] == "art-0"
    assert first["p50_ms"] == 1.0 and first["p95_ms"] == 2.0 and first["temperature_c"] == 40.0
    assert first["power_w"] == 3.0 and first["power_estimated"] is False and first["last_seen"] is not None
    assert first["objective_p95_ms"] is None and first["over_objective"] is False
    objectives = {d["device_id"]: (d["objective_p95_ms"], d["policy_scope"], d["over_objective"])
                  for d in client.get("/api/devices", params={"group": "g1"}).json()["devices"]}
    assert objectives["dev-0001"] == (10.0, "group:g1", False)  # p95 3 ms
    assert objectives["dev-0004"] == (3.0, "device:dev-0004", True)  # p95 6 ms: its own policy wins
    assert objectives["dev-0013"] == (10.0, "group:g1", True)  # p95 15 ms
    odd = client.get("/api/devices/dev-0001").json()
    assert odd["power_estimated"] is True and odd["state"] == "offline"

    g1 = client.get("/api/devices", params={"group": "g1", "state": "offline"}).json()
    assert g1["total"] == 10 and all(d["group"] == "g1" and d["state"] == "offline" for d in g1["devices"])
    assert client.get("/api/devices", params={"state": "unregistered"}).json()["devices"][0]["device_id"] == "dev-0029"

    by_p95 = client.get("/api/devices", params={"sort": "p95_ms", "order": "desc", "per_page": 5, "page": 2}).json()
    assert [d["p95_ms"] for d in by_p95["devices"]] == [26.0, 25.0, 24.0, 23.0, 22.0]
    assert client.get("/api/devices", params={"search": "0017"}).json()["total"] == 1


@pytest.mark.parametrize("params", [{"state": "sleeping"}, {"sort": "colour"}, {"per_page": 0}, {"page": "x"}])
def test_bad_queries_are_400_with_a_message(client: TestClient, params: dict) -> None:
    answer = client.get("/api/devices", params=params)
    assert answer.status_code == 400 and answer.json()["error"]


def test_device_detail_telemetry_deployments_loop_events(client: TestClient) -> None:
    detail = client.get("/api/devices/dev-0000").json()
    assert detail["slots"]["active"] == {"artifact_id": "art-0", "model": "m@0"}
    assert [e["kind"] for e in detail["deployments"]] == ["desired", "active"]
    assert detail["loop_events"][0]["kind"] == "loop.step_down"
    assert "objective" in detail["loop_events"][0]["detail"]["reason"]
    assert detail["benchmarks"]["art-0"]["p50_ms"] == 1.5
    assert client.get("/api/devices/dev-0000/deployments").json()["deployments"][1]["deployment_id"] == "dep-1"
    assert len(client.get("/api/devices/dev-0000/loop-events").json()["loop_events"]) == 1
    series = client.get("/api/devices/dev-0000/telemetry").json()["telemetry"]
    assert len(series) == 1 and series[0]["p95_ms"] == 2.0 and series[0]["power_source"] == "ina219"
    assert client.get("/api/devices/nope").status_code == 404
    assert client.get("/api/devices/nope/telemetry").status_code == 404
    assert client.get("/api/nothing-here").status_code == 404


def test_artifacts_with_verification_size_and_key(client: TestClient, registry: Any) -> None:
    (art,) = client.get("/api/artifacts").json()["artifacts"]
    assert art["model"] == "digits-cnn@3" and art["precision"] == "int8" and art["size_bytes"] > 0
    assert art["verification"]["verification"] == {"max_abs": 0.01}
    assert art["key_id"] and len(art["key_id"]) == 16
    assert client.get("/api/pushes").json()["pushes"] == []


def test_deployments_in_flight_with_their_stage(client: TestClient) -> None:
    store: FleetStore = client.store  # type: ignore[attr-defined]
    now = time.time()
    store.add_event(DeploymentEvent("dev-0005", now - 5, "desired", "dep-5", "art-1"))
    store.add_event(DeploymentEvent("dev-0005", now - 4, "downloading", "dep-5", "art-1", {"bytes_total": 10}))
    store.add_event(DeploymentEvent("dev-0006", now - 900, "desired", "dep-6", "art-1"))
    store.add_event(DeploymentEvent("dev-0006", now - 899, "failed", "dep-6", "art-1", {"error": "health check"}))
    flight = {d["device_id"]: d for d in client.get("/api/pushes").json()["deployments"]}
    assert set(flight) == {"dev-0000", "dev-0005"}  # dev-0006 ended long ago
    assert flight["dev-0005"]["stage"] == "downloading" and flight["dev-0005"]["progress"] == 0.25
    assert not flight["dev-0005"]["final"]
    assert flight["dev-0000"]["state"] == "active" and flight["dev-0000"]["progress"] == 1.0 and flight["dev-0000"]["final"]

    from builder.fleet.dashboard.queries import deployments_in_flight

    # with serve's live byte counts the download stage fills byte by byte: 4 of 10 bytes = 0.25 + 0.4 x 0.25
    live = {d["device_id"]: d for d in deployments_in_flight(store, transfers={("dev-0005", "dep-5"): (4, 10)})}
    assert live["dev-0005"]["progress"] == 0.35 and (live["dev-0005"]["bytes_done"], live["dev-0005"]["bytes_total"]) == (4, 10)


def test_actions_need_the_token(client: TestClient) -> None:
    assert client.post("/api/devices/dev-0000/rollback").status_code == 401
    assert client.post("/api/devices/dev-0000/rollback", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.actions.calls == []
    done = client.post("/api/devices/dev-0000/rollback", headers=AUTH)
    assert done.status_code == 200 and done.json()["state"] == "rolled_back"
    pushed = client.post("/api/devices/dev-0000/push", headers=AUTH, json={"artifact_id": "abc"})
    assert pushed.status_code == 200 and pushed.json()["state"] == "active"
    assert client.actions.calls == [("dev-0000", None), ("dev-0000", "abc")]
    assert client.post("/api/devices/dev-0000/push", headers=AUTH, json={}).status_code == 400
    refused = client.post("/api/devices/dev-0002/rollback", headers=AUTH)
    assert refused.status_code == 409 and "offline" in refused.json()["error"]
    assert client.post("/api/devices/nope/rollback", headers=AUTH).status_code == 404


def test_reads_need_the_token_off_loopback(home: Path, registry: Any) -> None:
    with open_store(home) as store:
        fill_fleet(store, 2, time.time())
        with TestClient(build_app(store, registry, DashboardConfig(TOKEN, reads_open=False))) as c:
            assert c.get("/api/devices").status_code == 401
            assert c.get("/api/devices", headers=AUTH).json()["total"] == 2
            assert c.get("/api/devices/dev-0000/telemetry/stream").status_code == 401
            assert c.post("/api/devices/dev-0000/rollback", headers=AUTH).status_code == 503  # no broker given


def test_live_stream_sends_new_reports(client: TestClient) -> None:
    store: FleetStore = client.store  # type: ignore[attr-defined]
    now = time.time()
    store.add_telemetry(TelemetryRow("dev-0003", 2, now, "window", requests=3, p50_ms=7.0, p95_ms=9.0))
    events = []
    with client.stream("GET", "/api/devices/dev-0003/telemetry/stream",
                       params={"after_ts": now - 100, "after_seq": -1, "limit": 2}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert [e["seq"] for e in events] == [1, 2] and events[1]["p95_ms"] == 9.0


def test_page_and_vendored_chart_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "uPlot.iife.min.js" in page.text and "http" not in page.text.split("<body")[0]
    chart = client.get("/static/vendor/uplot/uPlot.iife.min.js")
    assert chart.status_code == 200 and "uPlot" in chart.text
    assert client.get("/static/app.js").status_code == 200


def test_thousand_devices_page_is_fast(tmp_path: Path) -> None:
    with open_store(tmp_path / "big") as store:
        fill_fleet(store, 1000, time.time())
        with TestClient(build_app(store, None, DashboardConfig(TOKEN))) as c:
            start = time.perf_counter()
            page = c.get("/api/devices", params={"sort": "p95_ms", "per_page": 100}).json()
            elapsed = time.perf_counter() - start
    assert page["total"] == 1000 and len(page["devices"]) == 100
    assert elapsed < 1.0, f"1,000 devices took {elapsed:.2f} s"


def test_token_rules(tmp_path: Path) -> None:
    made = resolve_token(tmp_path, "127.0.0.1", None, None)
    assert made.reads_open and len(made.token) > 20 and (tmp_path / "dashboard-token").stat().st_mode & 0o077 == 0
    assert resolve_token(tmp_path, "127.0.0.1", None, None).token == made.token  # kept across restarts
    from builder.errors import UsageError

    with pytest.raises(UsageError, match="not loopback"):
        resolve_token(tmp_path, "0.0.0.0", None, None)
    given = resolve_token(tmp_path, "0.0.0.0", "abc", None)
    assert given.token == "abc" and not given.reads_open
    assert parse_http_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_http_address("[::1]:0") == ("::1", 0)
    with pytest.raises(UsageError):
        parse_http_address("127.0.0.1:http")


@pytest.mark.parametrize("address, message", [("0.0.0.0:8080", "not loopback"), ("127.0.0.1:web", "HOST:PORT"),
                                              ("dashboard.local:80", "not an IP address")])
def test_serve_refuses_a_bad_http_address_before_starting(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, tmp_path: Path,
                                                          address: str, message: str) -> None:
    from tests.support.cli import run_builder

    code, _, err = run_builder(monkeypatch, capsys, "serve", "--data-dir", str(tmp_path), "--port", "0",
                               "--http", address)
    assert code != 0 and message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "serve.json").exists()  # refused before the fleet server started


def test_serve_off_loopback_warns_and_wants_the_token_for_reads(tmp_path: Path) -> None:
    """`builder serve --http 0.0.0.0:0 --http-token-file F`: the warning, then reads refused without the token."""
    import re
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    from tests.support.processes import CHILD_ENV, wait_for

    token_file = tmp_path / "token"
    token_file.write_text("off-loopback-token\n")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "builder.cli.main", "serve", "--port", "0", "--no-loop",
                                 "--data-dir", str(tmp_path / "home"), "--http", "0.0.0.0:0",
                                 "--http-token-file", str(token_file)],
                                env={**CHILD_ENV, "COLUMNS": "250"}, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = wait_for(lambda: (m := re.search(r"dashboard: http://0\.0\.0\.0:(\d+)/", log.read_text())) and m.group(1),
                        60, "the dashboard's banner")
        text = log.read_text()
        assert "warning:" in text and "not loopback" in text and "reads and actions need the bearer token" in text
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/devices", timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/devices",
                                         headers={"Authorization": "Bearer off-loopback-token"})
        assert json.loads(urllib.request.urlopen(request, timeout=5).read())["total"] == 0
    finally:
        proc.terminate()
        proc.wait(15)


def test_optimize_runs_and_their_pareto_points(home: Path, registry: Any, tmp_path: Path) -> None:
    reports = tmp_path / "runs"
    write_optimize_report(reports / "digits" / "pi", study="digits-pi")
    (reports / "other").mkdir()
    (reports / "other" / "report.json").write_text("{not json")  # skipped, not an error
    with open_store(home) as store, \
            TestClient(build_app(store, registry, DashboardConfig(TOKEN, reports_dirs=(reports,)))) as c:
        (run,) = c.get("/api/optimize-runs").json()["runs"]
        assert run["id"] == "0/digits/pi" and run["study"] == "digits-pi" and run["front_size"] == 3
        detail = c.get(f"/api/optimize-runs/{run['id']}").json()
        assert len(detail["candidates"]) == 5 and sum(p["on_front"] for p in detail["candidates"]) == 3
        assert detail["chosen"]["recipe"].startswith("quantize(int8)") and detail["candidates"][0]["device_latency_ms"] == 4.0
        assert c.get("/api/optimize-runs/0/../../etc").status_code == 404
        assert c.get("/api/optimize-runs/7/digits/pi").status_code == 404
        assert c.get("/api/optimize-runs/0/other").status_code == 404


def test_policy_changes_need_the_token_and_a_valid_policy(client: TestClient) -> None:
    body = {"objective": {"latency_p95_ms": 4.5}}
    assert client.put("/api/policies/device:dev-0003", json=body).status_code == 401
    done = client.put("/api/policies/device:dev-0003", json=body, headers=AUTH)
    assert done.status_code == 200 and done.json()["policy"]["latency_p95_ms"] == 4.5
    row = client.get("/api/devices/dev-0003").json()
    assert (row["objective_p95_ms"], row["policy_scope"], row["over_objective"]) == (4.5, "device:dev-0003", True)  # p95 5
    assert "device:dev-0003" in client.get("/api/policies").json()["policies"]
    bad = client.put("/api/policies/device:dev-0003", json={"objective": {"p95": 1}}, headers=AUTH)
    assert bad.status_code == 400 and "unknown key objective.p95" in bad.json()["error"]
    assert client.put("/api/policies/planet:earth", json=body, headers=AUTH).status_code == 400
    assert client.delete("/api/policies/device:dev-0003").status_code == 401
    assert client.delete("/api/policies/device:dev-0003", headers=AUTH).json()["removed"] is True
    assert client.delete("/api/policies/device:dev-0003", headers=AUTH).status_code == 404
    assert client.get("/api/devices/dev-0003").json()["objective_p95_ms"] is None  # group g0 has none


def test_patching_the_objective_keeps_the_rest_of_the_policy_it_resolves_to(client: TestClient) -> None:
    group = {"objective": {"latency_p95_ms": 9.0}, "budget": {"energy_mj": 3.5}, "pacing": {"cooldown_s": 120}}
    assert client.put("/api/policies/group:g0", json=group, headers=AUTH).status_code == 200
    patch = {"objective": {"latency_p95_ms": 4.5}}
    assert client.patch("/api/policies/device:dev-0003", json=patch).status_code == 401
    done = client.patch("/api/policies/device:dev-0003", json=patch, headers=AUTH)
    assert done.status_code == 200
    policy = client.get("/api/policies").json()["policies"]["device:dev-0003"]
    # the field's one number changed; the group's budget and pacing the device ran under are kept
    assert (policy["latency_p95_ms"], policy["energy_mj_budget"], policy["pacing"]["cooldown_s"]) == (4.5, 3.5, 120)
    again = client.patch("/api/policies/device:dev-0003", json={"budget": {"memory_mb": 64}}, headers=AUTH).json()
    assert (again["policy"]["latency_p95_ms"], again["policy"]["memory_mb_budget"]) == (4.5, 64)
    bad = client.patch("/api/policies/device:dev-0003", json={"objective": {"latency_p95_ms": -1}}, headers=AUTH)
    assert bad.status_code == 400
    for scope in ("device:dev-0003", "group:g0"):
        assert client.delete(f"/api/policies/{scope}", headers=AUTH).json()["removed"] is True
