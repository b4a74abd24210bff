"""Dask wiring of the rank kernel: ``map_blocks`` over a count store's cell blocks.

:func:`rank_cells` builds the lazy graph; nothing is computed. The shared inputs (gene map,
medians, tokens) enter the graph once, as one key every block task depends on, not embedded
per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from .._kernels import require_single_chunk
from ..errors import VocabularyError
from . import _kernels

if TYPE_CHECKING:
    import scipy.sparse as sp

    from ..vocab import GeneMap

__all__ = ["RankContext", "RankedCells", "flat_context", "rank_cells", "rank_flat", "ranked_blocks"]


@dataclass(frozen=True)
class RankContext:
    """What every block needs: the gene map, and per kept column its median and token."""

    gene_map: GeneMap
    medians: np.ndarray
    tokens: np.ndarray
    width: int
    pad: int
    count_dtype: np.dtype[Any]


@dataclass(frozen=True)
class RankedCells:
    """Lazy ranking of every cell: see :func:`rank_cells`."""

    tokens: da.Array
    counts: da.Array
    lengths: da.Array
    blocks: da.Array  # the per-block result tuples the three arrays are taken from


def _rank_block(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    ctx: RankContext,
    block_info: dict[Any, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens, counts, lengths = _rank_block_flat(block, n_counts, ctx, block_info)
    return (
        _kernels.padded(tokens, lengths, ctx.width, ctx.pad),
        _kernels.padded(counts, lengths, ctx.width, 0),
        lengths,
    )


def _rank_block_flat(
    block: sp.csr_matrix,
    n_counts: np.ndarray,
    ctx: RankContext,
    block_info: dict[Any, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    row0 = block_info[0]["array-location"][0][0] if block_info else 0
    return rank_flat(block, n_counts, ctx, row0)


def rank_flat(
    block: sp.csr_matrix, n_counts: np.ndarray, ctx: RankContext, row0: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of store genes ranked flat: ``(tokens, counts, lengths)`` of
    :func:`flow.encode._kernels.rank_block_flat` (eager; what each block task runs)."""
    kept = ctx.gene_map.apply(block, sort=False)  # the kernel's ranking sorts the rows anyway
    tokens, counts, lengths = _kernels.rank_block_flat(
        kept, np.ravel(n_counts), ctx.medians, ctx.tokens, row_offset=row0, rows_unique=True
    )
    return tokens, counts.astype(ctx.count_dtype, copy=False), lengths


def _take(part: tuple[np.ndarray, ...], i: int) -> np.ndarray:
    return part[i]


def _take_lengths(parts: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    # ``parts``: the blocks of one cell block along the (single-chunk) rank axis, unconcatenated
    return parts[0][2]


def _block_results(
    counts: da.Array, n_counts: np.ndarray, ctx: RankContext, tok: str, *, flat: bool = False
) -> da.Array:
    """One task per cell block: ``(tokens, counts, lengths)`` of :func:`_rank_block` (or of
    :func:`_rank_block_flat` with ``flat``)."""
    shared: Delayed = delayed(ctx, name=f"flow-rank-context-{tok}")
    nc = da.from_array(
        n_counts.astype(np.float64), chunks=(counts.chunks[0],), name=f"flow-n-counts-{tok}"
    )
    return da.map_blocks(
        _rank_block_flat if flat else _rank_block,
        counts,
        nc[:, None],
        shared,
        chunks=(counts.chunks[0], (ctx.width,)),
        dtype=object,
        meta=np.empty((0, 0), dtype=object),
        name=f"flow-rank{'-flat' if flat else ''}-{tok}",
    )


def _split_results(blocks: da.Array, ctx: RankContext, tok: str) -> RankedCells:
    """The three arrays taken from the per-block result tuples."""
    dtype = ctx.tokens.dtype
    tokens = da.map_blocks(
        _take, blocks, 0, dtype=dtype, meta=np.empty((0, 0), dtype), name=f"flow-rank-tokens-{tok}"
    )
    ranked_counts = da.map_blocks(
        _take,
        blocks,
        1,
        dtype=ctx.count_dtype,
        meta=np.empty((0, 0), ctx.count_dtype),
        name=f"flow-rank-counts-{tok}",
    )
    # Not map_blocks(drop_axis=1): dropping an axis concatenates the blocks along it, and these
    # blocks are tuples, not arrays. blockwise with concatenate=False hands over the list.
    lengths = da.blockwise(
        _take_lengths,
        "i",
        blocks,
        "ij",
        concatenate=False,
        dtype=np.int32,
        meta=np.empty((0,), np.int32),
        name=f"flow-rank-lengths-{tok}",
    )
    return RankedCells(tokens, ranked_counts, lengths, blocks)


def rank_cells(
    counts: da.Array,
    n_counts: np.ndarray,
    gene_map: GeneMap,
    medians: np.ndarray,
    *,
    width: int,
    pad: int,
    count_dtype: Any = None,
) -> RankedCells:
    """Rank-value encode every cell, lazily.

    Parameters
    ----------
    counts
        ``(cell, gene)`` CSR blocks of a count store; must be one chunk along genes.
    n_counts
        Total counts per cell (numpy), the normalisation denominator.
    gene_map
        Store genes -> vocabulary columns (:func:`flow.vocab.build_gene_map`).
    medians
        Nonzero median of each kept column's gene (``gene_map.kept_gene_ids`` order).
    width
        Ranks per cell to produce (the full ranking needs the maximum genes per cell).
    pad
        Pad token.
    count_dtype
        dtype of the ranked counts (default: the counts' dtype).

    Returns
    -------
    RankedCells
        ``tokens`` (cell, rank) in the vocabulary's token dtype, ``counts`` (cell, rank) the
        count of the gene at each rank (``count_dtype``; the value at each rank follows from it,
        see :func:`flow.encode._kernels.ranked_values`), ``lengths`` (cell,) int32.
        Cell chunks are the store's blocks; the rank axis is one chunk of ``width``.

    Raises
    ------
    ChunkingError
        (a ValueError) if ``counts`` is split along genes.
    VocabularyError
        (a ValueError) if ``medians`` does not have one entry per kept gene.
    """
    require_single_chunk(counts, 1, name="counts", dim="genes")
    _check_medians(gene_map, medians)
    width, _ = _kernels._check_width_and_pad(gene_map.kept_tokens, width, pad)
    tok = tokenize(
        counts.name, n_counts, gene_map.vocab_fingerprint, gene_map.column, medians, width, pad
    )
    count_dtype = np.dtype(count_dtype if count_dtype is not None else counts.dtype)
    ctx = RankContext(gene_map, medians, gene_map.kept_tokens, width, pad, count_dtype)
    return _split_results(_block_results(counts, n_counts, ctx, tok), ctx, tok)


def ranked_blocks(
    counts: da.Array,
    n_counts: np.ndarray,
    gene_map: GeneMap,
    medians: np.ndarray,
    *,
    count_dtype: Any = None,
) -> da.Array:
    """Rank every cell lazily into flat rankings: one ``(tokens, counts, lengths)`` per block.

    Same inputs and checks as :func:`rank_cells` (no ``width``: nothing is padded). Each
    element of the result (an object array with one chunk per cell block and one along ranks;
    take its blocks with ``.to_delayed()``) is the tuple of
    :func:`flow.encode._kernels.rank_block_flat` for that block: the block's rankings one cell
    after another, the counts at each rank (``count_dtype``) and the lengths. Memory per task
    follows the block's stored counts, never the longest cell.
    """
    require_single_chunk(counts, 1, name="counts", dim="genes")
    tok = tokenize(counts.name, n_counts, gene_map.vocab_fingerprint, gene_map.column, medians)
    ctx = flat_context(gene_map, medians, count_dtype if count_dtype is not None else counts.dtype)
    return _block_results(counts, n_counts, ctx, tok, flat=True)


def flat_context(gene_map: GeneMap, medians: np.ndarray, count_dtype: Any) -> RankContext:
    """What :func:`rank_flat` needs for every block (medians checked: one per kept gene)."""
    _check_medians(gene_map, medians)
    return RankContext(gene_map, medians, gene_map.kept_tokens, 1, 0, np.dtype(count_dtype))


def _check_medians(gene_map: GeneMap, medians: np.ndarray) -> None:
    if medians.shape != (gene_map.n_kept,):
        msg = f"Need one median per kept gene ({gene_map.n_kept}); got shape {medians.shape}."
        raise VocabularyError(msg)
