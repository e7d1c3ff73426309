"""Distillation: the student trained on the teacher's soft targets ends closer to the teacher than the
same student trained on labels alone; students come from the teacher (narrower) or a factory (seeded
by the run's seed)."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from builder.compression.data import DataSource
from builder.compression.distillation import DistillStep
from builder.zoo import digits_cnn
from builder.zoo.digits_cnn import DigitsCNN
from compression_helpers import accuracy, context, torch_state
from tests.support.models import DIGITS_INPUTS


def same_shape_student() -> DigitsCNN:
    torch.manual_seed(1)
    return DigitsCNN(width=32)


def _kl_to_teacher(student: torch.nn.Module, teacher: torch.nn.Module, x) -> float:
    with torch.no_grad():
        t = torch.log_softmax(teacher(torch.from_numpy(x)), dim=1)
        s = torch.log_softmax(student(torch.from_numpy(x)), dim=1)
    return float(torch.nn.functional.kl_div(s, t, reduction="batchmean", log_target=True))


def test_distilled_student_is_closer_to_teacher_than_label_trained_student(
        digits_model: torch.nn.Module, digits_train_data, digits_test_data, tmp_path: Path) -> None:
    x = digits_test_data.inputs["input"]
    kl = {}
    for alpha in (1.0, 0.5):  # 1.0 = labels only (the teacher ignored); 0.5 = Hinton's mix
        step = DistillStep(width=0.45, epochs=4, lr=3e-3, alpha=alpha, temperature=4.0)
        state, record = step.apply(torch_state(copy.deepcopy(digits_model), DIGITS_INPUTS),
                                   context(tmp_path, train=digits_train_data, teacher=digits_model))
        assert record.facts["params_after"] * 4 <= record.facts["params_before"]  # >= 4x fewer parameters
        assert state.torch_module.features[0].out_channels < digits_model.features[0].out_channels
        assert accuracy(state.torch_module, digits_test_data) >= 0.93
        kl[alpha] = _kl_to_teacher(state.torch_module, digits_model, x)
    assert kl[0.5] < 0.7 * kl[1.0]


def test_factory_student_starts_from_teacher_weights_where_shapes_match(
        digits_model: torch.nn.Module, digits_train_data, tmp_path: Path) -> None:
    step = DistillStep(student=f"{__name__}:same_shape_student", epochs=1, lr=1e-4)
    state, record = step.apply(torch_state(digits_model, DIGITS_INPUTS),
                               context(tmp_path, train=digits_train_data, teacher=digits_model))
    assert record.facts["initialised_from_teacher"] == len(digits_model.state_dict())
    assert state.torch_module is not digits_model


FACTORY_STUDENT = "builder.zoo.digits_cnn:student"


def test_few_label_random_init_student_gains_from_the_teacher(
        digits_model: torch.nn.Module, digits_split: digits_cnn.DigitsSplit, digits_test_data, tmp_path: Path) -> None:
    """The regime where distillation matters: 10 labelled images per class (plus shifted noisy copies)
    for a 5x smaller, randomly initialised student; the teacher saw the whole training set."""
    x, y = digits_cnn.few_labels(digits_split.x_train, digits_split.y_train, per_class=10, seed=0)
    x, y = digits_cnn.shifted_copies(x, y, copies=3, seed=0)
    few = DataSource.from_arrays({"input": x}, y, DIGITS_INPUTS, "digits-few-labels")
    results = {}
    for alpha in (1.0, 0.5):  # same student, init, inputs and order; only the teacher's soft targets differ
        step = DistillStep(student=FACTORY_STUDENT, epochs=20, alpha=alpha)
        state, record = step.apply(torch_state(copy.deepcopy(digits_model), DIGITS_INPUTS),
                                   context(tmp_path, train=few, teacher=digits_model))
        assert record.facts["params_after"] * 4 <= record.facts["params_before"]
        results[alpha] = (_kl_to_teacher(state.torch_module, digits_model, digits_test_data.inputs["input"]),
                          accuracy(state.torch_module, digits_test_data))
    assert results[0.5][0] < 0.5 * results[1.0][0]  # KL to the teacher
    assert results[0.5][1] > results[1.0][1]  # test accuracy


def test_factory_student_initialisation_follows_the_run_seed(
        digits_model: torch.nn.Module, digits_train_data, tmp_path: Path) -> None:
    small = digits_train_data.take(64)
    global_state = torch.random.get_rng_state()
    trained = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ctx = dataclasses.replace(context(tmp_path, train=small, teacher=digits_model), seed=seed)
        state, _ = DistillStep(student=FACTORY_STUDENT, epochs=1).apply(torch_state(digits_model, DIGITS_INPUTS), ctx)
        trained[name] = state.torch_module.state_dict()
    assert all(torch.equal(trained["a"][k], trained["b"][k]) for k in trained["a"])
    assert not torch.equal(trained["a"]["features.0.weight"], trained["c"]["features.0.weight"])
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the caller's RNG is left alone
