"""The subprocesses a demo starts (``builder serve``, ``agent run``): logged to files, watched, stopped together."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from builder.errors import DemoError


class ChildProcesses:
    """Each child logs to ``log_dir/NAME.log``; ``wait_for`` fails fast when one dies, naming its log
    (a :class:`DemoError`: the demo prints it as one line)."""

    def __init__(self, log_dir: Path, env: Mapping[str, str]) -> None:
        self.log_dir = Path(log_dir)
        self.env = dict(env)
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DemoError(f"{name} exited ({proc.returncode}); see {self.log_dir / (name + '.log')}")
            time.sleep(0.3)
        raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}; logs in {self.log_dir}")

    def stop_all(self) -> None:
        """SIGTERM everyone first (they shut down in parallel), then wait; kill what hangs."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
