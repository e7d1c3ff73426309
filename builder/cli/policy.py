"""`builder fleet policy set|show|remove` and `builder fleet events`: the re-compression loop's
policies and its decision log. Added under the `fleet` group (created here if it does not exist)."""
from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from builder.cli.options import StoreOption

if TYPE_CHECKING:
    from builder.fleet.loop.policy import Policy

DataDirOption = typer.Option(None, "--data-dir", help="Fleet data directory (default: $EDGEFLEET_HOME or the user data dir).")


def _data_dir(data_dir: Optional[Path]) -> Path:
    from builder.artifacts.registry import default_home

    return Path(data_dir) if data_dir else default_home()


def _fleet_group(app: typer.Typer) -> typer.Typer:
    for info in app.registered_groups:
        if info.name == "fleet" and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help="The fleet: devices, status, policies and the re-compression loop.", no_args_is_help=True)
    app.add_typer(group, name="fleet")
    return group


def register(app: typer.Typer) -> None:
    add_to_fleet(_fleet_group(app))


def add_to_fleet(fleet: typer.Typer) -> None:
    """Adds `policy` and `events` to an existing `fleet` Typer group."""
    policy_app = typer.Typer(help="Latency objectives, floors and pacing of the re-compression loop.",
                             no_args_is_help=True)
    fleet.add_typer(policy_app, name="policy")

    @policy_app.command("set")
    def policy_set(file: Path = typer.Option(..., "--file", help="Policy TOML (see docs/loop.md)."),
                   device: Optional[str] = typer.Option(None, "--device", help="Apply to one device."),
                   group: Optional[str] = typer.Option(None, "--group", help="Apply to a device group."),
                   data_dir: Optional[Path] = DataDirOption, store_url: Optional[str] = StoreOption()) -> None:
        """Validate a policy file and store it for a device, a group, or (neither given) the whole fleet."""
        from builder.fleet.loop.policy import PolicyStore, load_policy_file, scope_for
        from builder.fleet.transport.store import open_store

        scope = scope_for(device, group)
        policy = load_policy_file(file)
        with open_store(_data_dir(data_dir), store_url) as fleet:  # creates the fleet file with its schema if this is the first command
            PolicyStore(fleet).set(scope, policy, now=time.time())
        typer.echo(f"policy for {scope}: p95 <= {policy.latency_p95_ms:g} ms over {policy.window_s:g} s windows "
                   f"(act after {policy.pacing.violate_windows} windows, cooldown {policy.pacing.cooldown_s:g} s)")

    @policy_app.command("show")
    def policy_show(device: Optional[str] = typer.Option(None, "--device", help="Show the policy that applies to this device."),
                    as_json: bool = typer.Option(False, "--json"), data_dir: Optional[Path] = DataDirOption,
                    store_url: Optional[str] = StoreOption()) -> None:
        """Show every stored policy, or the one that applies to a device (own > group > default)."""
        from builder.fleet.loop.policy import PolicyStore
        from builder.fleet.transport.store import open_store

        with open_store(_data_dir(data_dir), store_url) as fleet:
            store = PolicyStore(fleet)
            if device:
                record = fleet.device(device)
                scope, policy = store.resolve(device, (record.group,) if record.group else ())
                if scope is None or policy is None:  # both or neither
                    typer.echo(f"no policy applies to {device}; set one with `builder fleet policy set --device {device} --file P`")
                    return
                policies: dict[str, "Policy"] = {scope: policy}
            else:
                policies = store.all()
        if as_json:
            typer.echo(json.dumps({scope: p.to_dict() for scope, p in policies.items()}, indent=2))
            return
        if not policies:
            typer.echo("no policies; set one with `builder fleet policy set --file policy.toml`")
            return
        for scope, pol in policies.items():
            typer.echo(f"# {scope}")
            typer.echo(pol.to_toml())

    @policy_app.command("remove")
    def policy_remove(device: Optional[str] = typer.Option(None, "--device"),
                      group: Optional[str] = typer.Option(None, "--group"),
                      data_dir: Optional[Path] = DataDirOption, store_url: Optional[str] = StoreOption()) -> None:
        """Remove a device's, a group's or (neither given) the fleet default policy."""
        from builder.errors import UsageError
        from builder.fleet.loop.policy import PolicyStore, scope_for
        from builder.fleet.transport.store import open_store

        scope = scope_for(device, group)
        with open_store(_data_dir(data_dir), store_url) as fleet:
            removed = PolicyStore(fleet).remove(scope)
        if not removed:
            raise UsageError(f"no policy stored for {scope}; `builder fleet policy show` lists them")
        typer.echo(f"removed the policy for {scope}")

    @fleet.command("load")
    def load(device: str = typer.Option(..., "--device", help="The device to slow down (or restore)."),
             slowdown: float = typer.Option(1.0, "--slowdown", help="Every inference takes this many times as long (1: off)."),
             cpu_burn_threads: int = typer.Option(0, "--cpu-burn-threads", help="Background threads competing for the CPU."),
             cpu_burn_duty: float = typer.Option(0.5, "--cpu-burn-duty", help="Share of each 100 ms those threads spin."),
             data_dir: Optional[Path] = DataDirOption) -> None:
        """Make a device slow on purpose (tests, demos of the re-compression loop): the agent's set_load command."""
        from agent import protocol as proto
        from builder.errors import FleetError, UsageError
        from builder.fleet.transport.link import FleetLink, resolve_endpoint

        if slowdown < 1.0 or cpu_burn_threads < 0 or not 0.0 <= cpu_burn_duty <= 1.0:
            raise UsageError("--slowdown must be >= 1, --cpu-burn-threads >= 0 and --cpu-burn-duty in 0..1")
        args = proto.SetLoadArgs(slowdown_factor=slowdown, cpu_burn_threads=cpu_burn_threads, cpu_burn_duty=cpu_burn_duty)
        with FleetLink(resolve_endpoint(_data_dir(data_dir)), client_id=f"edgefleet-load-{time.time_ns()}").connect() as link:
            reply = link.command(device, args, timeout_s=15)
        if not reply.ok:
            raise FleetError(f"{device} refused set_load: {reply.error}")
        typer.echo(f"{device}: load now {json.dumps(dict(reply.result) or args.to_payload(), sort_keys=True)}")

    @fleet.command("events")
    def events(device: Optional[str] = typer.Option(None, "--device", help="Only this device."),
               since: Optional[str] = typer.Option(None, "--since", help="Only since then: 30s, 10m, 2h, 1d or an ISO time."),
               since_s: Optional[float] = typer.Option(None, "--since-s", hidden=True),
               show_all: bool = typer.Option(False, "--all", help="Include deployment events, not only the loop's."),
               as_json: bool = typer.Option(False, "--json"), data_dir: Optional[Path] = DataDirOption,
               store_url: Optional[str] = StoreOption()) -> None:
        """The re-compression loop's decisions with their reasons and numbers (oldest first)."""
        from builder.cli.fleet import parse_since
        from builder.cli.options import deprecated
        from builder.fleet.loop.service import EVENT_PREFIX
        from builder.fleet.transport.store import open_store

        if since_s is not None:
            deprecated("--since-s N", "--since Ns (or 10m, 2h)")
        start = parse_since(since) if since else (time.time() - since_s if since_s is not None else None)
        with open_store(_data_dir(data_dir), store_url) as fleet_store:
            ids = [device] if device else [d.device_id for d in fleet_store.devices()]
            if device:
                fleet_store.device(device)  # unknown device: one clear error
            rows = [e for dev in ids for e in fleet_store.events(dev, since=start)
                    if show_all or e.kind.startswith(EVENT_PREFIX)]
        rows.sort(key=lambda e: e.ts)
        if as_json:
            typer.echo(json.dumps([{"device_id": e.device_id, "ts": e.ts, "kind": e.kind, "artifact_id": e.artifact_id,
                                    "detail": dict(e.detail)} for e in rows], indent=2, default=str))
            return
        from rich.table import Table

        from builder.cli.tables import print_table

        table = Table(title="Fleet events" if show_all else "Re-compression loop events")
        for col in ("time (UTC)", "device", "event", "artifact", "reason / numbers"):
            table.add_column(col, overflow="fold")
        for e in rows:
            table.add_row(_dt.datetime.fromtimestamp(e.ts, _dt.timezone.utc).strftime("%H:%M:%S.%f")[:-3], e.device_id,
                          e.kind, (e.artifact_id or "")[:12], _describe(e.detail))
        print_table(table, keep=("time (UTC)", "device"), drop_order=("artifact",))


def _describe(detail: Any) -> str:
    detail = dict(detail or {})
    reason = detail.get("reason", "")
    numbers = detail.get("numbers") or {}
    keys = ("objective_p95_ms", "baseline_p95_ms", "post_p95_ms", "latency_factor_now", "latency_factor",
            "predicted_p95_ms", "target_predicted_ms", "headroom_windows")
    shown = ", ".join(f"{k}={numbers[k]}" for k in keys if k in numbers)
    return f"{reason}" + (f" [{shown}]" if shown else "")
