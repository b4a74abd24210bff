"""Vectorized t-digests of many genes at once (numpy + scipy only, no Dask).

One t-digest per gene, for all genes together: no Python loop over genes and no per-gene
objects. The state (:class:`Digests`) is five flat arrays, gene-major, so it pickles cheaply,
stores as flat Zarr arrays and merges through a Dask tree. It exists to estimate each gene's
median of nonzero normalized values, ``(count / n_counts) * 10_000``, in one pass over a
corpus, and to bracket that median for the exact two-pass mode.

Functions here compute eagerly on numpy arrays (they are the kernels of a Dask reduction).

Modules
-------
This module builds and merges digests and is the API (it re-exports the rest):
``_digests.py`` the state (:class:`Digests`) and its storage as flat arrays, ``_keysort.py``
the exact packed-key sort of ``(gene, value)`` pairs, ``_quantiles.py`` quantiles and the
guaranteed median bracket (how both are computed is described there).

Notes
-----
**Build** (:func:`from_values`, :func:`from_csr`). One ``np.sort`` of packed uint64 keys
``gene | value code | position`` orders the values by gene then value (the value code is the
float's bit pattern, monotone for positive floats, minus the smallest one and shifted right
to fit; runs whose code lost bits are re-sorted exactly, and ties are broken by position, so
the order is fully determined). A gene with ``n`` values puts its value of rank ``r`` into
bin ``floor(n_bins * (r + 1/2) / n)`` with ``n_bins = compression // 2``: the uniform scale
function (``k0`` of Dunning & Ertl) of the value's mid-rank quantile, in integer arithmetic.
Bins become centroids with ``np.add.reduceat``. A gene with ``n <= n_bins`` values keeps
each value as a weight-1 centroid, so its quantiles are exact.

**Merge** (:func:`merge`). The parts' centroids are sorted by ``(gene, mean, part,
position)`` (same packed-key sort) and re-binned by ``floor(n_bins * (2 * before + w) /
(2 * n))`` where ``before`` is the gene's weight before the centroid and ``w`` its weight.
Genes are processed in ranges of about 131,000 centroids (bounded memory, cache-sized
working sets); each gene's result is independent of the ranges. Counts are exact; the same
parts in the same order give identical bytes on any platform (integer binning, fully
tie-broken sorts, fixed summation order).

**Why the uniform scale and compression 200.** Measured on the data of
``tests/benchmarks/bench_tdigest.py --accuracy``: 16 blocks of 4,000 cells x 20,000 genes,
~1,450 nonzeros per cell, negative-binomial counts, lognormal gene means and library sizes;
block digests merged in a tree with ``split_every=8``; relative error of the median against
numpy's exact nonzero median over the ~10,000 genes with >= 1,000 nonzeros. "Hetero" has 4
cell types (gene means differing by lognormal(0, 1)) in 4 consecutive blocks each, as when a
corpus is a concatenation of datasets. Scale functions other than the uniform one were
measured during development (same generator and binning, other seeds; not in the code)::

    compression 200                  homogeneous p99 / max    hetero p99 / max
    uniform (k0, chosen)             0.24% / 0.58%            0.25% / 0.60%
    k1 (asin, the t-digest default)  0.31% / 0.60%            0.32% / 0.84%
    asinh, finest at q = 0.5         0.06% / 0.17%            0.58% / 3.7%
    arctan, finest at q = 0.5        0.06% / 0.14%            1.6% / 10%

    uniform          centroids/gene   homog. p50 / p99 / max   hetero p50 / p99 / max
    100              49               0.07% / 0.38% / 0.66%    0.08% / 0.39% / 1.5%
    200 (default)    94               0.04% / 0.25% / 0.44%    0.05% / 0.27% / 0.57%
    300              138              0.03% / 0.18% / 0.38%    0.04% / 0.20% / 0.44%
    crick 100 (k1)   122 (16 B each)  0.07% / 0.34% / 0.93%    0.07% / 0.35% / 0.95%

Scales finest at q = 0.5 win on homogeneous blocks but fail when blocks differ: a block's
own median is not the corpus median, so its digest is coarse exactly where the corpus median
falls, and no later merge can recover that. The uniform scale is equally fine everywhere, so
its error does not depend on how blocks differ. Compression 200 meets the p99 <= 0.5% target
with a 2x margin at ~3 KB per gene (32 bytes per centroid, ~94 centroids per merged gene).
Its median bracket holds on average 1.5% (homogeneous) to 2% (hetero) of a gene's values,
p99 3-3.6%.

**Speed and memory** (2 shared cores, CPU time, same data): :func:`from_values` ~46 M
values/s (crick, one ``TDigest`` per gene: ~11 M/s); merging 8 block digests ~180 M values/s
(crick ~58 M/s). :func:`from_csr` first groups a block by gene (scipy's CSR -> CSC, a counting
sort), then sorts gene ranges of about 65,536 values at a time, which stay in cache: ~50 M
values/s including the grouping, on 4,096-cell blocks of 8.2 M nonzeros (the same block
through :func:`from_values`: 2.3x slower sorting). It holds the block twice plus 8 bytes per
value (~170 MB for 8.2 M nonzeros, against ~32 bytes per value for :func:`from_values`); a
block's digest is ~40 MB (1.24 M centroids); a merge needs ~120 MB beyond its inputs and
output, whatever ``split_every``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import numpy as np
import scipy.sparse as sp

from .._kernels import bad_n_counts, normalize
from ._digests import (
    DEFAULT_COMPRESSION,
    Digests,
    bins_per_gene,
    check_compression,
    concat,
    empty,
    from_arrays,
    gene_ranges,
    gene_slice,
    to_arrays,
)
from ._keysort import sort_key, sort_values
from ._quantiles import median, median_bracket, quantile

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]
    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]
    Ints = npt.NDArray[np.integer]

__all__ = [
    "DEFAULT_COMPRESSION",
    "Digests",
    "empty",
    "from_arrays",
    "from_csr",
    "from_values",
    "median",
    "median_bracket",
    "merge",
    "quantile",
    "to_arrays",
]

_BUILD_ITEMS: Final = 1 << 16
"""Values sorted at once by :func:`from_csr` (gene ranges that stay in cache: 2.3x faster
than one sort of a 4,096-cell block's 8 M values, measured)."""


# --------------------------------------------------------------------------- build


def _check_values(genes: npt.ArrayLike, values: npt.ArrayLike, n_genes: int) -> tuple[Ints, F64]:
    g = np.asarray(genes)
    v = np.ascontiguousarray(values, dtype=np.float64)
    if g.ndim != 1 or v.ndim != 1 or g.shape != v.shape:
        msg = f"genes and values must be 1-D of equal length; got shapes {g.shape} and {v.shape}."
        raise ValueError(msg)
    if g.size and not np.issubdtype(g.dtype, np.integer):
        msg = f"genes must be integer gene indices; got dtype {g.dtype}."
        raise TypeError(msg)
    if n_genes < 0:
        msg = f"n_genes must be >= 0; got {n_genes}."
        raise ValueError(msg)
    if g.size:
        gmin, gmax = int(g.min()), int(g.max())
        if gmin < 0 or gmax >= n_genes:
            msg = f"gene indices must be in [0, {n_genes}); got [{gmin}, {gmax}]."
            raise ValueError(msg)
    return g, v


def _bin_starts(counts: I64, n_bins: int) -> I64:
    """First rank (in the gene-sorted values) of each centroid of a freshly built digest.

    A gene with ``n <= n_bins`` values keeps each value. Otherwise its value of rank ``r``
    goes to bin ``floor(n_bins * (2r + 1) / (2n))``, so bin ``j`` starts at the smallest
    ``r`` with ``n_bins * (2r + 1) >= 2jn``, i.e. ``(2jn + n_bins - 1) // (2 n_bins)``.
    """
    gstart = np.zeros(counts.size + 1, np.int64)
    np.cumsum(counts, out=gstart[1:])
    small = counts <= n_bins
    per_gene = np.where(small, counts, n_bins)
    cstart = np.zeros(counts.size + 1, np.int64)
    np.cumsum(per_gene, out=cstart[1:])
    starts = np.empty(int(cstart[-1]), np.int64)
    gs = np.flatnonzero(small & (counts > 0))
    if gs.size:  # every rank of a small gene
        lens = counts[gs]
        idx = np.repeat(cstart[gs] - np.cumsum(np.r_[0, lens[:-1]]), lens)
        idx += np.arange(idx.size)
        starts[idx] = np.repeat(gstart[gs] - cstart[gs], lens) + idx
    gl = np.flatnonzero(~small)
    if gl.size:
        j = np.arange(n_bins, dtype=np.int64)[None, :]
        first = (2 * j * counts[gl][:, None] + (n_bins - 1)) // (2 * n_bins)
        first += gstart[gl][:, None]
        starts[(cstart[gl][:, None] + j).ravel()] = first.ravel()
    return starts


def _build(genes: Ints, values: F64, n_genes: int, compression: float) -> Digests:
    v, counts = sort_values(genes, values, n_genes)
    return _from_sorted(v, counts, n_genes, compression)


def _from_sorted(v: F64, counts: I64, n_genes: int, compression: float) -> Digests:
    """Digests of values sorted by (gene, value), ``counts[g]`` values for gene ``g``."""
    n_bins = bins_per_gene(compression)
    starts = _bin_starts(counts, n_bins)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = v.size
    weights = ends - starts
    sums = np.add.reduceat(v, starts)
    mins = v[starts]
    maxs = v[ends - 1]
    means = np.divide(sums, weights, out=sums)
    np.clip(means, mins, maxs, out=means)  # a mean of equal values is that value
    offsets = np.zeros(n_genes + 1, np.int64)
    np.cumsum(np.minimum(counts, n_bins), out=offsets[1:])
    return Digests(offsets, means, weights, mins, maxs, compression)


def from_values(
    genes: npt.ArrayLike,
    values: npt.ArrayLike,
    n_genes: int,
    compression: float = DEFAULT_COMPRESSION,
) -> Digests:
    """Digests of ``(gene, value)`` pairs given in any order (computes eagerly).

    Parameters
    ----------
    genes
        Integer gene index of each value, in ``[0, n_genes)``.
    values
        The values (converted to float64), positive and finite.
    n_genes
        Number of genes of the result.
    compression
        Compression of the digests (see :class:`Digests`).

    Returns
    -------
    Digests
        One digest per gene; genes without values have no centroids. The same input in the
        same order gives identical arrays.

    Raises
    ------
    ValueError
        If shapes differ, a gene index is out of range, or a value is not positive and finite.
    TypeError
        If ``genes`` is not an integer array.

    Examples
    --------
    >>> d = from_values([0, 0, 0, 2], [1.0, 5.0, 2.0, 7.0], n_genes=3)
    >>> d.counts
    array([3, 0, 1])
    >>> median(d)
    array([ 2., nan,  7.])
    """
    compression = check_compression(compression)
    g, v = _check_values(genes, values, n_genes)
    if v.size == 0:
        return empty(n_genes, compression)
    return _build(g, v, n_genes, compression)


def from_csr(
    block: sp.csr_matrix | sp.csr_array,
    n_counts: npt.ArrayLike,
    compression: float = DEFAULT_COMPRESSION,
) -> Digests:
    """Digests of the normalized nonzero counts of a CSR block of cells x genes (eager).

    Each stored nonzero count becomes ``(count / n_counts[row]) * 10_000`` in float64, in
    exactly that order of operations (:func:`flow._kernels.normalize`). Explicitly stored zeros are ignored; duplicate entries
    of a non-canonical matrix are summed first.

    Parameters
    ----------
    block
        ``(cells, genes)`` CSR counts (any numeric dtype).
    n_counts
        Total count of each cell (one per row).
    compression
        Compression of the digests (see :class:`Digests`).

    Returns
    -------
    Digests
        One digest per column of ``block``.

    Raises
    ------
    TypeError
        If ``block`` is not a scipy.sparse CSR matrix or array.
    ValueError
        If ``n_counts`` does not have one entry per row or is not positive and finite for a
        cell with counts, or a count is negative.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> block = sp.csr_matrix(np.array([[1, 0, 3], [0, 0, 2]]))
    >>> median(from_csr(block, block.sum(axis=1).A1))
    array([2500.,   nan, 8750.])
    """
    if not sp.issparse(block) or block.format != "csr":
        msg = f"block must be a scipy.sparse CSR matrix or array; got {type(block).__name__}."
        raise TypeError(msg)
    nc = np.asarray(n_counts, dtype=np.float64)
    n_rows, n_genes = block.shape
    if nc.shape != (n_rows,):
        msg = f"n_counts must have one entry per row ({n_rows}); got shape {nc.shape}."
        raise ValueError(msg)
    compression = check_compression(compression)
    bad_rows = np.flatnonzero(bad_n_counts(np.diff(block.indptr), nc))
    if bad_rows.size:
        msg = (
            f"n_counts must be positive and finite for cells with counts; got "
            f"{nc[bad_rows[:5]].tolist()} at rows {bad_rows[:5].tolist()}."
        )
        raise ValueError(msg)
    csc = sp.csc_matrix(block)  # gene-major (a counting sort); a new matrix, the input stays
    csc.sum_duplicates()
    csc.eliminate_zeros()
    counts = np.diff(csc.indptr).astype(np.int64)
    if csc.nnz == 0:
        return empty(n_genes, compression)
    ordered = np.empty(csc.nnz, np.float64)
    for g0, g1 in gene_ranges(counts, _BUILD_ITEMS):
        p0, p1 = int(csc.indptr[g0]), int(csc.indptr[g1])
        values = normalize(csc.data[p0:p1], nc[csc.indices[p0:p1]])
        ordered[p0:p1], _ = sort_values(
            np.repeat(np.arange(g1 - g0), counts[g0:g1]), values, g1 - g0
        )
    return _from_sorted(ordered, counts, n_genes, compression)


# --------------------------------------------------------------------------- merge


def merge(parts: Sequence[Digests]) -> Digests:
    """Merge digests of the same genes into the digests of all their values (eager).

    Parameters
    ----------
    parts
        At least one digest, all with the same ``n_genes`` and ``compression``.

    Returns
    -------
    Digests
        The merged digests (the part itself if only one part has centroids). Counts are
        exact, a gene with at most ``compression // 2`` values in total keeps each value,
        and the same parts in the same order give identical arrays (bytes).

    Raises
    ------
    ValueError
        If ``parts`` is empty or the parts differ in ``n_genes`` or ``compression``.

    Examples
    --------
    >>> a = from_values([0, 1], [1.0, 2.0], n_genes=2)
    >>> b = from_values([0, 0], [3.0, 4.0], n_genes=2)
    >>> median(merge([a, b]))
    array([3., 2.])
    """
    parts = list(parts)
    if not parts:
        msg = "merge needs at least one Digests; got none."
        raise ValueError(msg)
    n_genes, compression = parts[0].n_genes, parts[0].compression
    for p in parts[1:]:
        if p.n_genes != n_genes or p.compression != compression:
            msg = (
                "all parts must have the same n_genes and compression; got "
                f"(n_genes={p.n_genes}, compression={p.compression}) and "
                f"(n_genes={n_genes}, compression={compression})."
            )
            raise ValueError(msg)
    parts = [p for p in parts if p.means.size]
    if not parts:
        return empty(n_genes, compression)
    if len(parts) == 1:
        return parts[0]
    items = np.sum([np.diff(p.offsets) for p in parts], axis=0)
    pieces = [
        _merge([gene_slice(p, g0, g1) for p in parts], g1 - g0, compression)
        for g0, g1 in gene_ranges(items)
    ]
    return concat(pieces, compression)


def _sorted_rows(parts: list[Digests], n_genes: int) -> F64:
    """The parts' centroids as rows ``(mean, weight, min, max)``, sorted by ``(gene, mean,
    part, position)`` (one gather of all four columns)."""
    edges = np.cumsum([0, *(p.means.size for p in parts)])
    means = np.concatenate([p.means for p in parts])
    rows = np.empty((int(edges[-1]), 4), np.float64)
    for p, a, b in zip(parts, edges[:-1], edges[1:], strict=True):
        rows[a:b, 0] = p.means
        rows[a:b, 1] = p.weights
        rows[a:b, 2] = p.mins
        rows[a:b, 3] = p.maxs
    gene_ids = np.arange(n_genes, dtype=np.uint64)

    def fill(out: U64) -> None:
        for p, a, b in zip(parts, edges[:-1], edges[1:], strict=True):
            out[a:b] = np.repeat(gene_ids, np.diff(p.offsets))

    srt = sort_key(means, n_genes, fill)
    del means
    rows = np.take(rows, srt.order, axis=0)
    moves = srt.repair(rows[:, 0])
    if moves is not None:
        rows[moves[0]] = rows[moves[1]]
    return rows


def _merged_bin_starts(w: I64, counts: I64, items: I64, n_bins: int) -> tuple[I64, I64]:
    """First centroid of each merged bin, and the first centroid of each gene.

    Bin of each centroid: ``floor(n_bins * (2 * before + w) / (2 * n))``, ``before`` the
    gene's weight ahead of it; integer arithmetic.
    """
    n_genes = counts.size
    b = np.cumsum(w)
    b -= w
    gstart = np.zeros(n_genes + 1, np.int64)
    np.cumsum(counts, out=gstart[1:])
    b -= np.repeat(gstart[:-1], items)
    b *= 2
    b += w
    b *= n_bins
    b //= np.repeat(2 * np.maximum(counts, 1), items)
    istart = np.zeros(n_genes + 1, np.int64)
    np.cumsum(items, out=istart[1:])
    new = np.empty(w.size, np.bool_)
    new[0] = True
    np.not_equal(b[1:], b[:-1], out=new[1:])
    del b
    # a gene's first centroid starts a bin; a gene with n <= n_bins values has only weight-1
    # centroids, and those land in distinct bins (consecutive ones are n_bins / n >= 1 apart)
    new[istart[:-1][items > 0]] = True
    return np.flatnonzero(new), istart


def _merge(parts: list[Digests], n_genes: int, compression: float) -> Digests:
    """Merge of gene-aligned parts (the kernel of :func:`merge`, for one gene range)."""
    items = np.zeros(n_genes, np.int64)
    counts = np.zeros(n_genes, np.int64)
    for p in parts:
        items += np.diff(p.offsets)
        counts += p.counts
    if int(items.sum()) == 0:
        return empty(n_genes, compression)
    rows = _sorted_rows(parts, n_genes)
    x = rows[:, 0]
    w = rows[:, 1].astype(np.int64)
    starts, istart = _merged_bin_starts(w, counts, items, bins_per_gene(compression))
    weights = np.add.reduceat(w, starts)
    sums = np.add.reduceat(x * w, starts)
    del x, w
    mins = np.minimum.reduceat(rows[:, 2], starts)
    maxs = np.maximum.reduceat(rows[:, 3], starts)
    del rows
    means = np.divide(sums, weights, out=sums)
    np.clip(means, mins, maxs, out=means)
    offsets = np.zeros(n_genes + 1, np.int64)
    offsets[1:] = np.searchsorted(starts, istart[1:])
    return Digests(offsets, means, weights, mins, maxs, compression)
