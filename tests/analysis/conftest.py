"""Analysis tests run torch on one thread (the machine is shared)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)
