"""Helpers shared by the sub-command modules (option parsing, cluster set-up)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from distributed import Client

from ..cluster import flow_client
from ..errors import InputError

__all__ = ["client_from_args", "storage_options"]


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` pairs as a dict (values stay strings)."""
    opts: dict[str, Any] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep:
            msg = f"--storage-option takes KEY=VALUE; got {item!r}."
            raise InputError(msg)
        if key == "endpoint_url":
            opts.setdefault("client_kwargs", {})["endpoint_url"] = value
        else:
            opts[key] = value
    return opts


@contextlib.contextmanager
def client_from_args(args: argparse.Namespace) -> Iterator[Client]:
    """The cluster the command's options ask for, for the duration of the command."""
    with flow_client(
        args.scheduler,
        n_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        quiet=args.quiet,
    ) as client:
        yield client


class TextProgress:
    """A one-line progress counter on standard error, for work done in the driver process."""

    def __init__(self, label: str, *, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` cells."""
        import sys

        if self.quiet:
            return
        pct = int(100 * done / total) if total else 100
        if pct != self._last:
            self._last = pct
            end = "\n" if done >= total else ""
            print(f"\r{self.label}: {done:,}/{total:,} cells ({pct}%)", end=end, file=sys.stderr)
