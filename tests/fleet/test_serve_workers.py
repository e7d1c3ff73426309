"""Several `builder serve` workers share one fleet through MQTT 5 shared subscriptions
(``$share/GROUP/…``) on a real Mosquitto, and one store (PostgreSQL, or one SQLite file): every
report is delivered to one worker and stored once, and one worker at a time does the singleton duties."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from agent import protocol as proto
from agent.mqtt import ClientSettings, MqttClient, MqttVersion, shared_filter, topic_matches
from builder.fleet.transport.link import SERVE_TOPIC, BrokerEndpoint
from builder.fleet.transport.serve import FleetServer, ServeSettings
from builder.fleet.transport.store import open_store
from tests.support.broker import MosquittoBroker, mosquitto_available
from tests.support.processes import wait_for

pytestmark = [pytest.mark.mosquitto, pytest.mark.skipif(not mosquitto_available(), reason="mosquitto not installed")]
DEVICES, REPORTS = 12, 25


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    with MosquittoBroker() as b:
        yield b


def _worker(broker: MosquittoBroker, data_dir: Path, store_url: str | None, group: str = "ingest") -> FleetServer:
    settings = ServeSettings(data_dir=data_dir, broker=BrokerEndpoint(broker.url), store_url=store_url, worker_group=group)
    return FleetServer(settings).start()


def store_count(data_dir: Path, store_url: str | None) -> int:
    with open_store(data_dir, store_url) as store:
        return store.telemetry_count()


def _device_client(broker: MosquittoBroker, name: str) -> MqttClient:
    return MqttClient(ClientSettings(host="127.0.0.1", port=broker.port, client_id=name, version=MqttVersion.V311,
                                     max_inflight=64)).connect(10)


def test_a_shared_filter_matches_the_topics_of_its_filter() -> None:
    topic = proto.device_topic("pi-1", proto.Up.TELEMETRY)
    flt = shared_filter("ingest", proto.all_devices_topic(proto.Up.TELEMETRY))
    assert flt.startswith("$share/ingest/") and topic_matches(flt, topic)
    assert not topic_matches(flt, proto.device_topic("pi-1", proto.Up.STATUS))
    with pytest.raises(ValueError):
        shared_filter("a/b", "x")


def test_two_workers_share_telemetry_and_store_each_report_once(broker: MosquittoBroker, tmp_path: Path,
                                                                store_url: str | None) -> None:
    workers = [_worker(broker, tmp_path, store_url), _worker(broker, tmp_path, store_url)]
    try:
        senders = [_device_client(broker, f"dev-{d}") for d in range(DEVICES)]

        def send(d: int) -> None:
            for seq in range(1, REPORTS + 1):
                report = proto.TelemetryReport(device_id=f"dev-{d}", seq=seq, ts=1000.0 + seq, event="periodic", requests=1)
                senders[d].publish(proto.device_topic(f"dev-{d}", proto.Up.TELEMETRY), report.to_json(), qos=1).wait(10)

        threads = [threading.Thread(target=send, args=(d,)) for d in range(DEVICES)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = DEVICES * REPORTS
        wait_for(lambda: sum(w.telemetry_received for w in workers) >= total, 30, "every report at some worker")
        # stored by each worker's ingest thread after it is received: on a loaded 2-core CI host the
        # PostgreSQL batches lagged (14 of 300 stored when the count was read)
        wait_for(lambda: sum(w.reports_ingested for w in workers) >= total, 60, "every report stored")
        time.sleep(0.5)  # a duplicate delivery (a non-shared subscription) would arrive meanwhile
        with open_store(tmp_path, store_url) as store:
            stored = {(d, r.seq) for d in (f"dev-{i}" for i in range(DEVICES)) for r in store.telemetry(d)}
        received = [w.telemetry_received for w in workers]
        assert len(stored) == total == store_count(tmp_path, store_url)  # all stored, nothing else
        assert sum(received) == total  # each delivered once: no worker saw a report another one had
        assert sum(w.reports_ingested for w in workers) == total and all(n > 0 for n in received), received
        for s in senders:
            s.stop()
    finally:
        for w in workers:
            w.stop()


def test_one_worker_does_the_singleton_duties_and_another_takes_them_over(broker: MosquittoBroker, tmp_path: Path,
                                                                          store_url: str | None) -> None:
    first = _worker(broker, tmp_path, store_url)
    second = _worker(broker, tmp_path, store_url)
    watcher = _device_client(broker, "watcher")
    states: list[dict[str, object]] = []
    watcher.subscribe(SERVE_TOPIC, lambda topic, payload: states.append(json.loads(payload)) if payload else None)
    try:
        assert first.leading and not second.leading
        assert not second.poll_duties()  # held by the first worker
        wait_for(lambda: states and states[-1]["state"] == "online", 10, "the retained online announcement")
        first.stop()  # announces offline, then frees the duties
        wait_for(second.poll_duties, 10, "the second worker to take the duties")
        wait_for(lambda: states[-1]["state"] == "online", 10, "the new holder's online announcement")
        assert any(s["state"] == "offline" for s in states)
    finally:
        watcher.stop()
        first.stop()
        second.stop()
