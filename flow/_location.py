"""Where something lives: a local path or an fsspec URL, with its storage options, parsed once.

A :class:`Location` is made where a user's words enter (the CLI, or the first public call) and
passed down; nothing below re-checks ``"://"`` or repacks ``storage_options``. Local paths keep
using the operating system directly; a URL is resolved with ``fsspec.core.url_to_fs`` at each
use (fsspec caches filesystem instances), so a Location pickles as two small values and each
task opens its own handles.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import fsspec
import zarr

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

__all__ = ["STORE_RETRIES", "Located", "Location", "LocationLike", "store_failure"]

#: Retries of one object-store request after its first attempt (botocore's "standard" mode:
#: 5xx answers, throttling and broken connections, with jittered exponential backoff; each
#: retry is logged at debug level by the ``botocore`` logger). A user's own
#: ``config_kwargs={"retries": ...}`` storage option replaces this. s3fs adds its own bounded
#: retries (5) around broken connections.
STORE_RETRIES = 4

_S3_PROTOCOLS = ("s3://", "s3a://")
#: What an object store's failure looks like once it has crossed a process boundary (the
#: backend's exception chain is lost in pickling): s3fs maps 5xx answers to these errnos.
_STORE_ERRNOS = (errno.EIO, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED)
_URL = re.compile(r"([a-z][a-z0-9+.-]*)://")
_NOT_STORES = ("file", "tcp", "tls", "ucx", "inproc", "ws", "wss")  # local, or a scheduler
_BACKENDS = ("botocore", "aiobotocore", "aiohttp", "s3fs", "urllib3")


@dataclass(frozen=True)
class Location:
    """A local path or fsspec URL (``s3://``, ``gs://``, ``memory://``, ``file://``, ...).

    Parameters
    ----------
    path
        The path or URL as the user gave it (kept as given: messages and recorded sources
        show it so).
    storage_options
        fsspec options of a URL (credentials, endpoint, ...); ignored for local paths.
    """

    path: str
    storage_options: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        where: str | os.PathLike[str] | Location,
        storage_options: Mapping[str, Any] | None = None,
    ) -> Location:
        """``where`` as a Location (a Location is returned as it is)."""
        if isinstance(where, Location):
            return where
        return cls(os.fspath(where), dict(storage_options) if storage_options else None)

    @property
    def is_url(self) -> bool:
        """Whether the path is written as a URL (``protocol://...``, ``file://`` included)."""
        return "://" in self.path

    @property
    def is_local(self) -> bool:
        """Whether this is on the local file system (a plain path or a ``file://`` URL)."""
        return not self.is_url or self.path.startswith("file://")

    @property
    def url(self) -> str:
        """The absolute local path, or the URL unchanged: the same from any working directory."""
        return self.path if self.is_url else os.path.abspath(self.path)

    @property
    def local_path(self) -> str:
        """The path on the local file system (``file://`` removed); only for local locations."""
        return self.path.removeprefix("file://")

    @property
    def options(self) -> dict[str, Any] | None:
        """Storage options to hand to fsspec or Zarr: a dict for a URL, None for a local path.

        For ``s3://`` URLs, bounded retries (:data:`STORE_RETRIES`) unless the options set their
        own ``config_kwargs["retries"]``.
        """
        if not self.is_url:
            return None
        options = dict(self.storage_options or {})
        if self.path.startswith(_S3_PROTOCOLS):
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("retries", {"max_attempts": STORE_RETRIES, "mode": "standard"})
            options["config_kwargs"] = config
        return options

    @property
    def store_options(self) -> dict[str, Any] | None:
        """Storage options for Zarr: None for local paths and ``file://`` URLs."""
        return None if self.is_local else self.options

    def fs(self) -> tuple[AbstractFileSystem, str]:
        """The fsspec filesystem of this location and the path inside it."""
        fs, root = fsspec.core.url_to_fs(self.path, **(self.options or {}))
        return fs, root

    @property
    def name(self) -> str:
        """The last part of the path or URL, without a trailing ``/`` (or an https query)."""
        path = self.path
        if self.is_url:
            if path.startswith(("http://", "https://")):
                path = path.split("?", 1)[0].split("#", 1)[0]
            return path.rstrip("/").rsplit("/", 1)[-1]
        return os.path.basename(path.rstrip("/" + os.sep))

    def join(self, name: str) -> Location:
        """``name`` inside this directory, with the same storage options."""
        if not self.is_url:
            return Location(os.path.join(self.path, name), self.storage_options)
        sep = "" if self.path.endswith("/") else "/"
        return Location(self.path + sep + name, self.storage_options)

    def exists(self) -> bool:
        """Whether anything is at this location."""
        if self.is_local:
            return os.path.exists(self.local_path)
        fs, root = self.fs()
        return bool(fs.exists(root))

    def makedirs(self) -> None:
        """Create this local directory (and its parents); object stores need none."""
        if self.is_local:
            os.makedirs(self.local_path, exist_ok=True)

    def open_group(self, *, mode: str = "r", zarr_format: int | None = None) -> zarr.Group:
        """The Zarr group at this location (no flow checks: see :mod:`flow._io`)."""
        return zarr.open_group(
            self.url,
            mode=mode,  # type: ignore[arg-type]
            zarr_format=zarr_format,  # type: ignore[arg-type]
            storage_options=self.store_options,
        )

    def __str__(self) -> str:
        return self.path


def store_failure(err: BaseException, places: Iterable[object]) -> str | None:
    """A one-line message if ``err`` is an object store failing (after its retries), else None.

    ``places`` are the paths and URLs the user gave (strings, or lists of them); the message
    names the first URL among them. Errors of commands without a URL are never store failures.
    """
    urls = [p for p in _flatten(places) if (m := _URL.match(p)) and m[1] not in _NOT_STORES]
    if not urls:
        return None
    retries, detail = None, ""
    for exc in _chain(err):
        meta = getattr(exc, "response", None)
        meta = meta.get("ResponseMetadata") if isinstance(meta, dict) else None
        if isinstance(meta, dict) and int(meta.get("HTTPStatusCode") or 0) >= 500:
            retries = int(meta.get("RetryAttempts") or 0)
            detail = f"HTTP {meta['HTTPStatusCode']}"
            break
        if type(exc).__module__.split(".")[0] in _BACKENDS and not isinstance(
            exc, (PermissionError, FileNotFoundError)
        ):
            retries, detail = STORE_RETRIES, type(exc).__name__
            break
        if isinstance(exc, OSError) and exc.errno in _STORE_ERRNOS and exc.__cause__ is None:
            retries, detail = STORE_RETRIES, errno.errorcode.get(exc.errno or 0, "I/O error")
            break
    if retries is None:
        return None
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return (
        f"{urls[0]}: the object store failed after {retries} retries ({detail}: {first}); "
        "check that it is reachable, then rerun the same command to finish."
    )


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    exc: BaseException | None = err
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _flatten(places: Iterable[object]) -> Iterable[str]:
    for place in places:
        if isinstance(place, str | os.PathLike):
            yield os.fspath(place) if not isinstance(place, bytes) else ""
        elif isinstance(place, list | tuple):
            yield from _flatten(place)


#: What public functions accept where a place is meant.
LocationLike = str | os.PathLike[str] | Location


class Located:
    """For stores that hold a :class:`Location` (as ``self.location``): its URL and options."""

    location: Location

    @property
    def url(self) -> str:
        """Where the store is: an absolute local path or a URL."""
        return self.location.url

    @property
    def storage_options(self) -> Mapping[str, Any] | None:
        """The fsspec options the store was opened with (credentials: not in the repr)."""
        return self.location.storage_options
