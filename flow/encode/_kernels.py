"""Numpy kernels of the rank-value encoding (no Dask here; ``rank.py`` wires them into Dask).

Fixed value arithmetic
----------------------
The value of a gene in a cell is computed in float64, in exactly this order::

    value = ((count / n_counts) * 10_000) / median

(each operation rounded to float64 in turn), which is upstream Geneformer's
``X / n_counts * target_sum / norm_factor_vector`` evaluated element-wise on dense arrays.
(Upstream's ``.h5ad`` path on a *scipy sparse* ``X`` instead multiplies by reciprocals, as scipy
implements sparse / dense: that changes the last bit of about 27% of PBMC 3k values, and none of
its 2,700 rankings under the V1 or V2 dictionaries.)
``count`` is converted to float64 first (exact for integer counts below 2**53). The first two
operations are the normalisation rule shared with the medians
(:func:`flow._kernels.normalize`); the division by the median is done here. Rankings depend on
the last bit of these values (e.g. all count-1 genes of a cell are ordered by their medians
alone), so this is the only place that computes them; everything else calls
:func:`value_matrix`, :func:`ranked_values` or :func:`rank_block`.

Order
-----
Genes with ``count > 0`` (explicitly stored zeros are never tokens) ordered by value
descending, ties (exactly equal float64 values) broken by token ID ascending. Different values
never tie, equal values always do: the result does not depend on column order, block size,
platform or sort algorithm.

How the sort is exact and fast
------------------------------
One ``np.sort`` of packed uint64 keys per slice of whole rows holding about 2**16 stored
counts (small slices stay in cache)::

    key = row in slice | (max_bits - value_bits) >> shift | offset of the entry in its row

Positive float64 values order like their bit patterns, so the middle field orders values
descending; the offset orders tokens ascending, because rows are first put in token order
(columns sorted by token, CSR indices sorted). The value field is truncated (``shift > 0``)
only when the slice's value range needs more bits than are left; then different values can
share a field and come out in token order. Every such mistake shows as a value that increases
within a row, so rows with an increase (rare; none or a few per 4,096 cells on Geneformer's
medians) are re-sorted exactly with ``np.lexsort``.

Rows need not be sorted first when no row holds a column twice (``rows_unique``: tokenize's
gene map leaves each row in the store's gene order, which saves a sort as costly as the
ranking). The offset then orders ties in store order, so every row is checked: a row with
equal values out of token order or an increase is re-sorted exactly, as above. That is rare
on Geneformer's medians (nearly all distinct: ~10 rows per 4,096 cells) and common on
medians of small integer counts (1.0, 2.0, ...: most rows tie), so the first slice decides:
if it would re-sort more than :data:`_MAX_RESORTED` of its rows, the block's rows are sorted
first.

Measured on this 2-core machine (4,096 cells x 20,000 genes, Geneformer V1 medians, CPU time,
canonical CSR input): 800 genes/cell about 105k cells/s, 2,000 genes/cell about 40k cells/s;
``np.lexsort`` of (token, -value, cell) over the block gives 5k and 1.5k, a stable ``argsort``
per cell 28k and 9k, the same packed keys sorted over the whole block at once 57k and 11k.
Worst case (every row re-sorted: values that differ in their last bits across a wide range)
about 14k and 5.5k cells/s, still exact. Rows whose indices are not sorted (a column remap)
are first put in order by :func:`flow._kernels.canonical_csr` (a packed-key sort too, ~3.5x
faster than scipy's ``sort_indices``).
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from .._kernels import (
    as_csr,
    bad_n_counts,
    bits_for,
    canonical_csr,
    cell_label,
    check_counts,
    normalize,
    row_slices,
)
from ..errors import InputError

__all__ = ["padded", "rank_block", "rank_block_flat", "ranked_values", "value_matrix"]

_SLICE_NNZ: Final = 1 << 16  # stored counts sorted at once: small slices stay in cache (measured)
_SLICE_MAX_ROWS: Final = 1 << 12
_MAX_VALUE_BITS = 64  # tests lower this to force truncated value fields and the exact re-sort
#: Unsorted rows are ranked as they are while the first slice re-sorts at most this share of
#: its rows (Geneformer's medians: ~1 in 400); more, and the block's rows are sorted first.
_MAX_RESORTED = 0.05

FloatArray = npt.NDArray[np.float64]
TokenArray = npt.NDArray[np.integer[Any]]


# --------------------------------------------------------------------------------------------
# input handling


def _parse_inputs(
    block: Any, n_counts: npt.ArrayLike, medians: npt.ArrayLike, tokens: npt.ArrayLike
) -> tuple[sp.csr_array, FloatArray, FloatArray, TokenArray]:
    """CSR block and flat float64 totals, medians and tokens, with their sizes checked."""
    x = as_csr(block)
    n_cells, n_cols = x.shape
    n_c = np.asarray(n_counts, dtype=np.float64).reshape(-1)
    med = np.asarray(medians, dtype=np.float64).reshape(-1)
    tok = np.asarray(tokens).reshape(-1)
    if n_c.size != n_cells:
        msg = f"n_counts must have one entry per cell ({n_cells}), got {n_c.size}."
        raise InputError(msg)
    if med.size != n_cols or tok.size != n_cols:
        msg = (
            f"medians and tokens must have one entry per column ({n_cols}), got "
            f"{med.size} and {tok.size}."
        )
        raise InputError(msg)
    if tok.size and not np.issubdtype(tok.dtype, np.integer):
        msg = f"tokens must be integers, got dtype {tok.dtype}."
        raise InputError(msg)
    return x, n_c, med, tok


def _in_token_order(
    x: sp.csr_array, med: FloatArray, tok: TokenArray, rows_unique: bool
) -> tuple[sp.csr_array, FloatArray, TokenArray]:
    """Columns sorted by token, CSR canonical (sorted indices, duplicates summed); with
    ``rows_unique`` and tokens already ascending, rows are left in their order."""
    n_cols = x.shape[1]
    if tok.size > 1 and not bool(np.all(tok[1:] > tok[:-1])):  # put columns in token order
        order = np.argsort(tok, kind="stable")
        tok = tok[order]
        if bool(np.any(tok[1:] == tok[:-1])):
            msg = "tokens must be unique per column (collapse duplicate genes first)."
            raise InputError(msg)
        med = med[order]
        rank_of_col = np.empty(n_cols, dtype=np.int64)
        rank_of_col[order] = np.arange(n_cols)
        x = canonical_csr(sp.csr_array((x.data, rank_of_col[x.indices], x.indptr), shape=x.shape))
    elif not rows_unique and not x.has_canonical_format:  # unsorted or duplicates: sort, sum
        x = canonical_csr(x)
    return x, med, tok


def _without_zeros(x: sp.csr_array) -> sp.csr_array:
    """Explicitly stored zeros removed (they are never tokens)."""
    positive = x.data > 0
    if positive.all():
        return x
    indptr = np.concatenate([[0], np.cumsum(positive, dtype=np.int64)])[x.indptr]
    return sp.csr_array((x.data[positive], x.indices[positive], indptr), shape=x.shape)


def _check_totals_and_medians(
    x: sp.csr_array, n_c: FloatArray, med: FloatArray, tok: TokenArray, row_offset: int
) -> None:
    """Every cell with counts needs a positive total, every detected gene a positive median."""
    lengths = np.diff(x.indptr)
    bad_n = bad_n_counts(lengths, n_c)
    if bad_n.any():
        row = int(np.argmax(bad_n))
        msg = (
            f"n_counts must be a positive finite total for every cell with counts, got "
            f"{n_c[row]!r} for {cell_label(row, row_offset)}, which has {int(lengths[row])} "
            "detected genes. Compute n_counts as the total count over all genes of the input."
        )
        raise InputError(msg)
    bad_m = ~(np.isfinite(med) & (med > 0))
    if bad_m.any():
        used = np.zeros(med.size, dtype=bool)
        used[x.indices] = True
        bad_m &= used
        if bad_m.any():
            col = int(np.argmax(bad_m))
            msg = (
                f"Every detected gene needs a positive finite median, got {med[col]!r} for the "
                f"gene with token {tok[col].item()}. Use a median set computed for this "
                "vocabulary (or drop the gene from the vocabulary)."
            )
            raise InputError(msg)


def _prepare(
    block: Any,
    n_counts: npt.ArrayLike,
    medians: npt.ArrayLike,
    tokens: npt.ArrayLike,
    row_offset: int,
    rows_unique: bool = False,
) -> tuple[sp.csr_array, FloatArray, FloatArray, TokenArray]:
    """Validate and canonicalise: CSR in token order, sorted (unless ``rows_unique``), no
    duplicates, no zeros."""
    x, n_c, med, tok = _parse_inputs(block, n_counts, medians, tokens)
    check_counts(x.data, x.indptr, row_offset)
    x, med, tok = _in_token_order(x, med, tok, rows_unique)
    x = _without_zeros(x)
    _check_totals_and_medians(x, n_c, med, tok, row_offset)
    return x, n_c, med, tok


def _check_width_and_pad(tokens: npt.ArrayLike, width: int, pad: int) -> tuple[int, np.dtype[Any]]:
    """``width`` as an int and the output token dtype (``pad`` must fit it)."""
    tok_in = np.asarray(tokens)
    out_dtype = tok_in.dtype if tok_in.size else np.dtype(np.uint16)
    if isinstance(width, bool) or int(width) != width or width < 0:
        msg = f"width must be a non-negative integer, got {width!r}."
        raise InputError(msg)
    if np.issubdtype(out_dtype, np.integer) and not (
        np.iinfo(out_dtype).min <= pad <= np.iinfo(out_dtype).max
    ):
        msg = f"pad token {pad} does not fit the token dtype {out_dtype}."
        raise InputError(msg)
    return int(width), out_dtype


# --------------------------------------------------------------------------------------------
# values


def _values(
    data: npt.NDArray[Any],
    n_counts_per_entry: FloatArray,
    medians_per_entry: FloatArray,
) -> FloatArray:
    """The fixed value arithmetic (see module docstring), element-wise."""
    out = normalize(data, n_counts_per_entry)
    out /= medians_per_entry
    return out


def value_matrix(
    block_csr: Any, n_counts: npt.ArrayLike, medians_of_columns: npt.ArrayLike
) -> sp.csr_array:
    """Values ``((count / n_counts) * 10_000) / median`` of a block, in float64.

    Parameters
    ----------
    block_csr
        Cells x genes counts (scipy sparse, CSR preferred, or a dense 2-D array).
    n_counts
        ``(n_cells,)`` total count of each cell over all genes of the input.
    medians_of_columns
        ``(n_genes,)`` nonzero median of each column's gene.

    Returns
    -------
    scipy.sparse.csr_array
        Same sparsity pattern as the input (stored zeros stay stored, with value 0); float64.
        Eager (a numpy kernel).

    Notes
    -----
    No validation: zero ``n_counts`` or medians give ``inf``/``nan``. :func:`rank_block`
    validates.
    """
    x = as_csr(block_csr)
    n_c = np.asarray(n_counts, dtype=np.float64).reshape(-1)
    med = np.asarray(medians_of_columns, dtype=np.float64).reshape(-1)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = _values(x.data, n_c[rows], med[x.indices])
    return sp.csr_array((vals, x.indices.copy(), x.indptr.copy()), shape=x.shape)


def ranked_values(
    ranked_counts: npt.ArrayLike, n_counts: npt.ArrayLike, ranked_medians: npt.ArrayLike
) -> FloatArray:
    """The value at each rank, from the counts at each rank (the fixed value arithmetic).

    Parameters
    ----------
    ranked_counts
        ``(n_cells, width)`` counts at each rank (:func:`rank_block`), 0 in padding.
    n_counts
        ``(n_cells,)`` total counts per cell.
    ranked_medians
        ``(n_cells, width)`` the median of the gene at each rank (e.g. ``medians[tokens]``).

    Returns
    -------
    numpy.ndarray
        float64 values, bit-identical to those the ranking was made from; 0 in padding.
    """
    counts = np.asarray(ranked_counts)
    med = np.asarray(ranked_medians, dtype=np.float64)
    present = counts > 0
    out = np.zeros(counts.shape, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n_counts, dtype=np.float64).reshape(-1, 1), counts.shape)
    out[present] = _values(counts[present], n[present], med[present])
    return out


# --------------------------------------------------------------------------------------------
# ranking


def _resort_misordered_rows(
    values: FloatArray,
    entry_tokens: TokenArray,
    offsets: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    perm: npt.NDArray[np.int64],
    give_up: int,
) -> int:
    """Re-sort exactly (in place) the rows whose keys left them out of order: a value before a
    larger one, or equal values not in token order; none if there are more than ``give_up``
    (the caller then ranks the rows another way).

    Truncated value fields can tie for different values, and a tie comes out in offset order,
    which is token order only in sorted rows; a row is exact iff its values do not increase
    and equal values have ascending tokens. Returns the number of rows re-sorted.
    """
    ranked, ranked_tokens = np.take(values, perm), np.take(entry_tokens, perm)
    bad = ranked[1:] > ranked[:-1]
    bad |= (ranked[1:] == ranked[:-1]) & (ranked_tokens[1:] < ranked_tokens[:-1])
    bad &= offsets[1:] != 0  # a new row may start anywhere
    if not bad.any():
        return 0
    entry_rows = np.repeat(np.arange(lengths.size), lengths)
    bad_rows = np.unique(entry_rows[1:][bad])
    if bad_rows.size > give_up:
        return int(bad_rows.size)
    pos = np.flatnonzero(np.isin(entry_rows, bad_rows))  # whole rows, in order
    sub = perm[pos]
    order = np.lexsort((entry_tokens[sub], -values[sub], entry_rows[pos]))
    perm[pos] = sub[order]
    return int(bad_rows.size)


def _sort_slice(
    values: FloatArray,
    entry_tokens: TokenArray,
    offsets: npt.NDArray[np.int64],
    row_starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    *,
    rows_sorted: bool = True,
    give_up: int = 2**62,
) -> tuple[npt.NDArray[np.int64], int]:
    """Exact order of a slice of whole rows: row asc, value desc, token asc.

    Parameters
    ----------
    values
        Positive finite float64 values of the slice's entries, grouped by row.
    entry_tokens
        Token of each entry.
    offsets
        Position of each entry within its row (``0 .. length - 1``).
    row_starts
        Index of the first entry of each entry's row (``arange - offsets``).
    lengths
        Entries per row (all rows of the slice, at least one entry in total).
    rows_sorted
        Whether each row's entries are in token order (then offset order is token order and
        exact keys need no check; otherwise every row is checked, and those with ties out of
        token order re-sorted).

    Returns
    -------
    perm
        Indices into the slice in ranked order. Rows keep their places: position ``p`` of the
        result belongs to the same row as entry ``p`` and has rank ``offsets[p]``.
    n_resorted
        Rows whose keys were ambiguous and were re-sorted exactly; if more than ``give_up``,
        none was and ``perm`` is not exact.
    """
    ob = bits_for(int(lengths.max()))
    rb = bits_for(lengths.size)
    vb = min(64 - ob - rb, _MAX_VALUE_BITS)  # >= 64 - 16 - 12 in practice
    bits = values.view(np.uint64)
    hi = bits.max()
    shift = max(int(hi - bits.min()).bit_length() - vb, 0)
    key = hi - bits  # value descending -> key ascending
    if shift:
        key >>= np.uint64(shift)
    key <<= np.uint64(ob)
    key |= offsets.view(np.uint64)
    if rb:
        row_ids = np.arange(lengths.size, dtype=np.uint64) << np.uint64(vb + ob)
        key |= np.repeat(row_ids, lengths)
    key.sort()
    key &= np.uint64((1 << ob) - 1)
    perm = key.view(np.int64)
    perm += row_starts  # rows keep their places, so the row start of position p is known
    if not shift and rows_sorted:  # exact keys in token order: nothing to check
        return perm, 0
    return perm, _resort_misordered_rows(values, entry_tokens, offsets, lengths, perm, give_up)


def _rank_rows(
    x: sp.csr_array,
    indptr: npt.NDArray[np.int64],
    n_c: FloatArray,
    med: FloatArray,
    tok: TokenArray,
    rows: tuple[int, int],
    out: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    rows_sorted: bool,
    give_up: int = 2**62,
) -> int:
    """Rank rows ``[r0, r1)`` of ``x`` (no column twice in a row; each row's columns ascending
    if ``rows_sorted``) into ``out = (tokens, counts)`` (in place).

    ``out`` is flat, in the layout of ``x``'s entries: row ``r``'s ranking fills
    ``indptr[r]:indptr[r + 1]``, highest value first. ``indptr`` is ``x.indptr`` as int64; the
    rows are one slice of :func:`_sort_slice`.
    """
    r0, r1 = rows
    a, b = int(indptr[r0]), int(indptr[r1])
    if b == a:
        return 0
    lens = np.diff(indptr[r0 : r1 + 1])
    row_starts = np.repeat(indptr[r0:r1] - a, lens)
    offsets = np.arange(b - a, dtype=np.int64)
    offsets -= row_starts
    cols = x.indices[a:b]
    vals = _values(x.data[a:b], np.repeat(n_c[r0:r1], lens), np.take(med, cols))
    entry_tokens = np.take(tok, cols)
    perm, n_resorted = _sort_slice(
        vals, entry_tokens, offsets, row_starts, lens, rows_sorted=rows_sorted, give_up=give_up
    )
    # plain gathers: np.take(..., out=) buffers its output in its default (raise) mode
    out[0][a:b] = entry_tokens[perm]
    out[1][a:b] = x.data[a:b][perm]
    return n_resorted


def rank_block_flat(
    block_csr: Any,
    n_counts: npt.ArrayLike,
    medians: npt.ArrayLike,
    tokens: npt.ArrayLike,
    *,
    row_offset: int = 0,
    rows_unique: bool = False,
) -> tuple[TokenArray, npt.NDArray[Any], npt.NDArray[np.int32]]:
    """Rank-value encode a block of cells into flat rankings (no padding anywhere).

    Same inputs, order and checks as :func:`rank_block` (without ``width`` and ``pad``), and
    ``rows_unique``: the caller's promise that no row of ``block_csr`` holds a column twice
    (e.g. :meth:`flow.vocab.GeneMap.apply` with ``sort=False``). Then rows in any column order
    are ranked as they are, without first sorting them: ties of equal values are put in token
    order by an exact check instead. Same result; a broken promise gives wrong rankings.

    Returns
    -------
    ranked_tokens : numpy.ndarray
        ``(lengths.sum(),)`` ``tokens.dtype``: the rankings of the cells one after another,
        each highest value first (cell ``i``'s at ``cumsum(lengths)[i] - lengths[i]``).
    ranked_counts : numpy.ndarray
        ``(lengths.sum(),)`` the block's count dtype: the count of the gene at each rank.
    lengths : numpy.ndarray
        ``(n_cells,)`` int32: detected genes (count > 0) per cell.

    Notes
    -----
    Eager numpy; work and memory follow the block's stored counts, never the longest cell.
    """
    tok_in = np.asarray(tokens)
    out_dtype = tok_in.dtype if tok_in.size else np.dtype(np.uint16)
    x, n_c, med, tok = _prepare(block_csr, n_counts, medians, tokens, row_offset, rows_unique)
    indptr = x.indptr.astype(np.int64, copy=False)
    ranked_tokens = np.empty(x.nnz, dtype=out_dtype)
    ranked_counts = np.empty(x.nnz, dtype=x.data.dtype)
    out = (ranked_tokens, ranked_counts)
    slices = list(row_slices(indptr, nnz=_SLICE_NNZ, max_rows=_SLICE_MAX_ROWS))
    done = 0
    if slices and not x.has_sorted_indices:  # rank unsorted rows while ties are rare
        limit = int(_MAX_RESORTED * (slices[0][1] - slices[0][0]))
        if _rank_rows(x, indptr, n_c, med, tok, slices[0], out, False, limit) > limit:
            x = canonical_csr(x)  # many ties (e.g. medians of small integer counts): sort first
        else:
            done = 1
    rows_sorted = bool(x.has_sorted_indices)
    for rows in slices[done:]:
        _rank_rows(x, indptr, n_c, med, tok, rows, out, rows_sorted)
    return ranked_tokens, ranked_counts, np.diff(indptr).astype(np.int32)


def padded(
    flat: npt.NDArray[Any], lengths: npt.NDArray[Any], width: int, fill: Any
) -> npt.NDArray[Any]:
    """``(n_cells, width)`` rows from flat rankings (:func:`rank_block_flat`): each cell's first
    ``width`` ranks, then ``fill``."""
    lens = np.asarray(lengths, dtype=np.int64)
    out = np.full((lens.size, width), fill, dtype=flat.dtype)
    if width == 0 or flat.size == 0:
        return out
    if int(lens.max()) > width:  # truncated: keep each row's first ``width`` entries
        starts = np.cumsum(lens) - lens
        offsets = np.arange(flat.size, dtype=np.int64) - np.repeat(starts, lens)
        flat, lens = flat[offsets < width], np.minimum(lens, width)
    out[np.arange(width) < lens[:, None]] = flat  # row-major order = ranked order
    return out


def rank_block(
    block_csr: Any,
    n_counts: npt.ArrayLike,
    medians: npt.ArrayLike,
    tokens: npt.ArrayLike,
    width: int,
    pad: int,
    *,
    row_offset: int = 0,
) -> tuple[TokenArray, npt.NDArray[Any], npt.NDArray[np.int32]]:
    """Rank-value encode a block of cells (exact; see the module docstring for the order).

    Parameters
    ----------
    block_csr
        Cells x kept-genes counts, already collapsed to one column per vocabulary gene
        (:meth:`flow.vocab.GeneMap.apply`); scipy sparse (CSR preferred) or dense. Integer or
        float counts. Column order is free; unsorted or duplicate CSR indices are handled
        (duplicates summed) by :func:`flow._kernels.canonical_csr`, which costs about as much
        again as the ranking: pass canonical CSR (:meth:`flow.vocab.GeneMap.apply` returns it).
    n_counts
        ``(n_cells,)`` total count per cell over all genes of the input (before vocabulary
        filtering).
    medians
        ``(n_genes,)`` nonzero median of each column's gene (float64).
    tokens
        ``(n_genes,)`` unique token ID of each column; its integer dtype is the output dtype
        (pass ``vocab.token_dtype``).
    width
        Ranks kept per cell: longer rankings are truncated, shorter ones padded. The full
        ranking needs ``width >= lengths.max()``.
    pad
        Token written after the last gene of a row; must fit the token dtype.
    row_offset
        Global index of the block's first cell, used only in error messages.

    Returns
    -------
    ranked_tokens : numpy.ndarray
        ``(n_cells, width)``, ``tokens.dtype``: token IDs by value descending, token ID
        ascending among equal values, then ``pad``.
    ranked_counts : numpy.ndarray
        ``(n_cells, width)``, the block's count dtype: the count of the gene at each rank, 0 in
        padding. With ``n_counts`` and the medians it gives the exact float64 value at each rank
        (:func:`ranked_values`); counts are smaller to store than the values and lose nothing.
    lengths : numpy.ndarray
        ``(n_cells,)`` int32: number of detected genes (count > 0) per cell, before truncation.

    Raises
    ------
    InputError
        Negative or NaN counts (naming the cell), a cell with counts whose ``n_counts`` is not
        positive, a detected gene whose median is not positive and finite, shape mismatches,
        or a ``pad`` that does not fit the token dtype.

    Notes
    -----
    Eager numpy; memory is a few times 8 bytes per stored count of the block. Values are
    computed and sorted in slices of about ``2**16`` stored counts (whole rows).
    """
    width, _ = _check_width_and_pad(tokens, width, pad)
    flat_tokens, flat_counts, lengths = rank_block_flat(
        block_csr, n_counts, medians, tokens, row_offset=row_offset
    )
    return (
        padded(flat_tokens, lengths, width, pad),
        padded(flat_counts, lengths, width, 0),
        lengths,
    )
