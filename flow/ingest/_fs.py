"""Reading inputs where they live (a :class:`~flow._location.Location`), and failing clearly.

Local paths keep using the operating system directly (``os``, ``open``), exactly as before
URLs were supported. A URL is resolved with fsspec at every use (fsspec caches filesystem
instances), so a reader holds only its Location, and every read opens and closes its own
file handle.

Messages about a URL never show the storage options: any text taken from a backend error is
passed through :func:`redact` first. :func:`remote_errors` turns filesystem failures (not
found, refused, unreachable) into an :class:`~flow.errors.InputError` naming the input;
:func:`input_errors` does the same for reads of a damaged input.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import gzip
import os
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from .._io import file_fingerprint
from .._location import Location
from ..errors import FlowError, InputError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import scipy.sparse as sp
    from fsspec import AbstractFileSystem

__all__ = [
    "cause",
    "describe",
    "exists",
    "filesystem",
    "fingerprint",
    "guard_reads",
    "input_errors",
    "isdir",
    "isfile",
    "listdir",
    "open_input",
    "parent",
    "redact",
    "remote_errors",
]

#: Option keys (any part of the name, lower case) whose values are always hidden in messages.
_SECRET_KEY_PARTS = ("key", "secret", "token", "passw", "credential", "auth", "sig", "session")
#: Other option values are hidden when at least this long (short ones such as ``path`` or
#: ``true`` are common words of messages and say nothing secret).
_MIN_HIDDEN = 8
_HIDDEN = "***"


def _hidden_values(options: Any, *, secret: bool = False) -> Iterator[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            name = str(key).lower()
            yield from _hidden_values(
                value, secret=secret or any(p in name for p in _SECRET_KEY_PARTS)
            )
    elif isinstance(options, list | tuple | set | frozenset):
        for value in options:
            yield from _hidden_values(value, secret=secret)
    elif isinstance(options, str | bytes):
        text = options.decode(errors="replace") if isinstance(options, bytes) else options
        if text and (secret or len(text) >= _MIN_HIDDEN):
            yield text


def redact(text: str, storage_options: Mapping[str, Any] | None, *, keep: str = "") -> str:
    """``text`` with every storage option value replaced by ``***`` (``keep``, the input's own
    name, is left as it is)."""
    values = sorted(set(_hidden_values(dict(storage_options or {}))), key=len, reverse=True)
    if not values:
        return text
    parts = text.split(keep) if keep else [text]
    for value in values:
        parts = [p.replace(value, _HIDDEN) for p in parts]
    return keep.join(parts)


def describe(err: BaseException, location: Location) -> str:
    """``"Type: message"`` of a backend error, with the location's storage options hidden."""
    return redact(f"{type(err).__name__}: {err}", location.options, keep=location.path)


def cause(err: BaseException, location: Location) -> BaseException | None:
    """What to chain a re-raised error to: nothing when the location has storage options
    (a backend's own message may show them)."""
    return None if location.options else err


@contextlib.contextmanager
def remote_errors(location: Location, what: str = "reaching it") -> Iterator[None]:
    """Turn a failure of the filesystem behind ``location`` into an :class:`InputError`.

    Missing -> "not found"; refused -> "access denied"; anything else the backend raises
    (a wrong storage option, no network, a missing fsspec backend package) -> the backend's
    message, with the storage options hidden.
    """
    url = location.path
    try:
        yield
    except FlowError:
        raise
    except FileNotFoundError as err:
        msg = f"{url}: not found (no such file, directory or object)."
        raise InputError(msg) from cause(err, location)
    except PermissionError as err:
        msg = (
            f"{url}: access denied while {what} ({describe(err, location)}). "
            "Check the credentials given in storage_options (--storage-option) or the "
            "environment."
        )
        raise InputError(msg) from None
    except ImportError as err:
        msg = (
            f"{url}: reading this URL needs a package that is not installed "
            f"({describe(err, location)}). Install the fsspec backend of its "
            "protocol (s3fs for s3://, gcsfs for gs://, adlfs for az://, aiohttp for https://)."
        )
        raise InputError(msg) from None
    except Exception as err:  # the backend's own errors (botocore, aiohttp, ...) vary widely
        msg = (
            f"{url}: failed while {what} ({describe(err, location)}). Check the URL "
            "and the storage options (storage_options=, --storage-option)."
        )
        raise InputError(msg) from None


@contextlib.contextmanager
def input_errors(
    location: Location, what: str, errors: tuple[type[Exception], ...] = (OSError,)
) -> Iterator[None]:
    """Turn read failures of the input (``errors``) into an :class:`InputError` naming it.

    A full disk or quota while transposing through temporary files is not the input's fault
    and propagates unchanged. Storage options never appear in the message.
    """
    try:
        yield
    except FlowError:
        raise
    except errors as err:
        if isinstance(err, OSError) and err.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
            raise
        remote = " (or the connection to it failed)" if location.is_url else ""
        msg = (
            f"{location.path}: reading {what} failed ({describe(err, location)}). The file is "
            f"truncated or corrupt{remote}: re-download or re-export it."
        )
        raise InputError(msg) from cause(err, location)


def guard_reads(
    location: Location,
    blocks: Iterator[sp.csr_matrix],
    errors: tuple[type[Exception], ...] = (OSError,),
) -> Iterator[sp.csr_matrix]:
    """Pass ``blocks`` through :func:`input_errors`."""
    with input_errors(location, "the counts", errors):
        yield from blocks


def filesystem(location: Location) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of a URL location and the path inside it."""
    with remote_errors(location, "setting up its filesystem"):
        return location.fs()


def exists(location: Location) -> bool:
    """Whether a local path or URL exists (a URL that cannot be reached is an InputError)."""
    if not location.is_url:
        return os.path.exists(location.path)
    fs, root = filesystem(location)
    with remote_errors(location, "looking it up"):
        if fs.exists(root):
            return True
        # a Zarr store where "directories" cannot be looked up (https without listings)
        return location.name.endswith(".zarr") and any(
            fs.exists(root.rstrip("/") + "/" + name) for name in ("zarr.json", ".zgroup")
        )


def isdir(location: Location) -> bool:
    """Whether a local path or URL is a directory (an object-store prefix counts)."""
    if not location.is_url:
        return os.path.isdir(location.path)
    fs, root = filesystem(location)
    with remote_errors(location, "looking it up"):
        return bool(fs.isdir(root))


def isfile(location: Location) -> bool:
    """Whether a local path or URL is a file."""
    if not location.is_url:
        return os.path.isfile(location.path)
    fs, root = filesystem(location)
    with remote_errors(location, "looking it up"):
        return bool(fs.isfile(root))


def listdir(location: Location) -> dict[str, bool]:
    """The entries of a directory: name -> whether it is a file."""
    if not location.is_url:
        path = location.path
        return {name: os.path.isfile(os.path.join(path, name)) for name in os.listdir(path)}
    fs, root = filesystem(location)
    with remote_errors(location, "listing it"):
        entries = fs.ls(root, detail=True)
    out = {}
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if name:
            out[name] = entry.get("type") == "file"
    return out


def fingerprint(location: Location) -> str:
    """:func:`flow._io.file_fingerprint` of a local path or URL (reads two MiB at most)."""
    if not location.is_url:
        return file_fingerprint(location.path)
    with remote_errors(location, "fingerprinting it"):
        return file_fingerprint(location.path, storage_options=location.options)


def parent(location: Location) -> tuple[Location, str]:
    """(directory, name) of a location (``memory://x.mtx`` -> ``memory://``, ``x.mtx``)."""
    path = location.path
    if not location.is_url:
        head, name = os.path.split(path)
        return Location(head, location.storage_options), name
    i = path.rfind("/")
    head = path[:i]
    if head.endswith((":/", "://")):  # the root of the URL's filesystem: keep its slashes
        head = path[: i + 1]
    return Location(head, location.storage_options), path[i + 1 :]


@contextlib.contextmanager
def open_input(
    location: Location, *, block_size: int | None = None, gunzip: bool = False
) -> Iterator[BinaryIO]:
    """A local file or URL opened for binary reading, closed on exit.

    ``block_size`` is the read-ahead of a remote file. ``gunzip=True`` decompresses on the fly
    (both the decompressor and the file are closed on exit).
    """
    with contextlib.ExitStack() as stack:
        if location.is_url:
            fs, root = filesystem(location)
            with remote_errors(location, "opening it"):
                kwargs = {} if block_size is None else {"block_size": block_size}
                raw = cast("BinaryIO", stack.enter_context(fs.open(root, "rb", **kwargs)))
        else:
            raw = stack.enter_context(open(location.path, "rb"))
        if gunzip:
            raw = cast("BinaryIO", stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        yield raw
