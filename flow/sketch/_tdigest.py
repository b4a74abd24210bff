"""Vectorized t-digests of many genes at once (numpy + scipy only, no Dask).

DRAFT - module docstring to be finalized after measurements.
"""

from __future__ import annotations

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
    Bool = npt.NDArray[np.bool_]

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

DEFAULT_COMPRESSION: Final = 200.0
"""Default compression: at most ``compression / 2`` centroids per gene."""

TARGET_SUM: Final = 10_000.0
"""Normalized value of a count: ``(count / n_counts) * TARGET_SUM``."""

_WIDTH: Final = 0.02
"""Width of the fine region of the scale function around q = 0.5 (see module Notes)."""

_POS_FINITE_MAX: Final = 0x7FF0_0000_0000_0000  # bits of +inf: positive finite floats are below
_ARRAY_NAMES: Final = ("offsets", "means", "weights", "mins", "maxs")


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
        The digest's compression: at most ``compression / 2`` centroids per gene, and genes
        with at most that many values are stored exactly (one centroid per value).
    """

    offsets: I64
    means: F64
    weights: I64
    mins: F64
    maxs: F64
    compression: float

    def __post_init__(self) -> None:
        n = self.means.shape
        if self.offsets.ndim != 1 or self.offsets.size < 1:
            msg = f"offsets must be 1-D with n_genes + 1 entries; got shape {self.offsets.shape}."
            raise ValueError(msg)
        for name in _ARRAY_NAMES[1:]:
            arr = getattr(self, name)
            if arr.ndim != 1 or arr.shape != n:
                msg = f"{name} must be 1-D like means {n}; got shape {arr.shape}."
                raise ValueError(msg)
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != n[0]:
            msg = (
                f"offsets must start at 0 and end at the number of centroids ({n[0]}); "
                f"got {int(self.offsets[0])} and {int(self.offsets[-1])}."
            )
            raise ValueError(msg)
        if not self.compression >= 2:
            msg = f"compression must be at least 2; got {self.compression!r}."
            raise ValueError(msg)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.offsets.size - 1)

    @property
    def counts(self) -> I64:
        """Number of values per gene (int64): the sum of its centroids' weights."""
        cw = np.zeros(self.weights.size + 1, np.int64)
        np.cumsum(self.weights, out=cw[1:])
        return cw[self.offsets[1:]] - cw[self.offsets[:-1]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state arrays."""
        return sum(int(getattr(self, name).nbytes) for name in _ARRAY_NAMES)


def _n_bins(compression: float) -> int:
    return max(1, int(compression) // 2)


def _check_compression(compression: float) -> float:
    c = float(compression)
    if not c >= 2 or not np.isfinite(c):
        msg = f"compression must be a finite number >= 2; got {compression!r}."
        raise ValueError(msg)
    return c


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


# --------------------------------------------------------------------------- scale function


def _scale_asinh(q: F64, n_bins: int) -> F64:
    a = np.arcsinh(0.5 / _WIDTH)
    k = np.arcsinh((q - 0.5) * (1.0 / _WIDTH))
    k += a
    k *= n_bins / (2.0 * a)
    return k


_SCALE: Callable[[F64, int], F64] = _scale_asinh
_SCALE_MERGE: Callable[[F64, int], F64] | None = None


# --------------------------------------------------------------------------- sorting


def _sort_by_gene_value(genes: I64, values: F64, n_genes: int) -> tuple[I64, I64]:
    """Permutation sorting ``(gene, value, position)`` ascending, and the sorted genes.

    One ``np.sort`` of packed uint64 keys ``gene | value code | position``. The value code is
    the float's bit pattern (monotone for positive floats) minus the smallest one, shifted right
    just enough to fit; if that drops bits, runs of equal codes that came out of value order are
    re-sorted exactly. Ties are broken by position, so the result is fully determined.
    """
    n = values.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    bits = values.view(np.uint64)
    bmin, bmax = int(bits.min()), int(bits.max())
    gbits = max(1, int(n_genes - 1).bit_length())
    ibits = max(1, int(n - 1).bit_length())
    vbits = 64 - gbits - ibits
    if vbits < 1:  # pragma: no cover - needs more than 2**63 values
        order = np.lexsort((values, genes))
        return order.astype(np.int64), genes[order]
    shift = max(0, (bmax - bmin).bit_length() - vbits)
    key = genes.astype(np.uint64)
    key <<= np.uint64(vbits + ibits)
    code = bits - np.uint64(bmin)
    if shift:
        code >>= np.uint64(shift)
    code <<= np.uint64(ibits)
    key |= code
    del code
    key |= np.arange(n, dtype=np.uint64)
    key.sort()
    order = (key & np.uint64((1 << ibits) - 1)).astype(np.int64)
    sgenes = (key >> np.uint64(vbits + ibits)).astype(np.int64)
    if shift:
        v = values[order]
        bad = (v[1:] < v[:-1]) & (sgenes[1:] == sgenes[:-1])
        if bad.any():
            _fix_ties(order, v, key >> np.uint64(ibits), bad)
    return order, sgenes


def _fix_ties(order: I64, v: F64, hi: U64, bad: Bool) -> None:
    """Re-sort, in place, the runs of equal ``hi`` (gene and value code) that are out of order."""
    run = np.zeros(hi.size, np.int64)
    np.cumsum(hi[1:] != hi[:-1], out=run[1:])
    pos = np.flatnonzero(np.isin(run, np.unique(run[1:][bad])))
    sub = np.lexsort((order[pos], v[pos], run[pos]))
    order[pos] = order[pos][sub]


# --------------------------------------------------------------------------- compress


def _compress(
    genes: I64,
    x: F64,
    w: I64 | None,
    mn: F64 | None,
    mx: F64 | None,
    n_genes: int,
    compression: float,
) -> Digests:
    """Bin items sorted by ``(gene, x)`` into centroids; ``w is None`` means single values."""
    n_items = x.size
    n_bins = _n_bins(compression)
    if w is None:
        counts = np.bincount(genes, minlength=n_genes).astype(np.int64)
        gstart = np.zeros(n_genes + 1, np.int64)
        np.cumsum(counts, out=gstart[1:])
        mid = np.arange(n_items, dtype=np.float64)
        mid -= gstart[:-1][genes]
        mid += 0.5
    else:
        cw = np.zeros(n_items + 1, np.int64)
        np.cumsum(w, out=cw[1:])
        bounds = np.zeros(n_genes + 1, np.int64)
        np.cumsum(np.bincount(genes, minlength=n_genes), out=bounds[1:])
        gbase = cw[bounds]
        counts = gbase[1:] - gbase[:-1]
        mid = (cw[:-1] - gbase[:-1][genes]).astype(np.float64)
        mid += 0.5 * w
    n_of = counts[genes]
    q = mid / n_of
    k = (_SCALE if (w is None or _SCALE_MERGE is None) else _SCALE_MERGE)(q, n_bins)
    bins = np.floor(k).astype(np.int64)
    np.clip(bins, 0, n_bins - 1, out=bins)
    start = np.ones(n_items, np.bool_)
    if n_items > 1:
        start[1:] = (bins[1:] != bins[:-1]) | (genes[1:] != genes[:-1])
    start |= n_of <= n_bins
    starts = np.flatnonzero(start)
    cgenes = genes[starts]
    offsets = np.zeros(n_genes + 1, np.int64)
    np.cumsum(np.bincount(cgenes, minlength=n_genes), out=offsets[1:])
    if w is None:
        weights = np.diff(np.append(starts, n_items))
        sums = np.add.reduceat(x, starts) if n_items else np.zeros(0)
        mins = x[starts]
        maxs = x[np.append(starts[1:], n_items) - 1] if n_items else np.zeros(0)
    else:
        assert mn is not None
        assert mx is not None
        weights = np.add.reduceat(w, starts) if n_items else np.zeros(0, np.int64)
        sums = np.add.reduceat(x * w, starts) if n_items else np.zeros(0)
        mins = np.minimum.reduceat(mn, starts) if n_items else np.zeros(0)
        maxs = np.maximum.reduceat(mx, starts) if n_items else np.zeros(0)
    means = sums / weights
    np.clip(means, mins, maxs, out=means)
    return Digests(
        offsets=offsets,
        means=means,
        weights=weights.astype(np.int64, copy=False),
        mins=mins,
        maxs=maxs,
        compression=compression,
    )


# --------------------------------------------------------------------------- build / merge


def _check_values(genes: npt.ArrayLike, values: npt.ArrayLike, n_genes: int) -> tuple[I64, F64]:
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
        bits = v.view(np.uint64)
        if int(bits.min()) == 0 or int(bits.max()) >= _POS_FINITE_MAX:
            bad = v[~((v > 0) & (v < np.inf))][:5]
            msg = f"values must be positive and finite; got for example {bad.tolist()}."
            raise ValueError(msg)
    return g.astype(np.int64, copy=False), v


def from_values(
    genes: npt.ArrayLike,
    values: npt.ArrayLike,
    n_genes: int,
    compression: float = DEFAULT_COMPRESSION,
) -> Digests:
    """Digests of ``(gene, value)`` pairs given in any order.

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
        One digest per gene; genes without values have no centroids.

    Raises
    ------
    ValueError
        If shapes differ, a gene index is out of range, or a value is not positive and finite.
    """
    compression = _check_compression(compression)
    g, v = _check_values(genes, values, n_genes)
    if v.size == 0:
        return empty(n_genes, compression)
    order, sgenes = _sort_by_gene_value(g, v, n_genes)
    return _compress(sgenes, v[order], None, None, None, n_genes, compression)


def from_csr(
    block: sp.csr_matrix | sp.csr_array,
    n_counts: npt.ArrayLike,
    compression: float = DEFAULT_COMPRESSION,
) -> Digests:
    """Digests of the normalized nonzero values of a CSR block of cells (rows) x genes.

    Each stored nonzero count becomes ``(count / n_counts[row]) * 10_000`` in float64, in
    exactly that order of operations. Explicitly stored zeros are ignored.

    Parameters
    ----------
    block
        ``(cells, genes)`` CSR counts.
    n_counts
        Total count of each cell (one per row).
    compression
        Compression of the digests (see :class:`Digests`).

    Returns
    -------
    Digests
        One digest per column of ``block``.
    """
    if not sp.issparse(block) or block.format != "csr":
        msg = f"block must be a scipy.sparse CSR matrix or array; got {type(block).__name__}."
        raise TypeError(msg)
    nc = np.asarray(n_counts, dtype=np.float64)
    n_rows, n_genes = block.shape
    if nc.shape != (n_rows,):
        msg = f"n_counts must have one entry per row ({n_rows}); got shape {nc.shape}."
        raise ValueError(msg)
    if not block.has_canonical_format:
        block = block.copy()
        block.sum_duplicates()
    data = block.data
    rows = np.repeat(np.arange(n_rows, dtype=np.intp), np.diff(block.indptr))
    genes = block.indices
    keep = data != 0
    if not keep.all():
        data, rows, genes = data[keep], rows[keep], genes[keep]
    values = data.astype(np.float64) / nc[rows]
    values *= TARGET_SUM
    return from_values(genes, values, n_genes, compression)


def merge(parts: Sequence[Digests]) -> Digests:
    """Merge digests of the same genes: the digests of all their values together.

    Deterministic: the same parts in the same order give identical arrays (bytes). Exact
    where possible: counts are summed exactly, and a gene with at most ``compression / 2``
    values in total keeps every value.

    Parameters
    ----------
    parts
        At least one digest, all with the same ``n_genes`` and ``compression``.

    Returns
    -------
    Digests
        The merged digests.
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
                f"({p.n_genes}, {p.compression}) and ({n_genes}, {compression})."
            )
            raise ValueError(msg)
    parts = [p for p in parts if p.means.size]
    if not parts:
        return empty(n_genes, compression)
    if len(parts) == 1:
        return parts[0]
    genes = np.concatenate([np.repeat(np.arange(n_genes), np.diff(p.offsets)) for p in parts])
    means = np.concatenate([p.means for p in parts])
    order, sgenes = _sort_by_gene_value(genes, means, n_genes)
    weights = np.concatenate([p.weights for p in parts])[order]
    mins = np.concatenate([p.mins for p in parts])[order]
    maxs = np.concatenate([p.maxs for p in parts])[order]
    return _compress(sgenes, means[order], weights, mins, maxs, n_genes, compression)


# --------------------------------------------------------------------------- queries


def _positions(d: Digests) -> tuple[I64, I64]:
    """Global rank of each centroid's first value, and each gene's first rank (n_genes + 1)."""
    cw = np.zeros(d.weights.size + 1, np.int64)
    np.cumsum(d.weights, out=cw[1:])
    return cw[:-1], cw[d.offsets]


def _rank_bounds(d: Digests, k_lo: I64, k_hi: I64) -> tuple[F64, F64]:
    """Guaranteed ``lo <= x_(k_lo)`` and ``x_(k_hi) <= hi`` per gene (0-based ranks).

    A centroid of weight ``w`` holds its min and its max as two of its values (one if
    ``min == max``), so with ``m`` = min and ``M`` = max of each centroid:
    ``count(x < v) <= sum_{m < v} (w - 1) + #{M < v}`` and
    ``count(x <= v) >= sum_{M <= v} (w - 1) + #{m <= v}``.
    Both bounds are steps at the centroids' mins and maxs, so the tightest ``lo`` and ``hi``
    are found among those by one sort of the ``2 * n_centroids`` events per gene.
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
    order, sg = _sort_by_gene_value(ev_genes, ev_values, n_genes)
    sv = ev_values[order]
    is_min = order < nc
    wm1 = np.concatenate([d.weights, d.weights])[order] - 1
    # events per gene: [estart[g], estart[g+1])
    estart = 2 * d.offsets
    # tie groups of equal (gene, value)
    new = np.ones(sv.size, np.bool_)
    new[1:] = (sv[1:] != sv[:-1]) | (sg[1:] != sg[:-1])
    grp = np.cumsum(new) - 1
    gfirst = np.flatnonzero(new)
    glast = np.append(gfirst[1:], sv.size) - 1

    # lo: U(v) = sum over events with value < v of (w-1 for mins, 1 for maxs)
    e_lo = np.where(is_min, wm1, 1)
    c_lo = np.zeros(sv.size + 1, np.int64)
    np.cumsum(e_lo, out=c_lo[1:])
    u = c_lo[gfirst[grp]] - c_lo[estart[:-1][sg]]
    ok = u <= k_lo[sg]
    n_ok = np.bincount(sg[ok], minlength=n_genes)
    has = np.diff(d.offsets) > 0
    lo[has] = sv[estart[:-1][has] + n_ok[has] - 1]

    # hi: L(v) = sum over events with value <= v of (w-1 for maxs, 1 for mins)
    e_hi = np.where(is_min, 1, wm1)
    c_hi = np.zeros(sv.size + 1, np.int64)
    np.cumsum(e_hi, out=c_hi[1:])
    low = c_hi[glast[grp] + 1] - c_hi[estart[:-1][sg]]
    ok = low >= k_hi[sg] + 1
    n_ok = np.bincount(sg[ok], minlength=n_genes)
    hi[has] = sv[estart[1:][has] - n_ok[has]]
    return lo, hi


def median_bracket(d: Digests) -> tuple[F64, F64]:
    """Guaranteed bounds on each gene's two middle values.

    For a gene with ``n`` values, both order statistics of 0-based ranks ``(n - 1) // 2`` and
    ``n // 2`` lie in ``[lo, hi]`` (so does the exact median). The bounds use only what the
    state proves (centroid mins, maxs and weights), and are the tightest such bounds.

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    lo, hi
        float64 per gene, NaN for genes without values.
    """
    n = d.counts
    return _rank_bounds(d, (n - 1) // 2, n // 2)


def quantile(d: Digests, q: float) -> F64:
    """Estimated ``q``-quantile of each gene's values.

    Linear interpolation between centroid centres, as numpy's default ("linear") method does
    between order statistics: the centroid holding ranks ``[r, r + w)`` sits at rank
    ``r + (w - 1) / 2``, the target rank is ``q * (n - 1)``, and below the first (above the
    last) centre the gene's min (max) is used. The estimate is then clamped to the
    guaranteed bounds of the two order statistics around the target rank. Genes stored
    exactly get numpy's exact result.

    Parameters
    ----------
    d
        The digests.
    q
        Quantile in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        float64 per gene, NaN for genes without values.
    """
    q = float(q)
    if not 0.0 <= q <= 1.0:
        msg = f"q must be in [0, 1]; got {q!r}."
        raise ValueError(msg)
    n_genes = d.n_genes
    out = np.full(n_genes, np.nan)
    counts = d.counts
    has = counts > 0
    if not has.any():
        return out
    first, gfirst = _positions(d)
    # twice the centre rank of each centroid, globally increasing
    centre2 = 2 * first + d.weights - 1
    t = q * (counts - 1)  # target rank within gene
    t2 = 2.0 * (gfirst[:-1] + t)  # exact for q = 0.5
    g = np.flatnonzero(has)
    i = np.searchsorted(centre2, t2[g], side="right") - 1  # last centre <= target
    c0, c1 = d.offsets[g], d.offsets[g + 1] - 1
    before = i < c0
    after = i >= c1
    ia = np.clip(i, c0, c1)
    ib = np.clip(i + 1, c0, c1)
    xa = centre2[ia].astype(np.float64)
    xb = centre2[ib].astype(np.float64)
    ya = d.means[ia]
    yb = d.means[ib]
    # below the first centre: from (rank 0, min) ; above the last: to (rank n - 1, max)
    xa = np.where(before, 2.0 * gfirst[g], xa)
    ya = np.where(before, d.mins[c0], ya)
    xb = np.where(after, 2.0 * (gfirst[g] + counts[g] - 1), xb)
    yb = np.where(after, d.maxs[c1], yb)
    span = xb - xa
    f = np.divide(t2[g] - xa, span, out=np.zeros_like(span), where=span > 0)
    np.clip(f, 0.0, 1.0, out=f)
    est = ya * (1.0 - f) + yb * f
    k_lo = np.floor(t).astype(np.int64)
    k_hi = np.ceil(t).astype(np.int64)
    lo, hi = _rank_bounds(d, k_lo, k_hi)
    out[g] = np.clip(est, lo[g], hi[g])
    return out


def median(d: Digests) -> F64:
    """Estimated median of each gene's values (``quantile(d, 0.5)``).

    Exact (equal to ``numpy.median``) for genes stored exactly, i.e. with at most
    ``compression / 2`` values; always inside :func:`median_bracket`.

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    numpy.ndarray
        float64 per gene, NaN for genes without values.
    """
    return quantile(d, 0.5)


# --------------------------------------------------------------------------- storage


def to_arrays(d: Digests) -> dict[str, npt.NDArray[np.generic]]:
    """The state as flat arrays for storage (for example one Zarr array each).

    Returns
    -------
    dict
        ``offsets``, ``means``, ``weights``, ``mins``, ``maxs`` and a 0-d ``compression``.
    """
    out: dict[str, npt.NDArray[np.generic]] = {n: getattr(d, n) for n in _ARRAY_NAMES}
    out["compression"] = np.asarray(d.compression, dtype=np.float64)
    return out


def from_arrays(arrays: Mapping[str, npt.ArrayLike]) -> Digests:
    """Digests from the arrays of :func:`to_arrays` (read back from storage).

    Parameters
    ----------
    arrays
        Mapping with the keys written by :func:`to_arrays`.

    Returns
    -------
    Digests
        The digests, with arrays converted to their dtypes.
    """
    missing = [n for n in (*_ARRAY_NAMES, "compression") if n not in arrays]
    if missing:
        msg = f"digest arrays are missing {missing}; expected the keys of to_arrays()."
        raise ValueError(msg)
    return Digests(
        offsets=np.asarray(arrays["offsets"], dtype=np.int64),
        means=np.asarray(arrays["means"], dtype=np.float64),
        weights=np.asarray(arrays["weights"], dtype=np.int64),
        mins=np.asarray(arrays["mins"], dtype=np.float64),
        maxs=np.asarray(arrays["maxs"], dtype=np.float64),
        compression=float(np.asarray(arrays["compression"])),
    )
