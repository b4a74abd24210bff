"""The parts of :mod:`flow.cluster` that subclass ``distributed``'s classes.

Imported by :mod:`flow.cluster` only once a cluster is in play: importing ``distributed``
costs ~0.4 s (quiet 2-core machine), which a command on a few thousand cells, run on dask's
threads, does not pay.
"""

from __future__ import annotations

import logging
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin
from distributed.diagnostics.progressbar import TextProgressBar

from ._progress import Throttle

__all__ = ["LogProgressBar", "QuietTaskErrors"]


class QuietTaskErrors(WorkerPlugin):
    """Local workers do not log a failed task ("Compute Failed" and its traceback) nor a task
    cancelled as they shut down (after Ctrl-C): a failure's exception reaches the caller, which
    reports it (one line for a fault the user can act on, such as a full disk; the traceback for
    a bug). Their stderr is the user's terminal."""

    def setup(self, worker: Any) -> None:
        """Filter the workers' task-failure log records."""
        for name in ("distributed.worker", "distributed.worker.state_machine"):
            logging.getLogger(name).addFilter(_not_reported_here)


def _not_reported_here(record: logging.LogRecord) -> bool:
    text = str(record.msg)
    if text.startswith("Compute Failed"):
        return False
    return not (text.startswith("Async instruction") and "CancelledError" in record.getMessage())


class LogProgressBar(TextProgressBar):
    """distributed's text progress bar, as plain lines for a log file."""

    def __init__(self, keys: Any, *, label: str, **kwargs: Any) -> None:
        self._throttle = Throttle(label)
        super().__init__(keys, **kwargs)

    def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:
        done = all - remaining
        pct = int(100 * done / all) if all else 100
        self._throttle.line(pct, f"{done:,}/{all:,} tasks", final=remaining == 0)

    def _draw_stop(self, **kwargs: Any) -> None:
        return None
