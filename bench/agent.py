"""Agent benchmark, one run on loopback against a real Mosquitto (numbers are ratios to baselines
measured in the same run):

1. model delivery throughput (the agent pulling the MiniLM artifact in windows of verified chunks,
   as a real `agent run` subprocess) vs the raw broker throughput of the same chunk frames
   published by a plain paho client to a plain paho subscriber (target >= 50%);
2. the agent's idle RSS without a model (target <= 40 MB) and with MiniLM loaded;
3. the CPU the telemetry loop costs (agent idle vs telemetry every 0.5 s).

    .venv/bin/python bench/agent.py [--window 16] [--no-results]

Appends its table to bench/RESULTS.md under "## Agent (bench/agent.py)".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

DEVICE, DEVICE_PW, BUILDER_PW = "bench-dev", "bench-pw", "builder-pw"
RESULTS_HEADING = "## Agent (bench/agent.py)"
NOTE = ("Reading it: the chunk phase is the apples-to-apples ratio (the same frames, but the agent also checks each chunk's sha256, writes the resumable .part file, decompresses and hashes the payload on the fly); the end-to-end line adds the signature check, free-disk check and fsync. On this shared 2-core VM (load average 7-14 from other jobs) the chunk-phase ratio ranged 0.31-0.55 over four runs with these settings: the agent needs ~0.75 CPU-s per 83 MB and waits for a core, so the ratio tracks the machine's load. Idle RSS is a real `agent run` without a model (numpy, onnxruntime and cryptography are imported lazily).")


def export_minilm_artifact(work: Path, private_key) -> Path:
    """MiniLM -> ONNX (torch exporter) -> signed artifact with a real sample and expected outputs."""
    import onnxruntime as ort
    import torch

    from agent.manifest import Target, TensorSpec
    from builder.artifacts.packaging import package_artifact
    from builder.zoo import minilm

    torch.set_num_threads(2)
    model = minilm.minilm()
    inputs = minilm.tokenize(minilm.machine_sentences(limit=4)[:1])
    onnx_path = work / "minilm.onnx"
    with torch.no_grad():
        torch.onnx.export(model, (torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"])),
                          str(onnx_path), input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          opset_version=17, dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    expected = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    np.savez(work / "sample.npz", **{"in:input_ids": inputs["input_ids"], "in:attention_mask": inputs["attention_mask"],
                                     "out:embedding": expected})
    seq = inputs["input_ids"].shape[1]
    dest = work / "artifact-minilm"
    package_artifact(dest, {"model.onnx": (onnx_path, "model"), "sample.npz": (work / "sample.npz", "sample")},
                     model_name="all-MiniLM-L6-v2", model_version="fp32",
                     target=Target(profile="x86-64-host", runtime="onnxruntime",
                                   execution_providers=("CPUExecutionProvider",), precision="fp32", format="onnx",
                                   runtime_options={"intra_op_num_threads": 1}),
                     inputs=[TensorSpec("input_ids", (1, seq), "int64"), TensorSpec("attention_mask", (1, seq), "int64")],
                     outputs=[TensorSpec("embedding", (1, 384), "float32")], private_key=private_key)
    return dest


def raw_broker_throughput(port: int, frames: list[bytes], runs: int = 2, inflight: int = 64) -> float:
    """Bytes/s of the same frames, plain paho publisher -> broker -> plain paho subscriber (QoS 1)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from agent import protocol as proto

    topic = proto.device_topic(DEVICE, proto.Down.CHUNKS)
    total = sum(len(f) for f in frames)
    best = 0.0
    for run in range(runs):
        done = threading.Event()
        received = {"n": 0}
        sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{run}", protocol=mqtt.MQTTv5)
        sub.username_pw_set(DEVICE, DEVICE_PW)

        def on_message(c, u, m, received=received, done=done):  # this run's counter and event (B023)
            received["n"] += 1
            if received["n"] == len(frames):
                done.set()
        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda c, u, mid, rc, p, subscribed=subscribed: subscribed.set()
        sub.connect("127.0.0.1", port)
        sub.loop_start()
        sub.subscribe(topic, qos=1)
        subscribed.wait(10)
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-pub-{run}", protocol=mqtt.MQTTv5)
        pub.username_pw_set("builder", BUILDER_PW)
        pub.max_inflight_messages_set(inflight)  # the same as the chunk server's client
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        t0 = time.perf_counter()
        for frame in frames:
            pub.publish(topic, frame, qos=1)
        done.wait(120)
        elapsed = time.perf_counter() - t0
        best = max(best, total / elapsed)
        for c in (pub, sub):
            c.loop_stop()
            c.disconnect()
    return best


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(ROOT / ".venv" / "bin" / "agent"), "run", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=open(log, "ab"), env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_file(path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.1)


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=int, default=64, help="agent window_chunks")
    parser.add_argument("--repeat", type=int, default=3, help="deliveries (fresh agent each); the best counts, as for the raw baseline")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--artifact", type=Path, default=None,
                        help="reuse a MiniLM artifact dir from an earlier run (signed with --key-dir's key)")
    args = parser.parse_args()

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent import protocol as proto
    from builder.fleet.transport.chunk_server import ChunkServer
    from tests.agent.conftest import Host, agent_toml
    from tests.support.broker import MosquittoBroker

    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    pub_pem = work / "trusted.pub.pem"
    if args.artifact is not None:
        artifact = args.artifact.resolve()
        pub_pem.write_bytes((artifact.parent / "trusted.pub.pem").read_bytes())
    else:
        key = Ed25519PrivateKey.generate()
        pub_pem.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
        print("exporting MiniLM and packaging the artifact ...", flush=True)
        t0 = time.perf_counter()
        artifact = export_minilm_artifact(work, key)
        print(f"  done in {time.perf_counter() - t0:.0f} s (reuse with --artifact {artifact})", flush=True)
    manifest = json.loads((artifact / "manifest.json").read_text())
    artifact_id = manifest["artifact_id"]
    raw_bytes = sum(p["size_bytes"] for p in manifest["payloads"])

    rows: list[tuple[str, str, str, str]] = []
    with MosquittoBroker(devices={DEVICE: DEVICE_PW}, builder_password=BUILDER_PW) as broker:
        # -- compressed chunk frames, exactly as the chunk server sends them -------------------------
        server = ChunkServer(_NullClient(), {artifact_id: artifact}.get)
        t0 = time.perf_counter()
        streams = [server.compressed(artifact_id, p["name"]) for p in manifest["payloads"]]
        compress_s = time.perf_counter() - t0
        compressed_bytes = sum(len(s.data) for s in streams)
        for s in streams:
            server.serve_request(DEVICE, proto.ChunkRequest(request_id="x", artifact_id=artifact_id, payload=s.name,
                                                            start_index=0, count=256))
            # windows of 256: enough for the whole stream in a few requests
            for start in range(256, s.chunk_count, 256):
                server.serve_request(DEVICE, proto.ChunkRequest(request_id="x", artifact_id=artifact_id,
                                                                payload=s.name, start_index=start, count=256))
        frames = server.client.frames
        print(f"raw broker throughput over {len(frames)} frames ...", flush=True)
        raw_bps = raw_broker_throughput(broker.port, frames, inflight=64)

        # -- the agent: idle RSS without a model, then delivery (best of --repeat fresh agents) -----
        best_transfer_s, t_active_s, idle_rss, loaded_rss = float("inf"), 0.0, 0, 0
        best_chunk_phase_s = float("inf")
        for attempt in range(args.repeat):
            data = work / f"data{attempt}"
            config = agent_toml(work / f"agent{attempt}.toml", broker.url, DEVICE, DEVICE_PW, pub_pem, data,
                                window_chunks=args.window, telemetry_interval_s=60.0)
            agent = start_agent(config, work / "agent.log")
            last = attempt == args.repeat - 1
            try:
                wait_file(data / "agent.json")
                proc = psutil.Process(agent.pid)
                time.sleep(5)
                idle_rss = max(idle_rss, proc.memory_info().rss)
                host = Host(broker.url, {artifact_id: artifact}, password=BUILDER_PW)
                host.server._cache.update(server._cache)  # compressed once, as `builder serve` does
                time.sleep(0.5)
                from builder.fleet.transport.chunk_server import clear_desired, publish_desired

                cpu_agent0, cpu_host0 = cpu_seconds(proc), cpu_seconds(psutil.Process())
                broker_proc = psutil.Process(broker.process.pid)
                cpu_broker0 = cpu_seconds(broker_proc)
                t_publish = time.perf_counter()
                publish_desired(host.client, DEVICE, artifact, deployment_id=f"bench-{attempt}")
                host.wait_progress(DEVICE, artifact_id, ("installing", "failed", "rejected"), 300)
                t_installing = time.perf_counter()
                cpu_used = {"agent": cpu_seconds(proc) - cpu_agent0, "host": cpu_seconds(psutil.Process()) - cpu_host0,
                            "broker": cpu_seconds(broker_proc) - cpu_broker0}
                print(f"  delivery {attempt}: {t_installing - t_publish:.2f} s wall; CPU s: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in cpu_used.items()), flush=True)
                final = host.wait_progress(DEVICE, artifact_id, ("active", "failed"), 300)
                t_active = time.perf_counter()
                if final.state != "active":
                    raise RuntimeError(f"delivery failed: {final.error}")
                if t_installing - t_publish < best_transfer_s:
                    best_transfer_s, t_active_s = t_installing - t_publish, t_active - t_publish
                install = host.wait(lambda host=host: [json.loads(t) for t in host.of_kind(DEVICE, proto.Up.TELEMETRY)
                                             if json.loads(t)["event"] == "install"], 30, "install telemetry")[-1]
                transfer = install["details"]["transfer"]
                best_chunk_phase_s = min(best_chunk_phase_s, transfer["chunk_phase_s"])
                time.sleep(2)
                loaded_rss = max(loaded_rss, proc.memory_info().rss)
                if last:  # -- telemetry CPU on the last agent ----------------------------------
                    host.command(DEVICE, "set_telemetry_interval", {"seconds": 60})
                    time.sleep(1)
                    c0 = cpu_seconds(proc)
                    time.sleep(10)
                    idle_cpu = (cpu_seconds(proc) - c0) / 10
                    n0 = len(host.of_kind(DEVICE, proto.Up.TELEMETRY))
                    host.command(DEVICE, "set_telemetry_interval", {"seconds": 0.5})
                    c0 = cpu_seconds(proc)
                    time.sleep(10)
                    busy_cpu = (cpu_seconds(proc) - c0) / 10
                    reports = len(host.of_kind(DEVICE, proto.Up.TELEMETRY)) - n0
                clear_desired(host.client, DEVICE)
                host.close()
            finally:
                agent.terminate()
                agent.wait(20)
        delivery_bps = compressed_bytes / best_chunk_phase_s
        end_to_end_bps = compressed_bytes / best_transfer_s

    per_report_ms = max(busy_cpu - idle_cpu, 0.0) * 10 / max(reports, 1) * 1000
    ratio = delivery_bps / raw_bps
    rows = [
        ("model delivery: chunk phase (request -> verified, decompressed)", f"{delivery_bps / 1e6:.1f} MB/s",
         f"raw broker {raw_bps / 1e6:.1f} MB/s", f"{ratio:.2f}x (target >= 0.50)"),
        ("model delivery: desired published -> payloads verified on disk", f"{end_to_end_bps / 1e6:.1f} MB/s",
         f"raw broker {raw_bps / 1e6:.1f} MB/s", f"{end_to_end_bps / raw_bps:.2f}x"),
        ("  payload raw / compressed", f"{raw_bytes / 1e6:.1f} MB", f"{compressed_bytes / 1e6:.1f} MB",
         f"{compressed_bytes / raw_bytes:.2f}"),
        ("  desired -> active (incl. load + health check)", f"{t_active_s:.2f} s",
         f"transfer {best_transfer_s:.2f} s", f"compress once {compress_s:.2f} s"),
        ("agent idle RSS, no model", f"{idle_rss / 1e6:.1f} MB", "target 40 MB", f"{idle_rss / 40e6:.2f}x"),
        ("agent RSS, MiniLM active", f"{loaded_rss / 1e6:.1f} MB", f"idle {idle_rss / 1e6:.1f} MB",
         f"{loaded_rss / idle_rss:.2f}x"),
        ("telemetry CPU per report", f"{per_report_ms:.1f} ms", f"{reports} reports in 10 s",
         f"{per_report_ms / 30000 * 100:.3f}% CPU at the 30 s default"),
        ("agent CPU, idle with model", f"{idle_cpu * 100:.2f}%", f"telemetry every 0.5 s: {busy_cpu * 100:.2f}%",
         f"{(busy_cpu - idle_cpu) * 100:.2f} points"),
    ]
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench/agent.py (loopback Mosquitto, window {args.window} chunks)")
    for column in ("measure", "value", "baseline (same run)", "ratio"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    Console(width=170).print(table)
    if not args.no_results:
        append_results(rows, args.window)
    return 0 if ratio >= 0.5 and idle_rss <= 40e6 else 1


class _NullClient:
    """Collects the frames the chunk server would publish (for the raw-broker baseline)."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def publish(self, topic, payload, qos=0, retain=False):
        self.frames.append(payload)


def append_results(rows, window: int) -> None:
    """Replace (or add) this benchmark's section in bench/RESULTS.md, leaving other sections alone."""
    path = ROOT / "bench" / "RESULTS.md"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = f"{psutil.cpu_count()} CPUs"
    lines = [RESULTS_HEADING, "", f"{stamp}, {cpu}, loopback Mosquitto, agent window {window} chunks, "
             "agent as a real `agent run` subprocess. Regenerate: `.venv/bin/python bench/agent.py`.", "",
             "| measure | value | baseline (same run) | ratio |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    lines += ["", NOTE]
    from bench.results_file import replace_section

    replace_section(path, RESULTS_HEADING, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
