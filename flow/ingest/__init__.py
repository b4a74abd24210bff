"""Input readers: one per format, each giving a :class:`Source` that yields blocks of cells.

Every reader reads metadata only when opened (shape, gene IDs and symbols, barcodes, the cell
columns to carry) and reads counts block by block in :meth:`Source.iter_blocks`, so memory
does not grow with the input. Where a format forces more (CSC AnnData matrices, Matrix Market
files not sorted by cell) the reader transposes through temporary files and says so in
``source.info.notes``.

Every format can also be read from an fsspec URL (``s3://bucket/x.h5ad``, ``gs://...``,
``https://...``, ``memory://...``, ``file:///abs/path``) with ``storage_options``: HDF5 files
(h5ad, 10x h5, loom) are read range by range through a file object, AnnData Zarr chunk by
chunk, and 10x MEX files streamed (the one format read whole, which its notes say).

How to read an input is one :class:`ReadOptions`, checked when made; formats are found in
:data:`READERS` (:func:`register_reader` adds one), each reader taking a
:class:`~flow._location.Location` and the options. Where a format allows it
(``source.supports_ranges``), ``source.read_rows(start, stop)`` reads any range of cells
directly.

Examples
--------
>>> import os, tempfile, numpy as np, scipy.sparse as sp, scipy.io
>>> from flow.ingest import ReadOptions, open_source
>>> with tempfile.TemporaryDirectory() as tmp:
...     scipy.io.mmwrite(os.path.join(tmp, "matrix.mtx"), sp.coo_matrix(np.eye(3, 2, dtype=int)))
...     _ = open(os.path.join(tmp, "genes.tsv"), "w").write("ENSG1\\tA\\nENSG2\\tB\\nENSG3\\tC\\n")
...     _ = open(os.path.join(tmp, "barcodes.tsv"), "w").write("c1\\nc2\\n")
...     src = open_source(tmp, ReadOptions(read_size=2))
...     blocks = [b.toarray().tolist() for b in src.iter_blocks(1)]
>>> src.info.format, src.info.n_cells, src.info.n_genes
('10x-mtx', 2, 3)
>>> blocks
[[[1, 0, 0]], [[0, 1, 0]]]
>>> ReadOptions(obs_columns="cell_type", read_size=0)
Traceback (most recent call last):
    ...
ValueError: read_size must be a positive number; got 0.
"""

from __future__ import annotations

from ._options import ReadOptions
from ._registry import FORMATS, READERS, Reader, detect_format, open_source, register_reader
from ._source import Source, SourceInfo

__all__ = [
    "FORMATS",
    "READERS",
    "ReadOptions",
    "Reader",
    "Source",
    "SourceInfo",
    "detect_format",
    "open_source",
    "register_reader",
]
