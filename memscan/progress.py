"""One rich progress bar for every long step (generation, embedding, triage)."""

from __future__ import annotations


def progress_bar(enabled: bool = True, unit: str = "images"):
    """A ``rich`` progress bar: description, bar, done/total ``unit``, elapsed, remaining.

    ``enabled=False`` (``--quiet``) gives the same object with drawing disabled, so callers never
    branch on it.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
