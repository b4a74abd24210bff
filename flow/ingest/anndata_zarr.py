"""AnnData Zarr stores (Zarr format 2 or 3, as written by ``anndata.AnnData.write_zarr``).

The AnnData encoding is the same as in ``.h5ad``, so this is
:class:`flow.ingest._anndata.AnnDataSource` over a read-only ``zarr.Group``: opening reads
metadata only (the group is opened once for it); each block reads only its cells' chunks. A
store at a URL (``s3://...``) is opened with ``zarr.open_group(url, storage_options=...)`` and
read chunk by chunk in the same way.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

import zarr

from .._io import content_hasher
from ..errors import InputError
from ._anndata import AnnDataSource
from ._fs import cause, filesystem, isdir, redact, remote_errors

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .._location import Location
    from ._options import ReadOptions

__all__ = ["open_zarr", "read_anndata_zarr", "store_fingerprint"]

_METADATA_FILES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")
#: What reads of a damaged Zarr store raise (codecs, missing chunks, bad metadata).
_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError)


def store_fingerprint(location: Location) -> str:
    """Fingerprint a Zarr directory without reading its chunks.

    Hashes every file's relative path and size, and the full text of the metadata documents
    (``zarr.json``, ``.zarray``, ``.zattrs``, ``.zgroup``, ``.zmetadata``). Hashing chunk
    contents too would cost as much as converting the store.

    A URL is listed through fsspec (one recursive listing gives the sizes) and only its
    metadata documents are read; the same store gives the same fingerprint on a local disk.
    Over https, listings (when the server gives any) have no sizes, and without listings
    only the root metadata documents are hashed.
    """
    if location.is_url:
        return _url_store_fingerprint(location)
    path = location.path
    h = content_hasher()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            rel = os.path.relpath(full, path)
            h.update(f"{rel}\0{os.path.getsize(full)}\0".encode())
            if name in _METADATA_FILES:
                with open(full, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()


def _url_store_fingerprint(location: Location) -> str:
    """:func:`store_fingerprint` of a store behind an fsspec URL (same order as ``os.walk``)."""
    url = location.path
    fs, root = filesystem(location)
    root = root.rstrip("/")
    with remote_errors(location, "listing the store"):
        try:
            found = fs.find(root, detail=True)
        except Exception:  # https without directory listings (403, 404): see below
            if not url.startswith(("http://", "https://")):
                raise
            found = {}
        files: list[tuple[list[tuple[int, str]], str, str, int | None]] = []
        for full, entry in found.items():
            rel = str(full)[len(root) :].lstrip("/")
            parts = rel.split("/")
            # os.walk visits a folder's files (sorted) before its sub-folders (sorted)
            order = [(1, d) for d in parts[:-1]] + [(0, parts[-1])]
            size = entry.get("size")  # (https listings have no sizes)
            files.append((order, rel, str(full), None if size is None else int(size)))
        files.sort()
        if not files:  # not listable (https without directory listings): the root documents
            roots = [(name, f"{root}/{name}") for name in sorted(_METADATA_FILES)]
            files.extend(([(0, name)], name, full, None) for name, full in roots if fs.exists(full))
        wanted = [full for _, rel, full, _ in files if rel.rsplit("/", 1)[-1] in _METADATA_FILES]
        documents = fs.cat(wanted) if wanted else {}
        h = content_hasher()
        for _, rel, full, size in files:
            h.update(f"{rel}\0{'?' if size is None else size}\0".encode())
            if full in documents:
                h.update(documents[full])
    return h.hexdigest()


@contextlib.contextmanager
def open_zarr(location: Location) -> Iterator[zarr.Group]:
    """Open a Zarr group read-only; one that cannot be opened is an :class:`InputError`."""
    path = location.path
    try:
        group = zarr.open_group(path, mode="r", storage_options=location.options)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        detail = redact(f"{type(err).__name__}: {err}", location.options, keep=path)
        msg = (
            f"{path}: cannot be opened as a Zarr group ({detail}). Pass the "
            "folder written by anndata's write_zarr."
        )
        raise InputError(msg) from cause(err, location)
    yield group


def read_anndata_zarr(location: Location, options: ReadOptions) -> AnnDataSource:
    """Open an AnnData Zarr store as a :class:`~flow.ingest.Source` (reads metadata only).

    The options mean what they mean for ``.h5ad`` (:func:`flow.ingest.h5ad.read_h5ad`). The
    store is opened read-only, once for all the metadata; a URL (``s3://...``) with its
    storage options, read chunk by chunk, never downloaded whole.

    Raises
    ------
    InputError
        Not a Zarr group or not AnnData, no such layer/raw, no gene IDs, barcodes that do not
        match the matrix, an empty matrix, or chunks that cannot be decoded.
    """
    path = location.path
    if not location.is_url and not isdir(location):  # URLs: zarr says what is missing
        msg = f"{path}: no such Zarr directory."
        raise InputError(msg)
    with open_zarr(location) as root:
        if root.attrs.get("encoding-type") != "anndata":
            msg = (
                f"{path}: is a Zarr group but not an AnnData store (no encoding-type 'anndata'). "
                "Write it with anndata's AnnData.write_zarr, or convert it to .h5ad."
            )
            raise InputError(msg)
        return AnnDataSource.from_root(
            root,
            location,
            options,
            format="anndata-zarr",
            fingerprint=store_fingerprint(location),
            open_root=open_zarr,
            read_errors=_READ_ERRORS,
        )
