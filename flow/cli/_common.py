"""Helpers shared by the sub-command modules (option parsing, cluster set-up)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..cluster import Reporter, lazy_client, working_on
from ..errors import InputError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["client_from_args", "reporter", "storage_options"]


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
    args: argparse.Namespace, *, environ: dict[str, Any] | None = None, cells: int | None = None
) -> Iterator[Callable[[], Client]]:
    """The cluster the command's options ask for, for the duration of the command (yields a
    function that returns its client, starting it).

    It starts when the command first computes work that needs it
    (:func:`flow.cluster.current_client`): at once with ``--scheduler``, ``--workers``,
    ``--threads-per-worker`` or ``--memory-limit``; without them, for work on
    ``$FLOW_CLUSTER_CELLS`` (default 50,000) cells or more; smaller work runs on threads
    here. ``cells``: the size of the command's work when it is one store's (None: each stage
    declares its own).
    """
    with (
        lazy_client(
            scheduler=args.scheduler,
            n_workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit or "auto",
            quiet=args.quiet,
            environ=environ,
        ) as client,
        working_on(cells) if cells is not None else contextlib.nullcontext(),
    ):
        yield client


def reporter(args: argparse.Namespace, *, steps: bool = True) -> Reporter:
    """Progress bars unless ``--quiet``; step messages on standard error (unless ``steps`` is
    false: a one-stage command under ``--quiet`` prints its result line only)."""
    return Reporter(quiet=args.quiet, messages=sys.stderr if steps else None)
