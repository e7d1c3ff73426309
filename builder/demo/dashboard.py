"""After ``make demo``: the fleet it built, in a browser.

The fleet stage's data dir (registry, fleet store, keys) outlives its processes, so a fresh
``builder serve --http`` on it shows the three devices (offline by then), their deployments,
telemetry, on-device benchmarks and artifacts. It runs until Ctrl-C, and only when a person is at
the terminal: ``--no-wait`` (or a non-interactive stdin, as in CI and the README test) skips it.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from builder.errors import DemoError
from builder.fleet.transport.embedded_broker import free_port


@dataclass
class DashboardProcess:
    proc: subprocess.Popen[bytes]
    url: str
    token_file: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_dashboard(home: Path, log_path: Path, timeout_s: float = 60.0) -> DashboardProcess:
    """``builder serve --http 127.0.0.1:PORT`` on ``home``; returns once its API answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "builder.cli.main", "serve", "--port", "0", "--no-loop",
                                 "--http", f"127.0.0.1:{port}", "--data-dir", str(home)],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoError(f"the dashboard's `builder serve` exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(url + "api/devices", timeout=2) as answer:
                if answer.status == 200:
                    return DashboardProcess(proc, url, home / "dashboard-token")
        except OSError:
            time.sleep(0.3)
    proc.terminate()
    raise DemoError(f"the dashboard did not answer on {url} within {timeout_s:.0f} s; see {log_path}")


def offer_dashboard(home: Path, log_path: Path, say: Callable[[str], None], wait: bool) -> None:
    """Serve the dashboard until Ctrl-C when ``wait`` and a person is at the terminal; else say how."""
    command = f"builder serve --http 127.0.0.1:8080 --data-dir {home}"
    if not wait or not sys.stdin.isatty():
        say(f"dashboard of this fleet: {command}  (then open http://127.0.0.1:8080/)")
        return
    dashboard = start_dashboard(home, log_path)
    say(f"dashboard: {dashboard.url}  (actions need the token in {dashboard.token_file}); Ctrl-C to stop")
    try:
        while dashboard.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
