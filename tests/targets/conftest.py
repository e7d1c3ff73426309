"""Shared fixtures: the trained digits CNN exported once, its test split, signing keys, a registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.manifest import TensorSpec


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory):
    """(torch module, onnx path, test split) of the deterministic trained digits CNN."""
    import torch

    torch.set_num_threads(1)
    from builder.loading import load_model
    from builder.zoo import digits_cnn

    work = tmp_path_factory.mktemp("digits")
    loaded = load_model("builder.zoo.digits_cnn:trained", "1x1x8x8", workdir=work)
    return loaded, digits_cnn.load_digits_split()


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory: pytest.TempPathFactory, digits) -> Path:
    from builder.zoo import digits_cnn

    return digits_cnn.write_npz(tmp_path_factory.mktemp("data") / "digits_test.npz", digits[1])


@pytest.fixture(scope="session")
def digits_samples(digits):
    from builder.targets.pipeline import samples_from_arrays

    loaded, split = digits
    return samples_from_arrays({loaded.inputs[0].name: split.x_test}, split.y_test, 24, "digits test")


@pytest.fixture()
def keys(tmp_path: Path):
    from builder.artifacts.signing import init_keys, load_private_key

    paths = init_keys(tmp_path / "keys")
    return paths, load_private_key(paths.private)


def input_specs(loaded) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(s.name, tuple(s.shape), s.dtype) for s in loaded.inputs)


def reference(loaded, samples):
    from builder.targets.pipeline import reference_outputs

    return reference_outputs(loaded.onnx_path, samples)


def first_output(outputs) -> np.ndarray:
    return np.concatenate([np.asarray(next(iter(o.values()))) for o in outputs])
