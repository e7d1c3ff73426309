"""For tests that start `agent` and `builder` subprocesses: the agent's command line, a child
environment kept to one thread (the machine has 2 cores shared by several jobs), and polling."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

# agent/cli.py has no __main__ block: call its entry point the way the console script does.
AGENT_CMD = [sys.executable, "-c", "import sys; from agent.cli import app; sys.argv[0] = 'agent'; app()"]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """``predicate()``'s first truthy value, polled every ``interval_s``; an AssertionError naming
    ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
