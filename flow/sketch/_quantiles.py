"""Quantiles and guaranteed median brackets of the per-gene t-digests (numpy only, eager).

Part of :mod:`flow.sketch._tdigest`, which re-exports :func:`quantile`, :func:`median` and
:func:`median_bracket`. Genes are processed in ranges of about 131,000 centroids (bounded
memory); each gene's result is independent of the ranges.

Notes
-----

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._digests import gene_ranges, gene_slice
from ._keysort import sort_key

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._digests import Digests

    F64 = npt.NDArray[np.float64]
    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]

__all__ = ["median", "median_bracket", "quantile"]


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

    srt = sort_key(ev_values, n_genes, fill)
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
    >>> from flow.sketch._tdigest import from_values
    >>> median_bracket(from_values([0, 0, 0, 0], [4.0, 1.0, 3.0, 2.0], n_genes=2))
    (array([ 2., nan]), array([ 3., nan]))
    """
    lo = np.full(d.n_genes, np.nan)
    hi = np.full(d.n_genes, np.nan)
    for g0, g1 in gene_ranges(np.diff(d.offsets)):
        sub = gene_slice(d, g0, g1)
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
    for g0, g1 in gene_ranges(np.diff(d.offsets)):
        out[g0:g1] = _quantile(gene_slice(d, g0, g1), q)
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
