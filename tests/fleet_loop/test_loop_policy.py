"""Policy TOML: parsing, validation messages, storage and resolution device > group > default."""
from __future__ import annotations

from pathlib import Path

import pytest

from builder.errors import UsageError
from builder.fleet.loop.policy import DEFAULT_SCOPE, Policy, PolicyStore, load_policy_file, scope_for
from builder.fleet.transport.store import open_store

FULL = """
[objective]
latency_p95_ms = 20
window_s = 5

[floor]
accuracy = 0.95
fidelity = 0.98

[budget]
energy_mj = 4.5
memory_mb = 64

[pacing]
violate_windows = 4
cooldown_s = 30
headroom_fraction = 0.5
headroom_windows = 8

[search]
enabled = false
model = "builder.zoo.digits_cnn:trained"
data = "digits.npz"
trials = 12
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_full_policy_parses_and_round_trips(tmp_path: Path) -> None:
    pol = load_policy_file(write(tmp_path, FULL))
    assert pol.latency_p95_ms == 20.0 and pol.window_s == 5.0
    assert (pol.accuracy_floor, pol.fidelity_floor) == (0.95, 0.98)
    assert (pol.energy_mj_budget, pol.memory_mb_budget) == (4.5, 64.0)
    assert pol.pacing.violate_windows == 4 and isinstance(pol.pacing.violate_windows, int)
    assert pol.pacing.judge_windows == 2  # default kept
    assert pol.search_enabled is False
    assert (pol.search_model, pol.search_data, pol.search_input_shape, pol.search_trials) == (
        "builder.zoo.digits_cnn:trained", "digits.npz", None, 12)
    again = load_policy_file(write(tmp_path, pol.to_toml()))
    assert again == pol
    assert Policy.from_dict(pol.to_dict()) == pol


def test_minimal_policy_needs_only_the_objective(tmp_path: Path) -> None:
    pol = load_policy_file(write(tmp_path, "[objective]\nlatency_p95_ms = 8.5\n"))
    assert pol.latency_p95_ms == 8.5 and pol.accuracy_floor is None and pol.search_enabled


@pytest.mark.parametrize("text, fragment", [
    ("[floor]\naccuracy = 0.9\n", "missing objective.latency_p95_ms"),
    ("[objective]\nlatency_p95_ms = -1\n", "latency_p95_ms must be > 0"),
    ("[objective]\nlatency_p95_ms = 'fast'\n", "must be a number"),
    ("[objective]\nlatency_p95_ms = 10\n[floor]\naccuracy = 95\n", "floor.accuracy must be between 0 and 1"),
    ("[objective]\nlatency_p95_ms = 10\n[pacing]\nviolate_windows = 0\n", "violate_windows must be >= 1"),
    ("[objective]\nlatency_p95_ms = 10\n[pacing]\nviolate_windows = 2.5\n", "whole number"),
    ("[objective]\nlatency_p95_ms = 10\n[pacing]\nheadroom_fraction = 0.9\n", "must not exceed pacing.step_up_margin"),
    ("[objective]\nlatency_p95_ms = 10\n[pacing]\ncooldown = 3\n", "unknown key pacing.cooldown"),
    ("[objectives]\nlatency_p95_ms = 10\n", "unknown section [objectives]"),
    ("[objective]\nlatency_p95_ms = 10\n[search]\nenabled = 'yes'\n", "search.enabled must be true or false"),
    ("[objective\nlatency_p95_ms = 10\n", "not valid TOML"),
])
def test_bad_policy_is_one_clear_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_policy_file(path)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert message.startswith(str(path))


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_policy_file(tmp_path / "nope.toml")


def test_store_resolves_device_then_group_then_default(tmp_path: Path, store_url: str | None) -> None:
    store = PolicyStore(open_store(tmp_path, store_url))
    default, group, own = Policy(latency_p95_ms=50), Policy(latency_p95_ms=20), Policy(latency_p95_ms=5)
    assert store.resolve("pi-1", ("kitchen",)) == (None, None)
    store.set(scope_for(), default, now=1.0)
    store.set(scope_for(group="kitchen"), group, now=1.0)
    store.set(scope_for(device_id="pi-1"), own, now=1.0)
    assert store.resolve("pi-1", ("kitchen",)) == ("device:pi-1", own)
    assert store.resolve("pi-2", ("kitchen",)) == ("group:kitchen", group)
    assert store.resolve("pi-3", ()) == (DEFAULT_SCOPE, default)
    assert store.remove("device:pi-1") and not store.remove("device:pi-1")
    assert store.resolve("pi-1", ("kitchen",))[0] == "group:kitchen"
    with pytest.raises(UsageError, match="not both"):
        scope_for(device_id="a", group="b")
