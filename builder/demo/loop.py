"""The `loop` stage of ``python -m builder.demo``: one device slowed down on purpose and the
re-compression loop reacting (a real `builder serve`, `agent run` and `builder` commands).

Alone: ``python -m builder.demo.loop [OUT_DIR]``. The ladder, its calibration on the device and the
field traffic come from :mod:`builder.zoo.digits_ladder` (the loop's end-to-end test uses them too).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from builder.demo.child_processes import ChildProcesses
from builder.errors import DemoError
from builder.fleet.loop.service import summarize_events
from builder.zoo.digits_ladder import (
    PROFILE, SLOWDOWN, THROTTLE_POLICY, BuiltRung, LoadGenerator, build_digits_ladder, calibrate_ladder_on_device,
    throttled_objective_ms, throttled_p95_ms,
)

DEMO_DEVICE = "pi-loop"


class LoopDemo:
    """`builder serve` (embedded broker, loop on), one `agent run`, the digits ladder, field traffic,
    `builder fleet load` on and off, and `builder fleet events` at the end. Everything under out_dir."""

    def __init__(self, out_dir: Path, say: Any = print) -> None:
        import os

        self.out_dir = Path(out_dir).resolve()
        self.home = self.out_dir / "home"
        self.say = say
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "COLUMNS": "200", "EDGEFLEET_HOME": str(self.home)}
        self.children = ChildProcesses(self.out_dir / "logs", self.env)
        self.summary: dict[str, Any] = {}

    def builder(self, *args: str, show: bool = True) -> str:
        import subprocess
        import sys

        if show:
            self.say("$ builder " + " ".join(args))
        try:
            result = subprocess.run([sys.executable, "-m", "builder.cli.main", *args], env=self.env, text=True,
                                    capture_output=True, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"`builder {' '.join(args[:3])}` took longer than 600 s") from exc
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if line.startswith("builder: error:")]
            detail = errors[-1] if errors else " ".join(result.stderr.strip().splitlines()[-1:])
            raise DemoError(f"`builder {' '.join(args[:3])}` failed (exit {result.returncode}): {detail}")
        if show and result.stdout.strip():
            self.say(result.stdout.rstrip())
        return result.stdout

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            self.children.stop_all()

    def _run(self) -> dict[str, Any]:
        import socket
        import sys

        from builder.artifacts.signing import init_keys, key_paths, load_private_key
        from builder.fleet.loop.service import count_changes, latency_factors, loop_events
        from builder.fleet.transport.devices import add_device
        from builder.fleet.transport.store import open_store

        keys = key_paths(self.home / "keys")
        if not keys.private.exists():
            keys = init_keys(self.home / "keys")
        self.say("training and registering the ladder: wide (width 80) / broken (health check fails) / narrow (width 8)")
        rungs = build_digits_ladder(self.home, load_private_key(keys.private), self.out_dir / "build")
        labels = {r.artifact_id: r.label for r in rungs}
        for r in rungs:
            self.say(f"   rung {r.label:<7} {r.artifact_id[:12]}  accuracy {r.metrics['accuracy']:.3f}  "
                     f"host p50 {r.metrics['device_latency_ms']:.3f} ms")
        self.children.start("serve", [sys.executable, "-m", "builder.cli.main", "serve", "--port", "0"])
        self.children.wait_for(lambda: (self.home / "serve.json").is_file(), 180, "builder serve")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        added = add_device(self.home, DEMO_DEVICE, PROFILE, agent_data_dir=str(self.out_dir / "agent"),
                           telemetry_interval_s=1.0, http_port=port, force=True,
                           extra_agent_settings={"threads": 1, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0})
        self.children.start("agent", [sys.executable, "-c", "import sys; from agent.cli import app; sys.argv[0] = 'agent'; app()",
                             "run", "--config", str(added.agent_toml)])
        store = open_store(self.home)
        try:
            self.children.wait_for(lambda: (d := store.find_device(DEMO_DEVICE)) is not None and d.online, 180, "the agent online")
            load = LoadGenerator(f"http://127.0.0.1:{port}", rate_hz=50).start()
            try:
                result = self._react(store, rungs, labels, load)
            finally:
                load.stop()
            events = loop_events(store, DEMO_DEVICE)
            factor = latency_factors(store).get(DEMO_DEVICE)
        finally:
            store.close()
        self.say("\nthe loop's decisions (reasons and numbers in --json):")
        self.builder("fleet", "events", "--device", DEMO_DEVICE)
        self.builder("fleet", "status", "--factors")
        (self.out_dir / "loop-events.json").write_text(self.builder("fleet", "events", "--device", DEMO_DEVICE, "--json",
                                                                    show=False), encoding="utf-8")
        self.summary = {**result, "changes": count_changes(events),
                        "latency_factor": factor,
                        "events": summarize_events(events, labels)}
        (self.out_dir / "loop-summary.json").write_text(json.dumps(self.summary, indent=2), encoding="utf-8")
        return self.summary

    def _react(self, store: Any, rungs: Sequence[BuiltRung], labels: dict[str, str], load: LoadGenerator) -> dict[str, Any]:
        import statistics

        from builder.fleet.loop.service import loop_events

        def windows(since: float) -> list[Any]:
            return [r for r in store.telemetry(DEMO_DEVICE, since=since) if r.requests > 0 and r.p95_ms is not None]

        def push(device_id: str, artifact_id: str) -> None:
            self.builder("push", "--device", device_id, "--artifact", artifact_id, "--benchmark-runs", "5", show=False)

        def throttle(factor: float) -> None:
            self.builder("fleet", "load", "--device", DEMO_DEVICE, "--slowdown", f"{factor:g}", show=False)

        self.say(f"calibrating the ladder on the device: field p50/p95 of the narrow, then the wide rung, "
                 f"unthrottled and slowed down x{SLOWDOWN:g}")
        rungs = calibrate_ladder_on_device(self.home, store, DEMO_DEVICE, rungs, push, throttle, SLOWDOWN)
        est = {r.label: r.metrics["device_latency_ms"] for r in rungs}
        p50 = {r.label: r.metrics["field_p50_ms"] for r in rungs}
        start = time.time()
        wide_id = rungs[0].artifact_id

        def on_wide() -> bool:
            # The fleet store must say so too: the loop judges the rung the store names, and on a
            # loaded host a status report can lag (once the loop took the calibration's narrow
            # windows for the current rung, stepped up from it and never saw the wide one throttled).
            device = store.find_device(DEMO_DEVICE)
            return (device is not None and device.active_artifact_id == wide_id
                    and len([w for w in windows(start) if w.model_id == wide_id]) >= 3)
        self.children.wait_for(on_wide, 120, "the fleet store to show 3 windows on the wide rung")
        base_p95 = statistics.median(w.p95_ms for w in windows(start))
        objective = throttled_objective_ms(rungs, SLOWDOWN)
        slow = {r.label: throttled_p95_ms(r, SLOWDOWN) for r in rungs}
        self.say(f"field latency unthrottled: wide p50 {p50['wide']:.2f} / p95 {est['wide']:.2f} ms, "
                 f"narrow p50 {p50['narrow']:.2f} / p95 {est['narrow']:.2f} ms; slowed down x{SLOWDOWN:g}: "
                 f"p95 wide {slow['wide']:.1f}, narrow {slow['narrow']:.1f} ms; objective {objective} ms")
        policy = self.out_dir / "policy.toml"
        policy.write_text(THROTTLE_POLICY.format(objective=objective, slowdown=SLOWDOWN), encoding="utf-8")
        self.builder("fleet", "policy", "set", "--device", DEMO_DEVICE, "--file", str(policy))
        narrow = rungs[-1].artifact_id
        wide = rungs[0].artifact_id

        def settled(artifact: str, after: float) -> bool:
            """The loop kept ``artifact`` (True), or is still at it (False); a DemoError with the loop's
            own reason when it rolled that rung back for good."""
            for e in loop_events(store, DEMO_DEVICE):
                if e.ts <= after:
                    continue
                if e.kind == "loop.accept" and e.artifact_id == artifact:
                    return True
                if e.kind == "loop.rollback" and (e.detail or {}).get("mark_bad") == artifact:
                    raise DemoError(f"the loop rolled the {labels.get(artifact, artifact[:12])} rung back: "
                                    f"{(e.detail or {}).get('reason', 'no reason recorded')}; "
                                    f"`builder fleet events --device {DEMO_DEVICE} --data-dir {self.home}` has the numbers")
            return False

        throttle_at = time.time()
        self.builder("fleet", "load", "--device", DEMO_DEVICE, "--slowdown", f"{SLOWDOWN:g}")
        self.children.wait_for(lambda: settled(narrow, throttle_at), 180, "the loop to step down")
        events = loop_events(store, DEMO_DEVICE)
        first_down = next(e for e in events if e.kind == "loop.step_down")
        accepted = next(e for e in events if e.kind == "loop.accept" and e.artifact_id == narrow)
        react_windows = len([w for w in windows(throttle_at) if w.ts <= first_down.ts])
        self.children.wait_for(lambda: len([w for w in windows(accepted.ts) if w.model_id == narrow]) >= 4, 30,
                      "4 windows on the narrow rung")
        narrow_p95 = statistics.median(w.p95_ms for w in windows(accepted.ts) if w.model_id == narrow)
        # The windows the loop acted on (the first windows after `fleet load` may predate the slowdown).
        wide_throttled = float((first_down.detail or {}).get("numbers", {}).get("baseline_p95_ms") or statistics.median(
            w.p95_ms for w in windows(throttle_at) if w.model_id == wide and w.ts <= first_down.ts))
        self.say(f"throttled x{SLOWDOWN:g}: wide p95 {wide_throttled:.1f} ms > objective {objective} ms; "
                 f"the loop reacted after {react_windows} windows; narrow rung p95 {narrow_p95:.1f} ms")

        off_at = time.time()
        self.builder("fleet", "load", "--device", DEMO_DEVICE, "--slowdown", "1")
        self.children.wait_for(lambda: any(e.kind == "loop.accept" and e.artifact_id == wide and e.ts > off_at
                                           for e in loop_events(store, DEMO_DEVICE)), 180, "the loop to step back up")
        up = next(e for e in loop_events(store, DEMO_DEVICE) if e.kind == "loop.step_up" and e.ts > off_at)
        up_windows = len([w for w in windows(off_at) if w.ts <= up.ts])
        self.say(f"throttle off: back on the wide rung after {up_windows} windows of headroom")
        return {"objective_p95_ms": objective, "wide_unthrottled_p95_ms": round(est["wide"], 3),
                "narrow_unthrottled_p95_ms": round(est["narrow"], 3), "wide_unthrottled_p50_ms": round(p50["wide"], 3),
                "narrow_unthrottled_p50_ms": round(p50["narrow"], 3),
                "wide_calibrated_throttled_p95_ms": round(slow["wide"], 3),
                "narrow_calibrated_throttled_p95_ms": round(slow["narrow"], 3), "wide_p95_after_calibration_ms": round(base_p95, 3),
                "wide_throttled_p95_ms": round(wide_throttled, 3), "narrow_throttled_p95_ms": round(narrow_p95, 3),
                "windows_to_react": react_windows, "windows_to_step_up": up_windows,
                "requests_sent": load.sent, "request_errors": load.errors}


def demo_stage(ctx: Any) -> None:
    """The `make demo` stage: throttle one device and show the loop reacting (~2 minutes)."""
    demo = LoopDemo(ctx.out_dir / "loop", say=ctx.console.print)
    summary = demo.run()
    for name in ("loop-events.json", "loop-summary.json", "policy.toml"):
        ctx.wrote(demo.out_dir / name)
    ctx.results["loop"] = summary


def main(argv: Optional[list[str]] = None) -> None:
    import sys

    from builder.cli.errors import guarded
    from builder.demo.output import prepare_output_dir
    from builder.errors import BuilderError

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path("demo-out") / "loop"

    def run() -> None:
        summary = LoopDemo(prepare_output_dir(out, keep=())).run()
        print(json.dumps({k: v for k, v in summary.items() if k != "events"}, indent=2))
    guarded(run, (BuilderError,), "loop_demo")


if __name__ == "__main__":
    main()
