"""`builder optimize` end to end on the digits CNN with the real compression engine (few trials)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from builder.compression.recipe import Recipe
from builder.search.pareto import dominates

ROOT = Path(__file__).resolve().parents[2]
MODEL = "builder.zoo.digits_cnn:trained"


@pytest.fixture(scope="module")
def digits_data(tmp_path_factory) -> Path:
    from builder.zoo.digits_cnn import write_npz

    return write_npz(tmp_path_factory.mktemp("data") / "digits-test.npz")


def _builder(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, EDGEFLEET_HOME=str(home), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "builder.cli.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def _optimize(data: Path, out: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    return _builder("optimize", MODEL, "--input-shape", "1x1x8x8", "--profile", "raspberry-pi-4", "--data", str(data),
                    "--trials", "4", "--population", "4", "--eval-samples", "150", "--out", str(out), *extra, home=home)


@pytest.mark.slow
def test_optimize_digits_respects_targets_writes_outputs_and_reruns_from_cache(tmp_path, digits_data):
    home = tmp_path / "home"
    keys = _builder("keys", "init", home=home)
    assert keys.returncode == 0, keys.stderr
    first = _optimize(digits_data, tmp_path / "run1", home, "--max-accuracy-drop", "2%",
                      "--tensorboard", str(tmp_path / "tb"), "--ladder-rungs", "2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = tmp_path / "run1"
    report = json.loads((out / "report.json").read_text())
    chosen = report["chosen"]
    assert report["baseline"]["accuracy"] - chosen["accuracy"] <= 0.02 + 1e-9
    assert chosen["feasible"]
    front = [tuple(r[k] for k in ("quality", "device_latency_ms", "download_bytes")) for r in report["front"]]
    every = [tuple(r[k] for k in ("quality", "device_latency_ms", "download_bytes")) for r in report["candidates"]]
    for point in front:  # quality is maximised: compare on (-quality, latency, size)
        neg = (-point[0], point[1], point[2])
        assert not any(dominates((-q, lat, s), neg) for q, lat, s in every)
    recipe = Recipe.from_toml(out / "recipe.toml")  # what `builder compress/build --recipe` read
    assert [s.name for s in recipe.steps] == [s["type"] for s in chosen["steps"]]
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["rungs"] and all(r["artifact_id"] for r in ladder["rungs"])
    from builder.artifacts.registry import Registry

    rungs = Registry(home).list_ladder(report["ladder"]["model_name"], "raspberry-pi-4")
    assert [r.artifact_id for r in rungs] == [r["artifact_id"] for r in ladder["rungs"]]
    qualities = [r["accuracy"] for r in ladder["rungs"]]
    assert qualities == sorted(qualities, reverse=True)  # most accurate first

    # Same model, data and recipes in a fresh study: every candidate comes from the cache.
    second = _optimize(digits_data, tmp_path / "run2", home, "--max-accuracy-drop", "2%", "--no-ladder", "--json")
    assert second.returncode == 0, second.stderr[-3000:]
    again = json.loads((tmp_path / "run2" / "report.json").read_text())
    assert json.loads(second.stdout) == again  # --json: the report on stdout, tables on stderr
    assert again["this_run"]["evaluations"] == 0
    assert again["this_run"]["cache_hits"] >= 1
    assert again["chosen"]["key"] == chosen["key"]


@pytest.mark.slow
def test_impossible_target_is_reported_with_the_gap_and_exits_non_zero(tmp_path, digits_data):
    home = tmp_path / "home"
    result = _optimize(digits_data, tmp_path / "run", home, "--max-latency", "1us", "--trials", "2", "--no-ladder")
    assert result.returncode == 1
    assert "builder: error: no recipe of" in result.stderr
    assert "closest: est. latency" in result.stderr and "over by" in result.stderr
    assert "Traceback" not in result.stderr
    assert "closest candidates" in result.stdout
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["chosen"] is None and report["infeasible"]["closest"]
    assert not (tmp_path / "run" / "recipe.toml").exists()


def test_bad_target_is_one_line_without_running(tmp_path, digits_data):
    result = _optimize(digits_data, tmp_path / "run", tmp_path / "home", "--max-size", "5 parsecs", "--no-ladder")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["builder: error: --max-size '5 parsecs': unknown unit 'parsecs'; use B, kB, MB, GB, KiB, MiB or GiB"]


def test_ladder_without_signing_key_is_refused_up_front(tmp_path, digits_data):
    result = _optimize(digits_data, tmp_path / "run", tmp_path / "home", "--max-accuracy-drop", "1%")
    assert result.returncode == 2
    assert "no signing key" in result.stderr and "--no-ladder" in result.stderr


def test_accuracy_target_on_unlabelled_npz_is_refused_before_loading_the_model(tmp_path):
    import numpy as np

    data = tmp_path / "unlabelled.npz"
    np.savez(data, x=np.zeros((4, 1, 8, 8), np.float32))
    out = tmp_path / "out"
    proc = _optimize(data, out, tmp_path / "home", "--max-accuracy-drop", "1%", "--no-ladder")
    assert proc.returncode != 0
    assert "--max-accuracy-drop needs labels in --data" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing ran, nothing written


@pytest.mark.slow
def test_report_and_ladder_json_are_written_when_no_rung_builds(tmp_path, digits_data):
    """The search's results survive a ladder that cannot be built: here every rung is refused because
    the profile only runs LiteRT, which converts the PyTorch model and cannot take an ONNX recipe."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    text = (ROOT / "device_profiles" / "android-arm64.toml").read_text(encoding="utf-8")
    text = text.replace('name = "android-arm64"', 'name = "litert-only-phone"')
    text = text.replace('available = ["litert", "onnxruntime"]', 'available = ["litert"]')
    text = "\n".join(line for line in text.splitlines() if not line.startswith("fallback_"))  # no other runtime to fall back on
    (profiles / "litert-only-phone.toml").write_text(text, encoding="utf-8")
    home = tmp_path / "home"
    assert _builder("keys", "init", home=home).returncode == 0
    out = tmp_path / "run"
    result = _builder("optimize", MODEL, "--input-shape", "1x1x8x8", "--profile", "litert-only-phone",
                      "--profiles-dir", str(profiles), "--data", str(digits_data), "--trials", "2",
                      "--population", "2", "--eval-samples", "100", "--out", str(out), home=home)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "no rung of the ladder built" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["chosen"] is not None and report["candidates"]
    assert report["ladder"]["status"] == "failed" and "no rung of the ladder built" in report["ladder"]["error"]
    ladder = json.loads((out / "ladder.json").read_text())
    assert ladder["rungs"] and all(r["artifact_id"] is None for r in ladder["rungs"])
