"""Tables that fit the terminal (80 columns at least): key cells (ids, profile names) are never cut,
long cells fold, and low-priority columns are left out, named in a caption, when the rest still does
not fit. ``--json`` always has every column."""
from __future__ import annotations

import os
import shutil
import sys
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

MIN_WIDTH = 80
FOLD_AT = 12  # words longer than this fold rather than widen their column
PIPE_WIDTH = 120  # stdout is not a terminal and $COLUMNS is unset: logs and files get a little more room


def terminal_width(stream: object = None) -> int:
    """``$COLUMNS``, else the terminal's width, else ``PIPE_WIDTH``; never below 80."""
    stream = sys.stdout if stream is None else stream
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        width = int(env)
    elif hasattr(stream, "isatty") and stream.isatty():
        width = shutil.get_terminal_size((MIN_WIDTH, 24)).columns
    else:
        width = PIPE_WIDTH
    return max(MIN_WIDTH, width)


def table_console(stderr: bool = False, width: Optional[int] = None) -> "Console":
    """A Rich console as wide as :func:`terminal_width` (the place every table is printed through)."""
    from rich.console import Console

    return Console(stderr=stderr, width=width or terminal_width(sys.stderr if stderr else sys.stdout))


def fit_table(table: "Table", width: int, keep: Sequence[str] = (), drop_order: Sequence[str] = ()) -> "Table":
    """Make ``table`` fit ``width`` columns in place and return it.

    ``keep``: headers of key columns, never wrapped or cut (ids, profile names). ``drop_order``: the
    headers that may be left out, least important first; the others always stay (and fold).
    """
    for column in table.columns:
        if str(column.header) in keep:
            column.no_wrap = True
            column.overflow = "ignore"
            column.min_width = max((len(str(c)) for c in column._cells), default=0) or None
        else:
            column.overflow = "fold"
    left_out: list[str] = []
    for header in drop_order:
        if _minimum_width(table, keep) <= width:
            break
        for index, column in enumerate(table.columns):
            if str(column.header) == header:
                del table.columns[index]
                left_out.append(header)
                break
    if left_out:
        note = f"left out to fit {width} columns: {', '.join(left_out)} (--json has every column)"
        table.caption = f"{table.caption}\n{note}" if table.caption else note
    return table


def _minimum_width(table: "Table", keep: Sequence[str]) -> int:
    """Narrowest readable width: key columns whole, others no narrower than their header's longest
    word or their longest word up to ``FOLD_AT`` (longer words fold), plus borders and padding."""
    total = 1 if table.show_edge else -1
    for column in table.columns:
        cells = [str(c) for c in column._cells]
        if str(column.header) in keep:
            inner = max([len(c) for c in cells] + [len(str(column.header))])
        else:
            words = [len(w) for c in cells for w in c.split()] or [1]
            header_words = [len(w) for w in str(column.header).split()] or [1]
            inner = max(max(header_words), min(max(words), FOLD_AT))
        total += inner + 3  # one space of padding each side, one border
    return total


def print_table(table: "Table", keep: Sequence[str] = (), drop_order: Sequence[str] = (),
                console: Optional["Console"] = None) -> None:
    """Fit ``table`` to the console's width and print it."""
    console = console or table_console()
    console.print(fit_table(table, console.width, keep, drop_order))
