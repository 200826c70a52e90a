"""Progress bars for long phases (warm-up, evaluation, checkpoints, HF export): rich, one look.

On a terminal the bar redraws in place with the elapsed time and an estimate of what is left; in a
log file (not a terminal) rich writes the bar once, when the phase ends. Only one process should
draw (global rank 0): pass ``enabled=False`` elsewhere.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_bar(enabled: bool = True) -> Progress:
    """``with progress_bar() as bar: task = bar.add_task("what", total=n); bar.advance(task)``.
    ``total=None`` for work of unknown size: the bar pulses and only the elapsed time counts."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


@contextmanager
def opaque_phase(description: str, enabled: bool = True) -> Iterator[None]:
    """One long call that reports no progress of its own (a collective checkpoint save or load):
    a pulsing bar with the elapsed time, full once the call returns."""
    with progress_bar(enabled) as bar:
        task = bar.add_task(description, total=None)
        yield
        bar.update(task, total=1, completed=1)
