"""``agent``: run the on-device agent, benchmark a model, show status, detect the hardware.

The only place AgentErrors become a one-line message and an exit code.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from agent.errors import AgentError, ConfigError

typer_app = typer.Typer(name="agent", help="EdgeFleet on-device agent.", no_args_is_help=True,
                        pretty_exceptions_enable=False, add_completion=False)

CONFIG_OPTION = typer.Option(Path("/etc/edgefleet/agent.toml"), "--config", "-c", help="agent.toml path")


# Native libraries (LiteRT/TensorFlow, glog) read these at import: errors only unless --verbose.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", "ABSL_MIN_LOG_LEVEL": "2"}


def _print_version(value: bool) -> None:
    if value:
        from agent import __version__

        print(f"agent {__version__}")
        raise typer.Exit()


@typer_app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library logs and warnings (LiteRT, ONNX Runtime)."),
         version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """EdgeFleet on-device agent: pulls models over MQTT, serves and benchmarks them, reports telemetry."""
    if not verbose:
        import os
        import warnings

        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)


@typer_app.command("version")
def version() -> None:
    """Print the agent version."""
    from agent import __version__

    print(__version__)


@typer_app.command("run")
def run(config: Path = CONFIG_OPTION, log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING")) -> None:
    """Connect to the broker, serve the active model on 127.0.0.1, pull new ones, report telemetry."""
    from agent.config import load_config
    from agent.daemon import Agent

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    cfg = load_config(config)
    agent = Agent(cfg).start()
    scheme = "mqtts" if cfg.broker.tls else "mqtt"
    print(f"agent {cfg.device_id} ({agent.profile}): broker {scheme}://{cfg.broker.host}:{cfg.broker.port}, "
          f"endpoint {agent.endpoint.url if agent.endpoint else '-'}, data dir {cfg.data_dir}", flush=True)
    stopping = {"flag": False}

    def _stop(signum: int, frame: object) -> None:  # noqa: ARG001
        stopping["flag"] = True
        agent._stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        agent.wait()
    finally:
        agent.stop()


@typer_app.command("bench")
def bench(model_arg: Optional[str] = typer.Argument(None, metavar="[MODEL]",
                                                   help="a .onnx/.ort/.tflite file, an artifact dir, or 'active' (default)"),
          model_opt: Optional[str] = typer.Option(None, "--model", "-m", help="same as MODEL"),
          input_shape: Optional[list[str]] = typer.Option(None, "--input-shape", "-s",
                                                          help="shape to time, repeatable: 1x3x640x640, x=1x3x640x640, sr=scalar:int64"),
          sample: Optional[Path] = typer.Option(None, "--sample", help="an .npz of inputs by name (or an artifact's sample.npz)"),
          runs: int = typer.Option(50, "--runs", "-n", min=1), warmup: int = typer.Option(5, "--warmup", min=0),
          config: Optional[Path] = typer.Option(None, "--config", "-c", help="agent.toml (for 'active' and the profile)"),
          threads: int = typer.Option(0, help="runtime threads (0 = runtime default)"),
          as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Warm up, then time N runs: latency p50/p90/p95/p99, throughput, peak RSS, CPU %, temperature, power."""
    from agent.bench import run_benchmark
    from agent.bench_feeds import describe_feeds, load_sample_file, parse_shape_options, resolve_feeds
    from agent.detect import detect_device
    from agent.install import load_sample
    from agent.runtime import open_model_file, open_runtime
    from agent.sensors import power_sensors_for

    if model_arg is not None and model_opt is not None and model_arg != model_opt:
        raise ConfigError(f"MODEL {model_arg} and --model {model_opt} disagree; give one")
    model = model_arg or model_opt or "active"
    shapes = parse_shape_options(input_shape or [])
    sample_feeds = load_sample_file(sample) if sample is not None else None
    profile = None
    feeds = None
    artifact_id = None
    if model == "active" or Path(model).is_dir():
        from agent.manifest import Manifest

        if model == "active":
            if config is None:
                raise ConfigError("--model active needs --config (to find the data dir)")
            from agent.config import load_config
            from agent.install import SlotStore

            cfg = load_config(config)
            profile = cfg.profile
            store = SlotStore(cfg.data_dir)
            slot = store.read_pointer().active
            if slot is None:
                raise AgentError(f"no active model in {cfg.data_dir}; wait for a deployment or pass --model FILE")
            directory = store.slot_dir(slot)
            cache_dir = cfg.data_dir / "cache"
        else:
            directory = Path(model)
            cache_dir = None  # never write into someone's artifact directory
        try:
            manifest = Manifest.from_bytes((directory / "manifest.json").read_bytes())
        except OSError as exc:
            raise AgentError(f"{directory} has no manifest.json; pass an artifact directory or a model file") from exc
        runtime = open_runtime(manifest, directory / manifest.model_payload.name, cache_dir, threads)
        artifact_id = manifest.artifact_id
        if manifest.sample_payload is not None:
            feeds, _ = load_sample(directory / manifest.sample_payload.name)
    else:
        path = Path(model)
        if not path.is_file():
            raise AgentError(f"model {model} does not exist; pass a model file, an artifact dir or 'active'")
        runtime = open_model_file(path, threads)
    profile = profile or detect_device().profile
    if sample_feeds is not None or shapes or feeds is None:
        feeds = resolve_feeds(runtime.inputs, sample=sample_feeds, shapes=shapes)
    timed = describe_feeds(feeds)
    result = run_benchmark(runtime.run, feeds, runs=runs, warmup=warmup, backend=runtime.backend,
                           artifact_id=artifact_id, power_sensors=power_sensors_for(profile), profile=profile)
    if as_json:
        print(json.dumps(result.to_dict() | {"inputs": {k: list(v.shape) for k, v in feeds.items()}}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent bench: {model} ({runtime.backend}, {runs} runs)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lat = result.latency
    for name, value in (("p50 ms", lat.p50_ms), ("p90 ms", lat.p90_ms), ("p95 ms", lat.p95_ms), ("p99 ms", lat.p99_ms),
                        ("mean ms", lat.mean_ms), ("throughput /s", result.throughput_per_s),
                        ("peak RSS MB", round(result.peak_rss_bytes / 1e6, 1)), ("CPU %", result.cpu_percent),
                        ("temperature °C", result.temperature_c if result.temperature_c is not None else "not measured")):
        table.add_row(name, str(value))
    if result.power_w is not None:
        table.add_row(f"power W ({result.power_source})", f"{result.power_w:.3f}")
        table.add_row("energy / inference J", f"{result.energy_per_inference_j:.6f}")
    else:
        table.add_row("power", "not measured")
        if result.estimated_power_w is not None:
            table.add_row(f"power W (ESTIMATE from profile {profile})", f"{result.estimated_power_w:.2f}")
            table.add_row("energy / inference J (ESTIMATE)", f"{result.estimated_energy_per_inference_j:.6f}")
    Console().print(table)
    print(f"timed inputs: {timed}")


@typer_app.command("status")
def status(config: Path = CONFIG_OPTION,
           as_json: bool = typer.Option(False, "--json", help="print the status as JSON")) -> None:
    """Show the active and previous models, and whether the agent is running (asks its local endpoint)."""
    import urllib.error
    import urllib.request

    from agent.config import load_config
    from agent.daemon import RUNTIME_FILE, _artifact_id_of
    from agent.install import SlotStore

    cfg = load_config(config)
    store = SlotStore(cfg.data_dir)
    pointer = store.read_pointer()
    info = {"device_id": cfg.device_id, "data_dir": str(cfg.data_dir), "active_slot": pointer.active,
            "active_artifact_id": _artifact_id_of(store.slot_dir(pointer.active)) if pointer.active else None,
            "previous_slot": pointer.previous,
            "previous_artifact_id": _artifact_id_of(store.slot_dir(pointer.previous)) if pointer.previous else None,
            "running": False}
    try:
        runtime_info = json.loads((cfg.data_dir / RUNTIME_FILE).read_text(encoding="utf-8"))
        url = runtime_info.get("http_url")
        if url:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                info["running"] = True
                info["health"] = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        info["running"] = True
        info["health"] = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        pass
    if as_json:
        print(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"agent {cfg.device_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for label, value in status_rows(info):
        table.add_row(label, value)
    Console().print(table)


def status_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    """`agent status` as (label, text) rows: ids shortened, the health answer spelled out."""
    def slot(name: str) -> str:
        artifact = info.get(f"{name}_artifact_id")
        return f"slot {info[f'{name}_slot']}: {artifact[:12]}" if artifact else "—"

    health = info.get("health") or {}
    rows = [("running", "yes" if info.get("running") else "no"), ("data dir", str(info["data_dir"])),
            ("active model", slot("active")), ("previous model", slot("previous"))]
    if health:
        serving = (f"{health.get('model') or str(health.get('artifact_id', ''))[:12]} ({health.get('backend', '?')})"
                   if health.get("ok") else f"nothing: {health.get('reason', 'unhealthy')}")
        rows.append(("serving", serving))
    return rows


@typer_app.command("detect")
def detect(root: Path = typer.Option(Path("/"), help="filesystem root to inspect (fixtures in tests)"),
           as_json: bool = typer.Option(False, "--json", help="print the result as JSON")) -> None:
    """Print the detected device profile, power sensors and temperature."""
    from agent.detect import detect_device
    from agent.sensors import power_sensors_for, read_power, read_temperature

    device = detect_device(root)
    power = read_power(power_sensors_for(device.profile, root))
    temp = read_temperature(root)
    if as_json:
        print(json.dumps({"profile": device.profile, "description": device.description, "source": device.source,
                          "power_w": power.watts if power.available else None,
                          "power_source": power.source if power.available else None,
                          "temperature_c": temp.celsius if temp.available else None}, indent=2))
        return
    print(f"profile: {device.profile}")
    print(f"description: {device.description}")
    print(f"detected from: {device.source}")
    print(f"power: {f'{power.watts:.3f} W ({power.source})' if power.available else f'not measured ({power.note})'}")
    print(f"temperature: {f'{temp.celsius:.1f} °C ({temp.source})' if temp.available else 'not measured'}")


def app() -> None:
    try:
        typer_app(prog_name="agent")
    except AgentError as exc:
        print(f"agent: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
