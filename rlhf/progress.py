"""Progress display for long work: rich progress bars on a terminal, one line per stage otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as _RichProgress


class Progress:
    """A thin wrapper so library code can report progress without caring where it goes.

    ``enabled=False`` drops everything (tests, library use); on a non-terminal it prints a line
    when a stage finishes instead of redrawing bars.
    """

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._bars = None
        self._live = enabled and self.console.is_terminal
        self._tasks: dict[int, dict] = {}
        if self._live:
            self._bars = _RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                console=self.console,
            )

    def __enter__(self):
        if self._bars:
            self._bars.start()
        return self

    def __exit__(self, *exc):
        if self._bars:
            self._bars.stop()

    def add(self, description: str, total: int) -> int:
        tid = self._bars.add_task(description, total=total, info="") if self._bars else len(self._tasks)
        self._tasks[tid] = {"description": description, "total": total, "done": 0, "t0": time.perf_counter(), "info": ""}
        return tid

    def update(self, task: int, advance: int = 1, info: str = "") -> None:
        t = self._tasks[task]
        t["done"] += advance
        t["info"] = info or t["info"]
        if self._bars:
            self._bars.update(task, advance=advance, info=info)
        elif self.enabled and t["done"] >= t["total"]:
            dt = time.perf_counter() - t["t0"]
            print(f"[done] {t['description']} ({t['total']} steps, {dt:.0f} s) {t['info']}", file=sys.stderr, flush=True)
        elif self.enabled and t["total"] >= 20 and t["done"] % max(1, t["total"] // 10) == 0:
            print(f"  {t['description']}: {t['done']}/{t['total']} {t['info']}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)
