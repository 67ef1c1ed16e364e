"""Progress bars with ETA (rich); disabled with progress=false or when nothing is shown."""
from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
    TimeElapsedColumn, TimeRemainingColumn


class Progress:
    def __init__(self, *, enabled: bool, console=None):
        self.bar = None
        if enabled and console is not None:
            self.bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                    console=console, transient=True)

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def track(self, iterable, description: str = "", total: int | None = None):
        if self.bar is None:
            return iterable
        return self._track(iterable, description, total)

    def _track(self, iterable, description, total):
        task = self.bar.add_task(description, total=total if total is not None else len(iterable))
        try:
            for item in iterable:
                yield item
                self.bar.advance(task)
        finally:
            self.bar.remove_task(task)
