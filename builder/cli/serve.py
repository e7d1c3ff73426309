"""`builder serve`: the fleet's host daemon (device registry, chunk server, telemetry store).

With no --broker it starts the embedded broker on 127.0.0.1 (no ACLs: a laptop or demo only).
"""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from builder.cli.options import StoreOption, duration_or_seconds

DataDirOption = typer.Option(None, "--data-dir", help="Registry + fleet store directory (default $EDGEFLEET_HOME or the user data dir).")
BrokerOption = typer.Option(None, "--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT of the fleet's broker; omit for the embedded one.")


def data_dir_or_default(data_dir: Optional[Path]) -> Path:
    from builder.artifacts.registry import default_home

    return Path(data_dir) if data_dir is not None else default_home()


def read_password_file(path: Optional[Path]) -> Optional[str]:
    from builder.errors import UsageError

    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read --password-file {path}: {exc.strerror}") from exc


def refuse_open_embedded_broker(listen: str, broker: Optional[str]) -> None:
    """The embedded broker (rumqttd) has no authentication and no ACLs: on a LAN address any device
    could publish a deployment for any other. Devices on a LAN need Mosquitto with the config
    `builder fleet add-device --broker-config-dir` writes."""
    import ipaddress

    from builder.errors import UsageError

    if broker:
        if listen != "127.0.0.1":
            raise UsageError("--listen sets the embedded broker's address; with --broker the broker listens where it is configured")
        return
    try:
        loopback = listen == "localhost" or ipaddress.ip_address(listen).is_loopback
    except ValueError as exc:
        raise UsageError(f"--listen {listen!r} is not an IP address") from exc
    if not loopback:
        raise UsageError(f"the embedded broker has no passwords or ACLs, so it listens on loopback only, not {listen}; "
                         "for devices on the LAN run Mosquitto with the config `builder fleet add-device "
                         "--broker-config-dir DIR` writes and pass --broker (see deploy/README.md)")


def _telemetry_hooks(data_dir: Path, loop: bool, loop_dry_run: bool, store_url: Optional[str]) -> list[Any]:
    """Callables ``(device_id, TelemetryReport) -> None`` run after each stored report: the
    re-compression loop (it acts only for devices with a policy: `builder fleet policy set`)."""
    if not loop:
        return []
    from builder.fleet.loop.service import serve_hooks

    return list(serve_hooks(data_dir, dry_run=loop_dry_run, store_url=store_url))


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        broker: Optional[str] = BrokerOption,
        username: Optional[str] = typer.Option(None, help="Broker username (default: saved builder credentials)."),
        password_file: Optional[Path] = typer.Option(None, help="File holding the broker password."),
        ca_file: Optional[Path] = typer.Option(None, help="CA certificate for mqtts:// brokers."),
        data_dir: Optional[Path] = DataDirOption,
        store_url: Optional[str] = StoreOption(),
        worker_group: Optional[str] = typer.Option(None, "--worker-group", help="Share the fleet with the other `builder serve` workers of this group (MQTT 5 shared subscriptions, each message to one worker; needs --broker and one store for all, e.g. --store postgresql://…: docs/scale.md)."),
        port: int = typer.Option(1883, help="Port of the embedded broker (0: any free port)."),
        listen: str = typer.Option("127.0.0.1", "--listen", help="Address of the embedded broker: loopback only (it has no authentication or ACLs)."),
        chunk_delay: str = typer.Option("0s", "--chunk-delay", help="Pause between chunks, e.g. 100ms (simulates a slow link; demos)."),
        chunk_delay_s: Optional[float] = typer.Option(None, "--chunk-delay-s", hidden=True),
        loop: bool = typer.Option(True, "--loop/--no-loop", help="Run the re-compression loop for devices that have a policy."),
        loop_dry_run: bool = typer.Option(False, help="The loop logs its decisions but pushes nothing."),
        log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING"),
        http: Optional[str] = typer.Option(None, "--http", help="Serve the dashboard and its JSON API on HOST:PORT, e.g. 127.0.0.1:8080 (off by default; docs/api.md)."),
        http_token: Optional[str] = typer.Option(None, "--http-token", help="Bearer token of the dashboard's actions (default: DATA_DIR/dashboard-token, made on loopback)."),
        http_token_file: Optional[Path] = typer.Option(None, "--http-token-file", help="File holding the dashboard's token (needed, or --http-token, off loopback)."),
        http_reports: Optional[list[Path]] = typer.Option(None, "--http-reports", help="Folder of `builder optimize` outputs whose Pareto fronts the dashboard shows; repeatable."),
    ) -> None:
        """Run the fleet's host side until Ctrl-C: registry, telemetry store, chunk server."""
        from rich.console import Console

        from builder.fleet.transport.embedded_broker import EmbeddedBrokerSettings
        from builder.fleet.transport.link import resolve_endpoint
        from builder.fleet.transport.serve import FleetServer, ServeSettings

        logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        refuse_open_embedded_broker(listen, broker)
        if worker_group is not None:
            from agent.mqtt import shared_filter
            from builder.errors import UsageError

            try:
                shared_filter(worker_group, "x")
            except ValueError as exc:
                raise UsageError(f"--worker-group: {exc}") from exc
        if worker_group is not None and not broker:
            raise UsageError("--worker-group shares one broker between serve workers: pass --broker mqtt://HOST:PORT "
                             "(the embedded broker is this process's own)")
        home = data_dir_or_default(data_dir)
        endpoint = None
        if broker:
            endpoint = resolve_endpoint(home, broker, username, read_password_file(password_file), ca_file)
        settings = ServeSettings(data_dir=home, broker=endpoint, embedded=EmbeddedBrokerSettings(host=listen, port=port),
                                 chunk_delay_s=duration_or_seconds(chunk_delay, chunk_delay_s, "--chunk-delay"),
                                 store_url=store_url, worker_group=worker_group)
        dashboard = None
        if http is not None:  # address and token checked before anything starts
            from builder.fleet.dashboard.server import prepare_dashboard

            dashboard = prepare_dashboard(home, http, token=http_token, token_file=http_token_file,
                                          reports_dirs=tuple(http_reports or ()), store_url=store_url)
        server = FleetServer(settings, telemetry_hooks=_telemetry_hooks(home, loop, loop_dry_run, store_url))
        signal.signal(signal.SIGTERM, lambda signum, frame: server.request_stop())
        server.start()
        console = Console(stderr=True)
        assert server.endpoint is not None
        kind = ("embedded broker (rumqttd): loopback only, no ACLs — laptop/demo use" if server.embedded
                else "external broker")
        assert server.store is not None
        group_text = f"; worker of group {worker_group}" if worker_group else ""
        console.print(f"builder serve: fleet on [bold]{server.endpoint.public_url()}[/] ({kind}); data dir {home}; "
                      f"store {server.store.location}{group_text}")
        if dashboard is not None:
            try:
                dashboard.start(endpoint=server.endpoint, transfers=server.transfer_bytes)
            except BaseException:
                server.stop()
                raise
            console.print(dashboard.banner())
        console.print("Ctrl-C to stop.")
        try:
            server.run_forever()
        except KeyboardInterrupt:
            server.stop()
        finally:
            if dashboard is not None:
                dashboard.stop()
