"""Progress of long runs: a live bar with the time left in a terminal, plain log lines anywhere else.

A log file or a CI job gets one line when a task starts, one at every ``log_every`` fraction of its total and
one when it is done, e.g. ``adapting 10% (3 s, about 27 s left)`` or
``training 20% (1000/5000 steps, 2:10, about 8:40 left, loss 0.412)``.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clock(seconds: float) -> str:
    """``42 s``, ``3:05`` or ``1:02:05``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class _LogTask:
    """Where one task stood when it last wrote a line, and when and where it started in this run."""

    def __init__(self, completed: float) -> None:
        self.started, self.start, self.logged = time.monotonic(), completed, completed


class ProgressReport:
    """Report the progress of named tasks, each counting up to its total (100 for percentages).

    ``unit`` names what the total counts (``steps``); without one the lines show percentages only. In a terminal
    the tasks are live bars with the elapsed and remaining time; elsewhere every update that starts a task, moves
    it on by ``log_every`` fraction of its total (10%, 20%, ...), or finishes it writes one line.
    """

    def __init__(
        self,
        console: Console,
        totals: dict[str, float],
        *,
        unit: str = "",
        log_every: float = 0.1,
    ) -> None:
        self.console, self.totals, self.unit, self.log_every = console, totals, unit, log_every
        self._log: dict[str, _LogTask] = {}
        self._bar: Progress | None = None
        self._ids: dict[str, int] = {}
        if console.is_terminal:
            columns = [TextColumn("{task.description}"), BarColumn()]
            columns.append(MofNCompleteColumn() if unit else TextColumn("{task.percentage:>3.0f}%"))
            columns += [TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
            self._bar = Progress(*columns, console=console)

    def __enter__(self) -> ProgressReport:
        if self._bar is not None:
            self._bar.__enter__()
            self._ids = {n: self._bar.add_task(n, total=t, status="") for n, t in self.totals.items()}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(kind, exc, tb)

    def update(self, task: str, completed: float, status: str = "") -> None:
        """``task`` has done ``completed`` of its total; ``status`` is a short note such as the loss."""
        if self._bar is not None:
            self._bar.update(self._ids[task], completed=completed, status=status)
            return
        total = self.totals[task]
        seen = self._log.get(task)
        if seen is None or completed < seen.logged:  # a new task, or one that starts again
            self._log[task] = _LogTask(completed)
            self._line(task, completed, status)
        elif completed >= total > seen.logged or self._stage(task, completed) > self._stage(
            task, seen.logged
        ):
            seen.logged = completed
            self._line(task, completed, status)

    def _stage(self, task: str, completed: float) -> int:
        """How many ``log_every`` fractions of the total ``completed`` has passed."""
        return int(completed / (self.log_every * self.totals[task]) + 1e-9)

    def _line(self, task: str, completed: float, status: str) -> None:
        total, seen = self.totals[task], self._log[task]
        parts = [f"{completed:g}/{total:g} {self.unit}"] if self.unit else []
        elapsed = time.monotonic() - seen.started
        if completed > seen.start:
            parts.append(_clock(elapsed))
            if completed < total:
                left = elapsed / (completed - seen.start) * (total - completed)
                parts.append(f"about {_clock(left)} left")
        parts += [status] if status else []
        detail = f" ({', '.join(parts)})" if parts else ""
        self.console.print(
            f"{task} {100 * completed / total:.0f}%{detail}", markup=False, highlight=False, soft_wrap=True
        )
