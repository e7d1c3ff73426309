"""Distillation: the student trained on the teacher's soft targets ends closer to the teacher than the
same student trained on labels alone; students come from the teacher (narrower) or a factory."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from builder.compression.distillation import DistillStep
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
