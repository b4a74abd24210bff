"""Block assembly shared by the readers: row reads, re-batching and out-of-core transposition.

Readers produce *pieces*: CSR row ranges of whatever size suits the format (a slab of a dense
array, a range of CSR rows), or, for inputs stored genes-first or unsorted, ``(row, col, value)``
triplets in any order. This module turns them into the consecutive blocks of exactly
``n_cells`` cells that :meth:`flow.ingest.Source.iter_blocks` promises:

- :func:`rebatch` joins and splits CSR pieces into blocks (memory: one piece plus one block);
- :func:`csr_row_pieces` reads CSR row ranges from any array-like with slicing (h5py, zarr);
- :func:`dense_row_pieces` reads row slabs of a dense 2-D array-like;
- :func:`bucket_transpose` turns triplets in any order into row blocks through temporary files:
  each piece of triplets is split by destination block and appended to that block's file, then
  each block is assembled from its file alone. Memory: one piece plus one block; temporary disk:
  every triplet once (16 bytes for int64/float64 values, 12 for 32-bit values).
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from ..errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

__all__ = [
    "DENSE_READ_BYTES",
    "ENTRIES_PER_READ",
    "bucket_transpose",
    "csc_triplets",
    "csr_row_pieces",
    "dense_row_pieces",
    "dense_rows_per_read",
    "filter_columns",
    "rebatch",
    "transpose_disk_bytes",
]

#: Nonzero entries per read for entry-oriented inputs (CSC, Matrix Market): about 16-24 MB.
ENTRIES_PER_READ = 1 << 20
#: Bytes of dense values per read for dense inputs (dense h5ad, loom).
DENSE_READ_BYTES = 64 << 20


def rebatch(pieces: Iterable[sp.csr_matrix], n_cells: int) -> Iterator[sp.csr_matrix]:
    """Join and split consecutive CSR row pieces into blocks of exactly ``n_cells`` rows.

    The last block may be shorter. A piece that is already a whole block passes through
    without a copy. Holds at most one piece plus one block.
    """
    pending: list[sp.csr_matrix] = []
    n_pending = 0
    for piece in pieces:
        rows = piece.shape[0]
        if rows == 0:
            continue
        if not pending and rows == n_cells:
            yield piece
            continue
        pending.append(piece)
        n_pending += rows
        if n_pending < n_cells:
            continue
        merged = pending[0] if len(pending) == 1 else sp.vstack(pending, format="csr")
        start = 0
        while n_pending - start >= n_cells:
            yield merged[start : start + n_cells]
            start += n_cells
        rest = merged[start:]
        pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
    if pending:
        yield pending[0] if len(pending) == 1 else sp.vstack(pending, format="csr")


def csr_row_pieces(
    data: Any,
    indices: Any,
    indptr: Any,
    *,
    n_rows: int,
    n_cols: int,
    rows_per_read: int,
    path: str,
    what: str = "X",
    start: int = 0,
    stop: int | None = None,
) -> Iterator[sp.csr_matrix]:
    """Read a CSR matrix stored as three 1-D array-likes, ``rows_per_read`` rows at a time.

    Reads only ``indptr[r0:r1+1]`` and the matching ranges of ``data`` and ``indices`` per piece
    (h5py datasets and zarr arrays both slice this way), so memory holds one piece. Only rows
    ``start:stop`` are read (all rows by default).

    Raises
    ------
    InputError
        Row pointers that decrease or overrun the data, or column indices out of range
        (a corrupt or truncated file).
    """
    n_data = int(data.shape[0])
    if int(indices.shape[0]) != n_data or int(indptr.shape[0]) != n_rows + 1:
        msg = (
            f"{path}: {what} is not a valid CSR matrix of {n_rows} rows: expected indptr of "
            f"length {n_rows + 1} and equal-length data/indices, got indptr "
            f"{int(indptr.shape[0])}, data {n_data}, indices {int(indices.shape[0])}. The file "
            "is corrupt or truncated: re-export it."
        )
        raise InputError(msg)
    stop = n_rows if stop is None else stop
    for r0 in range(start, stop, rows_per_read):
        r1 = min(r0 + rows_per_read, stop)
        ptr = np.asarray(indptr[r0 : r1 + 1], dtype=np.int64)
        p0, p1 = int(ptr[0]), int(ptr[-1])
        if (r0 == 0 and p0 != 0) or p1 > n_data or (np.diff(ptr) < 0).any():
            msg = (
                f"{path}: {what}/indptr is inconsistent in rows {r0}..{r1 - 1} (row pointers "
                f"must start at 0, never decrease and stay <= {n_data}). The file is corrupt or "
                "truncated: re-export it."
            )
            raise InputError(msg)
        values = np.asarray(data[p0:p1])
        cols = np.asarray(indices[p0:p1])
        _check_range(cols, n_cols, path, f"{what} column indices (rows {r0}..{r1 - 1})")
        # 32-bit index arrays when they fit, so scipy does not copy them to a common dtype
        small = p1 - p0 < 2**31 and n_cols < 2**31
        index_dtype = np.int32 if small else np.int64
        yield sp.csr_matrix(
            (values, cols.astype(index_dtype, copy=False), (ptr - p0).astype(index_dtype)),
            shape=(r1 - r0, n_cols),
        )


def dense_rows_per_read(n_cols: int, itemsize: int, n_cells: int, read_size: int | None) -> int:
    """Rows per read of a dense array: ``read_size`` if given, else what fits in 64 MB."""
    if read_size is not None:
        return max(1, read_size)
    return max(1, min(n_cells, DENSE_READ_BYTES // max(1, n_cols * itemsize)))


def dense_row_pieces(
    array: Any, *, n_rows: int, rows_per_read: int, transpose: bool = False, start: int = 0
) -> Iterator[sp.csr_matrix]:
    """Read rows ``start:n_rows`` of a dense 2-D array-like in slabs of ``rows_per_read`` rows,
    as CSR pieces.

    With ``transpose=True`` the array is stored ``(genes, cells)`` (loom): slabs are column
    ranges ``array[:, c0:c1]``, transposed in memory. Memory holds one slab.
    """
    for r0 in range(start, n_rows, rows_per_read):
        r1 = min(r0 + rows_per_read, n_rows)
        if transpose:
            slab = np.asarray(array[:, r0:r1])
            yield sp.csc_matrix(slab).T.tocsr()
        else:
            yield sp.csr_matrix(np.asarray(array[r0:r1]))


def filter_columns(block: sp.csr_matrix, col_map: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Keep the columns with ``col_map[j] >= 0`` and renumber them to ``col_map[j]``."""
    new = col_map[block.indices]
    keep = new >= 0
    if keep.all():
        return sp.csr_matrix((block.data, new, block.indptr), shape=(block.shape[0], n_cols))
    rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
    indptr = np.zeros(block.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows[keep], minlength=block.shape[0]), out=indptr[1:])
    return sp.csr_matrix((block.data[keep], new[keep], indptr), shape=(block.shape[0], n_cols))


def _check_range(values: np.ndarray, n: int, path: str, what: str) -> None:
    if values.size and (int(values.min()) < 0 or int(values.max()) >= n):
        bad = values[(values < 0) | (values >= n)][0]
        msg = (
            f"{path}: {what} out of range: found {int(bad)}, expected 0..{n - 1}. The file is "
            "corrupt or its header does not match its data: re-export it."
        )
        raise InputError(msg)


def transpose_disk_bytes(nnz: int, value_dtype: np.dtype[Any]) -> int:
    """Temporary disk space :func:`bucket_transpose` needs for ``nnz`` entries."""
    return nnz * (8 + np.dtype(value_dtype).itemsize)


def bucket_transpose(
    triplets: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    n_rows: int,
    n_cols: int,
    block_rows: int,
    value_dtype: np.dtype[Any],
    path: str,
    temp_dir: str | os.PathLike[str] | None = None,
) -> Iterator[sp.csr_matrix]:
    """Yield CSR blocks of ``block_rows`` rows of a matrix given as triplets in any order.

    Pass 1 reads every piece of ``(row, col, value)`` triplets (0-based; rows and columns are
    checked against the shape; ``path`` names the input in errors), splits it by destination block and appends each part to that
    block's temporary file (raw little-endian records) in a
    :class:`tempfile.TemporaryDirectory` under ``temp_dir`` (default: the system's). Pass 2
    reads one block's file at a time, orders its entries by row (stably, so entries of a row
    keep their input order) and yields it. Values are not summed or changed. The directory is
    removed when the iterator finishes or is closed.
    """
    rec = np.dtype(
        [("row", "<u4"), ("col", "<i4"), ("val", np.dtype(value_dtype).newbyteorder("<"))]
    )
    n_blocks = -(-n_rows // block_rows)
    with tempfile.TemporaryDirectory(prefix="flow-transpose-", dir=temp_dir) as tmp:

        def block_file(b: int) -> str:
            return os.path.join(tmp, f"block-{b:08d}.bin")

        for rows, cols, vals in triplets:
            if rows.size == 0:
                continue
            _check_range(rows, n_rows, path, "cell indices")
            _check_range(cols, n_cols, path, "gene indices")
            block = rows // block_rows
            order = np.argsort(block, kind="stable")
            block = block[order]
            records = np.empty(rows.size, dtype=rec)
            records["row"] = rows[order] - block * block_rows
            records["col"] = cols[order]
            records["val"] = vals[order]
            starts = np.flatnonzero(np.r_[True, block[1:] != block[:-1]])
            ends = np.r_[starts[1:], block.size]
            for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
                with open(block_file(int(block[s])), "ab") as fh:
                    records[s:e].tofile(fh)
            del records, order, block
        for b in range(n_blocks):
            n = min(block_rows, n_rows - b * block_rows)
            name = block_file(b)
            if os.path.exists(name):
                records = np.fromfile(name, dtype=rec)
                os.remove(name)
            else:
                records = np.empty(0, dtype=rec)
            order = np.argsort(records["row"], kind="stable")
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(records["row"], minlength=n), out=indptr[1:])
            yield sp.csr_matrix(
                (records["val"][order], records["col"][order], indptr), shape=(n, n_cols)
            )


def csc_triplets(
    data: Any,
    indices: Any,
    indptr: Any,
    *,
    n_rows: int,
    n_cols: int,
    entries_per_read: int,
    path: str,
    what: str = "X",
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Read a CSC matrix (cells in ``indices``) as ``(row, col, value)`` triplets, in pieces.

    Reads ``indptr`` whole (one pointer per gene column, so its size depends on the genes, not
    the cells), then ``entries_per_read`` entries of ``data`` and ``indices`` at a time.
    """
    n_data = int(data.shape[0])
    ptr = np.asarray(indptr[:], dtype=np.int64)
    if (
        int(indices.shape[0]) != n_data
        or ptr.shape[0] != n_cols + 1
        or (ptr.size and (ptr[0] != 0 or ptr[-1] != n_data))
        or (np.diff(ptr) < 0).any()
    ):
        msg = (
            f"{path}: {what} is not a valid CSC matrix of {n_cols} columns (indptr of length "
            f"{ptr.shape[0]}, data {n_data}, indices {int(indices.shape[0])}). The file is "
            "corrupt or truncated: re-export it."
        )
        raise InputError(msg)
    for p0 in range(0, n_data, entries_per_read):
        p1 = min(p0 + entries_per_read, n_data)
        cols = np.searchsorted(ptr, np.arange(p0, p1), side="right") - 1
        rows = np.asarray(indices[p0:p1]).astype(np.int64, copy=False)
        _check_range(rows, n_rows, path, f"{what} row indices (entries {p0}..{p1 - 1})")
        yield rows, cols, np.asarray(data[p0:p1])
