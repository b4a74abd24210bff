"""Plain progress lines for a log file: shared by :mod:`flow.cluster` and
:mod:`flow._distributed` (no Dask import here)."""

from __future__ import annotations

import sys
import time

__all__ = ["Throttle", "on_terminal"]


def on_terminal() -> bool:
    """Whether standard error is a terminal (progress bars) rather than a log (plain lines)."""
    return sys.stderr.isatty()


class Throttle:
    """Decides when a plain progress line is worth printing (every 10% or 30 s)."""

    STEP, SECONDS = 10, 30.0

    def __init__(self, label: str) -> None:
        self.label = label or "progress"
        self.last_pct, self.last_time = -self.STEP, time.monotonic()

    def line(self, pct: int, what: str, *, final: bool = False) -> None:
        """Print ``label: what (pct%)`` if 10 points or 30 s have passed (or ``final``)."""
        now = time.monotonic()
        due = pct >= self.last_pct + self.STEP or now - self.last_time >= self.SECONDS
        if (due or final) and pct != self.last_pct:
            print(f"{self.label}: {what} ({pct}%)", file=sys.stderr, flush=True)
            self.last_pct, self.last_time = pct, now
