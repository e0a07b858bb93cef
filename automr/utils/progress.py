"""The one progress bar of automr: rich, with throughput in a named unit (users/s, samples/s, ...).

Every long loop uses `rate_progress`, on the shared console of automr.utils.logging, so lines
printed while a bar runs appear above it instead of tearing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from automr.utils.logging import get_console

T = TypeVar("T")


class RateColumn(ProgressColumn):
    """Completed units per second, e.g. '812.3 users/s'; a task's own `unit` field overrides the bar's."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", self.unit)
        return Text("-" if speed is None else f"{speed:,.1f} {unit}/s", style="progress.data.speed")


def rate_progress(
    unit: str,
    console: Console | None = None,
    transient: bool = False,
    *,
    disable: bool = False,
    fields: Sequence[str] = (),
) -> Progress:
    """Progress bar: description, bar, done/total, rate in `unit`/s, `fields`, elapsed, remaining.

    fields: names of extra task fields shown as text after the rate (e.g. "tps" for a tokens/s
    string); pass them to `add_task` and `update`. transient: clear the bar when done (for loops
    that print their own summary line); off a terminal rich draws only a bar's final line, and a
    transient bar none. disable: no bar (progress: false, or a process other than the main one).
    """
    console = console or get_console()
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        *(TextColumn(f"{{task.fields[{name}]}}") for name in fields),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
        disable=disable,
    )


def track(sequence: Iterable[T], unit: str, description: str, *, total: float | None = None, disable: bool = False,
          transient: bool = False) -> Iterator[T]:
    """rich's `track` with automr's bar: iterate `sequence` showing its progress in `unit`/s."""
    with rate_progress(unit, transient=transient, disable=disable) as bar:
        yield from bar.track(sequence, total=total, description=description)
