"""Entry point of ``agent`` (the device side). Filled in by the agent issue."""
from __future__ import annotations

import typer

from agent.errors import AgentError

typer_app = typer.Typer(name="agent", help="EdgeFleet on-device agent.", no_args_is_help=True,
                        pretty_exceptions_enable=False, add_completion=False)


@typer_app.callback()
def main() -> None:
    """EdgeFleet on-device agent: pulls models over MQTT, serves and benchmarks them, reports telemetry."""


@typer_app.command("version")
def version() -> None:
    """Print the agent version."""
    from agent import __version__

    print(__version__)


def app() -> None:
    import sys

    try:
        typer_app(prog_name="agent")
    except AgentError as exc:
        print(f"agent: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
