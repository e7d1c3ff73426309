"""EdgeFleet builder: the host side (analyse, compress, cross-compile, deploy, re-compress)."""
from __future__ import annotations

__version__ = "0.1.0"
