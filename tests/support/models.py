"""Constants shared by test modules. Import as ``tests.support.models``: ``from conftest import``
breaks when several test folders each have a conftest.py (the name resolves to whichever loaded last)."""
from __future__ import annotations

from builder.loading.types import InputSpec

DIGITS_INPUTS = (InputSpec("input", (1, 1, 8, 8)),)
