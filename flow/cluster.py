"""Where flow's graphs run: an existing ``distributed`` scheduler, or a local cluster.

Nothing here schedules work itself. :func:`flow_client` connects to a scheduler address or
starts a :class:`distributed.LocalCluster` sized to the machine, and prints the dashboard link;
:func:`compute` runs Dask collections on the current client with a progress bar.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from dask import config as dask_config
from dask.base import compute as dask_compute
from distributed import Client, LocalCluster, Variable, get_client, progress, wait

from .errors import FlowError

__all__ = [
    "MEDIANS_MMAP_THRESHOLD",
    "SchedulerError",
    "compute",
    "current_client",
    "flow_client",
    "run_task",
    "worker_environ",
]

#: glibc's mmap threshold for the workers of ``flow medians``: see :func:`worker_environ`.
MEDIANS_MMAP_THRESHOLD = 1 << 20


def worker_environ(mmap_threshold: int | None = None) -> dict[str, Any]:
    """Environment of flow's local worker processes (distributed's, with glibc tuned).

    distributed's nanny sets ``MALLOC_TRIM_THRESHOLD_`` to return freed memory to the system
    quickly. Setting it also freezes glibc's mmap threshold at 128 KiB, so every array above
    that is fresh memory, faulted in page by page, every time; flow's kernels allocate
    arrays of a few hundred KB to tens of MB per block. Measured on 2,000-gene cells
    (4,096-cell blocks), per block:

    =============================  ================  ===================
    worker environment             medians' digests  tokenize (+ write)
    =============================  ================  ===================
    distributed's (trim 64 KiB)    0.33 s            0.89 s
    glibc's adaptive defaults      0.17 s            0.35 s
    trim 64 KiB, mmap at 1 MiB     0.24 s            0.81 s
    =============================  ================  ===================

    With no ``mmap_threshold`` this drops ``MALLOC_TRIM_THRESHOLD_`` (glibc's adaptive
    defaults: fastest, used for tokenize and export). Medians hold many digests of 10-60 MB
    until they are merged; served from the heap, those fragmented it (1M cells: worker peak
    1,136 MiB instead of 922 MiB), so ``flow medians`` keeps distributed's trim threshold and
    sets ``MALLOC_MMAP_THRESHOLD_`` (:data:`MEDIANS_MMAP_THRESHOLD`): small temporaries come
    from the heap, digests and blocks from the system.
    """
    env = dict(dask_config.get("distributed.nanny.pre-spawn-environ", {}))
    if mmap_threshold is None:
        env.pop("MALLOC_TRIM_THRESHOLD_", None)
    else:
        env["MALLOC_MMAP_THRESHOLD_"] = int(mmap_threshold)
    return env


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
    environ: dict[str, Any] | None = None,
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
    environ
        Environment variables of a local cluster's worker processes (default:
        :func:`worker_environ`).
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
        dask_config.set({"distributed.nanny.pre-spawn-environ": environ or worker_environ()}),
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


def run_task(
    client: Client, label: str, func: Any, *args: Any, progress: Any = None, **kwargs: Any
) -> Any:
    """Run ``func(*args, progress=..., **kwargs)`` as one task named ``flow-<label>`` on a worker.

    For work that is one sequential stream (reading an input file): it runs where the cluster's
    workers are (next to the data, with their credentials) and the caller holds nothing. The
    task's latest ``progress(done, total)`` reaches ``progress`` here, polled from a
    :class:`distributed.Variable` deleted at the end (intermediate values may be skipped).
    Its exception, if any, is raised here.
    """
    key = f"flow-{label}-{uuid.uuid4().hex}"
    latest = Variable(f"{key}-progress", client=client)
    latest.set(None)  # so that reading it never waits
    future = client.submit(_report_progress, func, latest, args, kwargs, key=key, pure=False)
    shown = None
    try:
        while True:
            finished = future.done()
            now = latest.get()
            if now is not None and progress is not None and tuple(now) != shown:
                shown = tuple(now)
                progress(*shown)
            if finished:
                return future.result()
            with contextlib.suppress(TimeoutError):
                wait(future, timeout=0.2)
    except BaseException:
        future.cancel()
        raise
    finally:
        latest.delete()


def _report_progress(
    func: Any, latest: Variable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The task of :func:`run_task`: call ``func``, keeping its latest progress in ``latest``."""
    return func(*args, progress=lambda done, total: latest.set((done, total)), **kwargs)
