"""One CLI grammar across `builder` and `agent` (docs/cli.md): --version, --profile/-p, repeatable
--input-shape, packaged recipes by name, --json, tables that fit 80 columns, no silent overwrite,
decimal size units, library noise silenced unless --verbose. Real processes, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
BUILDER = [sys.executable, "-m", "builder.cli.main"]
AGENT = [sys.executable, "-c", "import sys; from agent.cli import app; sys.argv[0] = 'agent'; app()"]


def run(cmd: list[str], *args: str, home: Path | None = None, columns: int | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if home is not None:
        env["EDGEFLEET_HOME"] = str(home)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    else:
        env.pop("COLUMNS", None)
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd or ROOT)


def one_line_error(proc: subprocess.CompletedProcess, prog: str = "builder") -> str:
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr
    return lines[0]


def assert_fits(text: str, width: int = 80) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, "\n".join(too_wide)


@pytest.fixture(scope="module")
def two_input_model(tmp_path_factory) -> Path:
    """a + b with every dim dynamic: both inputs need --input-shape."""
    root = tmp_path_factory.mktemp("grammar")
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", "k"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", "j"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "k"])
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, root / "add.onnx")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    relu = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])]),
                             opset_imports=[helper.make_opsetid("", 17)])
    relu.ir_version = 8
    onnx.save(relu, root / "relu.onnx")
    return root


def test_builder_and_agent_print_their_version() -> None:
    from agent import __version__ as agent_version
    from builder import __version__ as builder_version

    builder = run(BUILDER, "--version")
    agent = run(AGENT, "--version")
    assert builder.returncode == 0 and builder.stdout.strip() == f"builder {builder_version}", builder.stderr
    assert agent.returncode == 0 and agent.stdout.strip() == f"agent {agent_version}", agent.stderr


def test_repeated_input_shape_options_are_merged(two_input_model: Path) -> None:
    proc = run(BUILDER, "analyze", str(two_input_model / "add.onnx"), "--input-shape", "a=2x3",
               "--input-shape", "b=2x3", "--profile", "raspberry-pi-4", "--json")
    assert proc.returncode == 0, proc.stderr
    inputs = {i["name"]: i["shape"] for i in json.loads(proc.stdout)["model"]["inputs"]}
    assert inputs == {"a": [2, 3], "b": [2, 3]}


def test_profile_is_spelled_profile_and_old_device_still_works_with_a_warning(two_input_model: Path) -> None:
    model = str(two_input_model / "relu.onnx")
    new = run(BUILDER, "analyze", model, "-p", "raspberry-pi-5", "--json")
    assert new.returncode == 0 and new.stderr.strip() == "", new.stderr
    assert {e["profile"] for e in json.loads(new.stdout)["estimates"]} == {"raspberry-pi-5"}
    old = run(BUILDER, "analyze", model, "--device", "raspberry-pi-5", "--json")
    assert old.returncode == 0 and "--device is deprecated; use --profile" in old.stderr
    assert json.loads(old.stdout)["estimates"] == json.loads(new.stdout)["estimates"]


def test_packaged_recipes_resolve_by_name_and_unknown_names_list_them(tmp_path: Path) -> None:
    from builder.compression.recipe import PACKAGED_RECIPES_DIR, Recipe, packaged_recipe_names, resolve_recipe
    from builder.errors import UsageError

    path = resolve_recipe("sparse-clustered")
    assert path == PACKAGED_RECIPES_DIR / "sparse-clustered.toml" and Recipe.from_toml(path).steps
    own = tmp_path / "mine.toml"
    own.write_text('[[step]]\ntype = "prune_onnx"\n')
    assert resolve_recipe(str(own)) == own  # a path still works
    with pytest.raises(UsageError) as info:
        resolve_recipe("sparse-clusterd")
    assert all(name in str(info.value) for name in packaged_recipe_names()) and "\n" not in str(info.value)
    proc = run(BUILDER, "compress", "m.onnx", "--data", "d.npz", "--out", str(tmp_path / "o"), "--recipe", "nope")
    assert "packaged recipes: " in one_line_error(proc) and "sparse-clustered" in proc.stderr


def test_compress_refuses_to_overwrite_an_existing_output_without_force(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"earlier result")
    proc = run(BUILDER, "compress", "m.onnx", "--data", "d.npz", "--out", str(out), "--prune", "0.3")
    assert "already exists; pass --force" in one_line_error(proc)
    assert (out / "model.onnx").read_bytes() == b"earlier result"


def test_agent_bench_takes_the_model_as_a_positional_argument(two_input_model: Path) -> None:
    proc = run(AGENT, "bench", str(two_input_model / "relu.onnx"), "--runs", "3", "--warmup", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["latency"]["p50"] > 0


def test_keys_show_and_artifacts_verify_have_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(BUILDER, "keys", "init", "--data-dir", str(home)).returncode == 0
    shown = run(BUILDER, "keys", "show", "--data-dir", str(home), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert Path(info["public_key"]).is_file() and len(info["key_id"]) >= 8
    old = run(BUILDER, "keys", "show", "--registry-dir", str(home), "--json")  # the old name still works
    assert json.loads(old.stdout) == info


def test_fleet_status_fits_80_columns_and_keeps_ids_and_profiles_whole(tmp_path: Path) -> None:
    from builder.fleet.transport.store import TelemetryRow, open_store

    home = tmp_path / "home"
    with open_store(home) as store:
        for device_id, profile in (("kitchen-pi-01", "raspberry-pi-4"), ("kitchen-pi-02", "raspberry-pi-5"),
                                   ("garage-orin-01", "jetson-orin-nano")):
            store.register_device(device_id, profile, group="kitchen")
            store.record_status(device_id, online=True, active_artifact_id="c" * 64)
            store.add_telemetry(TelemetryRow(device_id, 1, time.time(), "periodic", model_id="c" * 64, window_s=10,
                                             requests=120, p50_ms=4.2, p95_ms=7.9, temperature_c=51.0, power_w=2.4,
                                             power_source="estimate (profile)"))
    proc = run(BUILDER, "fleet", "status", "--data-dir", str(home), columns=80)
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    for cell in ("kitchen-pi-01", "kitchen-pi-02", "garage-orin-01", "raspberry-pi-4", "raspberry-pi-5",
                 "jetson-orin-nano"):
        assert cell in proc.stdout, proc.stdout
    wide = run(BUILDER, "fleet", "status", "--data-dir", str(home), columns=200)
    assert "temp" in wide.stdout and "51 °C" in wide.stdout  # nothing left out when there is room


def test_profiles_list_fits_80_columns() -> None:
    proc = run(BUILDER, "profiles", "list", columns=80)
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    for name in ("raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "android-arm64"):
        assert name in proc.stdout


def test_sizes_are_printed_in_decimal_units() -> None:
    from builder.units import format_bytes

    assert format_bytes(1_500_000) == "1.5 MB" and format_bytes(244_000) == "244 kB"
    assert format_bytes(999) == "999 B" and format_bytes(2_340_000_000) == "2.34 GB"


def test_library_noise_is_silenced_unless_verbose() -> None:
    """torchao's missing-kernel lines and torch's _pytree notices: the logging the CLI silences."""
    code = "import sys; from builder.cli import noise; noise.configure(sys.argv[1] == 'v'); import torchao"
    quiet = run([sys.executable, "-c", code, "q"])
    loud = run([sys.executable, "-c", code, "v"])
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr
    assert "Failed to load" in loud.stderr  # the noise is real on this install...
    assert "Failed to load" not in quiet.stderr and "_pytree" not in quiet.stderr  # ...and gone without -v


def test_quiet_stderr_silences_native_writes_but_not_our_stream() -> None:
    code = ("import logging, os, sys\nfrom builder.cli import noise\nnoise.configure(False)\n"
            "with noise.quiet_stderr():\n    os.write(2, b'native noise\\n')\n    print('library print')\n"
            "    logging.getLogger('builder.x').warning('our warning')\n    print('ours', file=sys.stderr)\n"
            "os.write(2, b'after\\n')\n")
    proc = run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "native noise" not in proc.stderr and "library print" not in proc.stdout
    assert "our warning" in proc.stderr and "ours" in proc.stderr and "after" in proc.stderr


def test_optimize_warns_when_the_calibration_comes_from_agents_on_another_machine(tmp_path: Path) -> None:
    from builder.cli.optimize import calibration_host_warning
    from builder.fleet.transport.store import open_store
    from builder.search.objectives import Calibration

    learned = Calibration(0.121, 3, "fleet store x (raspberry-pi-4 devices): 3 benchmarks")
    with open_store(tmp_path) as store:
        store.record_hello("laptop-pi", agent_version="0.1.0", profile="raspberry-pi-4", machine="x86_64",
                           runtimes=("onnxruntime",), execution_providers=(), active_artifact_id=None)
        store.record_hello("real-pi", agent_version="0.1.0", profile="raspberry-pi-4", machine="aarch64",
                           runtimes=("onnxruntime",), execution_providers=(), active_artifact_id=None)
    warning = calibration_host_warning(tmp_path, "raspberry-pi-4", learned, None)
    assert warning is not None and "laptop-pi (x86_64)" in warning and "real-pi" not in warning
    assert "×0.121" in warning and "--latency-factor" in warning
    assert calibration_host_warning(tmp_path, "raspberry-pi-4", Calibration(), None) is None  # uncalibrated
    assert calibration_host_warning(tmp_path, "raspberry-pi-5", learned, None) is None  # no such devices


def test_fleet_events_since_takes_a_duration_and_since_s_still_works(tmp_path: Path) -> None:
    from builder.fleet.transport.store import DeploymentEvent, open_store

    now = time.time()
    with open_store(tmp_path) as store:
        store.register_device("pi", "raspberry-pi-4")
        store.add_event(DeploymentEvent("pi", now - 3600, "loop.step_down", detail={"reason": "old"}))
        store.add_event(DeploymentEvent("pi", now - 60, "loop.step_down", detail={"reason": "recent"}))
    recent = run(BUILDER, "fleet", "events", "--device", "pi", "--since", "10m", "--json", "--data-dir", str(tmp_path))
    assert recent.returncode == 0, recent.stderr
    assert [e["detail"]["reason"] for e in json.loads(recent.stdout)] == ["recent"]
    old = run(BUILDER, "fleet", "events", "--device", "pi", "--since-s", "600", "--json", "--data-dir", str(tmp_path))
    assert json.loads(old.stdout) == json.loads(recent.stdout) and "--since-s N is deprecated" in old.stderr


def test_fleet_add_device_has_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(BUILDER, "keys", "init", "--data-dir", str(home)).returncode == 0
    proc = run(BUILDER, "fleet", "add-device", "pi-01", "--profile", "raspberry-pi-4", "--group", "kitchen",
               "--data-dir", str(home), "--agent-data-dir", str(tmp_path / "agent"),
               "--broker-url", "mqtt://127.0.0.1:1883", "--json")
    assert proc.returncode == 0, proc.stderr
    added = json.loads(proc.stdout)
    assert added["device_id"] == "pi-01" and added["profile"] == "raspberry-pi-4" and added["group"] == "kitchen"
    assert Path(added["agent_toml"]).is_file()


def test_add_device_telemetry_interval_is_a_duration_and_the_seconds_spelling_still_works(tmp_path: Path) -> None:
    home = tmp_path / "home"
    assert run(BUILDER, "keys", "init", "--data-dir", str(home)).returncode == 0
    for device, flags in (("pi-01", ("--telemetry-interval", "2m")), ("pi-02", ("--telemetry-interval-s", "5"))):
        proc = run(BUILDER, "fleet", "add-device", device, "--profile", "raspberry-pi-4", "--data-dir", str(home),
                   "--agent-data-dir", str(tmp_path / device), "--broker-url", "mqtt://127.0.0.1:1883", "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        toml = Path(json.loads(proc.stdout)["agent_toml"]).read_text()
        assert ("telemetry_interval_s = 120" in toml) if device == "pi-01" else ("telemetry_interval_s = 5" in toml), toml
    assert "--telemetry-interval-s N is deprecated" in proc.stderr
    proc = run(BUILDER, "fleet", "add-device", "pi-03", "--profile", "raspberry-pi-4", "--data-dir", str(home),
               "--agent-data-dir", str(tmp_path / "pi-03"), "--telemetry-interval", "often")
    assert proc.returncode != 0 and "--telemetry-interval" in proc.stderr and "Traceback" not in proc.stderr


def test_analyze_tables_fit_80_columns_with_every_profile_named(two_input_model: Path) -> None:
    proc = run(BUILDER, "analyze", str(two_input_model / "relu.onnx"), columns=80)
    assert proc.returncode == 0, proc.stderr
    assert_fits(proc.stdout)
    for name in ("raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "android-arm64", "int8 (preferred)"):
        assert name in proc.stdout


def test_push_durations_are_written_like_10m_and_the_seconds_spelling_still_works(capsys) -> None:
    from builder.cli.options import duration_or_seconds
    from builder.errors import UsageError

    assert duration_or_seconds("15m", None, "--timeout") == 900.0 and duration_or_seconds("0s", None, "--soak") == 0.0
    assert duration_or_seconds("15m", 30.0, "--timeout") == 30.0
    assert "--timeout-s N is deprecated" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--soak"):
        duration_or_seconds("soon", None, "--soak")


def test_progress_in_a_log_names_the_slow_stages_and_a_failure_prints_nothing(monkeypatch) -> None:
    import io

    from rich.console import Console

    from builder.cli import progress

    monkeypatch.setattr(progress, "SLOW_S", 0.0)
    log = io.StringIO()
    with progress.stages(Console(file=log, force_terminal=False, width=80), "starting", log_first=False) as stage:
        stage("loading model")
        stage("building litert/int8/tflite")
    lines = log.getvalue().splitlines()
    assert [line.split("] ", 1)[1].rsplit(":", 1)[0] for line in lines] == ["loading model", "building litert/int8/tflite"]
    failed = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress.stages(Console(file=failed, force_terminal=False, width=80), "loading") as stage:
            stage("building")
            raise RuntimeError("conversion failed")
    assert failed.getvalue() == ""
    shown = io.StringIO()  # a terminal gets a live spinner from the first moment
    with progress.stages(Console(file=shown, force_terminal=True, width=80), "loading model") as stage:
        time.sleep(0.3)
        stage("building")
        time.sleep(0.3)
    assert "loading model" in shown.getvalue() or "building" in shown.getvalue()
