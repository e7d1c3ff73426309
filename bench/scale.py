"""Scale-out benchmark: telemetry ingest with 1 and 2 `builder serve` workers (MQTT 5 shared
subscription) into SQLite and PostgreSQL, on one real Mosquitto, this machine (numbers are
ratios to the 1-worker row of the same store, measured in the same run).

Each row: fresh store, `builder serve --broker … --worker-group bench [--store …] --no-loop`
subprocesses, then DEVICES simulated devices (one MQTT connection each, threads) publish REPORTS
QoS 1 telemetry reports each as fast as the broker takes them (a fleet-wide outbox flush). Measured:
reports stored / lost, wall time from the first publish to the last row stored, ingest rate,
workers' CPU seconds, and how the reports split between workers. The broker's per-client queue is
unbounded here (``max_queued_messages 0``) so the rate is not cut by drops; ``--queue 1000``
(Mosquitto's default, the fleet's shipped config) shows what a slow ingest loses.

    .venv/bin/python bench/scale.py [--devices 50] [--reports 100] [--queue 0] [--no-results]

Appends its table to bench/RESULTS.md under "## Scale-out (bench/scale.py)".
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

RESULTS_HEADING = "## Scale-out (bench/scale.py)"


def start_mosquitto(work: Path, port: int, queue: int) -> subprocess.Popen[bytes]:
    from tests.support.broker import MOSQUITTO

    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    conf = work / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"max_queued_messages {queue}\nmax_inflight_messages 64\nlog_dest none\n", encoding="utf-8")
    os.chmod(conf, 0o644)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def start_worker(broker_url: str, data_dir: Path, store_url: str | None, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "builder.cli.main", "serve", "--broker", broker_url, "--worker-group", "bench",
           "--data-dir", str(data_dir), "--no-loop", "--log-level", "WARNING"]
    if store_url:
        cmd += ["--store", store_url]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)  # noqa: SIM115


def stored_count(store_url: str | None, data_dir: Path) -> int:
    from builder.fleet.transport.store import open_store

    with open_store(data_dir, store_url) as store:
        return store.telemetry_count()


def wait_ready(logs: list[Path], procs: list[subprocess.Popen[bytes]], timeout_s: float = 90.0) -> None:
    """Every worker subscribed: it prints its banner after the SUBACKs (a flush that started while
    one worker was still connecting would all go to the other)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"serve worker exited: {log.read_text(errors='replace')[-2000:]}")
        if all("Ctrl-C to stop" in log.read_text(errors="replace") for log in logs if log.exists()) and \
                all(log.exists() for log in logs):
            return
        time.sleep(0.2)
    raise RuntimeError("serve workers did not come up")


def run_row(engine: str, workers: int, args: argparse.Namespace, work: Path, pg: object) -> dict[str, object]:
    from agent import protocol as proto
    from agent.mqtt import ClientSettings, MqttClient, MqttVersion
    from tests.support.broker import free_port

    row_dir = Path(tempfile.mkdtemp(prefix=f"{engine}-{workers}-", dir=work))
    data_dir = row_dir / "data"
    store_url = pg.new_database() if engine == "postgresql" else None  # type: ignore[attr-defined]
    port = free_port()
    broker = start_mosquitto(row_dir / "broker", port, args.queue)
    logs = [row_dir / f"worker{k}.log" for k in range(workers)]
    procs = [start_worker(f"mqtt://127.0.0.1:{port}", data_dir, store_url, log) for log in logs]
    try:
        wait_ready(logs, procs)
        base = stored_count(store_url, data_dir)
        cpu0 = [psutil.Process(p.pid).cpu_times() for p in procs]
        clients = [MqttClient(ClientSettings(host="127.0.0.1", port=port, client_id=f"dev-{d}", version=MqttVersion.V311,
                                             max_inflight=64)).connect(10) for d in range(args.devices)]

        def flush(d: int) -> None:
            deliveries = []
            for seq in range(1, args.reports + 1):
                report = proto.TelemetryReport(device_id=f"dev-{d}", seq=seq, ts=time.time(), event="periodic",
                                               requests=3, latency_ms={"p50": 1.0, "p95": 2.0})
                deliveries.append(clients[d].publish(proto.device_topic(f"dev-{d}", proto.Up.TELEMETRY), report.to_json()))
            for delivery in deliveries:
                delivery.wait(120)

        total = args.devices * args.reports
        t0 = time.perf_counter()
        threads = [threading.Thread(target=flush, args=(d,)) for d in range(args.devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sent_s = time.perf_counter() - t0
        last, last_change, done_s = base, time.perf_counter(), sent_s
        while True:
            n = stored_count(store_url, data_dir)
            now = time.perf_counter()
            if n != last:
                last, last_change, done_s = n, now, now - t0
            if n - base >= total or now - last_change > 5.0:
                break
            time.sleep(0.1)
        stored = last - base
        cpu = sum((psutil.Process(p.pid).cpu_times().user + psutil.Process(p.pid).cpu_times().system)
                  - (c.user + c.system) for p, c in zip(procs, cpu0))
        for c in clients:
            c.stop()
        return {"engine": engine, "workers": workers, "sent": total, "stored": stored, "lost": total - stored,
                "publish_s": sent_s, "wall_s": done_s, "rate": stored / done_s if done_s else 0.0, "cpu_s": cpu}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--reports", type=int, default=100, help="reports per device (one outbox flush)")
    parser.add_argument("--queue", type=int, default=0, help="Mosquitto max_queued_messages (0: unbounded)")
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()

    from tests.support.postgres import PostgresServer

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    rows: list[dict[str, object]] = []
    engines = [e for e in args.engines.split(",") if e]
    pg = PostgresServer().start() if "postgresql" in engines else None
    try:
        for engine in engines:
            for workers in (1, 2):
                print(f"{engine}, {workers} worker(s) ...", flush=True)
                rows.append(run_row(engine, workers, args, work, pg))
                print(f"  {rows[-1]}", flush=True)
    finally:
        if pg is not None:
            pg.close()
        shutil.rmtree(work, ignore_errors=True)

    base = {r["engine"]: r["rate"] for r in rows if r["workers"] == 1}
    lines = [f"{args.devices} devices × {args.reports} reports (QoS 1, as fast as the broker takes them), "
             f"Mosquitto max_queued_messages {args.queue or 'unbounded'}, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f} at the end, {time.strftime('%Y-%m-%d')}", "",
             "| store | workers | sent | stored | lost | wall s | reports/s | × 1 worker | workers' CPU s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = float(r["rate"]) / float(base[r["engine"]]) if base.get(r["engine"]) else 0.0  # type: ignore[arg-type]
        lines.append(f"| {r['engine']} | {r['workers']} | {r['sent']} | {r['stored']} | {r['lost']} | {float(r['wall_s']):.2f} "  # type: ignore[arg-type]
                     f"| {float(r['rate']):.0f} | ×{ratio:.2f} | {float(r['cpu_s']):.1f} |")  # type: ignore[arg-type]
    table = "\n".join(lines)
    print(table)
    if not args.no_results:
        results = ROOT / "bench" / "RESULTS.md"
        text = results.read_text(encoding="utf-8") if results.exists() else ""
        if RESULTS_HEADING not in text:
            text += f"\n{RESULTS_HEADING}\n"
        results.write_text(text.rstrip("\n") + "\n\n" + table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
