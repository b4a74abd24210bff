"""Where flow's graphs run: an existing ``distributed`` scheduler, a local cluster, or threads.

Nothing here schedules work itself. :func:`flow_client` connects to a scheduler address or
starts a :class:`distributed.LocalCluster` sized to the machine, and prints the dashboard link;
:func:`compute` runs Dask collections on the current client with a progress bar.

Which one, is one rule (:func:`current_client`): a client the user set up or asked for
(``--scheduler``, ``--workers``, ...) is used; inside :func:`lazy_client` with no such
request, work on fewer than :func:`cluster_cells` cells (declared with :func:`working_on`)
runs on dask's threads in this process, and larger work starts the local cluster, which the
later stages of the same command then reuse.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

import psutil
from dask import config as dask_config
from dask.base import compute as dask_compute
from dask.diagnostics.progress import ProgressBar

from ._progress import Throttle, on_terminal
from .errors import FlowError, InputError

if TYPE_CHECKING:
    from distributed import Client, Variable
    from distributed.scheduler import KilledWorker

# ``distributed`` itself is imported inside the functions that run only once a cluster is in
# play (a documented import-time cost: ~0.4 s of a command's start on a quiet 2-core machine,
# which commands on fewer than `cluster_cells()` cells, run on threads, do not need).

__all__ = [
    "CLUSTER_CELLS",
    "CLUSTER_CELLS_VARIABLE",
    "MEDIANS_MMAP_THRESHOLD",
    "QUIET",
    "Interrupted",
    "Reporter",
    "SchedulerError",
    "WorkerLostError",
    "TextProgress",
    "as_completed",
    "cluster_cells",
    "compute",
    "current_client",
    "flow_client",
    "lazy_client",
    "run_task",
    "stop_on_signals",
    "worker_environ",
    "working_on",
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


class WorkerLostError(FlowError, MemoryError):
    """A task killed every worker that ran it (out of memory, most often), past distributed's
    retries (``distributed.scheduler.allowed-failures``).

    ``task`` is the task's key; ``block`` the block index in it (for flow's per-block tasks,
    ``(flow-<op>-<token>, block, ...)``), else None. Stages that know their blocks re-raise it
    with the block's size and the option that fixes it.
    """

    def __init__(
        self, message: str, *, task: str = "", block: int | None = None, attempts: int = 0
    ) -> None:
        super().__init__(message)
        self.task, self.block, self.attempts = task, block, attempts

    def __str__(self) -> str:
        return str(self.args[0])


def task_block(key: Any) -> int | None:
    """The block index in a flow task key ``("flow-<op>-<token>", block, ...)``, else None
    (merge levels of a reduction, ``flow-...-L<level>``, are not blocks)."""
    if not isinstance(key, tuple) or len(key) < 2 or not isinstance(key[1], int):
        return None
    name = str(key[0])
    if not name.startswith("flow-") or re.search(r"-L\d+$", name):
        return None
    return int(key[1])


def worker_lost(err: KilledWorker) -> WorkerLostError:
    """:class:`WorkerLostError` for distributed's ``KilledWorker``: names the task and block."""
    key = err.task
    block = task_block(key)
    name = str(key[0] if isinstance(key, tuple) else key)
    what = f"block {block} (task {name})" if block is not None else f"task {name}"
    msg = (
        f"{what} killed its worker {err.allowed_failures + 1} times, most likely out of "
        "memory: give the workers more memory (--memory-limit), or fewer threads per worker "
        "(--threads-per-worker); rerun the same command to finish."
    )
    return WorkerLostError(msg, task=name, block=block, attempts=err.allowed_failures + 1)


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM arrived; :attr:`exit_status` is 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """130 for SIGINT, 143 for SIGTERM (the shell's convention)."""
        return 128 + self.signum


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into :class:`Interrupted` in the main thread, for a ``with`` block.

    The first signal raises :class:`Interrupted` where the command is: ``with`` blocks unwind,
    so claims are released and a local cluster is closed with its workers (what was written
    stays, resumable). distributed's shutdown messages are silenced then. A second signal
    during that shutdown ends the process at once, after killing its child processes (local
    workers): never a hang, no orphans. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in _SIGNALS}

    def again(signum: int, frame: Any) -> None:
        _kill_children()
        os._exit(128 + signum)

    def first(signum: int, frame: Any) -> None:
        for s in _SIGNALS:
            signal.signal(s, again)
        for name in ("distributed", "tornado", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        raise Interrupted(signum)

    for s in _SIGNALS:
        signal.signal(s, first)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _kill_children() -> None:
    """Kill this process's child processes (its local workers) and theirs."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()


#: Cells of work from which a command that asked for no cluster starts its local one: a
#: local cluster costs seconds to start (measured: 9,000 cells tokenize in 3.4 s on threads,
#: of which the cluster would add ~5 s), and 2 worker processes beat the threads of one from
#: about this size on (90,000 cells: tokenize 7.7 s on the cluster, 15 s on threads).
CLUSTER_CELLS = 50_000
#: The environment variable that overrides :data:`CLUSTER_CELLS` (0: always a cluster).
CLUSTER_CELLS_VARIABLE = "FLOW_CLUSTER_CELLS"

_WORK_CELLS: ContextVar[int | None] = ContextVar("flow_work_cells", default=None)


def cluster_cells() -> int:
    """Cells of work from which :func:`lazy_client` starts its local cluster:
    ``$FLOW_CLUSTER_CELLS`` if set, else :data:`CLUSTER_CELLS`.

    Raises
    ------
    InputError
        The variable is not a whole number.
    """
    text = os.environ.get(CLUSTER_CELLS_VARIABLE, "").strip()
    if not text:
        return CLUSTER_CELLS
    try:
        return int(text.replace("_", ""))
    except ValueError:
        msg = (
            f"{CLUSTER_CELLS_VARIABLE}={text!r} is not a number of cells: set it to a whole "
            "number (e.g. 50000; 0 for always a cluster) or unset it."
        )
        raise InputError(msg) from None


@contextlib.contextmanager
def working_on(n_cells: int | None) -> Iterator[None]:
    """Declare how many cells the work in the ``with`` block is about (None: unknown).

    :func:`current_client` (so :func:`compute`) chooses where that work runs by it. Blocks
    nest; the innermost declaration wins.
    """
    token = _WORK_CELLS.set(None if n_cells is None else int(n_cells))
    try:
        yield
    finally:
        _WORK_CELLS.reset(token)


def current_client(*, cells: int | None = None) -> Client | None:
    """The ``distributed.Client`` to compute on, or None for dask's scheduler in this process.

    The one rule of where flow's work runs:

    - a client already set (by the user, or a cluster started earlier in the command) is used;
    - inside :func:`lazy_client`, its cluster is started (then reused) when its options ask
      for one (a scheduler address, workers, threads per worker or a memory limit), or when
      the work is on :func:`cluster_cells` cells or more, or of unknown size;
    - otherwise (small work, nothing asked for) None: dask's threads in this process.

    Parameters
    ----------
    cells
        The number of cells of the work; default: the one declared by :func:`working_on`
        (unknown if none was).
    """
    client = _default_client()
    if client is not None or not _PENDING:
        return client
    pending = _PENDING[-1]
    n = _WORK_CELLS.get() if cells is None else cells
    if pending.started or pending.asked or n is None or n >= cluster_cells():
        return pending.client()
    return None


def _default_client() -> Client | None:
    """distributed's default client, if one is set (none if distributed was never imported)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_client  # imported already: free

    try:
        return get_client()
    except ValueError:
        return None


#: :func:`flow_client` options that ask for a cluster (and their values that do not).
_ASKING = {"scheduler": (None,), "n_workers": (None,), "threads_per_worker": (None,)}
_ASKING_MEMORY = (None, "auto")


class _LazyCluster:
    """A cluster that :func:`flow_client` starts on first use, and closes with the block."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._stack = contextlib.ExitStack()
        self._client: Client | None = None
        self.asked = any(options.get(k) not in none for k, none in _ASKING.items()) or (
            options.get("memory_limit") not in _ASKING_MEMORY
        )

    @property
    def started(self) -> bool:
        return self._client is not None

    def client(self) -> Client:
        if self._client is None:
            self._client = self._stack.enter_context(flow_client(**self._options))
        return self._client

    def close(self) -> None:
        self._stack.close()


_PENDING: list[_LazyCluster] = []


@contextlib.contextmanager
def lazy_client(**options: Any) -> Iterator[Callable[[], Client]]:
    """:func:`flow_client`, started only when work that needs it first computes in the block.

    Commands check their arguments and read metadata first: a mistake is reported without
    waiting for a cluster, and work that computes nothing (a dictionary import, a one-cell
    query) starts none. Small work (under :func:`cluster_cells` cells, see
    :func:`current_client`) runs on dask's threads unless ``options`` ask for a cluster
    (``scheduler``, ``n_workers``, ``threads_per_worker``, a ``memory_limit`` other than
    ``"auto"``). Once started, the cluster serves the rest of the block. Yields a function
    that returns the client, starting it if needed.
    """
    pending = _LazyCluster(**options)
    _PENDING.append(pending)
    try:
        yield pending.client
    finally:
        _PENDING.remove(pending)
        pending.close()


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
    from distributed import Client, LocalCluster  # a cluster is asked for: see the imports

    from ._distributed import QuietTaskErrors

    if isinstance(scheduler, Client):
        yield scheduler
        return
    existing = _default_client() if scheduler is None else None
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
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            dask_config.set({"distributed.nanny.pre-spawn-environ": environ or worker_environ()})
        )
        with _workers_ignore_sigint():
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=n_workers,
                    threads_per_worker=threads_per_worker,
                    memory_limit=memory_limit,
                    processes=processes,
                    dashboard_address=dashboard_address,
                )
            )
        client = stack.enter_context(Client(cluster, set_as_default=True))
        client.register_plugin(QuietTaskErrors(), name="flow-quiet-task-errors")
        n = len(cluster.workers)
        _announce(client, quiet, f"Started a local Dask cluster ({n} workers)")
        yield client


@contextlib.contextmanager
def _workers_ignore_sigint() -> Iterator[None]:
    """Ignore SIGINT while local worker processes are started, so that they inherit that.

    Ctrl-C at a terminal signals the whole foreground process group, workers included; each
    would print a ``KeyboardInterrupt`` traceback. This process handles the signal instead
    (:func:`stop_on_signals`) and shuts them down. A Ctrl-C during the cluster's start (a
    second or two) is ignored. Workers restarted later by their nanny do not inherit it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _announce(client: Client, quiet: bool, what: str) -> None:
    if not quiet:
        link = client.dashboard_link if client.dashboard_link else "(no dashboard)"
        print(f"{what}; dashboard: {link}", file=sys.stderr)


def compute(*collections: Any, quiet: bool = True, label: str = "") -> tuple[Any, ...]:
    """Compute Dask collections on :func:`current_client` (or dask's default scheduler).

    With ``quiet=False`` progress is shown on standard error while they run: a progress bar
    on a terminal, plain lines at a modest rate (every 10% or 30 s) in a log file.
    """
    client = current_client()
    if not quiet and label:
        print(label, file=sys.stderr)
    if client is None:
        if quiet:
            return tuple(dask_compute(*collections))
        bar = ProgressBar(out=sys.stderr) if on_terminal() else _LocalLogProgress(label)
        with bar:
            return tuple(dask_compute(*collections))
    from distributed import progress  # a client: imported already
    from distributed.scheduler import KilledWorker

    from ._distributed import LogProgressBar

    futures = client.compute(list(collections))
    try:
        if not quiet:
            if on_terminal():
                with contextlib.redirect_stdout(sys.stderr):
                    progress(futures, notebook=False)
                print(file=sys.stderr)
            else:
                LogProgressBar(futures, label=label)
        return tuple(client.gather(futures))
    except KilledWorker as err:
        raise worker_lost(err) from None
    except BaseException:  # interrupted, failed: stop what is still running
        with contextlib.suppress(Exception):
            client.cancel(futures)
        raise


class _LocalLogProgress(ProgressBar):
    """dask's local progress bar, as plain lines for a log file."""

    def __init__(self, label: str) -> None:
        super().__init__(out=sys.stderr)
        self._throttle = Throttle(label)

    def _draw_bar(self, frac: float, elapsed: float) -> None:
        self._throttle.line(int(100 * frac), f"{elapsed:.0f} s elapsed", final=frac >= 1)


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
    from distributed import Variable, wait  # a client: imported already
    from distributed.scheduler import KilledWorker

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
    except KilledWorker as err:
        raise worker_lost(err) from None
    except BaseException:
        future.cancel()
        raise
    finally:
        latest.delete()


def as_completed(futures: Any) -> Iterator[Any]:
    """``distributed.as_completed(futures)``, for modules that must not import ``distributed``
    when they run on threads (see the imports above)."""
    from distributed import as_completed as completed  # futures: imported already

    return iter(completed(futures))


def _report_progress(
    func: Any, latest: Variable, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The task of :func:`run_task`: call ``func``, keeping its latest progress in ``latest``."""
    return func(*args, progress=lambda done, total: latest.set((done, total)), **kwargs)


class TextProgress:
    """A one-line progress counter on standard error, for work done in the driver process."""

    def __init__(self, label: str, *, quiet: bool = False) -> None:
        self.label = label
        self.quiet = quiet
        self._last = -1
        self._log = None if on_terminal() else Throttle(label)

    def __call__(self, done: int, total: int) -> None:
        """Report ``done`` of ``total`` cells (in a log file: a plain line now and then)."""
        if self.quiet:
            return
        pct = int(100 * done / total) if total else 100
        if self._log is not None:
            self._log.line(pct, f"{done:,}/{total:,} cells", final=done >= total)
        elif pct != self._last:
            self._last = pct
            end = "\n" if done >= total else ""
            print(f"\r{self.label}: {done:,}/{total:,} cells ({pct}%)", end=end, file=sys.stderr)


@dataclass(frozen=True)
class Reporter:
    """How a long piece of work talks to its user: one object, passed down from the edge.

    Parameters
    ----------
    quiet
        No progress bars (and no dashboard link where a cluster is started).
    messages
        Where :meth:`say` writes one-line messages about each step (None: nowhere).
    """

    quiet: bool = True
    messages: TextIO | None = None

    def say(self, text: str) -> None:
        """Tell the user what is happening (a line on :attr:`messages`, if any)."""
        if self.messages is not None:
            print(text, file=self.messages)

    def progress(self, label: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for cells processed in this process."""
        return TextProgress(label, quiet=self.quiet)

    def compute(self, *collections: Any, label: str = "") -> tuple[Any, ...]:
        """:func:`compute` the collections, with a progress bar unless :attr:`quiet`."""
        return compute(*collections, quiet=self.quiet, label=label)


#: A reporter that says nothing (the default of library calls).
QUIET = Reporter()
