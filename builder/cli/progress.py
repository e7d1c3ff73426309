"""Progress for every step that may take more than ~2 s: on a terminal a spinner with the elapsed
time from the first moment; otherwise (logs, pipes), once the work succeeded, one line per stage that
took ``SLOW_S`` or more. Always on stderr, so stdout stays clean."""
from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console


SLOW_S = 2.0  # not a terminal: finished stages shorter than this print nothing


@contextlib.contextmanager
def stages(console: "Console", first: str, log_first: bool = True) -> Iterator[Callable[[str], None]]:
    """Yields ``update(text)``: the current stage. ``first`` is shown until the first update;
    ``log_first=False`` when it is only a placeholder (it never gets a log line)."""
    if console.is_terminal:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(first, total=None)

            def show(text: str) -> None:
                bar.reset(task, description=text, total=None)

            yield show
        return
    # not a terminal (logs, pipes): after success, one line per stage that took SLOW_S or more. A
    # failed command prints only its error, so a user's mistake stays one line.
    started = time.monotonic()
    current: list = [first if log_first else None, started]  # the running stage and when it began
    finished: list[tuple[str, float, float]] = []

    def finish() -> None:
        text, since = current
        now = time.monotonic()
        if text is not None and now - since >= SLOW_S:
            finished.append((text, now - started, now - since))

    def update(text: str) -> None:
        finish()
        current[:] = [text, time.monotonic()]

    yield update
    finish()
    for text, at_s, took_s in finished:
        console.print(f"[{at_s:6.1f}s] {text}: {took_s:.1f} s", highlight=False, markup=False)
