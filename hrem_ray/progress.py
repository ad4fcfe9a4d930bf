"""Progress lines for long loops: a text bar, rate and ETA, about ten lines per loop.

Long work (encoding a split, scanning a feature file, an epoch) reports through a plain
``progress(line)`` callback, so the same loop prints to a console, a Ray job log or a test.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STEPS = 10  # a line after each further tenth of the work, and one at the end
WIDTH = 20  # characters of the bar


class Progress:
    """Count work done towards ``total`` and report it through ``progress`` (may be None)."""

    def __init__(
        self,
        desc: str,
        total: int,
        progress: Callable[[str], None] | None,
        unit: str = "rows",
    ) -> None:
        self.desc, self.total, self.progress, self.unit = desc, total, progress, unit
        self.done, self.reported, self.start = 0, 0, time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        if self.progress is None:
            return
        if self.done - self.reported >= self.total / STEPS or self.done >= self.total:
            self.progress(self.line())
            self.reported = self.done

    def line(self) -> str:
        seconds = time.perf_counter() - self.start
        rate = self.done / seconds if seconds > 0 else float("inf")
        frac = self.done / self.total if self.total else 1.0
        filled = round(WIDTH * frac)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return (
            f"{self.desc} [{'#' * filled}{'.' * (WIDTH - filled)}] {100 * frac:3.0f}% "
            f"{self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s"
        )
