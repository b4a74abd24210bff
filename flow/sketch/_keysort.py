"""Exact sort of ``(gene, value)`` pairs with one ``np.sort`` of packed uint64 keys.

Part of :mod:`flow.sketch._tdigest`: building, merging and bracketing digests all order
positive float64 values by gene then value. The key is ``gene | value code | position``; the
value code is the float's bit pattern (monotone for positive floats) minus the smallest one,
shifted right just enough to fit the bits left over. Runs whose code lost bits are re-sorted
exactly (:meth:`Sorted.repair`), and ties are broken by position, so the order is fully
determined. Numpy only, eager.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]
    I64 = npt.NDArray[np.int64]
    U64 = npt.NDArray[np.uint64]
    Ints = npt.NDArray[np.integer]

__all__ = ["Sorted", "sort_key", "sort_values"]

_POS_FINITE_MAX: Final = 0x7FF0_0000_0000_0000  # bits of +inf: positive finite floats are below


@dataclass(frozen=True)
class Sorted:
    """Result of :func:`sort_key`."""

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


def sort_key(values: F64, n_genes: int, fill_genes: Callable[[U64], None]) -> Sorted:
    """Sort ``(gene, value, position)`` with one ``np.sort`` of packed uint64 keys.

    The key is ``gene | value code | position``; the value code is the float's bit pattern
    (monotone for positive floats) minus the smallest one, shifted right just enough to fit
    the bits left over (``shift``; if nonzero, :meth:`Sorted.repair` finishes the job).
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
    return Sorted(key, tmp.view(np.int64), ibits, shift, vbits + ibits)


def sort_values(genes: Ints, values: F64, n_genes: int) -> tuple[F64, I64]:
    """``values`` sorted by ``(gene, value)``, and the number of values of each gene."""

    def fill(out: U64) -> None:
        out[...] = genes

    srt = sort_key(values, n_genes, fill)
    v = values[srt.order]
    moves = srt.repair(v)
    if moves is not None:
        v[moves[0]] = v[moves[1]]
    return v, srt.gene_counts(n_genes)
