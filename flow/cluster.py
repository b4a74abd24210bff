"""Where flow's graphs run: an existing ``distributed`` scheduler, or a local cluster.

Nothing here schedules work itself. :func:`flow_client` connects to a scheduler address or
starts a :class:`distributed.LocalCluster` sized to the machine, and prints the dashboard link;
:func:`compute` runs Dask collections on the current client with a progress bar.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from dask import config as dask_config
from dask.base import compute as dask_compute
from distributed import Client, LocalCluster, get_client, progress

from .errors import FlowError

__all__ = ["WORKER_ENVIRON", "SchedulerError", "compute", "current_client", "flow_client"]

#: Environment for the local workers of tokenize and export (``worker_environ=``). Every block
#: allocates arrays of tens of MB of the same shapes; above glibc's default mmap threshold each
#: one is fresh memory, which this kind of machine backs slowly on first touch. Serving them
#: from the heap instead made tokenize about 2x faster here (100k cells x 2,000 genes,
#: 2 workers: 15.8 s -> 8.9 s wall). Not for medians: their allocations vary in size, and a
#: heap that keeps them grew past 1.2 GiB workers at 1M cells.
WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": 1 << 30}


class SchedulerError(FlowError, ConnectionError):
    """The Dask scheduler given by address cannot be reached."""


def current_client() -> Client | None:
    """The ``distributed.Client`` in use (the current one), or None."""
    try:
        return get_client()
    except ValueError:
        return None


@contextlib.contextmanager
def flow_client(
    scheduler: str | Client | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | int | None = "auto",
    processes: bool = True,
    quiet: bool = False,
    dashboard_address: str | None = ":0",
    worker_environ: dict[str, Any] | None = None,
) -> Iterator[Client]:
    """Use a Dask cluster for the duration of a ``with`` block.

    Parameters
    ----------
    scheduler
        A scheduler address (``tcp://host:8786``) or an existing ``Client`` to use as is.
        None: the current client if there is one, else a new local cluster.
    n_workers, threads_per_worker, memory_limit, processes
        Local cluster sizing (defaults: distributed's, sized to the machine).
    quiet
        Do not print the dashboard link.
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    existing = current_client() if scheduler is None else None
    if existing is not None:
        yield existing
        return
    if scheduler is not None:
        try:
            connected = Client(scheduler, set_as_default=True)
        except (OSError, ValueError) as err:  # refused, timed out, malformed address
            msg = (
                f"Cannot reach the Dask scheduler at {scheduler!r} ({err}). Check the address, "
                "start a scheduler (`dask scheduler`, then `dask worker ADDRESS` on each machine), "
                "or leave out --scheduler to run on a local cluster."
            )
            raise SchedulerError(msg) from err
        with connected as client:
            _announce(client, quiet, f"Connected to scheduler {scheduler}")
            yield client
        return
    with (
        dask_config.set(worker_environ or {}),
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            processes=processes,
            dashboard_address=dashboard_address,
        ) as cluster,
        Client(cluster, set_as_default=True) as client,
    ):
        n = len(cluster.workers)
        _announce(client, quiet, f"Started a local Dask cluster ({n} workers)")
        yield client


def _announce(client: Client, quiet: bool, what: str) -> None:
    if not quiet:
        link = client.dashboard_link if client.dashboard_link else "(no dashboard)"
        print(f"{what}; dashboard: {link}", file=sys.stderr)


def compute(*collections: Any, quiet: bool = True, label: str = "") -> tuple[Any, ...]:
    """Compute Dask collections on the current client (or dask's default scheduler).

    With ``quiet=False`` a progress bar is drawn on standard error while they run.
    """
    client = current_client()
    if client is None:
        if quiet:
            return tuple(dask_compute(*collections))
        from dask.diagnostics.progress import ProgressBar

        if label:
            print(label, file=sys.stderr)
        with ProgressBar(out=sys.stderr):
            return tuple(dask_compute(*collections))
    futures = client.compute(list(collections))
    if not quiet:
        if label:
            print(label, file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            progress(futures, notebook=False)
        print(file=sys.stderr)
    return tuple(client.gather(futures))
