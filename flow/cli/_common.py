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


#: Keys whose values are credentials: kept as given (never turned into numbers), never echoed.
_CREDENTIAL_KEYS = frozenset({"key", "secret", "token", "password", "username", "profile"})


def _option_value(key: str, value: str) -> Any:
    """``true``/``false`` as booleans and whole numbers as ints (fsspec expects them typed)."""
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if key not in _CREDENTIAL_KEYS and value.lstrip("-").isdigit():
        return int(value)
    return value


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--storage-option KEY=VALUE`` pairs as fsspec storage options.

    ``endpoint_url`` goes into ``client_kwargs`` (s3fs); a dotted key nests
    (``client_kwargs.region_name=eu-west-1``, ``config_kwargs.s3.addressing_style=path``);
    ``true``/``false`` become booleans and whole numbers ints, except for credentials.
    """
    opts: dict[str, Any] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = "--storage-option takes KEY=VALUE (the value given is not shown: it may be a credential)."
            raise InputError(msg)
        path = ["client_kwargs", "endpoint_url"] if key == "endpoint_url" else key.split(".")
        where = opts
        for part in path[:-1]:
            where = where.setdefault(part, {})
            if not isinstance(where, dict):
                msg = f"--storage-option {key}: {part} is given both as a value and as a group."
                raise InputError(msg)
        where[path[-1]] = _option_value(path[-1], value)
    return opts


@contextlib.contextmanager
def client_from_args(
    args: argparse.Namespace, *, environ: dict[str, Any] | None = None
) -> Iterator[Client]:
    """The cluster the command's options ask for, for the duration of the command."""
    with flow_client(
        args.scheduler,
        n_workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        memory_limit=args.memory_limit,
        quiet=args.quiet,
        environ=environ,
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
