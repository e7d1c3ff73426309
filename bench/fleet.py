"""Fleet benchmark (issue 16), one run on this machine: one Mosquitto with the fleet's own broker
config (every simulated device its own user, pattern ACL), one `builder serve` subprocess, and
`builder fleet simulate`'s devices (one process, one event loop) for N = 100, 300, 1000:

1. steady telemetry (one report per device every 10 s) and a full-fleet outbox flush (20 records
   per device at once): sent (acked by the host: the devices speak the acked telemetry protocol,
   ``--no-acks`` for the PUBACK rule before it) / re-sent / stored (rows in the fleet store) /
   lost, p50/p95 ingest latency (received_at - ts of the first stored copy), serve RSS and CPU
   (psutil on the serve pid);
2. `builder push --group` of one small model to 100 and 1,000 devices: wall to all active, command
   wall time, false timeouts (devices that are active but reported "timeout"), chunk-frame bytes
   received / (compressed size × N).

    .venv/bin/python bench/fleet.py [--sizes 100,300,1000] [--push-sizes 100,1000] [--steady-s 30] [--no-acks] [--no-results]

Writes its table under "## Fleet (bench/fleet.py)" in bench/RESULTS.md. Every device set is
disjoint (seq starts at 0 for a new device), so each row counts only its own reports.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from builder.fleet.simulate.device import AckSender, Behaviour, PubackSender, SimulatedDevice  # noqa: E402
from builder.fleet.simulate.fleet import Overhead, SimulatedFleet  # noqa: E402
from builder.fleet.simulate.register import load_identities, register_devices  # noqa: E402
from builder.fleet.transport.store import fleet_store_path  # noqa: E402

RESULTS_HEADING = "## Fleet (bench/fleet.py)"
PROFILE = "raspberry-pi-4"
PY = sys.executable
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "250"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_line() -> str:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    found = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{model}, {os.cpu_count()} cores, {', '.join(found) or 'no avx2'}" + ("" if "avx512_vnni" in flags or "avx_vnni" in flags else ", no VNNI")


def small_artifact(home: Path) -> str:
    """The digits CNN (width 8, untrained) as a signed ONNX artifact, registered in ``home``."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from agent.manifest import Target, TensorSpec
    from builder.artifacts.packaging import package_artifact
    from builder.artifacts.registry import Registry
    from builder.artifacts.signing import load_private_key
    from builder.zoo.digits_cnn import DigitsCNN

    work = Path(tempfile.mkdtemp(prefix="art-", dir=home))
    torch.manual_seed(0)
    onnx_path = work / "digits.onnx"
    with torch.no_grad():
        torch.onnx.export(DigitsCNN(width=8).eval(), (torch.zeros(1, 1, 8, 8),), str(onnx_path), input_names=["x"],
                          output_names=["logits"], dynamo=False, opset_version=17)
    x = np.random.default_rng(1).random((1, 1, 8, 8), dtype=np.float32)
    y = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(work / "sample.npz", **{"in:x": x, "out:logits": y.astype(np.float32)})
    package_artifact(work / "artifact", {"model.onnx": (onnx_path, "model"), "sample.npz": (work / "sample.npz", "sample")},
                     model_name="digits-cnn", model_version="1",
                     target=Target(profile=PROFILE, runtime="onnxruntime", execution_providers=("CPUExecutionProvider",),
                                   precision="fp32", format="onnx", runtime_options={"intra_op_num_threads": 1}),
                     inputs=[TensorSpec("x", (1, 1, 8, 8), "float32")], outputs=[TensorSpec("logits", (1, 10), "float32")],
                     private_key=load_private_key(home / "keys" / "signing_key.pem"),
                     verify_tolerance={"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.999})
    record, _ = Registry(home).add_artifact(work / "artifact")
    shutil.rmtree(work, ignore_errors=True)
    return record.artifact_id


class ServeProbe:
    """RSS and CPU of the `builder serve` process over a phase."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.mark()

    def mark(self) -> None:
        t = self.proc.cpu_times()
        self._cpu0, self._t0 = t.user + t.system, time.monotonic()
        self.peak_rss = self.proc.memory_info().rss

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)

    def cpu_percent(self) -> float:
        t = self.proc.cpu_times()
        return 100.0 * (t.user + t.system - self._cpu0) / max(time.monotonic() - self._t0, 1e-6)


def stored_rows(home: Path, ranges: dict[str, tuple[int, int]]) -> list[tuple[str, int, float, float]]:
    """Rows of the fleet store with each device's seq in [start, end)."""
    with sqlite3.connect(f"file:{fleet_store_path(home)}?mode=ro", uri=True, timeout=30) as db:
        rows = db.execute("SELECT device_id, seq, ts, received_at FROM telemetry WHERE event = 'periodic' "
                          "AND device_id IN (%s)" % ",".join("?" * len(ranges)), list(ranges)).fetchall()
    return [r for r in rows if ranges[r[0]][0] <= r[1] < ranges[r[0]][1]]


async def settle(home: Path, ranges: dict[str, tuple[int, int]], expected: int, probe: ServeProbe,
                 quiet_s: float = 4.0, timeout_s: float = 120.0) -> list[tuple[str, int, float, float]]:
    """Poll the store until every report is there or the count stopped growing for ``quiet_s``."""
    deadline, last_count, last_change = time.monotonic() + timeout_s, -1, time.monotonic()
    while True:
        probe.sample()
        rows = await asyncio.to_thread(stored_rows, home, ranges)
        if len(rows) != last_count:
            last_count, last_change = len(rows), time.monotonic()
        if len(rows) >= expected or time.monotonic() - last_change > quiet_s or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.5)


def latency_row(rows: list[tuple[str, int, float, float]]) -> tuple[float, float]:
    from agent.bench import percentile

    lat = sorted(max(0.0, (received - ts) * 1000.0) for _, _, ts, received in rows)
    return (percentile(lat, 50), percentile(lat, 95)) if lat else (float("nan"), float("nan"))


def seq_marks(devices: list[SimulatedDevice]) -> dict[str, int]:
    return {d.device_id: d.seq for d in devices}


async def telemetry_phase(home: Path, fleet: SimulatedFleet, probe: ServeProbe, kind: str, steady_s: float) -> dict[str, Any]:
    start = seq_marks(fleet.devices)
    probe.mark()
    mark = fleet.overhead_mark()
    acked0, resent0 = fleet.totals().records_acked, fleet.totals().records_resent
    if kind == "steady":
        fleet.start_telemetry()
        end_at = time.monotonic() + steady_s
        while time.monotonic() < end_at:
            probe.sample()
            await asyncio.sleep(0.5)
        fleet.stop_telemetry()
    else:
        await fleet.flush_outbox(20)
    await fleet.wait_acked(timeout_s=180)
    overhead = fleet.overhead_since(mark)
    end = seq_marks(fleet.devices)
    ranges = {d: (start[d], end[d]) for d in start}
    sent = sum(end[d] - start[d] for d in start)
    rows = await settle(home, ranges, sent, probe)
    p50, p95 = latency_row(rows)
    totals = fleet.totals()
    return {"sent": sent, "acked": totals.records_acked - acked0, "resent": totals.records_resent - resent0,
            "unacked": totals.records_unacked, "stored": len(rows), "lost": sent - len(rows),
            "p50_ms": p50, "p95_ms": p95, "serve_rss_mb": probe.peak_rss / 1e6, "serve_cpu_percent": probe.cpu_percent(),
            "overhead": overhead}


async def push_phase(home: Path, fleet: SimulatedFleet, group: str, artifact: str, probe: ServeProbe,
                     timeout: str) -> dict[str, Any]:
    bytes0 = sum(d.counters.chunk_bytes_received for d in fleet.devices)
    probe.mark()
    mark = fleet.overhead_mark()
    started = time.monotonic()
    command = asyncio.create_task(asyncio.to_thread(
        subprocess.run, [PY, "-m", "builder.cli.main", "push", "--group", group, "--artifact", artifact,
                         "--benchmark-runs", "0", "--timeout", timeout, "--json", "--data-dir", str(home)],
        cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=900))
    wait_all = asyncio.create_task(fleet.wait_active(artifact, timeout_s=900))
    # A device the push gave up on ("timeout") gets its previous desired state back and never
    # becomes active: stop waiting shortly after the command returned.
    await asyncio.wait({wait_all, command}, return_when=asyncio.FIRST_COMPLETED)
    result = await command
    try:
        active_s = await asyncio.wait_for(wait_all, timeout=10.0)
    except asyncio.TimeoutError:
        active_s = None
    command_s = time.monotonic() - started
    overhead = fleet.overhead_since(mark)
    try:
        outcomes = {o["device_id"]: o["state"] for o in json.loads(result.stdout)["outcomes"]}
    except (ValueError, KeyError):
        outcomes = {}
    active = {d.device_id for d in fleet.devices if d.active_artifact_id == artifact}
    compressed = next((int(rec["compressed_bytes"]) for d in fleet.devices for rec in d.counters.deployments.values()
                       if "compressed_bytes" in rec), 0)
    wire = sum(d.counters.chunk_bytes_received for d in fleet.devices) - bytes0
    return {"n": len(fleet.devices), "active_s": active_s, "command_s": command_s, "rc": result.returncode,
            "active": len(active), "false_timeouts": sum(1 for d, s in outcomes.items() if s == "timeout" and d in active),
            "outcome_states": {s: list(outcomes.values()).count(s) for s in set(outcomes.values())},
            "wire_ratio": wire / (compressed * len(fleet.devices)) if compressed else float("nan"),
            "compressed_bytes": compressed, "serve_rss_mb": probe.peak_rss / 1e6, "serve_cpu_percent": probe.cpu_percent(),
            "overhead": overhead, "stderr_tail": result.stderr[-400:]}


async def run_size(home: Path, ids: list[str], group: str | None, artifact: str | None, probe: ServeProbe,
                   steady_s: float, push_timeout: str, acks: bool = True) -> dict[str, Any]:
    fleet = SimulatedFleet(load_identities(home, ids), Behaviour(telemetry_interval_s=10.0), seed=len(ids),
                           sender_factory=AckSender if acks else PubackSender)
    t0 = time.monotonic()
    await fleet.start(connect_timeout_s=180, batch=100)
    out: dict[str, Any] = {"n": len(ids), "connect_s": time.monotonic() - t0}
    await asyncio.sleep(2.0)  # hellos and statuses settle in serve
    out["steady"] = await telemetry_phase(home, fleet, probe, "steady", steady_s)
    print(f"  steady: {out['steady']}", flush=True)
    out["flush"] = await telemetry_phase(home, fleet, probe, "flush", steady_s)
    print(f"  flush: {out['flush']}", flush=True)
    if artifact is not None and group is not None:
        out["push"] = await push_phase(home, fleet, group, artifact, probe, push_timeout)
    await fleet.stop()
    return out


def overhead_text(o: Overhead) -> str:
    return f"{o.cpu_percent:.0f}% CPU, lag p99 {o.loop_lag_p99_ms:.0f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,300,1000")
    parser.add_argument("--push-sizes", default="100,1000")
    parser.add_argument("--steady-s", type=float, default=30.0)
    parser.add_argument("--push-timeout", default="5m", help="builder push --timeout (per device)")
    parser.add_argument("--no-acks", action="store_true", help="devices forget a report at the broker's PUBACK (the rule before acks)")
    parser.add_argument("--no-results", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    push_sizes = {int(s) for s in args.push_sizes.split(",") if s}

    from builder.artifacts.signing import init_keys

    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    os.chmod(root, 0o755)
    home = root / "home"
    home.mkdir()
    init_keys(home / "keys")
    port = free_port()
    groups: dict[int, list[str]] = {}
    offset = 0
    t0 = time.monotonic()
    for n in sizes:
        ids = [f"sim-{offset + i:05d}" for i in range(n)]
        register_devices(home, ids, PROFILE, broker_config_dir=root / "broker", broker_port=port, group=f"n{n}")
        groups[n] = ids
        offset += n
    print(f"registered {offset} devices in {time.monotonic() - t0:.1f} s", flush=True)
    artifact = small_artifact(home)
    mosquitto = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(root / "broker" / "mosquitto.conf")],
                                 stdout=subprocess.DEVNULL, stderr=open(root / "mosquitto.log", "wb"))
    serve_log = open(root / "serve.log", "wb")
    serve = subprocess.Popen([PY, "-m", "builder.cli.main", "serve", "--broker", f"mqtt://127.0.0.1:{port}", "--data-dir",
                              str(home), "--no-loop", "--log-level", "WARNING"], cwd=ROOT, env=CHILD_ENV,
                             stdout=serve_log, stderr=subprocess.STDOUT)
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while not (home / "serve.json").is_file():
            if serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("builder serve did not start: " + (root / "serve.log").read_text()[-2000:])
            time.sleep(0.2)
        probe = ServeProbe(serve.pid)
        print(f"serve RSS at start {probe.proc.memory_info().rss / 1e6:.1f} MB", flush=True)
        for n in sizes:
            print(f"N = {n} ...", flush=True)
            result = asyncio.run(run_size(home, groups[n], f"n{n}", artifact if n in push_sizes else None, probe,
                                          args.steady_s, args.push_timeout, acks=not args.no_acks))
            results.append(result)
            print(json.dumps(result, default=lambda o: o.__dict__ if hasattr(o, "__dict__") else str(o))[:1500], flush=True)
    finally:
        serve.terminate()
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
        mosquitto.terminate()
        mosquitto.wait(10)
        serve_log.close()
    text = report(results, cpu_line(), args.steady_s, acks=not args.no_acks)
    print(text)
    if not args.no_results:
        write_results(ROOT / "bench" / "RESULTS.md", text)
    shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: list[dict[str, Any]], cpu: str, steady_s: float, acks: bool = True) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [RESULTS_HEADING, "",
             f"{stamp}; {cpu}; one Mosquitto 2.0 (the fleet's broker config: one user per device, pattern ACL, "
             "max_queued_messages 1000), one `builder serve --no-loop` subprocess, the simulated devices in ONE process "
             f"on one asyncio loop (`builder fleet simulate`'s classes). Steady: one report per device every 10 s for "
             f"{steady_s:.0f} s. Flush: 20 buffered reports per device at once. Regenerate: `.venv/bin/python bench/fleet.py`.",
             "", f"| N | phase | sent ({'acked by the host' if acks else 'PUBACKed'}) | re-sent | stored | lost | "
                 "ingest p50 / p95 | serve RSS peak | serve CPU | simulator |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for phase in ("steady", "flush"):
            p = r[phase]
            lines.append(f"| {r['n']} | {phase} | {p['sent']} ({p['acked']}) | {p['resent']} | {p['stored']} | **{p['lost']}** | "
                         f"{p['p50_ms']:.0f} / {p['p95_ms']:.0f} ms | {p['serve_rss_mb']:.0f} MB | {p['serve_cpu_percent']:.0f}% | "
                         f"{overhead_text(p['overhead'])} |")
    pushes = [r["push"] for r in results if "push" in r]
    if pushes:
        lines += ["", "| push to N | all active after | command returned after | exit | false timeouts | outcomes | "
                      "chunk bytes ÷ (compressed × N) | serve CPU | simulator |", "|---|---|---|---|---|---|---|---|---|"]
        for p in pushes:
            active = f"{p['active_s']:.1f} s" if p["active_s"] is not None else f"not all ({p['active']} of {p['n']})"
            lines.append(f"| {p['n']} | {active} | {p['command_s']:.1f} s | {p['rc']} | **{p['false_timeouts']}** | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(p['outcome_states'].items())) or _last_line(p['stderr_tail'])} | "
                         f"{p['wire_ratio']:.2f} ({p['compressed_bytes']} B stream) | {p['serve_cpu_percent']:.0f}% | "
                         f"{overhead_text(p['overhead'])} |")
    rule = ("*(acked by the host)* = covered by a `down/ack` from serve (stored), which is when the agent deletes "
            "them; *re-sent* = publishes of a report again after its ack window timed out (`agent.outbox.AckWindow`)"
            if acks else "*(PUBACKed)* = acknowledged by the broker, which is when a device deleted them before acks")
    lines += ["", f"Reading it: *sent* = reports the devices built and published, {rule}; *stored* = rows in the fleet store with those (device, seq); "
              "*lost* = sent − stored, permanent (the device forgot them). Ingest latency is `received_at − ts` of the "
              "stored rows (the flush stamps its records at the flush, so it measures the host's backlog, not an outage). "
              "*simulator* is the simulator process's own CPU (of one core) and how late its 50 ms timer fired (p99): a "
              "lag far above the ingest latency would mean the simulator, not serve, is the bottleneck. Chunk bytes are "
              "whole frames (header + chunk) received by the devices. A shared 2-core VM: other jobs ran meanwhile."]
    return "\n".join(lines) + "\n"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1][:160] if lines else "no outcome").replace("|", "/")


def write_results(path: Path, section: str) -> None:
    from bench.results_file import replace_section

    replace_section(path, RESULTS_HEADING, section)


if __name__ == "__main__":
    sys.exit(main())
