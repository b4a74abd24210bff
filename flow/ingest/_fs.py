"""Where an input lives: a local path, or an fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

Local paths keep using the operating system directly (``os``, ``open``), exactly as before
URLs were supported. A URL is resolved with ``fsspec.core.url_to_fs(url, **storage_options)``
at every use (fsspec caches filesystem instances), so a reader holds only the URL and the
options, and every read opens and closes its own file handle.

Messages about a URL never show the storage options: any text taken from a backend error is
passed through :func:`redact` first.
"""

from __future__ import annotations

import contextlib
import gzip
import os
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import FlowError, InputError

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from fsspec import AbstractFileSystem

__all__ = [
    "H5_BLOCK_SIZE",
    "basename",
    "exists",
    "filesystem",
    "fingerprint",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "open_input",
    "redact",
    "remote_errors",
    "split",
]

#: Read-ahead of remote HDF5 files (h5ad, 10x h5, loom): one request per miss fetches this much.
H5_BLOCK_SIZE = 2 << 20

#: Option keys (any part of the name, lower case) whose values are always hidden in messages.
_SECRET_KEY_PARTS = ("key", "secret", "token", "passw", "credential", "auth", "sig", "session")
#: Other option values are hidden when at least this long (short ones such as ``path`` or
#: ``true`` are common words of messages and say nothing secret).
_MIN_HIDDEN = 8
_HIDDEN = "***"


def is_url(path: str) -> bool:
    """Whether ``path`` is an fsspec URL (``protocol://...``, also ``file://``) and not a local path."""
    return "://" in path


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


def _describe(err: BaseException, url: str, storage_options: Mapping[str, Any] | None) -> str:
    return redact(f"{type(err).__name__}: {err}", storage_options, keep=url)


@contextlib.contextmanager
def remote_errors(
    url: str, storage_options: Mapping[str, Any] | None, what: str = "reaching it"
) -> Iterator[None]:
    """Turn a failure of the filesystem behind ``url`` into an :class:`InputError` naming it.

    Missing -> "not found"; refused -> "access denied"; anything else the backend raises
    (a wrong storage option, no network, a missing fsspec backend package) -> the backend's
    message, with the storage options hidden.
    """
    try:
        yield
    except FlowError:
        raise
    except FileNotFoundError as err:
        msg = f"{url}: not found (no such file, directory or object)."
        raise InputError(msg) from (None if storage_options else err)
    except PermissionError as err:
        msg = (
            f"{url}: access denied while {what} ({_describe(err, url, storage_options)}). "
            "Check the credentials given in storage_options (--storage-option) or the "
            "environment."
        )
        raise InputError(msg) from None
    except ImportError as err:
        msg = (
            f"{url}: reading this URL needs a package that is not installed "
            f"({_describe(err, url, storage_options)}). Install the fsspec backend of its "
            "protocol (s3fs for s3://, gcsfs for gs://, adlfs for az://, aiohttp for https://)."
        )
        raise InputError(msg) from None
    except Exception as err:  # the backend's own errors (botocore, aiohttp, ...) vary widely
        msg = (
            f"{url}: failed while {what} ({_describe(err, url, storage_options)}). Check the URL "
            "and the storage options (storage_options=, --storage-option)."
        )
        raise InputError(msg) from None


def filesystem(
    url: str, storage_options: Mapping[str, Any] | None
) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` (with ``storage_options``) and the path inside it."""
    import fsspec

    with remote_errors(url, storage_options, "setting up its filesystem"):
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    return fs, root


def exists(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether a local path or URL exists (a URL that cannot be reached is an InputError)."""
    if not is_url(path):
        return os.path.exists(path)
    fs, root = filesystem(path, storage_options)
    with remote_errors(path, storage_options, "looking it up"):
        if fs.exists(root):
            return True
        # a Zarr store where "directories" cannot be looked up (https without listings)
        return basename(path).endswith(".zarr") and any(
            fs.exists(root.rstrip("/") + "/" + name) for name in ("zarr.json", ".zgroup")
        )


def isdir(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether a local path or URL is a directory (an object-store prefix counts)."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, root = filesystem(path, storage_options)
    with remote_errors(path, storage_options, "looking it up"):
        return bool(fs.isdir(root))


def isfile(path: str, storage_options: Mapping[str, Any] | None) -> bool:
    """Whether a local path or URL is a file."""
    if not is_url(path):
        return os.path.isfile(path)
    fs, root = filesystem(path, storage_options)
    with remote_errors(path, storage_options, "looking it up"):
        return bool(fs.isfile(root))


def listdir(path: str, storage_options: Mapping[str, Any] | None) -> dict[str, bool]:
    """The entries of a directory: name -> whether it is a file."""
    if not is_url(path):
        return {name: os.path.isfile(os.path.join(path, name)) for name in os.listdir(path)}
    fs, root = filesystem(path, storage_options)
    with remote_errors(path, storage_options, "listing it"):
        entries = fs.ls(root, detail=True)
    out = {}
    for entry in entries:
        name = str(entry["name"]).rstrip("/").rsplit("/", 1)[-1]
        if name:
            out[name] = entry.get("type") == "file"
    return out


def fingerprint(path: str, storage_options: Mapping[str, Any] | None) -> str:
    """:func:`flow._io.file_fingerprint` of a local path or URL (reads two MiB at most)."""
    from .._io import file_fingerprint

    if not is_url(path):
        return file_fingerprint(path)
    with remote_errors(path, storage_options, "fingerprinting it"):
        return file_fingerprint(path, storage_options=storage_options)


def join(path: str, name: str) -> str:
    """``name`` inside the directory ``path`` (``/``-joined for URLs)."""
    if not is_url(path):
        return os.path.join(path, name)
    return path + name if path.endswith("/") else path + "/" + name


def split(path: str) -> tuple[str, str]:
    """(directory, name) of a local path or URL (``memory://x.mtx`` -> ``memory://``, ``x.mtx``)."""
    if not is_url(path):
        return os.path.split(path)
    i = path.rfind("/")
    head = path[:i]
    if head.endswith((":/", "://")):  # the root of the URL's filesystem: keep its slashes
        head = path[: i + 1]
    return head, path[i + 1 :]


def basename(path: str) -> str:
    """The last part of a path or URL, without a trailing ``/`` (or an https query string)."""
    if is_url(path):
        if path.startswith(("http://", "https://")):
            path = path.split("?", 1)[0].split("#", 1)[0]
        return path.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(path.rstrip("/" + os.sep))


@contextlib.contextmanager
def open_input(
    path: str,
    storage_options: Mapping[str, Any] | None,
    *,
    block_size: int | None = None,
    gunzip: bool = False,
) -> Iterator[BinaryIO]:
    """A local file or URL opened for binary reading, closed on exit.

    ``block_size`` is the read-ahead of a remote file. ``gunzip=True`` decompresses on the fly
    (both the decompressor and the file are closed on exit).
    """
    with contextlib.ExitStack() as stack:
        if is_url(path):
            fs, root = filesystem(path, storage_options)
            with remote_errors(path, storage_options, "opening it"):
                kwargs = {} if block_size is None else {"block_size": block_size}
                raw = cast("BinaryIO", stack.enter_context(fs.open(root, "rb", **kwargs)))
        else:
            raw = stack.enter_context(open(path, "rb"))
        if gunzip:
            raw = cast("BinaryIO", stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")))
        yield raw
