"""N simulated devices on ONE asyncio event loop in one thread: connections are multiplexed by the
loop's selector (``agent.mqtt.LoopMqttClient``), telemetry is scheduled by one ticker with each
device at its own phase of the interval, and the simulator measures its own overhead (CPU seconds
of this process and how late the loop wakes up) so a benchmark can tell when the simulator, not
the host, is the bottleneck.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Sequence

from agent.bench import percentile
from builder.fleet.simulate.device import AckSender, Behaviour, DeviceIdentity, SenderFactory, SimulatedDevice

log = logging.getLogger(__name__)

TICK_S = 0.05  # telemetry scheduling resolution; keep-alives are checked every second


@dataclass(frozen=True)
class FleetTotals:
    """What the simulated fleet did, summed over its devices."""

    devices: int
    connected: int
    records_built: int
    records_published: int
    records_resent: int
    records_acked: int  # delivered by the devices' rule: host-acked (stored), or PUBACKed with --no-acks
    records_pubacked: int
    records_unacked: int  # still in the devices' outboxes
    acks_received: int
    chunk_requests: int
    chunk_frames: int
    chunk_bytes_received: int
    active_deployments: int
    errors: int


@dataclass(frozen=True)
class Overhead:
    """The simulator's own cost over a measured span: process CPU, and event-loop lag (how late a
    0.05 s timer fires; high lag means the simulator itself is saturated)."""

    wall_s: float
    cpu_s: float
    loop_lag_p50_ms: float
    loop_lag_p99_ms: float
    loop_lag_max_ms: float

    @property
    def cpu_percent(self) -> float:
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s else 0.0


class SimulatedFleet:
    """Use inside a running event loop: ``await fleet.start()``, then the scenario methods, then
    ``await fleet.stop()``."""

    def __init__(self, identities: Sequence[DeviceIdentity], behaviour: Behaviour = Behaviour(), *, seed: int = 0,
                 sender_factory: SenderFactory = AckSender) -> None:
        self.identities = list(identities)
        self.behaviour = behaviour
        self.seed = seed
        self.sender_factory = sender_factory
        self.devices: list[SimulatedDevice] = []
        self._ticker: asyncio.Task[None] | None = None
        self._telemetry_on = False
        self._next_due: list[float] = []
        self._lags_ms: list[float] = []

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self, connect_timeout_s: float = 60.0, batch: int = 50) -> None:
        """Connect every device (in batches, letting CONNACKs in between); raise TimeoutError if
        some are still not connected after ``connect_timeout_s``."""
        loop = asyncio.get_running_loop()
        master = random.Random(self.seed)
        self.devices = [SimulatedDevice(identity, self.behaviour, loop, random.Random(master.getrandbits(64)),
                                        sender_factory=self.sender_factory) for identity in self.identities]
        for start in range(0, len(self.devices), batch):
            for device in self.devices[start:start + batch]:
                device.start()
            await asyncio.sleep(0.01)
        self._ticker = asyncio.create_task(self._tick_forever())
        deadline = time.monotonic() + connect_timeout_s
        while not all(d.connected for d in self.devices):
            if time.monotonic() > deadline:
                missing = [d.device_id for d in self.devices if not d.connected]
                errors = {d.client.last_error for d in self.devices if not d.connected}
                raise TimeoutError(f"{len(missing)} of {len(self.devices)} simulated devices not connected after "
                                   f"{connect_timeout_s:.0f} s (e.g. {missing[:3]}; {sorted(e or '?' for e in errors)[:3]})")
            await asyncio.sleep(0.05)

    async def stop(self, linger_s: float = 0.5) -> None:
        self._telemetry_on = False
        for device in self.devices:
            device.stop()
        await asyncio.sleep(linger_s)  # the final statuses and DISCONNECTs go out
        if self._ticker is not None:
            self._ticker.cancel()
            try:
                await self._ticker
            except asyncio.CancelledError:
                pass

    async def _tick_forever(self) -> None:
        loop = asyncio.get_running_loop()
        last_misc = 0.0
        expected = loop.time() + TICK_S
        while True:
            await asyncio.sleep(max(0.0, expected - loop.time()))
            now = loop.time()
            self._lags_ms.append(max(0.0, (now - expected) * 1000.0))
            expected = now + TICK_S
            if now - last_misc >= 1.0:
                last_misc = now
                mono = time.monotonic()
                for device in self.devices:
                    device.tick(mono)
            if self._telemetry_on:
                for index, due in enumerate(self._next_due):
                    if now >= due:
                        device = self.devices[index]
                        device.emit_telemetry()
                        self._next_due[index] = due + device.telemetry_interval_s

    # -- scenarios ------------------------------------------------------------------------------
    def start_telemetry(self) -> None:
        """Every device reports every ``telemetry_interval_s``, phases spread over the interval."""
        now = asyncio.get_running_loop().time()
        rng = random.Random(self.seed + 1)
        self._next_due = [now + rng.uniform(0.0, d.telemetry_interval_s) for d in self.devices]
        self._telemetry_on = True

    def stop_telemetry(self) -> None:
        self._telemetry_on = False

    async def flush_outbox(self, records_per_device: int, devices_per_slice: int = 10) -> int:
        """Every device sends ``records_per_device`` buffered reports at once; returns how many.
        The loop gets control back every ``devices_per_slice`` devices, so the first devices' bursts
        are on the wire while the next ones are built (building 20,000 reports takes seconds of CPU:
        done in one go, the simulator's own delay would count as the host's ingest latency)."""
        for index, device in enumerate(self.devices):
            device.flush_outbox(records_per_device)
            if index % devices_per_slice == devices_per_slice - 1:
                await asyncio.sleep(0)
        return records_per_device * len(self.devices)

    async def wait_acked(self, timeout_s: float) -> bool:
        """Until every record built is delivered by the devices' rule: acknowledged by the host as
        stored (``AckSender``), or PUBACKed by the broker (``PubackSender``, ``--no-acks``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            totals = self.totals()
            if totals.records_acked >= totals.records_built:
                return True
            await asyncio.sleep(0.05)
        return False

    async def wait_active(self, artifact_id: str, timeout_s: float) -> float | None:
        """Seconds until every device runs ``artifact_id``; None on timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if all(d.active_artifact_id == artifact_id for d in self.devices):
                return time.monotonic() - started
            await asyncio.sleep(0.02)
        return None

    # -- measurements ---------------------------------------------------------------------------
    def totals(self) -> FleetTotals:
        c = [d.counters for d in self.devices]
        return FleetTotals(
            devices=len(self.devices), connected=sum(1 for d in self.devices if d.connected),
            records_built=sum(x.records_built for x in c), records_published=sum(x.records_published for x in c),
            records_resent=sum(x.records_resent for x in c), records_acked=sum(x.records_acked for x in c),
            records_pubacked=sum(x.records_pubacked for x in c), records_unacked=sum(d.records.unacked for d in self.devices),
            acks_received=sum(x.acks_received for x in c), chunk_requests=sum(x.chunk_requests for x in c),
            chunk_frames=sum(x.chunk_frames for x in c), chunk_bytes_received=sum(x.chunk_bytes_received for x in c),
            active_deployments=sum(1 for x in c for dep in x.deployments.values() if dep.get("state") == "active"),
            errors=sum(x.errors for x in c))

    def overhead_mark(self) -> tuple[float, float, int]:
        """Start of a measured span (pass it to ``overhead_since``)."""
        return time.monotonic(), time.process_time(), len(self._lags_ms)

    def overhead_since(self, mark: tuple[float, float, int]) -> Overhead:
        wall0, cpu0, lag_index = mark
        lags = sorted(self._lags_ms[lag_index:]) or [0.0]
        return Overhead(wall_s=time.monotonic() - wall0, cpu_s=time.process_time() - cpu0,
                        loop_lag_p50_ms=round(percentile(lags, 50), 2), loop_lag_p99_ms=round(percentile(lags, 99), 2),
                        loop_lag_max_ms=round(lags[-1], 2))
