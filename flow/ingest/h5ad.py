"""``.h5ad`` files: :class:`~flow.ingest._anndata.AnnDataSource` over an ``h5py.File``.

The file is opened once for all its metadata (and once more per pass over the counts); a URL
(``s3://...``) is read through fsspec, range by range, never downloaded whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._anndata import AnnDataSource
from ._fs import fingerprint
from ._hdf5 import open_h5

if TYPE_CHECKING:
    import h5py

    from .._location import Location
    from ._options import ReadOptions

__all__ = ["h5ad_from_file", "read_h5ad"]


def h5ad_from_file(fh: h5py.File, location: Location, options: ReadOptions) -> AnnDataSource:
    """:func:`read_h5ad` of a file already open as ``fh`` (read there; nothing else opened)."""
    return AnnDataSource.from_root(
        fh,
        location,
        options,
        format="h5ad",
        fingerprint=fingerprint(location),
        open_root=open_h5,
    )


def read_h5ad(location: Location, options: ReadOptions) -> AnnDataSource:
    """Open an ``.h5ad`` file as a :class:`~flow.ingest.Source` (reads metadata only).

    The file is opened read-only with h5py: once here for all the metadata, and once per
    :meth:`~flow.ingest._anndata.AnnDataSource.iter_blocks` pass. Takes the options
    ``layer``, ``use_raw``, ``gene_id_column``, ``obs_columns``, ``read_size`` and
    ``temp_dir`` (see :class:`~flow.ingest.ReadOptions`).

    Raises
    ------
    InputError
        Not HDF5 or truncated, no such layer/raw, no gene IDs, barcodes that do not match the
        matrix, an empty matrix, or an encoding flow does not read.
    """
    with open_h5(location) as fh:
        return h5ad_from_file(fh, location, options)
