"""Progress for every step that may take more than ~2 s: on a terminal a spinner with the elapsed
time from the first moment; otherwise (logs, pipes) one line for each stage still running after
``SLOW_S``. Always on stderr, so stdout stays clean."""
from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console


SLOW_S = 10.0  # not a terminal: stages shorter than this print nothing (logs stay short, errors one line)


@contextlib.contextmanager
def stages(console: "Console", first: str) -> Iterator[Callable[[str], None]]:
    """Yields ``update(text)``: the current stage. Each stage's time is shown while it runs."""
    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(first, total=None)

            def update(text: str) -> None:
                bar.reset(task, description=text, total=None)

            yield update
        return
    # not a terminal: a stage is logged only once it has run for SLOW_S, so quick commands (and
    # one-line errors) stay as they were
    started = time.monotonic()
    timer: list[threading.Timer] = []

    def log_line(text: str) -> None:
        console.print(f"[{time.monotonic() - started:6.1f}s] {text} ...", highlight=False, markup=False)

    def update(text: str) -> None:
        for old in timer:
            old.cancel()
        timer[:] = [threading.Timer(SLOW_S, log_line, (text,))]
        timer[0].daemon = True
        timer[0].start()

    update(first)
    try:
        yield update
    finally:
        for old in timer:
            old.cancel()
