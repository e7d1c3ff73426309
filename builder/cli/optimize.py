"""`builder optimize` (not built yet: see the open issue that owns it)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the builder app."""
