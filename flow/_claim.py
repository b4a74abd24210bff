"""Claims: one run writes an output at a time.

A run that writes an output (a store, a dataset directory, a run's output folder) first takes
a *claim* on it: a small file beside the output, ``OUTPUT.flow-claim``, recording the host, the
process id, the start time and the command of the run. A second run on the same output stops
at once with :class:`~flow.errors.OutputBusyError` naming them. The claim is removed when the
run ends, whatever the ending; a claim left by a killed run is taken over.

Local file systems (NFS included): the claim file is locked with ``flock``. The operating
system holds the lock for the process and drops it when the process ends, however it ends
(``kill -9`` included), so a claim left behind is detected as free without guessing from
process ids, and the kernel lets exactly one of several runs taking it over win. The lock is
re-checked against the file's inode after locking: a run that locked a file its holder had just
removed tries again.

Object stores (``s3://``, ``gs://``, ``memory://``, ...): the claim is created with an
exclusive create (``If-None-Match: *`` on S3, fsspec's ``"xb"`` mode elsewhere), so of two
runs starting at once exactly one creates it. Its holder rewrites it every
:data:`HEARTBEAT_SECONDS`; a claim whose holder is on this host and gone, or whose last
heartbeat is older than :data:`STALE_SECONDS` (``FLOW_CLAIM_STALE_SECONDS``), is stale and is
taken over by deleting it and creating a new one exclusively. Limit: fsspec offers no
conditional delete, so two runs taking over the *same stale* claim at the same instant could
both delete it; each re-reads the claim after a pause and only the run whose claim is there
goes on (a narrow window, not an atomic guarantee).

Within one process claims are re-entrant per thread: :func:`flow.pipeline.run` claims its
output folder and each stage claims its own output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ._location import Location, LocationLike
from .errors import DiskFullError, OutputBusyError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "CLAIM_SUFFIX",
    "HEARTBEAT_SECONDS",
    "STALE_SECONDS",
    "ClaimInfo",
    "claim_location",
    "claim_output",
    "read_claim",
]

log = logging.getLogger(__name__)

#: The claim of ``OUTPUT`` is the file ``OUTPUT + CLAIM_SUFFIX``, beside it.
CLAIM_SUFFIX = ".flow-claim"
#: How often the holder of a claim on an object store rewrites it (seconds).
HEARTBEAT_SECONDS = 30.0
#: A claim on an object store not rewritten for this long is stale (seconds; environment
#: variable ``FLOW_CLAIM_STALE_SECONDS``).
STALE_SECONDS = 600.0
#: After taking over a stale claim on an object store, wait this long and read it again.
_SETTLE_SECONDS = 1.0


@dataclass(frozen=True)
class ClaimInfo:
    """Who holds a claim: host, process id, when it was taken, the command, a unique token."""

    host: str
    pid: int
    since: float
    command: str
    token: str
    heartbeat: float = 0.0

    @classmethod
    def mine(cls, command: str) -> ClaimInfo:
        """A new claim by this process."""
        now = time.time()
        return cls(socket.gethostname(), os.getpid(), now, command, uuid.uuid4().hex, now)

    @classmethod
    def parse(cls, data: bytes) -> ClaimInfo | None:
        """The claim recorded in ``data`` (None if it is not one, e.g. still being written)."""
        try:
            raw = json.loads(data.decode())
            return cls(
                str(raw["host"]),
                int(raw["pid"]),
                float(raw["since"]),
                str(raw.get("command", "?")),
                str(raw.get("token", "")),
                float(raw.get("heartbeat", raw["since"])),
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def dumps(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        """``host H, pid P, since T`` for messages."""
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def stale(self, now: float | None = None) -> bool:
        """Whether its holder is gone: on this host and not running, or silent too long."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        limit = float(os.environ.get("FLOW_CLAIM_STALE_SECONDS", STALE_SECONDS))
        return (now or time.time()) - max(self.heartbeat, self.since) > limit


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def claim_location(output: LocationLike) -> Location:
    """Where the claim of ``output`` is: ``OUTPUT.flow-claim`` beside it."""
    where = Location.of(output)
    base = where.path.rstrip("/") if where.is_url else where.url.rstrip(os.sep)
    return Location(base + CLAIM_SUFFIX, where.storage_options)


def read_claim(output: LocationLike) -> ClaimInfo | None:
    """The claim recorded beside ``output``, if any (held or left by a killed run)."""
    where = claim_location(output)
    try:
        if where.is_local:
            with open(where.local_path, "rb") as fh:
                return ClaimInfo.parse(fh.read())
        fs, path = where.fs()
        return ClaimInfo.parse(fs.cat_file(path))
    except FileNotFoundError:
        return None


def _busy(output: Location, holder: ClaimInfo | None) -> OutputBusyError:
    who = holder.describe() if holder is not None else "which is just starting"
    cmd = f": {holder.command}" if holder is not None and holder.command else ""
    msg = (
        f"{output.url} is being written by another run ({who}{cmd}); wait for it to finish "
        "(or stop it), or choose another output."
    )
    return OutputBusyError(msg)


class _LocalClaim:
    """A claim file locked with ``flock`` (see the module notes)."""

    def __init__(self, output: Location, info: ClaimInfo) -> None:
        self.output, self.info = output, info
        self.path = claim_location(output).local_path
        self.fd = -1

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ClaimInfo.parse(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise _busy(self.output, holder) from None
            try:  # the holder may have removed the file between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        left = ClaimInfo.parse(os.pread(fd, 1 << 16, 0))
        if left is not None:
            log.debug("taking over the claim left by %s on %s", left.describe(), self.output.url)
        try:
            data = self.info.dumps()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # while still locked: the next run locks a new file
        os.close(self.fd)


class _ObjectClaim:
    """A claim object created exclusively and kept alive by a heartbeat (see the notes)."""

    def __init__(self, output: Location, info: ClaimInfo) -> None:
        self.output, self.info = output, info
        self.fs, self.path = claim_location(output).fs()
        self.stop = threading.Event()
        self.beat: threading.Thread | None = None

    def _create(self, info: ClaimInfo) -> bool:
        """Create the claim object unless one exists; whether it was created."""
        try:
            if "s3" in _protocols(self.fs):
                self.fs.pipe_file(self.path, info.dumps(), mode="create")
            else:
                with self.fs.open(self.path, "xb") as fh:
                    fh.write(info.dumps())
        except FileExistsError:
            return False
        except OSError as err:  # S3: 412 Precondition Failed
            if "precondition" in str(err).lower():
                return False
            raise
        self.fs.invalidate_cache()
        return True

    def _read(self) -> ClaimInfo | None:
        self.fs.invalidate_cache()
        try:
            return ClaimInfo.parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def acquire(self) -> None:
        if not self._create(self.info):
            holder = self._read()
            if holder is not None and not holder.stale():
                raise _busy(self.output, holder)
            log.debug("taking over a stale claim on %s", self.output.url)
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
            if not self._create(self.info):
                raise _busy(self.output, self._read())
            time.sleep(_SETTLE_SECONDS)
            now = self._read()
            if now is None or now.token != self.info.token:
                raise _busy(self.output, now)
        self.beat = threading.Thread(target=self._heartbeat, daemon=True, name="flow-claim")
        self.beat.start()

    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                now = self._read()
                if now is None or now.token != self.info.token:
                    log.warning("the claim on %s was taken by another run", self.output.url)
                    return
                fresh = ClaimInfo(**{**asdict(self.info), "heartbeat": time.time()})
                self.fs.pipe_file(self.path, fresh.dumps())
            except OSError as err:  # a flaky store: try again at the next beat
                log.debug("heartbeat of the claim on %s failed: %s", self.output.url, err)

    def release(self) -> None:
        self.stop.set()
        if self.beat is not None:
            self.beat.join(timeout=5)
        with contextlib.suppress(OSError):
            now = self._read()
            if now is not None and now.token == self.info.token:
                self.fs.rm_file(self.path)


def _protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


_HELD: dict[tuple[str, int], int] = {}
_HELD_LOCK = threading.Lock()


@contextlib.contextmanager
def claim_output(
    output: LocationLike,
    *,
    command: str,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[Location]:
    """Hold the claim on ``output`` for the duration of a ``with`` block (see the module notes).

    Also names the output when the block runs out of space: an ``OSError`` with ``ENOSPC``
    or ``EDQUOT`` (from this process or a Dask worker) becomes :class:`~flow.errors.DiskFullError`.

    Parameters
    ----------
    output
        The output the block writes (a path, URL or :class:`~flow._location.Location`).
    command
        What writes it (recorded in the claim and shown to a second run), e.g. ``"tokenize"``.
    storage_options
        fsspec options, used only when ``output`` is not a Location.

    Raises
    ------
    OutputBusyError
        Another run holds the claim.
    """
    where = Location.of(output, storage_options)
    key = (claim_location(where).url, threading.get_ident())
    with _HELD_LOCK:
        depth = _HELD.get(key, 0)
        _HELD[key] = depth + 1
    claim: _LocalClaim | _ObjectClaim | None = None
    try:
        if depth == 0:
            info = ClaimInfo.mine(_describe_command(command))
            taking = _LocalClaim(where, info) if where.is_local else _ObjectClaim(where, info)
            try:
                taking.acquire()
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT):  # not even room for the claim
                    raise _disk_full(where, err) from err
                raise
            claim = taking
        try:
            yield where
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, DiskFullError):
                raise _disk_full(where, err) from err
            raise
    finally:
        with _HELD_LOCK:
            if depth == 0:
                _HELD.pop(key, None)
            else:
                _HELD[key] = depth
        if claim is not None:
            with contextlib.suppress(OSError):
                claim.release()


def _describe_command(command: str) -> str:
    """The command line if this is the ``flow`` command, else ``flow.<command>`` (a call)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if prog == "flow" or (prog == "__main__.py" and "flow" in sys.argv[0]):
        return shlex.join(["flow", *sys.argv[1:]])[:300]
    return f"flow.pipeline.{command}() in {prog or 'python'}"


def _disk_full(output: Location, err: OSError) -> DiskFullError:
    where = f" (at {err.filename})" if err.filename else ""
    msg = (
        f"no space left on the device of {output.url}{where}: free space or choose another "
        "output, then rerun the same command (what is written is kept unfinished, never "
        "taken for finished)."
    )
    full = DiskFullError(msg)
    full.errno = err.errno
    return full
