"""Device profiles: one TOML data file per device class. Code that reads them lives in builder.profiles.

This package exists so the TOML files install with the wheel; ``PROFILE_DIR`` is where they are.
"""
from __future__ import annotations

from pathlib import Path

PROFILE_DIR = Path(__file__).resolve().parent
