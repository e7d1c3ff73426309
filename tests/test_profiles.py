"""Device profiles: bundled ones valid, user directories override, bad files give clear errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from builder.errors import ProfileError
from builder.profiles import PROFILES_ENV, get_profile, load_profile_file, load_profiles
from device_profiles import PROFILE_DIR

BUILDER = str(Path(sys.executable).with_name("builder"))
REQUIRED = {"raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano", "android-arm64", "x86-64-host"}


def _copy_profile(directory: Path, name: str, **changes: str) -> Path:
    text = (PROFILE_DIR / "raspberry-pi-4.toml").read_text()
    text = text.replace('name = "raspberry-pi-4"', f'name = "{name}"')
    for old, new in changes.items():
        text = text.replace(old, new)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_bundled_profiles_are_valid_and_plausible():
    profiles = load_profiles(env={})
    assert REQUIRED <= set(profiles)
    for profile in profiles.values():
        assert profile.peak_int8_gops >= profile.peak_fp32_gflops > 0
        assert profile.idle_w <= profile.typical_w <= profile.max_w
        assert profile.preferred_runtime in {"onnxruntime", "onnxruntime-tensorrt", "litert"}
    assert profiles["jetson-orin-nano"].has_gpu and not profiles["raspberry-pi-4"].has_gpu


def test_user_directory_adds_and_overrides_profiles(tmp_path):
    _copy_profile(tmp_path, "my-board")
    _copy_profile(tmp_path, "raspberry-pi-4", **{"ram_mb = 4096": "ram_mb = 8192"})
    via_option = load_profiles([tmp_path], env={})
    assert via_option["my-board"].ram_mb == 4096
    assert via_option["raspberry-pi-4"].ram_mb == 8192
    via_env = load_profiles(env={PROFILES_ENV: str(tmp_path)})
    assert via_env["raspberry-pi-4"].ram_mb == 8192 and "my-board" in via_env
    assert get_profile("my-board", [tmp_path], env={}).source_path == str(tmp_path / "my-board.toml")


@pytest.mark.parametrize("change, message", [
    ({"peak_fp32_gflops = 48.0": ""}, "lacks 'peak_fp32_gflops'"),
    ({"cores = 4": 'cores = "four"'}, "'cores' = 'four' has the wrong type"),
    ({'precision = "int8"': 'precision = "int3"'}, "precision 'int3' unknown"),
    ({"[cpu]": "[cpu"}, "not valid TOML"),
])
def test_bad_profile_files_name_file_key_and_fix(tmp_path, change, message):
    path = _copy_profile(tmp_path, "broken", **change)
    with pytest.raises(ProfileError) as info:
        load_profile_file(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_unknown_profile_and_missing_directory_errors(tmp_path):
    with pytest.raises(ProfileError, match="unknown device profile 'pi-9'.*raspberry-pi-4"):
        get_profile("pi-9", env={})
    with pytest.raises(ProfileError, match="does not exist"):
        load_profiles([tmp_path / "nope"], env={})


def test_cli_lists_user_profiles_and_reports_bad_ones_in_one_line(tmp_path):
    _copy_profile(tmp_path, "my-board")
    listed = subprocess.run([BUILDER, "profiles", "list", "--json", "--profiles-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and '"my-board"' in listed.stdout
    _copy_profile(tmp_path, "broken", **{"[memory]": "[memory"})
    shown = subprocess.run([BUILDER, "profiles", "show", "my-board"], capture_output=True, text=True, timeout=120,
                           env={"PATH": "/usr/bin:/bin", PROFILES_ENV: str(tmp_path)})
    assert shown.returncode != 0 and "Traceback" not in shown.stderr
    assert shown.stderr.strip().count("\n") == 0 and "broken.toml" in shown.stderr and "not valid TOML" in shown.stderr
