"""`builder fleet add-device|remove-device|status|telemetry|plot|rollback|simulate`: the fleet day to day (and a simulated one)."""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Optional

import typer

from builder.cli.options import StoreOption, deprecated, duration_or_seconds
from builder.cli.tables import print_table
from builder.cli.serve import BrokerOption, DataDirOption, data_dir_or_default, read_password_file


def parse_since(text: Optional[str], now: float | None = None) -> Optional[float]:
    """'10m', '2h', '1d', '30s' ago, or an ISO 8601 time, as a unix timestamp."""
    from builder.errors import UsageError

    if not text:
        return None
    now = time.time() if now is None else now
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units:
        try:
            return now - float(text[:-1]) * units[text[-1]]
        except ValueError:
            pass
    try:
        moment = _dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"--since {text!r} is neither a duration (30s, 10m, 2h, 1d) nor an ISO time") from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=_dt.timezone.utc)
    return moment.timestamp()


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="The fleet: devices, their status, telemetry and rollbacks.", no_args_is_help=True)
    app.add_typer(group, name="fleet")

    @group.command("add-device")
    def add_device(
        device_id: str = typer.Argument(..., help="Device id (also its MQTT username)."),
        profile: str = typer.Option(..., "--profile", "-p", help="Device profile (see `builder profiles list`)."),
        group_name: Optional[str] = typer.Option(None, "--group", help="Group for group pushes."),
        broker_config_dir: Optional[Path] = typer.Option(None, help="Mosquitto config dir: creates/extends passwd + ACL there."),
        broker_port: int = typer.Option(1883, help="Listener port written into a NEW Mosquitto config."),
        broker_url: Optional[str] = typer.Option(None, help="URL the device connects to (default: the running serve's, or the config's)."),
        tls_port: Optional[int] = typer.Option(None, help="NEW Mosquitto config: TLS listener port (needs --tls-cert/--tls-key/--ca-file)."),
        tls_cert: Optional[Path] = typer.Option(None, help="Broker TLS certificate (NEW config)."),
        tls_key: Optional[Path] = typer.Option(None, help="Broker TLS key (NEW config)."),
        tls_listen: str = typer.Option("0.0.0.0", help="NEW Mosquitto config: address of the TLS listener devices dial."),
        ca_file: Optional[Path] = typer.Option(None, help="CA the device trusts for mqtts://."),
        trusted_key: Optional[Path] = typer.Option(None, help="Public signing key the agent trusts (default DATA_DIR/keys/signing_key.pub.pem)."),
        agent_data_dir: str = typer.Option("/var/lib/edgefleet", help="data_dir written into agent.toml (on the device)."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write agent.toml (default DATA_DIR/devices/ID/agent.toml)."),
        telemetry_interval: Optional[str] = typer.Option(None, "--telemetry-interval", help="Telemetry interval written into agent.toml, e.g. 10s."),
        telemetry_interval_s: Optional[float] = typer.Option(None, "--telemetry-interval-s", hidden=True),
        http_port: Optional[int] = typer.Option(None, "--http-port", help="Local inference endpoint port on the device (default 8765; 0 = any free port; set it for a second agent on one host)."),
        force: bool = typer.Option(False, "--force", help="Replace an already registered device (new password and agent.toml)."),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
        as_json: bool = typer.Option(False, "--json", help="Print what was registered and written as JSON."),
    ) -> None:
        """Register a device, create its broker credentials (Mosquitto: password + pattern ACL) and write its agent.toml."""
        from rich.console import Console

        from builder.errors import UsageError
        from builder.fleet.transport.devices import BrokerTls
        from builder.fleet.transport.devices import add_device as do_add

        tls = None
        if tls_port is not None:
            if not (tls_cert and tls_key and ca_file):
                raise UsageError("--tls-port needs --tls-cert, --tls-key and --ca-file")
            tls = BrokerTls(tls_port, ca_file, tls_cert, tls_key, listen=tls_listen)
        added = do_add(data_dir_or_default(data_dir), device_id, profile, group=group_name, store_url=store_url, broker_url=broker_url,
                       broker_config_dir=broker_config_dir, broker_port=broker_port, tls=tls, agent_ca_file=ca_file,
                       trusted_key=trusted_key, agent_data_dir=agent_data_dir, agent_toml=out,
                       telemetry_interval_s=_interval(telemetry_interval, telemetry_interval_s), http_port=http_port, force=force)
        if as_json:
            print(json.dumps({"device_id": added.device_id, "profile": added.profile, "group": added.group,
                              "agent_toml": str(added.agent_toml), "broker_url": added.broker_url,
                              "credentials": str(added.credentials),
                              "broker_config_file": None if added.broker_config_file is None else str(added.broker_config_file)},
                             indent=2))
            return
        console = Console()
        console.print(f"registered [bold]{added.device_id}[/] ({added.profile}"
                      + (f", group {added.group}" if added.group else "") + ")")
        console.print(f"  agent.toml: {added.agent_toml} (mode 0600; copy its folder to /etc/edgefleet on the device, "
                      "see deploy/README.md)")
        console.print(f"  broker:     {added.broker_url}; credentials: {added.credentials}")
        if added.broker_config_file is not None:
            console.print(f"  mosquitto:  {added.broker_config_file} (running broker: send it SIGHUP to reload users)")

    @group.command("remove-device")
    def remove_device(
        device_id: str = typer.Argument(..., help="Device id to remove."),
        broker_config_dir: Optional[Path] = typer.Option(None, help="Mosquitto config dir (default: the one add-device used)."),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
    ) -> None:
        """Remove a device: its Mosquitto user, its agent.toml folder, and its rows in the fleet store."""
        from builder.fleet.transport.devices import remove_device as do_remove

        removed = do_remove(data_dir_or_default(data_dir), device_id, broker_config_dir=broker_config_dir, store_url=store_url)
        print(f"removed {removed.device_id}: " + ("; ".join(removed.removed) or "nothing was left"))
        if removed.broker_config_file is not None:
            print(f"  mosquitto: {removed.broker_config_file} (running broker: send it SIGHUP to drop the user)")

    @group.command("status")
    def status(
        group_name: Optional[str] = typer.Option(None, "--group", help="Only this group."),
        as_json: bool = typer.Option(False, "--json"),
        show_factors: bool = typer.Option(False, "--factors", help="Also the loop's latency factor (field / estimate)."),
        old_verbose: bool = typer.Option(False, "--verbose", "-v", hidden=True),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
    ) -> None:
        """One row per device: online, profile, model, field p50/p95, requests, power, temperature, last seen."""
        from rich.console import Console
        from rich.table import Table

        if old_verbose:
            deprecated("fleet status --verbose", "fleet status --factors (-v before the command shows library logs)")
        verbose = show_factors or old_verbose

        from builder.fleet.rollout.status import STATUS_COLUMNS, STATUS_DROP_ORDER, collect_status, status_cells
        from builder.fleet.transport.store import open_store

        home = data_dir_or_default(data_dir)
        factors: dict[str, float] = {}
        with open_store(home, store_url) as store:
            rows = collect_status(store, time.time(), group=group_name)
            if verbose:
                from builder.fleet.loop.service import latency_factors

                factors = latency_factors(store)
        if as_json:
            data = [r.to_dict() for r in rows]
            for item in data:
                if verbose:
                    item["latency_factor"] = factors.get(item["device_id"])
            print(json.dumps(data, indent=2))
            return
        table = Table(title="Fleet status")
        for column in STATUS_COLUMNS + (("latency factor",) if verbose else ()):
            table.add_column(column)
        for row in rows:
            extra = (f"×{factors[row.device_id]:.2f}" if row.device_id in factors else "—",) if verbose else ()
            table.add_row(*status_cells(row), *extra, style=None if row.online else "dim")
        print_table(table, keep=("device", "profile"), drop_order=STATUS_DROP_ORDER + ("latency factor",))
        if not rows:
            Console().print("no devices yet: `builder fleet add-device ID --profile P`, then start its agent")

    @group.command("telemetry")
    def telemetry(
        device: str = typer.Option(..., "--device"),
        since: Optional[str] = typer.Option(None, "--since", help="30s, 10m, 2h, 1d or an ISO time."),
        limit: int = typer.Option(50, help="At most this many (the latest)."),
        as_json: bool = typer.Option(False, "--json"),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
    ) -> None:
        """A device's telemetry reports: field latency per window, requests, power, temperature."""
        from dataclasses import asdict

        from rich.table import Table

        from builder.fleet.rollout.status import DASH, format_power
        from builder.fleet.transport.store import open_store

        with open_store(data_dir_or_default(data_dir), store_url) as store:
            store.device(device)
            rows = store.telemetry(device, since=parse_since(since), limit=limit)
        if as_json:
            print(json.dumps([asdict(r) for r in rows], indent=2, default=str))
            return
        table = Table(title=f"Telemetry of {device}")
        for column in ("time (UTC)", "event", "artifact", "requests", "errors", "p50 ms", "p95 ms", "power", "temp", "CPU %"):
            table.add_column(column)
        for r in rows:
            table.add_row(_dt.datetime.fromtimestamp(r.ts, _dt.timezone.utc).strftime("%H:%M:%S"), r.event,
                          (r.model_id or DASH)[:12], str(r.requests), str(r.errors),
                          DASH if r.p50_ms is None else f"{r.p50_ms:.2f}", DASH if r.p95_ms is None else f"{r.p95_ms:.2f}",
                          format_power(r.power_w, r.power_source),
                          DASH if r.temperature_c is None else f"{r.temperature_c:.0f} °C",
                          DASH if r.cpu_percent is None else f"{r.cpu_percent:.0f}")
        print_table(table, keep=("time (UTC)", "artifact"), drop_order=("CPU %", "errors", "temp", "event", "power"))

    @group.command("plot")
    def plot(
        device: str = typer.Option(..., "--device"),
        out: Path = typer.Option(Path("fleet-plot.png"), "--out", help="PNG file to write."),
        since: Optional[str] = typer.Option(None, "--since", help="30s, 10m, 2h, 1d or an ISO time."),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
    ) -> None:
        """Field latency and power over time, deployments marked, as a PNG."""
        from builder.fleet.rollout.plot import plot_series, render_plot
        from builder.fleet.transport.store import open_store

        start = parse_since(since)
        with open_store(data_dir_or_default(data_dir), store_url) as store:
            store.device(device)
            series = plot_series(device, store.telemetry(device, since=start), store.events(device, since=start))
        print(render_plot(series, out))

    @group.command("rollback")
    def rollback(
        device: str = typer.Option(..., "--device"),
        broker: Optional[str] = BrokerOption,
        username: Optional[str] = typer.Option(None),
        password_file: Optional[Path] = typer.Option(None),
        ca_file: Optional[Path] = typer.Option(None),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
    ) -> None:
        """Switch a device back to the model in its other slot (and make the retained desired state match)."""
        from rich.console import Console

        from builder.artifacts.registry import Registry
        from builder.errors import FleetError
        from builder.fleet.rollout.push import Pusher
        from builder.fleet.transport.link import FleetLink, resolve_endpoint
        from builder.fleet.transport.store import open_store

        home = data_dir_or_default(data_dir)
        endpoint = resolve_endpoint(home, broker, username, read_password_file(password_file), ca_file)
        with open_store(home, store_url) as store, FleetLink(endpoint).connect() as link:
            outcome = Pusher(link, store, Registry(home), home).rollback(device)
        if outcome.state != "rolled_back":
            raise FleetError(f"{device} did not roll back: {outcome.error}")
        Console().print(f"{device}: rolled back from {(outcome.previous_model or outcome.previous_artifact_id or '?')} "
                        f"to {outcome.model or outcome.artifact_id[:12]}")


    @group.command("simulate")
    def simulate(
        devices: int = typer.Option(..., "--devices", "-n", min=1, help="How many devices to simulate (one process, one event loop)."),
        prefix: str = typer.Option("sim-", "--prefix", help="Device ids are PREFIX00000, PREFIX00001, ..."),
        broker: Optional[str] = typer.Option(None, "--broker", help="HOST:PORT or mqtt(s)://HOST:PORT (default: each device's agent.toml)."),
        register_missing: bool = typer.Option(False, "--register", help="Register devices that are not yet (like add-device; needs --broker-config-dir)."),
        broker_config_dir: Optional[Path] = typer.Option(None, help="Mosquitto config dir the new devices' users go into."),
        broker_port: int = typer.Option(1883, help="Listener port written into a NEW Mosquitto config."),
        reload_broker_pid: Optional[int] = typer.Option(None, "--reload-broker", help="PID of the running Mosquitto: SIGHUP it after registering."),
        profile: str = typer.Option("raspberry-pi-4", "--profile", "-p", help="Profile of newly registered devices."),
        group_name: Optional[str] = typer.Option(None, "--group", help="Group of newly registered devices (for `builder push --group`)."),
        telemetry_interval: str = typer.Option("10s", "--telemetry-interval", help="Each device reports this often."),
        duration: str = typer.Option("60s", "--duration", help="How long to run (0: until Ctrl-C)."),
        flush: int = typer.Option(0, "--flush", min=0, help="After connecting, each device flushes this many buffered reports at once."),
        requests_per_s: float = typer.Option(5.0, help="Synthetic inference requests per device per second."),
        seed: int = typer.Option(0, help="Seed of the synthetic latencies."),
        acks: bool = typer.Option(True, "--acks/--no-acks", help="Keep each report until the host acks it stored (the agent's rule); --no-acks: forget it at the broker's PUBACK (the rule before acks, for comparison)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        data_dir: Optional[Path] = DataDirOption,
    ) -> None:
        """Simulate N devices speaking the real protocol (telemetry, outbox flush, pulls of pushed models) to size a broker and a host."""
        from builder.fleet.simulate.device import Behaviour
        from builder.fleet.simulate.run import (SimulationPlan, ids_and_identities, normalise_broker_url, reload_broker,
                                                run_simulation)

        home = data_dir_or_default(data_dir)
        url = normalise_broker_url(broker)
        newly, identities = ids_and_identities(home, devices, prefix, url, register=register_missing,
                                               broker_config_dir=broker_config_dir, profile=profile, group=group_name,
                                               broker_port=broker_port)
        if newly:
            print(f"registered {len(newly)} device(s) ({newly[0]} ... {newly[-1]})", flush=True)
            if reload_broker_pid is not None:
                reload_broker(reload_broker_pid)
                time.sleep(0.5)
        behaviour = Behaviour(telemetry_interval_s=duration_or_seconds(telemetry_interval, None, "--telemetry-interval"),
                              requests_per_s=requests_per_s)
        plan = SimulationPlan(duration_s=duration_or_seconds(duration, None, "--duration"), flush_records=flush, seed=seed, acks=acks)
        from builder.fleet.simulate.register import save_states

        summary = run_simulation(identities, behaviour, plan,
                                 on_started=lambda fleet: None if as_json else print(
                                     f"{len(fleet.devices)} simulated devices connected; Ctrl-C to stop", flush=True),
                                 on_stopped=lambda fleet: save_states(home, {d.device_id: d.state() for d in fleet.devices}))
        if as_json:
            print(json.dumps(summary.to_dict(), indent=2))
            return
        t, o = summary.totals, summary.overhead
        rule = "acked by the host" if acks else "PUBACKed"
        print(f"devices {t.devices} (connected in {summary.connect_s:.1f} s); telemetry built {t.records_built}, "
              f"{rule} {t.records_acked}, re-sent {t.records_resent}, unacked {t.records_unacked}; chunk frames {t.chunk_frames} ({t.chunk_bytes_received} bytes); "
              f"deployments active {t.active_deployments}; errors {t.errors}")
        print(f"simulator overhead: {o.cpu_percent:.1f}% of one core over {o.wall_s:.1f} s; "
              f"event-loop lag p50 {o.loop_lag_p50_ms:.1f} ms, p99 {o.loop_lag_p99_ms:.1f} ms, max {o.loop_lag_max_ms:.1f} ms")


def _interval(text: Optional[str], old_seconds: Optional[float]) -> Optional[float]:
    """``--telemetry-interval 10s`` (or the deprecated ``--telemetry-interval-s 10``); None: the agent's default."""
    if text is None and old_seconds is None:
        return None
    return duration_or_seconds(text or "0s", old_seconds, "--telemetry-interval")
