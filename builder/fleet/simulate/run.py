"""The shell of ``builder fleet simulate``: register (optionally), connect, run telemetry and an
outbox flush for a while, answer pushes, and summarise. ``run_simulation`` owns the event loop."""
from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from builder.fleet.simulate.device import AckSender, Behaviour, DeviceIdentity, PubackSender
from builder.fleet.simulate.fleet import FleetTotals, Overhead, SimulatedFleet


@dataclass(frozen=True)
class SimulationPlan:
    duration_s: float = 60.0  # 0: until SIGINT/SIGTERM
    flush_records: int = 0  # each device flushes this many buffered reports right after connecting
    telemetry: bool = True
    seed: int = 0
    acks: bool = True  # False: the devices forget a report at the broker's PUBACK (the rule before acks)


@dataclass(frozen=True)
class SimulationSummary:
    totals: FleetTotals
    overhead: Overhead
    connect_s: float
    active_artifacts: dict[str, int]  # artifact id -> devices running it

    def to_dict(self) -> dict[str, Any]:
        return {"totals": asdict(self.totals), "overhead": {**asdict(self.overhead), "cpu_percent": round(self.overhead.cpu_percent, 1)},
                "connect_s": round(self.connect_s, 3), "active_artifacts": self.active_artifacts}


def normalise_broker_url(text: str | None) -> str | None:
    """``HOST:PORT`` or a URL; the agent's config parser checks the rest."""
    if text is None or "://" in text:
        return text
    return f"mqtt://{text}"


def reload_broker(pid: int) -> None:
    """A running Mosquitto loads new users on SIGHUP."""
    os.kill(pid, signal.SIGHUP)


def run_simulation(identities: Sequence[DeviceIdentity], behaviour: Behaviour, plan: SimulationPlan,
                   on_started: Callable[[SimulatedFleet], None] | None = None,
                   on_stopped: Callable[[SimulatedFleet], None] | None = None) -> SimulationSummary:
    return asyncio.run(_simulate(identities, behaviour, plan, on_started, on_stopped))


async def _simulate(identities: Sequence[DeviceIdentity], behaviour: Behaviour, plan: SimulationPlan,
                    on_started: Callable[[SimulatedFleet], None] | None,
                    on_stopped: Callable[[SimulatedFleet], None] | None) -> SimulationSummary:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    fleet = SimulatedFleet(identities, behaviour, seed=plan.seed, sender_factory=AckSender if plan.acks else PubackSender)
    started = loop.time()
    await fleet.start()
    connect_s = loop.time() - started
    mark = fleet.overhead_mark()
    if on_started is not None:
        on_started(fleet)
    if plan.flush_records:
        await fleet.flush_outbox(plan.flush_records)
    if plan.telemetry:
        fleet.start_telemetry()
    try:
        if plan.duration_s > 0:
            await asyncio.wait_for(stop.wait(), timeout=plan.duration_s)
        else:
            await stop.wait()
    except asyncio.TimeoutError:
        pass
    fleet.stop_telemetry()
    await fleet.wait_acked(timeout_s=10.0 if plan.acks else 5.0)
    overhead = fleet.overhead_since(mark)
    totals = fleet.totals()
    active: dict[str, int] = {}
    for device in fleet.devices:
        if device.active_artifact_id:
            active[device.active_artifact_id] = active.get(device.active_artifact_id, 0) + 1
    await fleet.stop()
    if on_stopped is not None:
        on_stopped(fleet)
    return SimulationSummary(totals=totals, overhead=overhead, connect_s=connect_s, active_artifacts=active)


def ids_and_identities(data_dir: Path, count: int, prefix: str, broker_url: str | None, *, register: bool,
                       broker_config_dir: Path | None, profile: str, group: str | None,
                       broker_port: int) -> tuple[list[str], list[DeviceIdentity]]:
    from builder.errors import UsageError
    from builder.fleet.simulate.register import load_identities, register_devices, simulated_ids

    ids = simulated_ids(count, prefix)
    newly: list[str] = []
    if register:
        if broker_config_dir is None:
            raise UsageError("--register needs --broker-config-dir (the Mosquitto config the devices' users go into)")
        newly = register_devices(data_dir, ids, profile, broker_config_dir=broker_config_dir, broker_port=broker_port,
                                 broker_url=broker_url, group=group)
    return newly, load_identities(data_dir, ids, broker_url)
