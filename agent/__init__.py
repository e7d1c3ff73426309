"""EdgeFleet agent: the device side. Imports neither torch nor builder (a test enforces it)."""
from __future__ import annotations

__version__ = "0.1.0"
