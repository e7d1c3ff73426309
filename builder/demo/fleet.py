"""The fleet part of `make demo`: one machine plays a whole fleet.

Stages (each printed with its time): signing keys; MiniLM compressed and built per device profile;
the embedded broker and `builder serve` (a subprocess); three `agent run` processes posing as a
Raspberry Pi 4, a Jetson Orin Nano and an Android phone (own data dir and profile each); `builder
push` to each; real requests to each agent's local endpoint (field latency); `builder fleet
status`; a latency/power plot per device. Everything is written under ``out_dir``.

``builder.demo`` calls ``run_fleet_demo``; ``python -m builder.demo.fleet OUT_DIR`` runs it alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, Callable

from builder.demo.child_processes import ChildProcesses
from builder.errors import DemoError
from builder.fleet.transport.store import FLEET_STORE_FILE

MINILM = "builder.zoo.minilm:minilm"
MINILM_SHAPES = "input_ids=1x128:int64,attention_mask=1x128:int64"
DEVICES = {"pi-kitchen": "raspberry-pi-4", "jetson-garage": "jetson-orin-nano", "phone-anna": "android-arm64"}
SENTENCES = ["The device keeps its previous model when the health check fails.",
             "Edge inference trades accuracy for latency and energy.",
             "A canary rollout stops when the new model is slower.",
             "Telemetry arrives in order after the broker comes back."]
CHILD_ENV_EXTRA = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "160"}


@dataclass
class FleetDemo:
    """State shared by the stages (paths, processes, artifact ids)."""

    out_dir: Path
    say: Callable[[str], None] = print
    minilm_onnx: Path | None = None  # MiniLM already exported (the demo's analyse stage): skips a re-export
    litert_budget_s: float = 240.0
    traffic_s: float = 8.0
    home_dir: InitVar[Path | None] = None  # default: out_dir/home (its own registry, store and keys)
    artifacts: dict[str, str] = field(default_factory=dict)
    litert_devices: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    home: Path = field(init=False)  # home_dir resolved

    def __post_init__(self, home_dir: Path | None) -> None:
        self.out_dir = Path(self.out_dir).resolve()
        self.home = Path(home_dir).resolve() if home_dir else self.out_dir / "home"
        self.env = {**os.environ, **CHILD_ENV_EXTRA, "EDGEFLEET_HOME": str(self.home)}
        self.children = ChildProcesses(self.out_dir / "logs", self.env)

    # -- helpers ----------------------------------------------------------------------------
    # An hour: only a hung build should stop the demo (a MiniLM build took over 15 minutes on the
    # 2-core VM at load average 19: other jobs plus two CPU burners).
    def builder(self, *args: str, capture: bool = False, timeout_s: float = 3600) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "builder.cli.main", *args]
        # stdout (tables, progress) shows live unless captured; stderr is kept for the error's reason
        try:
            result = subprocess.run(cmd, env=self.env, timeout=timeout_s, text=True, stderr=subprocess.PIPE,
                                    stdout=subprocess.PIPE if capture else None)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"`builder {' '.join(args[:3])}` took longer than {timeout_s:.0f} s") from exc
        if result.returncode != 0:
            errors = [line for line in (result.stderr or "").splitlines() if line.startswith("builder: error:")]
            detail = errors[-1] if errors else " ".join((result.stderr or "").strip().splitlines()[-1:])
            how = f"killed by signal {-result.returncode}" if result.returncode < 0 else f"exit {result.returncode}"
            raise DemoError(f"`builder {' '.join(args[:3])}` failed ({how}){': ' + detail if detail else ''}")
        return result

    def stage(self, name: str, fn: Callable[[], None]) -> None:
        self.say(f"\n== fleet: {name} ==")
        start = time.monotonic()
        fn()
        self.timings[name] = time.monotonic() - start
        self.say(f"   ({self.timings[name]:.1f} s)")

    # -- stages -----------------------------------------------------------------------------
    def keys(self) -> None:
        from builder.artifacts.signing import init_keys, key_paths

        if not key_paths(self.home / "keys").private.exists():
            init_keys(self.home / "keys")
        self.say(f"signing keys in {self.home / 'keys'}")

    def build(self) -> None:
        """MiniLM per profile with each profile's preferred runtime/precision (cached across runs).

        ONNX Runtime builds start from the exported ONNX file when there is one; LiteRT converts the
        PyTorch model (litert-torch), so it starts from the factory."""
        for device, profile in DEVICES.items():
            if profile == "android-arm64":
                try:
                    self.say(f"{profile}: LiteRT int8 from the PyTorch model (budget {self.litert_budget_s:.0f} s)")
                    self.artifacts[device] = self._build(MINILM, profile, timeout_s=self.litert_budget_s)
                    self.litert_devices.add(device)
                except DemoError as exc:
                    timed_out = isinstance(exc.__cause__, subprocess.TimeoutExpired)
                    reason = "took longer than the demo's budget" if timed_out else str(exc)
                    self._use_ort_on_android(device, f"the LiteRT build {reason}")
            else:
                self.say(f"{profile}: the profile's preferred runtime and precision")
                self.artifacts[device] = self._build(self._source(), profile)

    def _source(self) -> str:
        return str(self.minilm_onnx) if self.minilm_onnx else MINILM

    def _build(self, source: str, profile: str, *extra: str, timeout_s: float = 3600) -> str:
        out = self.builder("build", source, "--profile", profile, "--input-shape", MINILM_SHAPES,
                           "--verify-samples", "4", *extra, capture=True, timeout_s=timeout_s)
        artifact_id = next(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("artifact id:"))
        summary = [line for line in out.stdout.splitlines() if line.startswith(("verified:", "worst:"))]
        reused = "[reused]" in out.stdout
        self.say(f"   artifact {artifact_id[:16]} " + ("(reused: same model, recipe and profile were built before)"
                                                    if reused else " ".join(summary)))
        return artifact_id

    def _use_ort_on_android(self, device: str, why: str) -> None:
        """ONNX Runtime instead of LiteRT on the Android agent. The Raspberry Pi's artifact is already an
        int8 ``.ort`` file converted for arm64, which ORT Mobile on Android runs as is: reuse it."""
        pi_device = next((d for d, p in DEVICES.items() if p == "raspberry-pi-4"), None)
        reuse = self.artifacts.get(pi_device) if pi_device else None
        what = "the Raspberry Pi's int8 .ort artifact (ORT for arm64)" if reuse else "an ONNX Runtime int8 artifact"
        note = (f"{device} (android-arm64) runs {what} instead of LiteRT: {why}. "
                "ONNX Runtime (ORT Mobile) is a supported Android runtime.")
        self.notes.append(note)
        self.say("   " + note)
        self.artifacts[device] = reuse or self._build(self._source(), "android-arm64", "--runtime", "onnxruntime",
                                                      "--precision", "int8", "--format", "ort")
        self.litert_devices.discard(device)

    def serve(self) -> None:
        self.children.start("serve", [sys.executable, "-m", "builder.cli.main", "serve", "--port", "0"])
        self.children.wait_for(lambda: (self.home / "serve.json").is_file(), 180, "builder serve")
        url = json.loads((self.home / "serve.json").read_text())["url"]
        self.say(f"`builder serve` running (pid {self.children.procs['serve'].pid}) with the embedded broker on {url}")

    def agents(self) -> None:
        from builder.fleet.transport.devices import add_device

        for device, profile in DEVICES.items():
            data_dir = self.out_dir / "agents" / device
            added = add_device(self.home, device, profile, group="demo", agent_data_dir=str(data_dir),
                               telemetry_interval_s=2.0, http_port=0, force=True,
                               extra_agent_settings={"threads": 1, "reconnect_min_s": 0.2, "reconnect_max_s": 2.0})
            (data_dir / "agent.json").unlink(missing_ok=True)
            self.children.start(device, [sys.executable, "-c", "import sys; from agent.cli import app; sys.argv[0] = 'agent'; app()",
                                "run", "--config", str(added.agent_toml)])
            self.say(f"{device}: agent process {self.children.procs[device].pid} as {profile} (config {added.agent_toml})")

        def online() -> bool:
            from builder.fleet.transport.store import open_store

            with open_store(self.home) as store:
                return all(store.device(d).online for d in DEVICES if store.find_device(d))
        self.children.wait_for(online, 240, "three agents online")  # start-up only: generous on a loaded host

    def push(self) -> None:
        for device in DEVICES:
            self.say(f"$ builder push --device {device} --artifact {self.artifacts[device][:12]}")
            try:
                self.builder("push", "--device", device, "--artifact", self.artifacts[device], "--benchmark-runs", "20")
            except DemoError as exc:
                if device not in self.litert_devices:
                    raise
                # the device refused the LiteRT model (it keeps no model): give it the ORT build instead
                self._use_ort_on_android(device, f"the device refused the LiteRT artifact ({exc})")
                self.say(f"$ builder push --device {device} --artifact {self.artifacts[device][:12]}")
                self.builder("push", "--device", device, "--artifact", self.artifacts[device], "--benchmark-runs", "20")

    def traffic(self) -> None:
        """Real requests on each device's local endpoint, all at once: what field telemetry measures."""
        import threading

        from builder.zoo.minilm import tokenize

        counts: dict[str, int] = {}
        failures: dict[str, str] = {}

        def input_names(device: str) -> dict[str, str]:
            """Model input name -> the name the artifact's runtime expects (LiteRT signature tensors)."""
            from builder.artifacts.registry import Registry

            options = dict(Registry(self.home).manifest(self.artifacts[device]).target.runtime_options)
            signature = options.get("signature")
            mapping = dict(signature.get("inputs", {})) if isinstance(signature, dict) else {}
            return {model_name: tensor for tensor, model_name in mapping.items()}

        def load(device: str) -> None:
            info = json.loads((self.out_dir / "agents" / device / "agent.json").read_text())
            names = input_names(device)
            deadline, n = time.monotonic() + self.traffic_s, 0
            while time.monotonic() < deadline:
                feeds = tokenize([SENTENCES[n % len(SENTENCES)]])
                body = json.dumps({"inputs": {names.get(k, k): v.tolist() for k, v in feeds.items()}}).encode()
                req = urllib.request.Request(info["http_url"] + "/infer", data=body, headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        resp.read()
                except urllib.error.HTTPError as exc:
                    failures[device] = f"HTTP {exc.code}: {exc.read().decode(errors='replace')[:200]}"
                    break
                n += 1
            counts[device] = n

        threads = [threading.Thread(target=load, args=(device,)) for device in DEVICES]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.say("real requests served: " + ", ".join(f"{d} {counts.get(d, 0)}" for d in DEVICES))
        for device, problem in failures.items():
            note = f"{device}: its local endpoint refused a request ({problem})"
            self.notes.append(note)
            self.say("   " + note)
        time.sleep(3.0)  # one more telemetry window reaches `builder serve`

    def status(self) -> None:
        self.builder("fleet", "status")
        result = self.builder("fleet", "status", "--json", capture=True)
        (self.out_dir / "fleet-status.json").write_text(result.stdout, encoding="utf-8")

    def plots(self) -> None:
        """The same as `builder fleet plot --device D --out FILE`, in-process (one matplotlib import)."""
        from builder.fleet.rollout.plot import plot_series, render_plot
        from builder.fleet.transport.store import open_store

        with open_store(self.home) as store:
            for device in DEVICES:
                series = plot_series(device, store.telemetry(device), store.events(device))
                out = render_plot(series, self.out_dir / "plots" / f"{device}.png")
                self.say(f"plot: {out}")

    def outputs(self) -> list[Path]:
        plots = sorted((self.out_dir / "plots").glob("*.png"))
        return [p for p in [self.out_dir / "fleet-status.json", *plots] if p.exists()]

    def run(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.stage("signing keys", self.keys)
            self.stage("MiniLM compressed and built per profile", self.build)
            self.stage("embedded broker + builder serve", self.serve)
            self.stage("three agents (Raspberry Pi 4, Jetson Orin Nano, Android)", self.agents)
            self.stage("builder push to each device", self.push)
            self.stage("field traffic on each device", self.traffic)
            self.stage("builder fleet status", self.status)
            self.stage("latency and power plots", self.plots)
        finally:
            self.children.stop_all()
        self.say("\n== fleet demo outputs ==")
        self.say(f"data dir (registry, {FLEET_STORE_FILE}, keys): {self.home}")
        self.say(f"fleet status (JSON):  {self.out_dir / 'fleet-status.json'}")
        self.say(f"plots:                {self.out_dir / 'plots'}")
        self.say(f"process logs:         {self.out_dir / 'logs'}")
        for note in self.notes:
            self.say(f"note: {note}")
        self.say("stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items()))


def run_fleet_demo(out_dir: Path, say: Callable[[str], None] = print, minilm_onnx: Path | None = None) -> FleetDemo:
    demo = FleetDemo(Path(out_dir), say=say, minilm_onnx=minilm_onnx)
    demo.run()
    return demo


def demo_stage(ctx: Any) -> None:
    """The `fleet` stage of ``builder.demo`` (``ctx`` is its DemoContext)."""
    loaded = ctx.results.get("minilm")
    demo = run_fleet_demo(ctx.out_dir / "fleet", say=lambda text: ctx.console.print(text, markup=False, highlight=False),
                          minilm_onnx=getattr(loaded, "onnx_path", None))
    for path in demo.outputs():
        ctx.wrote(path)
    ctx.results["fleet"] = demo


def main(argv: list[str] | None = None) -> None:
    from builder.cli.errors import guarded
    from builder.demo.output import FLEET_KEEP, prepare_output_dir
    from builder.errors import BuilderError

    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0]) if args else Path("demo-out") / "fleet"
    guarded(lambda: run_fleet_demo(prepare_output_dir(out, keep=FLEET_KEEP)), (BuilderError,), "fleet_demo")


if __name__ == "__main__":
    main()
