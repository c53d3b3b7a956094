"""Progress bars on stderr (rich): shown on a terminal, silent when piped or with --no-progress."""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_enabled(requested: bool = True) -> bool:
    return bool(requested) and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True, fields: str = "", unit: str = "it"):
    """Yield `advance(n=1, **fields)`: a rich bar with M/N, rate (`unit`/s), elapsed time and ETA, or a no-op.

    `fields` is a rich format string over task fields shown after the bar, e.g.
    "loss {task.fields[loss]}"; pass their values as keyword arguments to `advance`. `advance(0,
    completed=c, total=t)` sets the count and the total instead (a bar over work done elsewhere too).
    """
    if not progress_enabled(enabled):
        yield lambda n=1, **kw: None
        return
    names = {name: "" for name in re.findall(r"task\.fields\[(\w+)\]", fields)}
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, rate="", **names)

        def advance(n: int = 1, **kw) -> None:
            bar.update(task, advance=n, **kw)
            speed = bar.tasks[0].speed
            bar.update(task, rate=f"{speed:.2f} {unit}/s" if speed else "")

        yield advance
