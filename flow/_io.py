"""Opening Zarr stores on local paths or fsspec URLs, and the attributes every flow store shares.

Every flow artifact (count store, median set, encoding store) is a Zarr v3 group whose
``attrs["flow"]`` holds ``{"kind", "schema_version", "complete", ...}``. A writer creates the
group with ``complete = False`` and sets it to ``True`` only after its last byte is written, so
an interrupted store is never mistaken for a finished one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.storage import LocalStore

from ._checksum import DEFAULT_CODECS, checked
from ._location import Location, LocationLike
from .errors import IncompleteStoreError, SchemaError, StoreNotFoundError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "COUNT_CODECS",
    "DEFAULT_CODECS",
    "checked",
    "content_hasher",
    "file_fingerprint",
    "flow_attrs",
    "mark_complete",
    "open_flow_group",
    "create_flow_group",
    "store_url",
    "ChunkedWriter",
    "create_1d",
    "write_1d",
]

#: Blosc zstd + bitshuffle: measured best for integer counts here (DESIGN section 2); then
#: the chunk checksum (crc32c) that every array flow writes carries (see :mod:`flow._checksum`).
COUNT_CODECS = checked((BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle),))


def store_url(path: LocationLike) -> str:
    """Return a string form of a local path (absolute) or an fsspec URL (unchanged)."""
    return Location.of(path).url


def create_flow_group(
    where: LocationLike,
    kind: str,
    schema_version: int,
    *,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = True,
    extra_attrs: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create (or replace) a flow store group, marked incomplete until :func:`mark_complete`.

    ``storage_options`` is used only when ``where`` is not already a :class:`Location`.
    """
    location = Location.of(where, storage_options)
    group = location.open_group(mode="w" if overwrite else "w-", zarr_format=3)
    attrs: dict[str, Any] = dict(extra_attrs or {})
    attrs["flow"] = {"kind": kind, "schema_version": schema_version, "complete": False}
    group.attrs.update(attrs)
    return group


def open_flow_group(
    where: LocationLike,
    kind: str,
    *,
    mode: str = "r",
    storage_options: Mapping[str, Any] | None = None,
    require_complete: bool = True,
    finish_hint: str = "rerun the command that wrote it",
) -> zarr.Group:
    """Open a flow store of the given kind, checking its kind, schema and completeness.

    ``storage_options`` is used only when ``where`` is not already a :class:`Location`.

    Raises
    ------
    StoreNotFoundError
        Nothing at ``where``.
    SchemaError
        The store is not a flow store of ``kind``.
    IncompleteStoreError
        The writer did not finish (``require_complete=True``).
    """
    location = Location.of(where, storage_options)
    url = location.url
    if not location.exists():
        msg = f"No flow {kind} store at {url!r}."
        raise StoreNotFoundError(msg)
    try:
        group = location.open_group(mode=mode)
    except (FileNotFoundError, ValueError, KeyError) as err:
        msg = f"{url!r} is not a Zarr v3 group, so not a flow {kind} store: {err}"
        raise SchemaError(msg) from err
    meta = group.attrs.get("flow")
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        msg = f"{url!r} is not a flow {kind} store (found kind {found!r})."
        raise SchemaError(msg)
    if require_complete and not meta.get("complete", False):
        msg = f"The {kind} store {url!r} is unfinished (its writer was stopped): {finish_hint}."
        raise IncompleteStoreError(msg)
    return group


def remove_partial_writes(group: zarr.Group) -> int:
    """Delete the temporary files of chunk writes cut off by a killed process (local stores).

    zarr's local store writes each chunk to ``<chunk>.<uuid>.partial`` and renames it into
    place; a process or worker killed mid-write leaves that file behind, even when the chunk is
    written again afterwards. Object stores write each object whole: nothing to remove there.
    Returns how many files were removed.
    """
    if not isinstance(group.store, LocalStore):
        return 0
    removed = 0
    for leftover in (Path(group.store.root) / group.path).rglob("*.partial"):
        leftover.unlink(missing_ok=True)
        removed += 1
    return removed


class ChunkedWriter:
    """Write a 1-D Zarr array in order, ``unit`` values at a time (whole chunks or shards):
    no chunk is written twice, and memory holds at most one unit plus one appended piece.

    With ``grow`` the array starts empty and is resized as values arrive (size unknown up
    front). ``hasher`` is fed the bytes of every value, in order.
    """

    def __init__(self, array: Any, unit: int, *, grow: bool = False, hasher: Any = None) -> None:
        self.array, self.unit, self.grow, self.hasher = array, unit, grow, hasher
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.written = 0

    def append(self, values: np.ndarray) -> None:
        values = values.astype(self.array.dtype, copy=False)
        if self.hasher is not None:
            self.hasher.update(values.tobytes())
        self.pending.append(values)
        self.n_pending += values.size
        if self.n_pending >= self.unit:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.pending:
            return
        buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n_whole = buf.size if final else (buf.size // self.unit) * self.unit
        if n_whole:
            end = self.written + n_whole
            if self.grow:
                self.array.resize((end,))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr: the string dtype has no v3 spec yet
                self.array[self.written : end] = buf[:n_whole]
            self.written = end
            if self.grow:
                release_free_memory()  # large buffers: give their pages back
        rest = buf[n_whole:]
        self.pending = [rest] if rest.size else []
        self.n_pending = rest.size

    def close(self) -> int:
        """Write what is left; return how many values were written in all."""
        self._flush(final=True)
        return self.written


def create_1d(
    group: zarr.Group,
    name: str,
    dtype: Any,
    *,
    size: int,
    chunk: int,
    dim: str,
    attrs: Mapping[str, Any] | None = None,
) -> ChunkedWriter:
    """Create a 1-D array of ``size`` values (text dtypes as Zarr strings; an existing array
    of that name is replaced) and return a writer that fills it in order, chunk by chunk."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: the string dtype has no v3 spec yet
        arr = group.create_array(
            name,
            shape=(size,),
            dtype=str if np.dtype(dtype).kind in "OUST" else dtype,
            chunks=(max(1, min(chunk, size)),),
            dimension_names=(dim,),
            attributes=dict(attrs or {}),
            compressors=DEFAULT_CODECS,
            overwrite=True,
        )
    return ChunkedWriter(arr, arr.chunks[0])


def write_1d(
    group: zarr.Group,
    name: str,
    pieces: Iterable[np.ndarray],
    *,
    size: int,
    chunk: int,
    dim: str,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a 1-D array of ``size`` values given as consecutive pieces, chunk by chunk.

    The dtype comes from the first piece (text as Zarr strings).
    """
    writer = None
    for piece in pieces:
        if writer is None:
            writer = create_1d(
                group, name, piece.dtype, size=size, chunk=chunk, dim=dim, attrs=attrs
            )
        writer.append(piece)
    written = 0 if writer is None else writer.close()
    if written != size:
        msg = f"{name}: {written} values were written for an array of {size}"
        raise AssertionError(msg)


def flow_attrs(group: zarr.Group) -> dict[str, Any]:
    """The ``attrs["flow"]`` mapping of a flow store."""
    return dict(group.attrs["flow"])  # type: ignore[arg-type]


def mark_complete(group: zarr.Group, **updates: Any) -> None:
    """Record ``updates`` in ``attrs["flow"]`` and mark the store complete (the last write).

    Every task has finished by then, so temporary files of writes cut off by a killed worker
    are removed first: a finished store holds exactly its chunks.
    """
    remove_partial_writes(group)
    meta = flow_attrs(group)
    meta.update(updates)
    meta["complete"] = True
    group.attrs["flow"] = meta


def content_hasher() -> hashlib._Hash:
    """The hash used for content fingerprints (SHA-256)."""
    return hashlib.sha256()


def file_fingerprint(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> str:
    """A cheap fingerprint of an input file or directory: size, and SHA-256 of its first and last MiB.

    Hashing whole inputs of many gigabytes would cost more than converting them; this catches
    a different or changed file in all practical cases. Directories hash their sorted entries.

    ``path`` may be an fsspec URL (``s3://...``, ``file://...``), opened with
    ``storage_options``: its size comes from the filesystem's ``info`` and only the two MiB
    are read (two range reads), giving the same fingerprint as the same bytes on a local disk.
    """
    location = Location.of(path, storage_options)
    p = location.path
    if location.is_url:
        fs, root = location.fs()
        return _fs_fingerprint(fs, root)
    h = content_hasher()
    if os.path.isdir(p):
        for name in sorted(os.listdir(p)):
            h.update(name.encode())
            h.update(file_fingerprint(os.path.join(p, name)).encode())
        return h.hexdigest()
    size = os.path.getsize(p)
    h.update(str(size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if size > 1 << 20:
            fh.seek(max(size - (1 << 20), 1 << 20))
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def _fs_fingerprint(fs: Any, path: str) -> str:
    """:func:`file_fingerprint` of ``path`` inside the fsspec filesystem ``fs``."""
    h = content_hasher()
    info = fs.info(path)
    if info.get("type") == "directory":
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
        for name in sorted(n for n in names if n):
            h.update(name.encode())
            h.update(_fs_fingerprint(fs, path.rstrip("/") + "/" + name).encode())
        return h.hexdigest()
    size = int(info["size"])
    h.update(str(size).encode())
    if size:  # (a local read of an empty file adds nothing either)
        h.update(fs.cat_file(path, start=0, end=min(size, 1 << 20)))
    if size > 1 << 20:
        h.update(fs.cat_file(path, start=max(size - (1 << 20), 1 << 20), end=size))
    return h.hexdigest()


@functools.cache
def _libc_malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


def release_free_memory() -> None:
    """Hand memory that is free inside the process back to the system (glibc's malloc_trim).

    The writer's compression threads each keep a malloc arena; without this, freed chunk
    buffers stay in them and a long convert's RSS crept up with the cells (~0.4 KB per cell
    measured). Cheap enough to call once per shard written. No-op without glibc.
    """
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
