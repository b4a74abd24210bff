"""Dask wiring of the per-gene sketches: a fixed reduction tree over a count store's blocks.

The tree is fixed by the block grid and ``split_every`` alone (block ``i`` is always merged
with its neighbours in the same order), so the same store gives bit-identical digests on the
synchronous, threaded or distributed scheduler, with any number of workers.

All functions build graphs and compute nothing.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from .._kernels import normalized_values, require_single_chunk
from . import _tdigest

if TYPE_CHECKING:
    import dask.array as da

__all__ = ["MEDIAN_SPLIT_EVERY", "bracket_values", "nonzero_digests", "tree_merge"]

#: Fan-in of the medians' merge tree. A merge holds its inputs and output at once; with
#: 20,000 genes a merged digest is ~60 MB, so 4 keeps a merge task near 0.5 GB (8 measured
#: too much for 1.2 GiB workers at 1M cells); the tree is deeper but merges are cheap.
MEDIAN_SPLIT_EVERY = 4


def _block_cells(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    keep: np.ndarray | None,
    collapse: sp.csr_matrix | None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The block's cells passing the filter and their totals, genes collapsed if asked."""
    block = sp.csr_matrix(block)
    if keep is not None and not keep.all():
        block, n_counts = block[keep], n_counts[keep]
    if collapse is not None:
        block = sp.csr_matrix(block @ collapse)
    return block, np.asarray(n_counts, dtype=np.float64)


def _block_values(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    keep: np.ndarray | None,
    collapse: sp.csr_matrix | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(gene, value) pairs of a block's nonzero counts: value = (count / n_counts) * 10,000."""
    block, n_counts = _block_cells(block, n_counts, keep, collapse)
    block.eliminate_zeros()
    return block.indices, normalized_values(block.data, block.indptr, n_counts)


def _digest_chunk(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    keep: np.ndarray | None,
    collapse: sp.csr_matrix | None,
    compression: float,
) -> _tdigest.Digests:
    return _tdigest.from_csr(*_block_cells(block, n_counts, keep, collapse), compression)


def _merge(*parts: _tdigest.Digests) -> _tdigest.Digests:
    return _tdigest.merge(list(parts))


def tree_merge(
    parts: list[Delayed], *, split_every: int, name: str, merge: Any = _merge
) -> Delayed:
    """Merge delayed parts in a fixed tree: groups of ``split_every`` neighbours, level by level."""
    if split_every < 2:
        msg = f"split_every must be at least 2; got {split_every}."
        raise ValueError(msg)
    level = 0
    while len(parts) > 1:
        parts = [
            delayed(merge, pure=True)(
                *parts[i : i + split_every], dask_key_name=(f"{name}-L{level}", i // split_every)
            )
            for i in range(0, len(parts), split_every)
        ]
        level += 1
    return parts[0]


def _per_block(values: np.ndarray | None, counts: da.Array) -> list[np.ndarray | None]:
    if values is None:
        return [None] * counts.numblocks[0]
    edges = np.cumsum((0, *counts.chunks[0]))
    return [values[a:b] for a, b in itertools.pairwise(edges)]


def _map_blocks_delayed(
    func: Any,
    counts: da.Array,
    n_counts: np.ndarray,
    keep: np.ndarray | None,
    *args: Any,
    name: str,
) -> list[Delayed]:
    """One task ``func(block, n_counts, keep, *args)`` per cell block, keyed ``(name, i)``."""
    return [
        delayed(func, pure=True)(blk, nc, kp, *args, dask_key_name=(name, i))
        for i, (blk, nc, kp) in enumerate(
            zip(
                counts.to_delayed().ravel(),
                _per_block(n_counts, counts),
                _per_block(keep, counts),
                strict=True,
            )
        )
    ]


def nonzero_digests(
    counts: da.Array,
    n_counts: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    collapse: sp.csr_matrix | None = None,
    compression: float = _tdigest.DEFAULT_COMPRESSION,
    split_every: int = MEDIAN_SPLIT_EVERY,
) -> Delayed:
    """Per-gene t-digests of nonzero normalized values, as one lazy object (nothing computed).

    Parameters
    ----------
    counts
        ``(cell, gene)`` Dask array of CSR blocks, one chunk along genes (a count store's
        ``counts``). Its cell blocks are the leaves of the reduction tree.
    n_counts
        Total counts per cell (numpy, one per cell).
    keep
        Cells to use (``filter_pass``); None uses all.
    collapse
        Optional ``(n_genes, n_out)`` 0/1 matrix summing store genes into output genes.
    compression, split_every
        Digest compression and the fan-in of the fixed merge tree.

    Returns
    -------
    dask.delayed.Delayed
        Computes to a :class:`flow.sketch._tdigest.Digests`.

    Raises
    ------
    ChunkingError
        (a ValueError) if ``counts`` is split along genes.
    """
    require_single_chunk(counts, 1, name="counts", dim="genes")
    tok = tokenize(counts, n_counts, keep, collapse, compression, split_every)
    leaves = _map_blocks_delayed(
        _digest_chunk,
        counts,
        n_counts,
        keep,
        collapse,
        compression,
        name=f"flow-medians-digest-{tok}",
    )
    return tree_merge(leaves, split_every=split_every, name=f"flow-medians-merge-{tok}")


# ----------------------------------------------------------------- exact mode, pass 2


def _bracket_chunk(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    keep: np.ndarray | None,
    collapse: sp.csr_matrix | None,
    lo: np.ndarray,
    hi: np.ndarray,
    range_edges: np.ndarray,
) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Count values below each gene's bracket; keep (gene, value) inside it, split by gene range."""
    genes, values = _block_values(block, n_counts, keep, collapse)
    below = np.bincount(genes[values < lo[genes]], minlength=lo.size).astype(np.int64)
    inside = (values >= lo[genes]) & (values <= hi[genes])
    g_in, v_in = genes[inside], values[inside]
    order = np.argsort(g_in, kind="stable")
    g_in, v_in = g_in[order], v_in[order]
    cuts = np.searchsorted(g_in, range_edges)
    pieces = [(g_in[a:b], v_in[a:b]) for a, b in itertools.pairwise(cuts)]
    return below, pieces


def _sum_below(*parts: tuple[np.ndarray, Any]) -> tuple[np.ndarray, None]:
    return np.sum([p[0] for p in parts], axis=0), None


def _range_medians(
    r: int, g0: int, g1: int, n_nonzero: np.ndarray, below: tuple[np.ndarray, None], *chunks: Any
) -> np.ndarray:
    """Exact medians of genes [g0, g1) from the values inside their brackets."""
    genes = np.concatenate([c[1][r][0] for c in chunks]) if chunks else np.zeros(0, np.int64)
    values = np.concatenate([c[1][r][1] for c in chunks]) if chunks else np.zeros(0)
    order = np.lexsort((values, genes))
    genes, values = genes[order], values[order]
    starts = np.searchsorted(genes, np.arange(g0, g1))
    n = n_nonzero[g0:g1]
    b = below[0][g0:g1]
    out = np.full(g1 - g0, np.nan)
    has = n > 0
    lo_idx = starts + (n - 1) // 2 - b
    hi_idx = starts + n // 2 - b
    # both middle order statistics are inside the bracket by construction of the bracket
    a = values[lo_idx[has]]
    c = values[hi_idx[has]]
    out[has] = (a + c) / 2.0  # numpy's median: mean of the middle pair (a == c for odd n)
    return out


def bracket_values(
    counts: da.Array,
    n_counts: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    n_nonzero: np.ndarray,
    *,
    keep: np.ndarray | None = None,
    collapse: sp.csr_matrix | None = None,
    genes_per_range: int = 2048,
    split_every: int = MEDIAN_SPLIT_EVERY,
) -> Delayed:
    """Exact medians from a second pass that keeps only values inside per-gene brackets (lazy).

    ``lo``/``hi`` must contain both middle order statistics of each gene's nonzero values
    (see :func:`flow.sketch._tdigest.median_bracket`). The pass counts values below ``lo`` with
    a fixed tree of sums and gathers bracketed values by gene range, one task per range (never
    all genes in one task). Computes to a float64 array of medians, NaN for genes with none.
    Raises :class:`~flow.errors.ChunkingError` (a ValueError) if ``counts`` is split along genes.
    """
    require_single_chunk(counts, 1, name="counts", dim="genes")
    n_out = lo.size
    edges = np.unique(np.r_[np.arange(0, n_out, genes_per_range), n_out]).astype(np.int64)
    tok = tokenize(counts, n_counts, keep, collapse, lo, hi, genes_per_range)
    chunks = _map_blocks_delayed(
        _bracket_chunk,
        counts,
        n_counts,
        keep,
        collapse,
        lo,
        hi,
        edges,
        name=f"flow-medians-bracket-{tok}",
    )
    below = tree_merge(
        chunks, split_every=split_every, name=f"flow-medians-below-{tok}", merge=_sum_below
    )
    ranges = [
        delayed(_range_medians, pure=True)(
            r,
            int(g0),
            int(g1),
            n_nonzero,
            below,
            *chunks,
            dask_key_name=(f"flow-medians-exact-{tok}", r),
        )
        for r, (g0, g1) in enumerate(itertools.pairwise(edges))
    ]
    return delayed(np.concatenate, pure=True)(ranges, dask_key_name=f"flow-medians-exact-all-{tok}")
