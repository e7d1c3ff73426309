"""Shared fixtures: the digits CNN trained once per session, its ONNX export, real data splits."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from builder.compression._export import export_module  # noqa: E402
from builder.compression.data import DataSource  # noqa: E402
from builder.loading.types import LoadedModel  # noqa: E402
from builder.zoo import digits_cnn  # noqa: E402

from tests.support.models import DIGITS_INPUTS  # noqa: E402,F401


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits_split() -> digits_cnn.DigitsSplit:
    return digits_cnn.load_digits_split()


@pytest.fixture(scope="session")
def _digits_trained() -> torch.nn.Module:
    torch.set_num_threads(1)
    return digits_cnn.trained(epochs=8)


@pytest.fixture()
def digits_model(_digits_trained: torch.nn.Module) -> torch.nn.Module:
    """A fresh copy of the trained CNN (tests may modify it)."""
    return copy.deepcopy(_digits_trained).eval()


@pytest.fixture()
def digits_loaded(digits_model: torch.nn.Module, tmp_path: Path) -> LoadedModel:
    path = tmp_path / "digits.onnx"
    names = export_module(digits_model, DIGITS_INPUTS, path)
    return LoadedModel("digits", "builder.zoo.digits_cnn:trained", "factory", path, DIGITS_INPUTS, names,
                       torch_module=digits_model)


@pytest.fixture(scope="session")
def digits_test_data(digits_split: digits_cnn.DigitsSplit) -> DataSource:
    return DataSource.from_arrays({"input": digits_split.x_test}, digits_split.y_test, DIGITS_INPUTS, "digits-test")


@pytest.fixture(scope="session")
def digits_train_data(digits_split: digits_cnn.DigitsSplit) -> DataSource:
    return DataSource.from_arrays({"input": digits_split.x_train}, digits_split.y_train, DIGITS_INPUTS, "digits-train")
