"""Vectorized t-digests of many genes at once (numpy + scipy only, no Dask).

One t-digest per gene, for all genes together: no Python loop over genes and no per-gene
objects. The state (:class:`Digests`) is five flat arrays, gene-major, so it pickles cheaply,
stores as flat Zarr arrays and merges through a Dask tree. It exists to estimate each gene's
median of nonzero normalized values, ``(count / n_counts) * 10_000``, in one pass over a
corpus, and to bracket that median for the exact two-pass mode.

Functions here compute eagerly on numpy arrays (they are the kernels of a Dask reduction).

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

**Quantiles** (:func:`quantile`). Numpy's "linear" interpolation between order statistics,
with each centroid standing at its centre rank ``before + (w - 1) / 2`` (a weight-1
centroid is a point), the gene's min and max at ranks ``0`` and ``n - 1``; the estimate is
then clamped to the guaranteed bounds of the order statistics around the target rank
(:func:`median_bracket` for the median).

**Bracket** (:func:`median_bracket`). A centroid's min and max are two of its values
(one if equal), so ``count(x < v) <= sum_{min < v} (w - 1) + #{max < v}`` and
``count(x <= v) >= sum_{max <= v} (w - 1) + #{min <= v}``. The tightest ``lo`` and ``hi``
satisfying these for ranks ``(n - 1) // 2`` and ``n // 2`` are found among the centroids'
mins and maxs. For a freshly built digest this is exactly the min and max of the centroids
holding the middle ranks.

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

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]
    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]
    Ints = npt.NDArray[np.integer]

__all__ = [
    "DEFAULT_COMPRESSION",
    "TARGET_SUM",
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

DEFAULT_COMPRESSION: Final = 200.0
"""Default compression: at most 100 centroids per gene; genes with <= 100 values are exact.

Median relative error p99 ~0.25% after a merge tree on realistic data (module Notes)."""

TARGET_SUM: Final = 10_000.0
"""Normalized value of a count: ``(count / n_counts) * TARGET_SUM``."""

_CHUNK_ITEMS: Final = 1 << 17
"""Centroids per gene range in merges and queries (bounds temporary memory)."""

_BUILD_ITEMS: Final = 1 << 16
"""Values sorted at once by :func:`from_csr` (gene ranges that stay in cache: 2.3x faster
than one sort of a 4,096-cell block's 8 M values, measured)."""
_POS_FINITE_MAX: Final = 0x7FF0_0000_0000_0000  # bits of +inf: positive finite floats are below
_ARRAY_NAMES: Final = ("offsets", "means", "weights", "mins", "maxs")
_DTYPES: Final = {
    "offsets": np.int64,
    "means": np.float64,
    "weights": np.int64,
    "mins": np.float64,
    "maxs": np.float64,
}


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class Digests:
    """Centroids of one t-digest per gene, gene-major, as flat arrays.

    Parameters
    ----------
    offsets
        int64, shape ``(n_genes + 1,)``: the centroids of gene ``g`` are
        ``[offsets[g], offsets[g + 1])``.
    means
        float64, centroid means, ascending within each gene.
    weights
        int64, number of values merged into each centroid (at least 1).
    mins, maxs
        float64, smallest and largest value merged into each centroid.
    compression
        At most ``compression // 2`` centroids per gene; a gene with at most that many
        values keeps each value (its quantiles are exact).

    Raises
    ------
    TypeError
        If an array is not a numpy array of its dtype.
    ValueError
        If the shapes, the ends of ``offsets`` or ``compression`` are invalid (checks that
        do not read the data).
    """

    offsets: I64
    means: F64
    weights: I64
    mins: F64
    maxs: F64
    compression: float

    def __post_init__(self) -> None:
        for name, dtype in _DTYPES.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
                got = f"{type(arr).__name__} of {getattr(arr, 'dtype', '?')}"
                msg = f"{name} must be a numpy array of dtype {np.dtype(dtype)}; got {got}."
                raise TypeError(msg)
            if arr.ndim != 1:
                msg = f"{name} must be 1-D; got shape {arr.shape}."
                raise ValueError(msg)
        n = self.means.shape
        for name in _ARRAY_NAMES[2:]:
            if getattr(self, name).shape != n:
                msg = f"{name} must have the shape of means {n}; got {getattr(self, name).shape}."
                raise ValueError(msg)
        if self.offsets.size < 1 or self.offsets[0] != 0 or self.offsets[-1] != n[0]:
            msg = (
                f"offsets must have n_genes + 1 entries, start at 0 and end at the number of "
                f"centroids ({n[0]}); got {self.offsets[:1]} ... {self.offsets[-1:]}."
            )
            raise ValueError(msg)
        _check_compression(self.compression)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.offsets.size - 1)

    @property
    def counts(self) -> I64:
        """Number of values of each gene (int64): the sum of its centroids' weights."""
        cw = np.zeros(self.weights.size + 1, np.int64)
        np.cumsum(self.weights, out=cw[1:])
        return cw[self.offsets[1:]] - cw[self.offsets[:-1]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        return sum(int(getattr(self, name).nbytes) for name in _ARRAY_NAMES)


def _check_compression(compression: float) -> float:
    c = float(compression)
    if not (c >= 2 and np.isfinite(c)):
        msg = f"compression must be a finite number >= 2; got {compression!r}."
        raise ValueError(msg)
    return c


def _n_bins(compression: float) -> int:
    return int(compression) // 2


def empty(n_genes: int, compression: float = DEFAULT_COMPRESSION) -> Digests:
    """Digests of ``n_genes`` genes that have seen no values.

    Parameters
    ----------
    n_genes
        Number of genes.
    compression
        Compression of the digests (see :class:`Digests`).

    Returns
    -------
    Digests
        No centroids; every gene's count is 0.

    Examples
    --------
    >>> empty(3).counts
    array([0, 0, 0])
    """
    if n_genes < 0:
        msg = f"n_genes must be >= 0; got {n_genes}."
        raise ValueError(msg)
    return Digests(
        offsets=np.zeros(n_genes + 1, np.int64),
        means=np.zeros(0, np.float64),
        weights=np.zeros(0, np.int64),
        mins=np.zeros(0, np.float64),
        maxs=np.zeros(0, np.float64),
        compression=_check_compression(compression),
    )


def _gene_slice(d: Digests, g0: int, g1: int) -> Digests:
    """Genes ``[g0, g1)`` of ``d`` (views of its arrays)."""
    a, b = int(d.offsets[g0]), int(d.offsets[g1])
    return Digests(
        d.offsets[g0 : g1 + 1] - a,
        d.means[a:b],
        d.weights[a:b],
        d.mins[a:b],
        d.maxs[a:b],
        d.compression,
    )


def _concat(pieces: Sequence[Digests], compression: float) -> Digests:
    """Digests of consecutive gene ranges, joined."""
    sizes = np.cumsum([0, *(p.means.size for p in pieces)])
    offsets = np.concatenate(
        [
            np.zeros(1, np.int64),
            *(p.offsets[1:] + s for p, s in zip(pieces, sizes[:-1], strict=True)),
        ]
    )
    return Digests(
        offsets,
        np.concatenate([p.means for p in pieces]),
        np.concatenate([p.weights for p in pieces]),
        np.concatenate([p.mins for p in pieces]),
        np.concatenate([p.maxs for p in pieces]),
        compression,
    )


def _gene_ranges(items: I64, target: int = _CHUNK_ITEMS) -> list[tuple[int, int]]:
    """Consecutive gene ranges of about ``target`` items each (at least one gene each)."""
    n_genes = items.size
    if n_genes == 0:
        return []
    cum = np.cumsum(items)
    cuts = np.searchsorted(cum, np.arange(target, int(cum[-1]), target), side="right")
    edges = np.unique(np.r_[0, cuts, n_genes])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


# --------------------------------------------------------------------------- sorting


@dataclass(frozen=True)
class _Sorted:
    """Result of :func:`_sort_key`."""

    key: U64
    order: I64
    ibits: int
    shift: int
    gshift: int

    def gene_counts(self, n_genes: int) -> I64:
        """Number of sorted values of each gene (from the gene bits of the sorted keys)."""
        bounds = np.arange(1, n_genes, dtype=np.uint64) << np.uint64(self.gshift)
        edges = np.empty(n_genes + 1, np.int64)
        edges[0], edges[-1] = 0, self.key.size
        edges[1:-1] = np.searchsorted(self.key, bounds)
        return np.diff(edges)

    def repair(self, v: F64) -> tuple[I64, I64] | None:
        """Where the value code was lossy, the moves that make ``v`` exactly sorted.

        ``v`` is the values in key order. Only runs of equal ``(gene, value code)``
        (contiguous, since the keys are sorted) can be out of order; those runs are re-sorted
        by ``(value, position)``. Returns ``(pos, src)``: apply ``a[pos] = a[src]`` to every
        array in key order (``order`` is done here), or None if nothing moves.
        """
        if not self.shift:
            return None
        cand = np.flatnonzero(v[1:] < v[:-1])
        if cand.size == 0:
            return None
        sh = np.uint64(self.ibits)
        hi = self.key[cand] >> sh
        same = hi == self.key[cand + 1] >> sh
        if not same.any():
            return None
        runs = np.unique(hi[same])
        first = np.searchsorted(self.key, runs << sh, side="left")
        end = np.searchsorted(self.key, (runs + np.uint64(1)) << sh, side="left")
        lens = end - first
        pos = np.repeat(first - np.cumsum(np.r_[0, lens[:-1]]), lens) + np.arange(lens.sum())
        run_of = np.repeat(np.arange(runs.size), lens)
        src = pos[np.lexsort((self.order[pos], v[pos], run_of))]
        self.order[pos] = self.order[src]
        return pos, src


def _sort_key(values: F64, n_genes: int, fill_genes: Callable[[U64], None]) -> _Sorted:
    """Sort ``(gene, value, position)`` with one ``np.sort`` of packed uint64 keys.

    The key is ``gene | value code | position``; the value code is the float's bit pattern
    (monotone for positive floats) minus the smallest one, shifted right just enough to fit
    the bits left over (``shift``; if nonzero, :meth:`_Sorted.repair` finishes the job).
    ``fill_genes`` writes the gene index of each value into the uint64 array it is given.

    Raises
    ------
    ValueError
        If a value is not positive and finite.
    """
    n = values.size
    bits = values.view(np.uint64)
    bmin, bmax = int(bits.min()), int(bits.max())
    if bmin == 0 or bmax >= _POS_FINITE_MAX:  # zero, negative (sign bit), inf or nan
        bad = values[~((values > 0) & (values < np.inf))][:5]
        msg = f"values must be positive and finite; got for example {bad.tolist()}."
        raise ValueError(msg)
    gbits = max(1, (n_genes - 1).bit_length())
    ibits = max(1, (n - 1).bit_length())
    vbits = 64 - gbits - ibits
    if vbits < 8:  # pragma: no cover - needs about 2**50 values
        msg = f"too many values ({n}) and genes ({n_genes}) to sort in one call."
        raise ValueError(msg)
    shift = max(0, (bmax - bmin).bit_length() - vbits)
    key = np.subtract(bits, np.uint64(bmin))
    if shift:
        key >>= np.uint64(shift)
    key <<= np.uint64(ibits)
    tmp = np.arange(n, dtype=np.uint64)
    key |= tmp
    fill_genes(tmp)
    tmp <<= np.uint64(vbits + ibits)
    key |= tmp
    key.sort()
    np.bitwise_and(key, np.uint64((1 << ibits) - 1), out=tmp)
    return _Sorted(key, tmp.view(np.int64), ibits, shift, vbits + ibits)


def _sort_values(genes: Ints, values: F64, n_genes: int) -> tuple[F64, I64]:
    """``values`` sorted by ``(gene, value)``, and the number of values of each gene."""

    def fill(out: U64) -> None:
        out[...] = genes

    srt = _sort_key(values, n_genes, fill)
    v = values[srt.order]
    moves = srt.repair(v)
    if moves is not None:
        v[moves[0]] = v[moves[1]]
    return v, srt.gene_counts(n_genes)


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
    v, counts = _sort_values(genes, values, n_genes)
    return _from_sorted(v, counts, n_genes, compression)


def _from_sorted(v: F64, counts: I64, n_genes: int, compression: float) -> Digests:
    """Digests of values sorted by (gene, value), ``counts[g]`` values for gene ``g``."""
    n_bins = _n_bins(compression)
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
    compression = _check_compression(compression)
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
    exactly that order of operations. Explicitly stored zeros are ignored; duplicate entries
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
    compression = _check_compression(compression)
    nnz = np.diff(block.indptr)
    bad_rows = np.flatnonzero((nnz > 0) & ~((nc > 0) & (nc < np.inf)))
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
    for g0, g1 in _gene_ranges(counts, _BUILD_ITEMS):
        p0, p1 = int(csc.indptr[g0]), int(csc.indptr[g1])
        values = np.divide(csc.data[p0:p1], nc[csc.indices[p0:p1]], dtype=np.float64)
        values *= TARGET_SUM
        ordered[p0:p1], _ = _sort_values(
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
        _merge([_gene_slice(p, g0, g1) for p in parts], g1 - g0, compression)
        for g0, g1 in _gene_ranges(items)
    ]
    return _concat(pieces, compression)


def _merge(parts: list[Digests], n_genes: int, compression: float) -> Digests:
    """Merge of gene-aligned parts (the kernel of :func:`merge`, for one gene range)."""
    n_bins = _n_bins(compression)
    items = np.zeros(n_genes, np.int64)
    counts = np.zeros(n_genes, np.int64)
    for p in parts:
        items += np.diff(p.offsets)
        counts += p.counts
    edges = np.cumsum([0, *(p.means.size for p in parts)])
    n_items = int(edges[-1])
    if n_items == 0:
        return empty(n_genes, compression)
    means = np.concatenate([p.means for p in parts])
    rows = np.empty((n_items, 4), np.float64)  # (mean, weight, min, max): one gather below
    for p, a, b in zip(parts, edges[:-1], edges[1:], strict=True):
        rows[a:b, 0] = p.means
        rows[a:b, 1] = p.weights
        rows[a:b, 2] = p.mins
        rows[a:b, 3] = p.maxs
    gene_ids = np.arange(n_genes, dtype=np.uint64)

    def fill(out: U64) -> None:
        for p, a, b in zip(parts, edges[:-1], edges[1:], strict=True):
            out[a:b] = np.repeat(gene_ids, np.diff(p.offsets))

    srt = _sort_key(means, n_genes, fill)
    del means
    rows = np.take(rows, srt.order, axis=0)
    moves = srt.repair(rows[:, 0])
    if moves is not None:
        rows[moves[0]] = rows[moves[1]]
    del srt, moves
    x = rows[:, 0]
    w = rows[:, 1].astype(np.int64)
    # bin of each centroid: floor(n_bins * (2 * before + w) / (2 * n)), before = gene's
    # weight ahead of it; integer arithmetic
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
    new = np.empty(n_items, np.bool_)
    new[0] = True
    np.not_equal(b[1:], b[:-1], out=new[1:])
    del b
    # a gene's first centroid starts a bin; a gene with n <= n_bins values has only weight-1
    # centroids, and those land in distinct bins (consecutive ones are n_bins / n >= 1 apart)
    new[istart[:-1][items > 0]] = True
    starts = np.flatnonzero(new)
    del new
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


# --------------------------------------------------------------------------- queries


def _rank_bounds(d: Digests, k_lo: I64, k_hi: I64) -> tuple[F64, F64]:
    """Guaranteed ``lo <= x_(k_lo)`` and ``x_(k_hi) <= hi`` per gene (0-based ranks).

    With ``m``, ``M``, ``w`` a centroid's min, max and weight: ``count(x < v) <= U(v) =
    sum_{m < v} (w - 1) + #{M < v}`` and ``count(x <= v) >= L(v) = sum_{M <= v} (w - 1) +
    #{m <= v}``. ``lo`` is the largest min or max ``v`` with ``U(v) <= k_lo`` and ``hi``
    the smallest with ``L(v) >= k_hi + 1``: one sort of the ``2 * n_centroids`` events.
    Genes without values get NaN.
    """
    n_genes = d.n_genes
    nc = d.means.size
    lo = np.full(n_genes, np.nan)
    hi = np.full(n_genes, np.nan)
    if nc == 0:
        return lo, hi
    cgenes = np.repeat(np.arange(n_genes), np.diff(d.offsets))
    ev_genes = np.concatenate([cgenes, cgenes])
    ev_values = np.concatenate([d.mins, d.maxs])

    def fill(out: U64) -> None:
        out[...] = ev_genes

    srt = _sort_key(ev_values, n_genes, fill)
    order = srt.order
    sv = ev_values[order]
    moves = srt.repair(sv)
    if moves is not None:
        sv[moves[0]] = sv[moves[1]]
    del srt, moves
    sg = ev_genes[order]
    is_min = order < nc
    wm1 = np.concatenate([d.weights, d.weights])[order] - 1
    estart = 2 * d.offsets  # events of gene g: [estart[g], estart[g + 1])
    base = estart[:-1][sg]
    # tie groups of equal (gene, value): bounds use all events of a tie at once
    new = np.ones(sv.size, np.bool_)
    new[1:] = (sv[1:] != sv[:-1]) | (sg[1:] != sg[:-1])
    grp = np.cumsum(new) - 1
    tie_first = np.flatnonzero(new)
    tie_end = np.append(tie_first[1:], sv.size)
    has = np.diff(d.offsets) > 0

    c = np.zeros(sv.size + 1, np.int64)
    np.cumsum(np.where(is_min, wm1, 1), out=c[1:])
    ok = (c[tie_first[grp]] - c[base]) <= k_lo[sg]  # U(v) <= k_lo: a prefix of each gene
    n_ok = np.bincount(sg[ok], minlength=n_genes)
    lo[has] = sv[estart[:-1][has] + n_ok[has] - 1]

    np.cumsum(np.where(is_min, 1, wm1), out=c[1:])
    ok = (c[tie_end[grp]] - c[base]) >= k_hi[sg] + 1  # L(v) > k_hi: a suffix of each gene
    n_ok = np.bincount(sg[ok], minlength=n_genes)
    hi[has] = sv[estart[1:][has] - n_ok[has]]
    return lo, hi


def median_bracket(d: Digests) -> tuple[F64, F64]:
    """Guaranteed bounds on each gene's two middle values (computes eagerly).

    For a gene with ``n`` values, both order statistics of 0-based ranks ``(n - 1) // 2`` and
    ``n // 2`` lie in ``[lo, hi]`` (so does its exact median). The bounds use only what the
    state proves (centroid mins, maxs and weights) and are the tightest such bounds; for a
    gene stored exactly they are its two middle values.

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    lo, hi
        float64 per gene, NaN for genes without values.

    Examples
    --------
    >>> median_bracket(from_values([0, 0, 0, 0], [4.0, 1.0, 3.0, 2.0], n_genes=2))
    (array([ 2., nan]), array([ 3., nan]))
    """
    lo = np.full(d.n_genes, np.nan)
    hi = np.full(d.n_genes, np.nan)
    for g0, g1 in _gene_ranges(np.diff(d.offsets)):
        sub = _gene_slice(d, g0, g1)
        n = sub.counts
        lo[g0:g1], hi[g0:g1] = _rank_bounds(sub, (n - 1) // 2, n // 2)
    return lo, hi


def _quantile(d: Digests, q: float) -> F64:
    out = np.full(d.n_genes, np.nan)
    counts = d.counts
    g = np.flatnonzero(counts > 0)
    if g.size == 0:
        return out
    cw = np.zeros(d.weights.size + 1, np.int64)
    np.cumsum(d.weights, out=cw[1:])
    gfirst = cw[d.offsets]  # rank of each gene's first value, counted over all genes
    centre2 = 2 * cw[:-1] + d.weights - 1  # twice each centroid's centre rank: increasing
    t = q * (counts[g] - 1)  # target rank within the gene
    base2 = 2 * gfirst[:-1][g]
    i = np.searchsorted(centre2, base2 + 2.0 * t, side="right") - 1  # last centre <= target
    c0, c1 = d.offsets[g], d.offsets[g + 1] - 1
    before, after = i < c0, i >= c1
    ia, ib = np.clip(i, c0, c1), np.clip(i + 1, c0, c1)
    # ranks within the gene (exact integers); below the first centre interpolate from
    # (rank 0, min), above the last one to (rank n - 1, max)
    xa = np.where(before, 0, centre2[ia] - base2).astype(np.float64)
    xb = np.where(after, 2 * (counts[g] - 1), centre2[ib] - base2).astype(np.float64)
    ya = np.where(before, d.mins[c0], d.means[ia])
    yb = np.where(after, d.maxs[c1], d.means[ib])
    span = xb - xa
    f = np.divide(2.0 * t - xa, span, out=np.zeros_like(span), where=span > 0)
    np.clip(f, 0.0, 1.0, out=f)
    est = ya * (1.0 - f) + yb * f  # (ya + yb) / 2 exactly when f = 1/2, like numpy's median
    k_lo = np.zeros(d.n_genes, np.int64)
    k_hi = np.zeros(d.n_genes, np.int64)
    k_lo[g], k_hi[g] = np.floor(t), np.ceil(t)
    lo, hi = _rank_bounds(d, k_lo, k_hi)
    out[g] = np.clip(est, lo[g], hi[g])
    return out


def quantile(d: Digests, q: float) -> F64:
    """Estimated ``q``-quantile of each gene's values (computes eagerly).

    Numpy's default ("linear") interpolation between order statistics, with each centroid
    standing at its centre rank (ranks ``[r, r + w)`` give ``r + (w - 1) / 2``) and the
    gene's min and max at ranks ``0`` and ``n - 1``; the target rank is ``q * (n - 1)``.
    The estimate is clamped to the guaranteed bounds of the order statistics on either
    side of the target rank, so ``q = 0`` and ``q = 1`` give the exact min and max.

    Parameters
    ----------
    d
        The digests.
    q
        Quantile in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        float64 per gene, NaN for genes without values. For a gene stored exactly this is
        numpy's ``quantile`` up to rounding, and exactly ``numpy.median`` for ``q = 0.5``.

    Raises
    ------
    ValueError
        If ``q`` is not in ``[0, 1]``.
    """
    q = float(q)
    if not 0.0 <= q <= 1.0:
        msg = f"q must be in [0, 1]; got {q!r}."
        raise ValueError(msg)
    out = np.full(d.n_genes, np.nan)
    for g0, g1 in _gene_ranges(np.diff(d.offsets)):
        out[g0:g1] = _quantile(_gene_slice(d, g0, g1), q)
    return out


def median(d: Digests) -> F64:
    """Estimated median of each gene's values: ``quantile(d, 0.5)`` (computes eagerly).

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    numpy.ndarray
        float64 per gene, NaN for genes without values; equal to ``numpy.median`` for a
        gene stored exactly, and always inside :func:`median_bracket`.
    """
    return quantile(d, 0.5)


# --------------------------------------------------------------------------- storage


def to_arrays(d: Digests) -> dict[str, npt.NDArray[np.generic]]:
    """The state as flat arrays for storage (for example one Zarr array each).

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    dict
        ``offsets``, ``means``, ``weights``, ``mins``, ``maxs`` (the state's own arrays, not
        copies) and a 0-d float64 ``compression``.
    """
    out: dict[str, npt.NDArray[np.generic]] = {n: getattr(d, n) for n in _ARRAY_NAMES}
    out["compression"] = np.asarray(d.compression, dtype=np.float64)
    return out


def from_arrays(arrays: Mapping[str, npt.ArrayLike]) -> Digests:
    """Digests from the arrays of :func:`to_arrays` (read back from storage).

    Parameters
    ----------
    arrays
        Mapping with the keys written by :func:`to_arrays`; array-likes are read into
        numpy arrays of the state's dtypes.

    Returns
    -------
    Digests
        The digests.

    Raises
    ------
    ValueError
        If a key is missing or the arrays are inconsistent.

    Examples
    --------
    >>> d = from_values([0, 1, 1], [1.0, 2.0, 4.0], n_genes=2)
    >>> median(from_arrays(to_arrays(d)))
    array([1., 3.])
    """
    missing = [n for n in (*_ARRAY_NAMES, "compression") if n not in arrays]
    if missing:
        msg = f"digest arrays are missing {missing}; expected the keys of to_arrays()."
        raise ValueError(msg)
    return Digests(
        offsets=np.asarray(arrays["offsets"], dtype=np.int64).reshape(-1),
        means=np.asarray(arrays["means"], dtype=np.float64).reshape(-1),
        weights=np.asarray(arrays["weights"], dtype=np.int64).reshape(-1),
        mins=np.asarray(arrays["mins"], dtype=np.float64).reshape(-1),
        maxs=np.asarray(arrays["maxs"], dtype=np.float64).reshape(-1),
        compression=float(np.asarray(arrays["compression"])),
    )
