"""Fixtures for loading tests: the digits CNN as a factory, a TorchScript file and an ONNX file."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory) -> dict[str, Path]:
    """The same digits CNN as an ONNX file (via the factory export) and as a TorchScript file."""
    import torch

    from builder.loading import load_model
    from builder.zoo import digits_cnn

    root = tmp_path_factory.mktemp("digits")
    loaded = load_model("builder.zoo.digits_cnn:untrained", "1x1x8x8", workdir=root)
    scripted = torch.jit.trace(digits_cnn.untrained(), torch.randn(*digits_cnn.INPUT_SHAPE))
    ts_path = root / "digits.pt"
    scripted.save(str(ts_path))
    return {"onnx": loaded.onnx_path, "torchscript": ts_path}
