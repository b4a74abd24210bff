"""Numpy kernels shared by the stages: the normalisation rule, canonical CSR, count checks.

Bottom layer: numpy and scipy only (no Dask at run time), imports nothing from flow but
:mod:`flow.errors`. The medians (``flow.sketch``) and the encoding (``flow.encode``) both
normalise counts here, so the medians a ranking divides by and the values it ranks come from
one rule.

The normalisation rule
----------------------
A stored count of a cell becomes, in float64 and in exactly this order::

    normalized = (float64(count) / n_counts) * TARGET_SUM

(each operation rounded to float64 in turn; ``count`` converted to float64 first, exact for
integer counts below 2**53). Medians are taken over these values; the encoding then divides by
the median (:mod:`flow.encode._kernels`). Rankings depend on the last bit of the values, so
every stage calls :func:`normalize` or :func:`normalized_values` instead of writing the
arithmetic again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import numpy as np
import scipy.sparse as sp

from .errors import ChunkingError, InputError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import dask.array as da
    import numpy.typing as npt

__all__ = [
    "TARGET_SUM",
    "as_csr",
    "bad_n_counts",
    "bits_for",
    "canonical_csr",
    "cell_label",
    "check_counts",
    "normalize",
    "normalized_values",
    "require_single_chunk",
    "row_slices",
]

TARGET_SUM: Final = 10_000.0
"""Counts are scaled to this total per cell: ``(count / n_counts) * TARGET_SUM``."""

_SLICE_NNZ: Final = 1 << 16  # stored counts sorted at once: small slices stay in cache (measured)
_SLICE_MAX_ROWS: Final = 1 << 12


# --------------------------------------------------------------------------------------------
# the normalisation rule


def normalize(data: npt.ArrayLike, n_counts_of_entries: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """``(count / n_counts) * TARGET_SUM`` element-wise, in float64, in exactly that order.

    Parameters
    ----------
    data
        Stored counts (any numeric dtype; converted to float64).
    n_counts_of_entries
        Total count of the cell of each entry (same shape as ``data``).

    Returns
    -------
    numpy.ndarray
        A new float64 array (eager). No validation: a zero total gives ``inf`` or ``nan``
        (and numpy's warning); callers check totals with :func:`bad_n_counts`.

    Examples
    --------
    >>> normalize(np.array([1, 3]), np.array([4.0, 3.0]))
    array([ 2500., 10000.])
    """
    out: npt.NDArray[np.float64] = np.divide(data, n_counts_of_entries, dtype=np.float64)
    out *= TARGET_SUM  # in place: a block holds millions of values
    return out


def normalized_values(
    data: npt.ArrayLike, indptr: npt.ArrayLike, n_counts: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Normalised value of every stored count of a CSR block (the rule of :func:`normalize`).

    Parameters
    ----------
    data
        CSR ``data`` (stored counts, rows = cells).
    indptr
        CSR ``indptr``: the entries of row ``i`` are ``data[indptr[i]:indptr[i + 1]]``.
    n_counts
        ``(n_rows,)`` total count of each cell over all genes of the input.

    Returns
    -------
    numpy.ndarray
        float64, one value per stored count (explicit zeros give 0). Eager.

    Examples
    --------
    >>> normalized_values(np.array([1, 2, 5]), np.array([0, 2, 3]), np.array([4.0, 5.0]))
    array([ 2500.,  5000., 10000.])
    """
    n_c = np.asarray(n_counts, dtype=np.float64).reshape(-1)
    return normalize(data, np.repeat(n_c, np.diff(np.asarray(indptr))))


# --------------------------------------------------------------------------------------------
# checks


def bad_n_counts(lengths: npt.ArrayLike, n_counts: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Cells with stored counts whose total is not positive and finite (a boolean mask).

    Parameters
    ----------
    lengths
        Stored counts per cell (``np.diff(indptr)``).
    n_counts
        Total count of each cell.

    Returns
    -------
    numpy.ndarray
        bool per cell: True where ``lengths > 0`` and ``n_counts`` is zero, negative, NaN or
        infinite (the normalisation would give ``inf`` or ``nan``).
    """
    n_c = np.asarray(n_counts, dtype=np.float64)
    bad: npt.NDArray[np.bool_] = (np.asarray(lengths) > 0) & ~((n_c > 0) & (n_c < np.inf))
    return bad


def cell_label(row: int, row_offset: int) -> str:
    """``"cell 7"``, or ``"cell 107 (row 7 of this block)"`` for a block starting at 100."""
    if row_offset:
        return f"cell {row + row_offset} (row {row} of this block)"
    return f"cell {row}"


def check_counts(data: npt.NDArray[Any], indptr: npt.NDArray[Any], row_offset: int = 0) -> None:
    """Raise :class:`~flow.errors.InputError` naming the first cell with a negative or NaN count.

    Parameters
    ----------
    data, indptr
        CSR arrays of a block of cells (rows).
    row_offset
        Global index of the block's first cell, for the message.

    Raises
    ------
    InputError
        A negative or NaN count, or counts that are neither integers nor floats.
    """
    if data.dtype.kind == "u" or data.dtype.kind == "b":
        return
    if data.dtype.kind not in "if":
        msg = f"Counts must be integers or floats, got dtype {data.dtype}."
        raise InputError(msg)
    ok = data >= 0  # False for NaN too
    if not ok.all():
        k = int(np.argmin(ok))
        row = int(np.searchsorted(indptr, k, side="right")) - 1
        bad = data[k]
        what = "NaN" if np.isnan(bad) else f"negative ({bad.item()})"
        msg = (
            f"Counts must be >= 0 and not NaN, got a {what} count in {cell_label(row, row_offset)}. "
            "Fix the input matrix (raw UMI/read counts are expected)."
        )
        raise InputError(msg)


def require_single_chunk(
    arr: da.Array, axis: int, *, name: str, dim: str | None = None
) -> da.Array:
    """Check that a Dask array is one chunk along ``axis`` (metadata only; nothing computed).

    Parameters
    ----------
    arr
        The Dask array.
    axis
        The axis that must not be split.
    name
        The array's name in the message (``counts``).
    dim
        Optional name of the axis in the message (``genes``).

    Returns
    -------
    dask.array.Array
        ``arr`` itself.

    Raises
    ------
    ChunkingError
        (a ValueError) if ``arr`` has more than one chunk along ``axis``; the message names the
        rechunk that fixes it.
    """
    n = arr.numblocks[axis]
    if n != 1:
        along = f"axis {axis} ({dim})" if dim else f"axis {axis}"
        msg = (
            f"{name} must be one chunk along {along}; got {n} chunks. "
            f"Rechunk first: {name}.rechunk({{{axis}: -1}})."
        )
        raise ChunkingError(msg)
    return arr


# --------------------------------------------------------------------------------------------
# CSR blocks


def as_csr(block: Any) -> sp.csr_array:
    """A CSR array view of a scipy sparse block or a dense 2-D array (no copy if already CSR).

    Raises
    ------
    InputError
        If a dense block is not 2-D.
    """
    if isinstance(block, sp.csr_array | sp.csr_matrix):
        return sp.csr_array(block, copy=False) if isinstance(block, sp.csr_matrix) else block
    if sp.issparse(block):
        return sp.csr_array(block)
    arr = np.asarray(block)
    if arr.ndim != 2:
        msg = f"Expected a 2-D cells x genes block, got {arr.ndim}-D."
        raise InputError(msg)
    return sp.csr_array(arr)


def bits_for(n: int) -> int:
    """Bits needed to store ``0 .. n - 1``."""
    return max(int(n - 1).bit_length(), 0)


def row_slices(
    indptr: npt.NDArray[np.int64], *, nnz: int, max_rows: int
) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges ``[r0, r1)`` of about ``nnz`` stored entries each.

    Each range holds whole rows, at least one and at most ``max_rows``; together they cover
    every row in order.
    """
    n_rows = indptr.size - 1
    r0 = 0
    while r0 < n_rows:
        r1 = int(np.searchsorted(indptr, indptr[r0] + nnz, side="right")) - 1
        r1 = min(max(r1, r0 + 1), r0 + max_rows, n_rows)
        yield r0, r1
        r0 = r1


def _canonical_slice(
    x: sp.csr_array, lengths: npt.NDArray[np.int64], a: int, b: int, cb: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[np.int64]]:
    """Data, columns and row lengths of one slice of rows (entries ``[a, b)``), canonical."""
    lens = lengths
    rows = np.repeat(np.arange(lens.size, dtype=np.uint64), lens)
    cols = x.indices[a:b].astype(np.uint64)
    ib = bits_for(b - a)
    if bits_for(lens.size) + cb + ib <= 64:
        key = rows << np.uint64(cb + ib)
        key |= cols << np.uint64(ib)
        key |= np.arange(b - a, dtype=np.uint64)
        key.sort()
        idx = (key & np.uint64((1 << ib) - 1)).view(np.int64)
        row_col = key >> np.uint64(ib)
    else:  # pragma: no cover - needs > 2**20 columns and huge rows
        idx = np.lexsort((cols, rows))
        row_col = (rows[idx] << np.uint64(cb)) | cols[idx]
    data = x.data[a:b][idx]
    first = np.ones(b - a, dtype=bool)
    first[1:] = row_col[1:] != row_col[:-1]
    if not first.all():
        starts = np.flatnonzero(first)
        data = np.add.reduceat(data, starts).astype(x.data.dtype, copy=False)
        row_col = row_col[starts]
        lens = np.bincount((row_col >> np.uint64(cb)).view(np.int64), minlength=lens.size)
    cols_out = (row_col & np.uint64((1 << cb) - 1)).astype(x.indices.dtype)
    return data, cols_out, lens


def canonical_csr(block: Any) -> sp.csr_array:
    """Sort the column indices of every row and sum duplicate entries (a new CSR array).

    Same result as scipy's ``sum_duplicates`` (explicit zeros are kept), several times faster
    on cells x genes blocks: one ``np.sort`` of packed (row, column, position) keys per slice
    of about 2**16 stored counts. Use it on blocks whose columns were remapped (e.g. store
    genes -> vocabulary columns), which leaves rows unsorted.

    Parameters
    ----------
    block
        Any scipy sparse matrix or array (converted to CSR).

    Returns
    -------
    scipy.sparse.csr_array
        Canonical CSR: sorted indices, no duplicates; same dtype. Eager.
    """
    x = as_csr(block)
    n_rows, n_cols = x.shape
    indptr = x.indptr.astype(np.int64, copy=False)
    if x.nnz == 0:
        return sp.csr_array(x, copy=True)
    lengths = np.diff(indptr)
    cb = bits_for(n_cols)
    out_data, out_cols, out_lengths = [], [], []
    for r0, r1 in row_slices(indptr, nnz=_SLICE_NNZ, max_rows=_SLICE_MAX_ROWS):
        a, b = int(indptr[r0]), int(indptr[r1])
        data, cols, lens = _canonical_slice(x, lengths[r0:r1], a, b, cb)
        out_data.append(data)
        out_cols.append(cols)
        out_lengths.append(lens)
    new_indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.concatenate(out_lengths), out=new_indptr[1:])
    out = sp.csr_array(
        (np.concatenate(out_data), np.concatenate(out_cols), new_indptr), shape=x.shape
    )
    out.has_canonical_format = True
    return out
