"""`register_ladder`: a rung whose rebuild fails the engine's checks is left off, the rest register."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from builder.artifacts.registry import Registry
from builder.artifacts.signing import init_keys
from builder.errors import SearchError
from builder.search.objectives import Calibration, CandidateMetrics, ScoredCandidate
from builder.search.outputs import register_ladder
from builder.targets.profile_build import default_key_dir

MODEL = "builder.zoo.digits_cnn:trained"


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> Path:
    from builder.zoo.digits_cnn import write_npz

    return write_npz(tmp_path_factory.mktemp("data") / "digits-test.npz")


def _candidate(steps: list[dict]) -> ScoredCandidate:
    metrics = CandidateMetrics(fidelity=1.0, download_bytes=1000, file_bytes=1000, host_latency_ms=0.1,
                               device_latency_ms=0.2, energy_mj=1.0, accuracy=0.98)
    return ScoredCandidate(key=str(steps), steps=tuple(steps), metrics=metrics, objectives=(0.0, 0.2, 1000.0))


# A rebuild that the quantize step refuses every time: no int8 digits model keeps cosine 0.9999999.
REFUSED = [{"type": "fold"}, {"type": "quantize", "mode": "static", "min_cosine": 0.9999999}]
# The latency guard is off (check_latency): static int8 of this tiny CNN reads 1.2-1.3x slower than
# fp32 on some CPUs (AVX2 without VNNI), and this test is about the ladder, not about speed.
GOOD = [{"type": "fold"}, {"type": "quantize", "mode": "static", "check_latency": False}]


def _register(rungs, digits_data: Path, home: Path):
    outcome = SimpleNamespace(calibration=Calibration())  # the one field rung_metrics reads
    return register_ladder(rungs, outcome, model=MODEL, profile="raspberry-pi-4", input_shapes="1x1x8x8",
                           data=str(digits_data), registry_dir=home, model_name=None, out_dir=home / "out",
                           threads=1, profiles_dir=None)


@pytest.mark.slow
def test_a_rung_that_fails_its_rebuild_is_left_off_and_the_rest_register(digits_data, tmp_path):
    home = tmp_path / "home"
    init_keys(default_key_dir(home))
    good, refused = _candidate(GOOD), _candidate(REFUSED)
    built = _register([refused, good], digits_data, home)
    assert built.rungs == (good,) and len(built.artifact_ids) == 1
    assert len(built.skipped) == 1 and "fidelity collapse" in built.skipped[0]["reason"]
    ladder = Registry(home).list_ladder(built.model_name, "raspberry-pi-4")
    assert [r.artifact_id for r in ladder] == list(built.artifact_ids)
    assert sorted(p.name for p in (home / "out" / "ladder-recipes").iterdir()) == ["rung-0.toml"]
    init_keys(default_key_dir(tmp_path / "home2"))
    with pytest.raises(SearchError, match="no rung of the ladder built.*fidelity collapse"):
        _register([refused], digits_data, tmp_path / "home2")


@pytest.fixture(scope="module")
def digits_train(tmp_path_factory) -> Path:
    from builder.zoo.digits_cnn import write_npz

    return write_npz(tmp_path_factory.mktemp("train") / "digits-train.npz", part="train")


# A rung from a search with --train-data: channel pruning fine-tunes (1 epoch keeps the test short).
TRAINED = [{"type": "prune_channels", "ratio": 0.25, "epochs": 1}, {"type": "fold"}]


@pytest.mark.slow
# A fine-tuned rung's logits drift from the original's (cosine ~0.89 with top-1 agreement ~0.98): it is
# judged by the task against the original and by the precision's tolerance against its own ONNX.
def test_a_rung_that_trains_is_rebuilt_with_the_searchs_train_data(digits_data, digits_train, tmp_path):
    home = tmp_path / "home"
    init_keys(default_key_dir(home))
    outcome = SimpleNamespace(calibration=Calibration())
    built = register_ladder([_candidate(TRAINED)], outcome, model=MODEL, profile="raspberry-pi-4",
                            input_shapes="1x1x8x8", data=str(digits_data), registry_dir=home, model_name=None,
                            out_dir=home / "out", threads=1, profiles_dir=None, train_data=str(digits_train))
    assert built.skipped == () and len(built.artifact_ids) == 1
    manifest = Registry(home).manifest(built.artifact_ids[0])
    assert [step["type"] for step in manifest.recipe["step"]][:1] == ["prune_channels"]
