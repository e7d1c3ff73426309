"""--data: .npz by input name or single key x, factories, and one clear DataError for mismatches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.compression.data import DataSource
from builder.errors import DataError
from builder.loading.types import InputSpec

IMAGE = (InputSpec("input", (1, 1, 8, 8)),)
TEXT = (InputSpec("input_ids", (1, 16), "int64", {0: "batch", 1: "seq"}),
        InputSpec("attention_mask", (1, 16), "int64", {0: "batch", 1: "seq"}))


def test_single_input_npz_with_key_x_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((10, 1, 8, 8), np.float64), y=np.arange(10))
    data = DataSource.from_arg(str(path), IMAGE)
    assert len(data) == 10 and data.has_labels
    assert data.inputs["input"].dtype == np.float32  # cast within the float kind
    batches = list(data.batches(4))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 2]
    shuffled = [labels for _, labels in data.labelled_batches(4, shuffle=True, seed=1)]
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(10))


def test_multi_input_npz_by_name_accepts_other_sequence_lengths(tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    np.savez(path, input_ids=np.ones((3, 32), np.int32), attention_mask=np.ones((3, 32), np.int64))
    data = DataSource.from_arg(str(path), TEXT)
    assert data.inputs["input_ids"].dtype == np.int64 and not data.has_labels


@pytest.mark.parametrize("arrays, fragment", [
    ({"pixels": np.zeros((2, 1, 8, 8), np.float32)}, "model inputs are ['input']"),
    ({"input": np.zeros((2, 1, 9, 8), np.float32)}, "axis 2 is fixed"),
    ({"input": np.zeros((2, 8, 8), np.float32)}, "expects 4 dims"),
    ({"input": np.array([["a"] * 8] * 8)[None, None].repeat(2, 0)}, "expects float32"),
    ({"input": np.zeros((2, 1, 8, 8), np.float32), "y": np.array([0.5, 1.5])}, "integer class ids"),
    ({"input": np.zeros((2, 1, 8, 8), np.float32), "y": np.array([1, 2, 3])}, "1-D array of 2"),
])
def test_mismatched_npz_is_one_clear_data_error(tmp_path: Path, arrays: dict, fragment: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        DataSource.from_arg(str(path), IMAGE)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_same_kind_casts_warn_and_int_for_float_is_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((4, 1, 8, 8), np.float64))
    with caplog.at_level("WARNING", logger="builder.compression.data"):
        assert DataSource.from_arg(str(path), IMAGE).inputs["input"].dtype == np.float32
    assert "is float64, cast to the model's float32" in caplog.text  # a safe cast, but never a silent one
    np.savez(path, x=np.zeros((4, 1, 8, 8), np.uint8))  # raw pixels for a float model: wrong array, not a cast
    with pytest.raises(DataError, match="is uint8, the model expects float32"):
        DataSource.from_arg(str(path), IMAGE)
    np.savez(path, input_ids=np.ones((3, 16), np.float32), attention_mask=np.ones((3, 16), np.int64))
    with pytest.raises(DataError, match="'input_ids' is float32, the model expects int64"):
        DataSource.from_arg(str(path), TEXT)


def test_missing_file_and_bad_factory_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        DataSource.from_arg(str(tmp_path / "nope.npz"), IMAGE)
    with pytest.raises(DataError, match="cannot import data factory"):
        DataSource.from_arg("no_such_module_xyz:batches", IMAGE)


def make_batches():  # a factory target for the test below
    for _ in range(3):
        yield np.ones((2, 1, 8, 8), np.float32), np.array([1, 2])


def test_factory_batches_are_materialised() -> None:
    data = DataSource.from_arg(f"{__name__}:make_batches", IMAGE)
    assert len(data) == 6 and data.labels.tolist() == [1, 2] * 3
