"""Entry point of ``builder``. Command modules import heavy libraries (torch, onnx) lazily inside
their commands so ``builder --help`` stays fast."""
from __future__ import annotations

import typer

from builder.cli import analyze, artifacts, build, compress, fleet, keys, optimize, profiles, push, serve
from builder.cli import policy as fleet_policy  # after fleet: adds `fleet policy` and `fleet events`
from builder.cli import noise
from builder.cli.errors import run_app
from builder.errors import BuilderError

typer_app = typer.Typer(
    name="builder",
    help="EdgeFleet builder: analyse, compress, cross-compile and deploy models to edge devices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)



def _print_version(value: bool) -> None:
    if value:
        from builder import __version__

        typer.echo(f"builder {__version__}")
        raise typer.Exit()


@typer_app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show library logs and warnings (torch, ONNX Runtime, LiteRT...)."),
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """EdgeFleet builder: analyse, compress, cross-compile and deploy models to edge devices."""
    noise.configure(verbose)


for module in (profiles, analyze, compress, build, artifacts, keys, optimize, serve, push, fleet, fleet_policy):
    module.register(typer_app)


def app() -> None:
    run_app(typer_app, (BuilderError,), "builder")


if __name__ == "__main__":
    app()
