"""Sensor readers and profile detection against fixture folders shaped like each platform's sysfs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.detect import detect_device
from agent.sensors import (AndroidBatterySensor, HwmonPowerSensor, JetsonPowerSensor, RaplSensor,
                           RaspberryPiPmicSensor, power_sensors_for, read_power, read_temperature)
from agent.sensors.rpi import parse_pmic_read_adc

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("fixture,machine,profile", [
    ("rpi5", "aarch64", "raspberry-pi-5"),
    ("rpi4", "aarch64", "raspberry-pi-4"),
    ("jetson-nano", "aarch64", "jetson-nano"),
    ("jetson-orin-nano", "aarch64", "jetson-orin-nano"),
    ("android", "aarch64", "android-arm64"),
    ("empty", "x86_64", "x86-64-host"),
    ("empty", "aarch64", "linux-aarch64"),
])
def test_profile_detected_from_platform_files(fixture, machine, profile):
    device = detect_device(FIX / fixture, getprop=lambda name: None, machine=machine)
    assert device.profile == profile


def test_android_detected_from_getprop_without_build_prop():
    props = {"ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "Termux phone"}
    device = detect_device(FIX / "empty", getprop=props.get, machine="aarch64")
    assert device.profile == "android-arm64" and device.description == "Termux phone"


def test_jetson_nano_reports_input_rail_only_not_the_sum():
    reading = JetsonPowerSensor(FIX / "jetson-nano").read()
    assert reading.available and reading.watts == pytest.approx(3.512)  # POM_5V_IN, not 3.512+0.412+1.205
    assert "POM_5V_IN" in reading.source


def test_jetson_orin_hwmon_rails_power_is_volts_times_amps():
    reading = JetsonPowerSensor(FIX / "jetson-orin-nano").read()
    assert reading.watts == pytest.approx(5.072 * 1.432) and "VDD_IN" in reading.source


def test_jetson_without_input_rail_sums_and_says_so(tmp_path):
    root = tmp_path / "j"
    shutil.copytree(FIX / "jetson-nano", root)
    dev = root / "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    (dev / "rail_name_0").write_text("POM_5V_DDR\n")
    reading = JetsonPowerSensor(root).read()
    assert reading.watts == pytest.approx(3.512 + 0.412 + 1.205) and "sum" in reading.source


def test_raspberry_pi_5_pmic_output_parsed():
    text = (FIX / "rpi5" / "vcgencmd_pmic_read_adc.txt").read_text()
    rails = parse_pmic_read_adc(text)
    assert rails["VDD_CORE"] == pytest.approx(0.80012340 * 0.88034)
    assert "EXT5V" not in rails  # a voltage without a current is not a power
    reading = RaspberryPiPmicSensor(runner=lambda argv: text).read()
    assert reading.available and reading.watts == pytest.approx(sum(rails.values()))
    assert 0.5 < reading.watts < 5


def test_raspberry_pi_without_vcgencmd_is_not_available():
    reading = RaspberryPiPmicSensor(runner=lambda argv: None).read()
    assert not reading.available and reading.watts is None and reading.source == "not measured"


def test_android_battery_discharge_power_and_charging_not_measured(tmp_path):
    reading = AndroidBatterySensor(FIX / "android").read()
    assert reading.watts == pytest.approx(0.452 * 3.987)
    root = tmp_path / "a"
    shutil.copytree(FIX / "android", root)
    (root / "sys/class/power_supply/battery/status").write_text("Charging\n")
    charging = AndroidBatterySensor(root).read()
    assert not charging.available and "charging" in charging.note


def test_rapl_energy_counter_gives_power(tmp_path, monkeypatch):
    import types

    import agent.sensors.linux as linux

    root = tmp_path / "x"
    shutil.copytree(FIX / "x86-rapl", root)
    counter = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    sensor = RaplSensor(root, interval_s=0.2)
    assert sensor.energy_j() == pytest.approx(123.456789)  # package zone only, not its sub-zone

    # The sensor's clock, so the window is exactly 0.2 s however loaded the machine is: the counter
    # gains 2 J while the sensor waits between its two reads.
    clock = [1000.0]

    def sleep(seconds):
        counter.write_text(str(123456789 + 2_000_000))
        clock[0] += seconds
    monkeypatch.setattr(linux, "time", types.SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep))
    reading = sensor.read()
    assert reading.available and reading.watts == pytest.approx(10.0) and "package-0" in reading.source


def test_temperatures_from_thermal_zones_and_hwmon():
    assert read_temperature(FIX / "rpi5").celsius == pytest.approx(52.3)
    temp = read_temperature(FIX / "x86-rapl")
    assert temp.celsius == pytest.approx(61.0) and len(temp.zones) == 2


def test_no_sensors_means_not_measured_never_zero():
    power = read_power(power_sensors_for("x86-64-host", FIX / "empty"))
    assert not power.available and power.watts is None and "rapl" in power.note
    assert not read_temperature(FIX / "empty").available
    assert not HwmonPowerSensor(FIX / "empty").read().available


def test_benchmark_reports_not_measured_with_labelled_estimate():
    import numpy as np

    from agent.bench import run_benchmark

    result = run_benchmark(lambda feeds: feeds["x"] * 2, {"x": np.ones((4,), np.float32)}, runs=5, warmup=1,
                           power_sensors=power_sensors_for("raspberry-pi-5", FIX / "empty"),
                           profile="raspberry-pi-5", root=FIX / "empty")
    assert result.power_w is None and result.power_source == "not measured" and result.energy_per_inference_j is None
    assert result.estimated_power_w == pytest.approx(5.0)  # raspberry-pi-5.toml typical_w, labelled as an estimate
    assert result.latency.count == 5 and result.latency.p50_ms <= result.latency.p99_ms


def test_agent_detect_cli_on_a_jetson_fixture():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "from agent.cli import app; app()", "detect", "--root",
                          str(FIX / "jetson-nano")], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr
    assert "profile: jetson-nano" in out.stdout and "3.512 W (jetson-ina3221:POM_5V_IN)" in out.stdout


def test_onnxruntime_providers_requested_and_available_with_tensorrt_engine_cache(tmp_path):
    from agent.runtime.onnxrt import choose_providers

    chosen = choose_providers(("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                              ["TensorrtExecutionProvider", "CPUExecutionProvider"], tmp_path, precision="fp16")
    assert [name for name, _ in chosen] == ["TensorrtExecutionProvider", "CPUExecutionProvider"]  # no CUDA here
    trt = chosen[0][1]
    assert trt["trt_engine_cache_enable"] and trt["trt_fp16_enable"]
    assert trt["trt_engine_cache_path"] == str(tmp_path / "tensorrt") and (tmp_path / "tensorrt").is_dir()
    assert [n for n, _ in choose_providers(("XNNPACKExecutionProvider",), ["CPUExecutionProvider"], None)] == \
        ["CPUExecutionProvider"]  # always a CPU fallback
