"""`builder push`: deploy a model to devices (one, several, a group or the whole fleet, canary
first) and follow them live, in one process however many devices."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from builder.cli.options import InputShapeOption, StoreOption, duration_or_seconds
from builder.cli.tables import fit_table, table_console
from builder.cli.serve import BrokerOption, DataDirOption, data_dir_or_default, read_password_file


def parse_percent(text: str) -> float:
    from builder.errors import UsageError

    value = text.strip().rstrip("%").strip()
    try:
        return float(value)
    except ValueError as exc:
        raise UsageError(f"--canary {text!r} is not a percentage; pass e.g. --canary 10%") from exc


class RichObserver:
    """Live progress: one bar per device (download bytes), its description the current stage; past
    ``max_bars`` devices, one line counts the others by stage (a thousand bars help nobody)."""

    def __init__(self, bars: Any, max_bars: int = 12) -> None:
        self.bars = bars
        self.max_bars = max_bars
        self.tasks: dict[str, Any] = {}
        self.others: dict[str, str] = {}  # device -> its stage, for devices without a bar
        self._others_task: Any = None

    def _task(self, device_id: str) -> Any:
        if device_id not in self.tasks:
            if len(self.tasks) >= self.max_bars:
                return None
            self.tasks[device_id] = self.bars.add_task(f"{device_id}: starting", total=None)
        return self.tasks[device_id]

    def _count(self, device_id: str, stage: str) -> None:
        self.others[device_id] = stage
        counts: dict[str, int] = {}
        for value in self.others.values():
            counts[value] = counts.get(value, 0) + 1
        text = f"{len(self.others)} more: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        if self._others_task is None:
            self._others_task = self.bars.add_task(text, total=None)
        self.bars.update(self._others_task, description=text)

    def stage(self, device_id: str, text: str) -> None:
        task = self._task(device_id)
        if task is None:
            self._count(device_id, _stage_word(text))
            return
        self.bars.update(task, description=f"{device_id}: {text}")

    def progress(self, device_id: str, update: Any) -> None:
        task = self._task(device_id)
        if task is None:
            self._count(device_id, update.state)
            return
        label = {"verifying": "verifying signature", "downloading": "downloading", "installing": "installing + health check",
                 "active": "active", "failed": "FAILED", "rejected": "REJECTED", "rolled_back": "ROLLED BACK"}.get(update.state, update.state)
        kwargs: dict[str, Any] = {"description": f"{device_id}: {label}"}
        if update.bytes_total:
            kwargs.update(total=update.bytes_total, completed=update.bytes_done)
        if update.state == "active" and update.bytes_total:
            kwargs["completed"] = update.bytes_total
        self.bars.update(task, **kwargs)


def _stage_word(text: str) -> str:
    """One word per stage for the summary line."""
    for prefix, word in (("desired", "sent"), ("no answer", "timeout"), ("offline", "pending"),
                         ("on-device benchmark", "benchmarking"), ("benchmarking the previous", "baseline")):
        if text.startswith(prefix):
            return word
    return text.split(" ", 1)[0].rstrip(":")


def outcome_table(outcomes: list[Any], title: str) -> Any:
    from rich.table import Table

    from builder.fleet.rollout.push_report import OUTCOME_COLUMNS, outcome_cells

    table = Table(title=title)
    for column in OUTCOME_COLUMNS:
        table.add_column(column)
    for outcome in outcomes:
        table.add_row(*outcome_cells(outcome))
    return table


PUSH_FIT = {"keep": ("device", "artifact"), "drop_order": ("power", "size", "p50 ms")}


def register(app: typer.Typer) -> None:
    @app.command("push")
    def push(
        device: Optional[list[str]] = typer.Option(None, "--device", help="Device id to deploy to (repeatable)."),
        group: Optional[str] = typer.Option(None, "--group", help="Deploy to every device of this group."),
        all_devices: bool = typer.Option(False, "--all", help="Deploy to every registered device of the fleet."),
        artifact: Optional[str] = typer.Option(None, "--artifact", help="Registered artifact id (or unique prefix)."),
        model: Optional[str] = typer.Option(None, "--model", help="Model to build for the device's profile (file or package.module:factory)."),
        input_shape: Optional[list[str]] = InputShapeOption(),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Compression recipe TOML (or a packaged recipe's name) applied before building."),
        precision: Optional[str] = typer.Option(None, "--precision", help="With --model: fp32 | fp16 | int8 (default: the profile's)."),
        data: Optional[str] = typer.Option(None, "--data", help="With --model: real inputs to calibrate and verify the build (.npz or package.module:function), as for `builder build`."),
        train_data: Optional[str] = typer.Option(None, "--train-data", help="With --model: training data for a recipe that fine-tunes or distils."),
        task: Optional[str] = typer.Option(None, "--task", help="With --model: what the output means (auto, classify, embed, dense_map, sequence, regression)."),
        force: bool = typer.Option(False, "--force", help="Push an artifact built for another profile anyway."),
        canary: str = typer.Option("0", "--canary", help="With --group, --all or several --device: percentage of the online devices that go first, e.g. 10%."),
        max_latency_ratio: float = typer.Option(1.25, help="Canary fails if its p95 exceeds the previous model's by this factor."),
        soak: str = typer.Option("0s", "--soak", help="Canaries serve real traffic this long before they are judged, e.g. 2m."),
        soak_s: Optional[float] = typer.Option(None, "--soak-s", hidden=True),
        benchmark_runs: int = typer.Option(30, help="On-device benchmark runs after install (0: skip)."),
        timeout: str = typer.Option("15m", "--timeout", help="Give up on a device after this long, e.g. 15m."),
        timeout_s: Optional[float] = typer.Option(None, "--timeout-s", hidden=True),
        max_in_flight: int = typer.Option(0, "--max-in-flight", help="Devices transferring at once (0: by the model's size, up to 256)."),
        broker: Optional[str] = BrokerOption,
        username: Optional[str] = typer.Option(None, help="Broker username (default: saved builder credentials)."),
        password_file: Optional[Path] = typer.Option(None, help="File holding the broker password."),
        ca_file: Optional[Path] = typer.Option(None, help="CA certificate for mqtts:// brokers."),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
        as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON instead of a table."),
    ) -> None:
        """Build (or reuse) the model for each device's profile, deploy it, follow it live and compare it
        with the previous model. Exits non-zero when a device refused, failed, rolled back or timed out."""
        from rich.progress import BarColumn, DownloadColumn, Progress, TaskProgressColumn, TextColumn

        from builder.artifacts.registry import Registry
        from builder.errors import FleetError, UsageError
        from builder.fleet.rollout.canary import CanaryThresholds
        from builder.fleet.rollout.push import Pusher, PushOptions, outcome_summary
        from builder.fleet.rollout.push_artifacts import ArtifactChooser
        from builder.fleet.transport.link import FleetLink, resolve_endpoint
        from builder.fleet.transport.store import open_store

        devices = list(dict.fromkeys(device or []))
        if sum((bool(devices), group is not None, all_devices)) != 1:
            raise UsageError("pass one of --device ID (repeatable), --group G or --all")
        if (artifact is None) == (model is None):
            raise UsageError("pass exactly one of --artifact ID or --model M")
        percent = parse_percent(canary)
        if len(devices) == 1 and percent:
            raise UsageError("--canary applies to pushes to several devices (--group, --all, or --device repeated)")
        home = data_dir_or_default(data_dir)
        registry = Registry(home)
        from builder.compression.recipe import resolve_recipe

        chooser = ArtifactChooser(registry, home, artifact=artifact, model=model, input_shapes=list(input_shape or []),
                                  recipe=resolve_recipe(recipe) if recipe is not None else None, precision=precision,
                                  data=data, train_data=train_data, task=task)
        endpoint = resolve_endpoint(home, broker, username, read_password_file(password_file), ca_file)
        console = table_console(stderr=as_json)
        chooser.on_stage = lambda text: console.print(f"[dim]build: {text}[/]")
        options = PushOptions(timeout_s=duration_or_seconds(timeout, timeout_s, "--timeout"),
                              benchmark_runs=benchmark_runs, soak_s=duration_or_seconds(soak, soak_s, "--soak"),
                              allow_other_profile=force or chooser.builds, max_in_flight=max(0, max_in_flight))
        thresholds = CanaryThresholds(max_latency_ratio=max_latency_ratio)
        with open_store(home, store_url) as store, FleetLink(endpoint).connect() as link:
            with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), DownloadColumn(),
                          console=console, transient=False) as progress:
                pusher = Pusher(link, store, registry, home, options, RichObserver(progress))
                if len(devices) == 1:
                    artifact_id = chooser.for_device(store.device(devices[0]))
                    outcomes = [pusher.push(devices[0], artifact_id)]
                    verdict, rolled = None, []
                else:
                    if devices:
                        result = pusher.push_devices(devices, chooser.for_device, percent, thresholds)
                    elif group is not None:
                        result = pusher.push_group(group, chooser.for_profile, percent, thresholds)
                    else:
                        result = pusher.push_all(chooser.for_profile, percent, thresholds)
                    outcomes = list(result.outcomes)
                    verdict, rolled = result.verdict, list(result.rolled_back)
        if as_json:
            print(json.dumps({"outcomes": [outcome_summary(o) for o in outcomes],
                              "canary": None if verdict is None else {"proceed": verdict.proceed, "reasons": list(verdict.reasons)},
                              "rolled_back": [outcome_summary(o) for o in rolled]}, indent=2))
        else:
            console.print(fit_table(outcome_table(outcomes, "Push result"), console.width, **PUSH_FIT))
            if verdict is not None:
                console.print(("[green]canary held[/]" if verdict.proceed else "[red]canary did not hold[/]")
                              + "".join(f"\n  - {r}" for r in verdict.reasons))
            if rolled:
                console.print(fit_table(outcome_table(rolled, "Canaries rolled back"), console.width, **PUSH_FIT))
            for outcome in outcomes:
                for note in outcome.notes:
                    console.print(f"[dim]{outcome.device_id}: {note}[/]")
        failures = [o for o in outcomes if not o.ok]
        if verdict is not None and not verdict.proceed:
            raise FleetError("canary did not hold; stopped and rolled back: " + "; ".join(verdict.reasons))
        if failures:
            shown = "; ".join(f"{o.device_id} {o.state}: {o.error or 'no reason given'}" +
                              (" (still on its previous model)" if o.state in ("failed", "rejected") else "")
                              for o in failures[:5])
            more = f"; and {len(failures) - 5} more (see the table)" if len(failures) > 5 else ""
            raise FleetError(f"{len(failures)} of {len(outcomes)} devices not active: {shown}{more}"
                             if len(outcomes) > 1 else shown)
