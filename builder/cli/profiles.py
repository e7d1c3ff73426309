"""`builder profiles list|show`: the device classes EdgeFleet knows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from builder.cli.tables import print_table
from builder.profiles import PROFILES_ENV, get_profile, load_profiles

ProfilesDirOption = typer.Option(None, "--profiles-dir", help=f"Extra directory of profile TOML files (also ${PROFILES_ENV}).")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Device profiles: one TOML file per device class.", no_args_is_help=True)
    app.add_typer(group, name="profiles")

    @group.command("list")
    def list_profiles(profiles_dir: Optional[list[Path]] = ProfilesDirOption, as_json: bool = typer.Option(False, "--json")) -> None:
        """List the known device profiles."""
        profiles = load_profiles(profiles_dir)
        if as_json:
            print(json.dumps([p.to_dict() for p in profiles.values()], indent=2))
            return
        table = Table(title="Device profiles")
        for col in ("name", "arch", "cores", "fp32 GFLOP/s", "int8 GOP/s", "RAM MB", "BW GB/s", "accelerator", "preferred"):
            table.add_column(col)
        for p in profiles.values():
            table.add_row(p.name, p.arch, str(p.cores), f"{p.peak_fp32_gflops:g}", f"{p.peak_int8_gops:g}", str(p.ram_mb),
                          f"{p.bandwidth_gbps:g}", p.accelerator_kind, f"{p.preferred_runtime} / {p.preferred_format} / {p.preferred_precision}")
        print_table(table, keep=("name",), drop_order=("BW GB/s", "cores", "accelerator", "arch", "int8 GOP/s"))

    @group.command("show")
    def show_profile(name: str, profiles_dir: Optional[list[Path]] = ProfilesDirOption) -> None:
        """Show every field of one profile (and the file it came from)."""
        print(json.dumps(get_profile(name, profiles_dir).to_dict(), indent=2))
