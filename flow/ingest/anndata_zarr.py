"""AnnData Zarr stores (Zarr format 2 or 3, as written by ``anndata.AnnData.write_zarr``).

The AnnData encoding is the same as in ``.h5ad``, so this is :class:`flow.ingest.h5ad.AnnDataSource`
over a read-only ``zarr.Group``: opening reads metadata only; each block reads only its cells'
chunks.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any

from .._io import content_hasher
from ..errors import InputError
from .h5ad import AnnDataSource

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["open_anndata_zarr", "store_fingerprint"]

_METADATA_FILES = (".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json")


def store_fingerprint(path: str) -> str:
    """Fingerprint a Zarr directory without reading its chunks.

    Hashes every file's relative path and size, and the full text of the metadata documents
    (``zarr.json``, ``.zarray``, ``.zattrs``, ``.zgroup``, ``.zmetadata``). Hashing chunk
    contents too would cost as much as converting the store.
    """
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


@contextlib.contextmanager
def _open_zarr(path: str) -> Iterator[Any]:
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        msg = (
            f"{path}: cannot be opened as a Zarr group ({type(err).__name__}: {err}). Pass the "
            "folder written by anndata's write_zarr."
        )
        raise InputError(msg) from err
    yield group


def open_anndata_zarr(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    read_size: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
) -> AnnDataSource:
    """Open an AnnData Zarr store as a :class:`~flow.ingest.Source` (reads metadata only).

    See :func:`flow.ingest.open_source` for the parameters; they mean what they mean for
    ``.h5ad`` (:func:`flow.ingest.h5ad.open_h5ad`). The store is opened read-only.

    Raises
    ------
    InputError
        Not a Zarr group or not AnnData, no such layer/raw, no gene IDs, barcodes that do not
        match the matrix, an empty matrix, or chunks that cannot be decoded.
    """
    text = os.fspath(path)
    if not os.path.isdir(text):
        msg = f"{text}: no such Zarr directory."
        raise InputError(msg)
    with _open_zarr(text) as root:
        if root.attrs.get("encoding-type") != "anndata":
            msg = (
                f"{text}: is a Zarr group but not an AnnData store (no encoding-type 'anndata'). "
                "Write it with anndata's AnnData.write_zarr, or convert it to .h5ad."
            )
            raise InputError(msg)
    return AnnDataSource(
        text,
        format="anndata-zarr",
        open_root=lambda: _open_zarr(text),
        fingerprint=store_fingerprint(text),
        layer=layer,
        use_raw=use_raw,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        read_size=read_size,
        temp_dir=temp_dir,
        read_errors=(OSError, ValueError, RuntimeError, KeyError),
    )
