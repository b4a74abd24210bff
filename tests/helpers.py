"""Test helpers: refuse computes while building graphs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import dask


class CountingScheduler:
    """A dask scheduler that counts computes and raises past ``max_computes``."""

    def __init__(self, max_computes: int = 0) -> None:
        self.total = 0
        self.max_computes = max_computes

    def __call__(self, dsk: Any, keys: Any, **kwargs: Any) -> Any:
        self.total += 1
        if self.total > self.max_computes:
            msg = f"Too many dask computations were scheduled: {self.total}"
            raise RuntimeError(msg)
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def no_compute(max_computes: int = 0) -> Iterator[CountingScheduler]:
    """Inside this block, computing any dask collection raises."""
    sched = CountingScheduler(max_computes)
    with dask.config.set(scheduler=sched):
        yield sched
