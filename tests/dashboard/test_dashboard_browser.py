"""The dashboard in a real headless browser (Debian's chromium + chromium-driver, Selenium): a running
`builder serve --http` with a real agent; screenshots of each page under the test's tmp output."""
from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fleet.conftest import (
    PY,
    Processes,
    agent_http_url,
    builder_cli,
    infer,
    start_agent,
    store_status,
)
from tests.support.broker import free_port
from tests.support.processes import wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_js(driver, script: str, timeout_s: float, what: str):
    return wait_for(lambda: driver.execute_script(script), timeout_s, what)


def text_of(driver, css: str) -> str:
    return driver.execute_script(f"const e = document.querySelector({json.dumps(css)}); return e ? e.textContent : ''")


def test_dashboard_in_a_browser(browser, fleet_home, processes: Processes, tmp_path: Path) -> None:
    home = fleet_home.root
    v1 = fleet_home.artifact("raspberry-pi-4")
    v2 = fleet_home.artifact("raspberry-pi-4", version="2", width=16)
    http_port = free_port()
    processes.start("serve", [PY, "-m", "builder.cli.main", "serve", "--port", str(free_port()), "--data-dir", str(home),
                              "--no-loop", "--http", f"127.0.0.1:{http_port}"])
    url = f"http://127.0.0.1:{http_port}/"

    def up() -> bool:
        try:
            return json.loads(urllib.request.urlopen(url + "api/health", timeout=2).read())["ok"]
        except OSError:
            return False

    wait_for(up, 60, "the dashboard to answer: " + processes.log("serve"))
    assert "dashboard: http://127.0.0.1:" in processes.log("serve")
    token = (home / "dashboard-token").read_text().strip()
    data_dir = tmp_path / "agent"
    builder_cli("fleet", "add-device", "pi-01", "--profile", "raspberry-pi-4", "--group", "lab",
                "--agent-data-dir", str(data_dir), "--telemetry-interval", "1s", home=home)
    start_agent(processes, "agent", home / "devices" / "pi-01" / "agent.toml", data_dir)
    wait_for(lambda: store_status(home).get("pi-01", {}).get("online"), 60, "agent online: " + processes.log("agent"))
    for artifact in (v1, v2):
        outcome = json.loads(builder_cli("push", "--device", "pi-01", "--artifact", artifact, "--json",
                                         "--benchmark-runs", "5", home=home).stdout)["outcomes"][0]
        assert outcome["state"] == "active", outcome
    infer(agent_http_url(data_dir), count=20)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    # the fleet table shows the device, as the store has it
    browser.get(url)
    wait_js(browser, "return document.querySelector('#fleet tr[data-device=\"pi-01\"]')", 20, "pi-01 in the fleet table")
    row = text_of(browser, '#fleet tr[data-device="pi-01"]')
    assert "online" in row and "raspberry-pi-4" in row and "lab" in row and "digits-cnn@2" in row
    browser.save_screenshot(str(shots / "fleet.png"))

    # the device page: the latency chart gets a point when telemetry arrives
    browser.get(url + "#/device/pi-01")
    wait_js(browser, "return document.body.dataset.loaded === 'device'", 20, "the device page")
    before = int(browser.execute_script("return document.querySelector('#points').dataset.points"))
    infer(agent_http_url(data_dir), count=10)
    wait_js(browser, f"return Number(document.querySelector('#points').dataset.points) > {before}", 30,
            "a live point on the latency chart")
    assert browser.execute_script("return document.querySelectorAll('#chart-latency canvas').length") >= 1
    browser.save_screenshot(str(shots / "device.png"))

    # rollback: refused without the token, done with it
    assert "active" in text_of(browser, "#d-slots") and store_status(home)["pi-01"]["artifact_id"] == v2
    browser.find_element("css selector", "#rollback").click()
    wait_js(browser, "return document.querySelector('#action-msg').className === 'refused'", 20, "the refusal")
    assert "401" in text_of(browser, "#action-msg")
    assert store_status(home)["pi-01"]["artifact_id"] == v2
    browser.find_element("css selector", "#token").send_keys(token)
    browser.find_element("css selector", "#rollback").click()
    wait_js(browser, "return document.querySelector('#action-msg').className === 'done'", 90,
            "the rollback: " + text_of(browser, "#action-msg"))
    wait_for(lambda: store_status(home)["pi-01"]["artifact_id"] == v1, 30, "pi-01 back on v1")
    assert infer(agent_http_url(data_dir))["artifact_id"] == v1
    browser.save_screenshot(str(shots / "device-rolled-back.png"))

    # push v2 again from the page (the registry's artifacts for the device's profile)
    wait_js(browser, f"return [...document.querySelectorAll('#push-artifact option')].some(o => o.value === '{v2}')", 20,
            "v2 offered for a push")
    browser.execute_script(f"document.querySelector('#push-artifact').value = '{v2}'")
    browser.find_element("css selector", "#push").click()
    wait_js(browser, "return document.querySelector('#action-msg').textContent.startsWith('pushed: active')", 90,
            "the push: " + text_of(browser, "#action-msg"))
    assert store_status(home)["pi-01"]["artifact_id"] == v2

    # a policy change from the page: the loop's p95 objective of this device
    field = browser.find_element("css selector", "#objective")
    field.clear()
    field.send_keys("25")
    browser.find_element("css selector", "#set-objective").click()
    wait_js(browser, "return document.querySelector('#action-msg').textContent.startsWith('policy of device:pi-01')", 20,
            "the policy change: " + text_of(browser, "#action-msg"))
    from builder.fleet.loop.policy import PolicyStore
    from builder.fleet.transport.store import open_store

    with open_store(home) as store:
        assert PolicyStore(store).resolve("pi-01")[1].latency_p95_ms == 25.0

    browser.get(url + "#/artifacts")
    wait_js(browser, "return document.querySelectorAll('#artifacts tbody tr').length === 2", 20, "two artifacts")
    assert "digits-cnn@2" in text_of(browser, "#artifacts")
    browser.save_screenshot(str(shots / "artifacts.png"))
    browser.get(url + "#/pushes")
    wait_js(browser, "return document.body.dataset.loaded === 'pushes'", 20, "the pushes page")
    assert browser.execute_script("return document.querySelector('#deployments tr[data-device=\"pi-01\"] progress').value") == 1
    browser.save_screenshot(str(shots / "pushes.png"))
    assert all((shots / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
               for name in ("fleet", "device", "device-rolled-back", "artifacts", "pushes"))
    print(f"screenshots in {shots}")

    # serve stops on SIGTERM with the page's event stream still open, without a traceback
    browser.get(url + "#/device/pi-01")
    wait_js(browser, "return document.body.dataset.loaded === 'device'", 20, "the device page")
    start = time.monotonic()
    processes.stop("serve")
    assert time.monotonic() - start < 8, "serve took too long to stop"
    assert "Traceback" not in processes.log("serve"), processes.log("serve")


def test_thousand_devices_load_under_a_second(browser, tmp_path: Path) -> None:
    """The fleet page of 1,000 devices: from navigation to the first page of the table drawn."""
    from builder.fleet.dashboard.server import prepare_dashboard
    from builder.fleet.transport.store import open_store
    from tests.dashboard.fill import fill_fleet, write_optimize_report

    home = tmp_path / "home"
    with open_store(home) as store:
        fill_fleet(store, 1000, time.time())
    write_optimize_report(tmp_path / "runs" / "digits")
    dashboard = prepare_dashboard(home, "127.0.0.1:0", reports_dirs=(tmp_path / "runs",)).start(endpoint=None)
    try:
        timings = []
        for _ in range(3):
            browser.get(dashboard.url + "?t=" + str(time.time()))
            wait_js(browser, "return document.body.dataset.loaded === 'fleet'", 20, "the fleet table")
            timings.append(float(browser.execute_script("return document.body.dataset.firstLoadMs")))
        assert browser.execute_script("return document.querySelectorAll('#fleet tbody tr').length") == 50
        assert "1000 shown" in text_of(browser, "#counts")
        browser.save_screenshot(str(tmp_path / "fleet-1000.png"))

        # the Pareto front of an optimize run: hovering a point shows its recipe
        from selenium.webdriver.common.action_chains import ActionChains

        browser.get(dashboard.url + "#/optimize")
        wait_js(browser, "return document.body.dataset.loaded === 'optimize'", 20, "the optimize page")
        assert browser.execute_script("return document.querySelector('#chart-pareto').dataset.points") == "5"
        ActionChains(browser).move_to_element(browser.find_element("css selector", "#chart-pareto .u-over")).perform()
        wait_js(browser, "return document.querySelector('#o-hover').textContent.startsWith('trial ')", 10, "the recipe on hover")
        assert "quantize(int8)" in text_of(browser, "#o-hover")
        browser.save_screenshot(str(tmp_path / "optimize.png"))
    finally:
        dashboard.stop()
    print(f"fleet page of 1,000 devices loaded in {', '.join(f'{t:.0f}' for t in timings)} ms")
    assert min(timings) < 1000 and max(timings) < 2000, timings
