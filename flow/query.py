"""What the cutoff drops: queries over an encoding store, for any cutoff ``L`` (DESIGN section 4).

Every query is answered from the encoding store (:func:`flow.encode.store.open_encoding`)
without recomputing ranks. Ranks are 0-based: rank 0 is the cell's highest-value gene, and a
model of input size ``L`` sees ranks ``0 .. L-1``; ranks ``L .. length-1`` are *dropped*.

Only cells that pass filtering (``filter_pass``) are part of the corpus: counts, rates,
coverage and distributions use passing cells only. A cell query by index or barcode answers
for any cell and says whether it passes.

What each query reads
---------------------
- :func:`dropped_genes`: that cell's entries of the flat ``tokens`` and ``counts`` bands at
  ranks ``L .. length-1`` (the chunks holding them: one cell block, a few bands), read
  directly, and its block's lengths.
- :func:`gene_ranks` / :func:`gene_drop`: all of the flat ``tokens`` bands (a gene may sit at
  any rank), as stored, one small result per cell; never ``counts``.
- :func:`drop_rates`: only the flat ``tokens`` bands that hold ranks ``>= L``, as stored
  (no padding); never ``counts``. One reduction: a bincount per block, tree-summed.
- :func:`coverage` / :func:`coverage_summary`: the per-cell lengths only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
from dask.base import tokenize
from dask.delayed import delayed
from dask.highlevelgraph import HighLevelGraph

# the name helpers live in flow._names (shared with flow.retention); the private aliases stay
# importable from here as they were
from ._names import as_str as _as_str
from ._names import close_matches as _close  # noqa: F401
from ._names import gene_tokens as _gene_tokens
from ._names import group_codes, resolve_cell, resolve_gene
from ._names import shortlist as _shortlist  # noqa: F401
from ._names import table_writer as _table_writer
from .cluster import compute as cluster_compute
from .encode._bands import BandReader, band_sizes
from .encode._kernels import ranked_values
from .errors import InputError

if TYPE_CHECKING:
    from .encode.store import EncodingStore

__all__ = [
    "DEFAULT_CUTOFF",
    "REFERENCE_INPUT_SIZE",
    "DropRates",
    "GeneDrop",
    "attention_cost",
    "coverage",
    "coverage_summary",
    "drop_rates",
    "dropped_genes",
    "gene_drop",
    "gene_ranks",
    "parse_sizes",
    "resolve_cell",
    "resolve_gene",
    "write_drop_rates",
]

DEFAULT_CUTOFF = 2048
"""The V1 model input size: the cutoff every query uses unless told otherwise."""

REFERENCE_INPUT_SIZE = 2048
"""Attention cost is relative to this input size: cost(L) = (L / 2048) ** 2."""

MAX_GROUPS = 256
"""Most distinct values a ``group_by`` column may have: it is meant for labels like cell_type
(each cell-block task holds a groups x tokens count table)."""

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)

Compute = Callable[..., tuple[Any, ...]]


# --------------------------------------------------------------------------------------------
# argument parsing


def _parse_cutoff(cutoff: Any) -> int:
    """A cutoff (model input size) as a positive int."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, int | np.integer):
        msg = f"cutoff must be an integer input size (e.g. 2048), got {cutoff!r}."
        raise TypeError(msg)
    if cutoff < 1:
        msg = f"cutoff must be at least 1 (a model input size), got {cutoff}."
        raise InputError(msg)
    return int(cutoff)


def _default_compute() -> Compute:
    return cluster_compute


# --------------------------------------------------------------------------------------------
# one cell


def _cell_value(enc: EncodingStore, name: str, index: int) -> Any:
    """One cell's entry of a per-cell array (reads the one chunk that holds it)."""
    return enc._group()[name][index]


def _cell_tail(enc: EncodingStore, index: int, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and counts of one cell's ranks ``cutoff .. length-1``, read from the flat bands
    (only that cell's entries, in rank order)."""
    layout = enc.layout
    group = enc._group()
    block, row = divmod(index, layout.block_size)
    lengths = np.asarray(
        enc.lengths[block * layout.block_size : (block + 1) * layout.block_size], dtype=np.int64
    )
    hi = np.zeros_like(lengths)
    hi[row] = lengths[row]  # this cell only
    width = layout.band_width
    bands = range(cutoff // width, min(layout.n_bands, -(-int(lengths[row]) // width)))
    out = []
    for name in ("tokens", "counts"):
        reader = BandReader.of(group, name, layout, bands=bands)
        parts = [reader.take(block, k, lengths, cutoff, hi)[0] for k in bands]
        out.append(np.concatenate(parts) if parts else np.empty(0, reader.dtype))
    return out[0], out[1]


def dropped_genes(
    enc: EncodingStore, cell: int | str, cutoff: int = DEFAULT_CUTOFF
) -> pd.DataFrame:
    """The genes a model of input size ``cutoff`` does not see in one cell (reads; small).

    Reads only that cell's entries of the flat ``tokens`` and ``counts`` bands at ranks
    ``cutoff .. length-1`` (the chunks of its cell block's regions that hold them), directly
    in this process (no Dask graph: a few chunks), and the cell's block of lengths.

    Parameters
    ----------
    enc
        An opened encoding store.
    cell
        0-based cell index or barcode. Cells that do not pass filtering are answered too.
    cutoff
        Model input size ``L``: ranks ``L`` and beyond are dropped.

    Returns
    -------
    pandas.DataFrame
        One row per dropped gene, in rank order: ``rank`` (0-based), ``token``, ``gene_id``,
        ``symbol``, ``value`` (the stored normalized value: count / n_counts x 10,000 /
        median, i.e. the fold change against the corpus median) and ``log2_fold_change``.
        ``frame.attrs`` holds ``cell`` (barcode), ``index``, ``length``, ``cutoff`` and
        ``filter_pass``.

    Raises
    ------
    InputError
        Unknown barcode or index out of range; cutoff below 1.
    """
    length_cutoff = _parse_cutoff(cutoff)
    index = resolve_cell(enc, cell)
    length = int(enc.lengths[index])
    table = enc.token_table()
    if length_cutoff < length:
        tokens, counts = _cell_tail(enc, index, length_cutoff)
        medians = np.nan_to_num(np.asarray(table["median"], dtype=np.float64), nan=1.0)
        n_counts = np.asarray(_cell_value(enc, "n_counts", index), dtype=np.float64).reshape(1)
        # the ranking's own value arithmetic (as EncodingStore.values): bit-identical values
        values = ranked_values(counts[None, :], n_counts, medians[tokens][None, :])[0]
        tokens = tokens.astype(np.int64)
    else:
        tokens, values = np.empty(0, np.int64), np.empty(0, np.float64)
    frame = pd.DataFrame(
        {
            "rank": np.arange(length_cutoff, length_cutoff + tokens.size, dtype=np.int64),
            "token": tokens,
            "gene_id": _as_str(table["gene_id"][tokens]) if tokens.size else np.empty(0, object),
            "symbol": _as_str(table["symbol"][tokens]) if tokens.size else np.empty(0, object),
            "value": values,
            "log2_fold_change": np.log2(values.astype(np.float64)),
        }
    )
    frame.attrs.update(
        cell=str(_cell_value(enc, "cell", index)),
        index=index,
        length=length,
        cutoff=length_cutoff,
        filter_pass=bool(_cell_value(enc, "filter_pass", index)),
    )
    return frame


# --------------------------------------------------------------------------------------------
# one gene


def _gene_rank_band(
    reader: BandReader, lengths: np.ndarray, *, block: int, band: int, gene_token: int
) -> np.ndarray:
    """Rank of ``gene_token`` in each cell of one block within one band, or -1: a
    ``(cells, 1)`` int32 block, from the band's flat entries (no padding)."""
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    out = np.full(lengths.size, -1, dtype=np.int32)
    width = reader.layout.band_width
    stored = band_sizes(lengths, band, width)
    flat = reader.read(block, band, 0, int(stored.sum()))
    hits = np.flatnonzero(flat == gene_token)
    if hits.size:  # a token is at most once in a ranking
        ends = np.cumsum(stored)
        cell = np.searchsorted(ends, hits, side="right")
        out[cell] = width * band + hits - (ends - stored)[cell]
    return out[:, None]


def gene_ranks(enc: EncodingStore, gene: str | int, *, split_every: int = 8) -> da.Array:
    """Rank of one gene in every cell, -1 where the cell does not express it (lazy).

    Parameters
    ----------
    enc
        An opened encoding store.
    gene
        Ensembl ID or symbol (see :func:`resolve_gene`), or a token ID (int).
    split_every
        Fan-in of the max-reduction over bands.

    Returns
    -------
    dask.array.Array
        ``(cell,)`` int32, chunked like ``enc.tokens`` along cells. Computing it reads every
        band of ``tokens`` (the gene can sit at any rank), flat as stored (one task per cell
        block and band: no padding), and no chunk of ``counts``.
    """
    token = resolve_gene(enc, gene) if isinstance(gene, str) else int(gene)
    tokens = enc.tokens  # the dense view: its name and cell chunks only (never computed here)
    layout = enc.layout
    lengths = enc.cell_array("length")
    reader = delayed(
        BandReader.of(enc._group(), "tokens", layout),
        name=f"flow-gene-rank-bands-{tokenize(tokens)}",
        traverse=False,
    )
    name = f"flow-gene-rank-{tokenize(tokens, token)}"
    dsk: dict[Any, Any] = {
        (name, b, k): (
            partial(_gene_rank_band, block=b, band=k, gene_token=token),
            reader.key,
            (lengths.name, b),
        )
        for b in range(lengths.numblocks[0])
        for k in range(layout.n_bands)
    }
    deps: list[Any] = [lengths, reader]
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    per_chunk = da.Array(
        graph, name, (lengths.chunks[0], (1,) * layout.n_bands), meta=np.empty((0, 0), np.int32)
    )
    ranks: da.Array = da.reduction(
        per_chunk,
        np.max,
        np.max,
        axis=1,
        split_every=split_every,
        dtype=np.int32,
        meta=np.empty((0,), dtype=np.int32),
        name=f"flow-gene-rank-max-{tokenize(tokens, token, split_every)}",
    )
    return ranks


@dataclass(frozen=True)
class GeneDrop:
    """How often one gene is dropped at a cutoff, and where it ranks (passing cells only).

    Attributes
    ----------
    gene_id, symbol, token
        The gene.
    cutoff
        Model input size ``L``.
    cells_expressing
        Passing cells that express the gene (it is in their ranking).
    cells_dropped
        Of those, the cells where it ranks at ``L`` or beyond.
    rate
        ``cells_dropped / cells_expressing`` (NaN when no cell expresses it).
    quantiles
        Rank quantiles over expressing cells (``{"0.5": median rank, ...}``; linear
        interpolation; empty when no cell expresses it).
    histogram
        ``rank_from``, ``rank_to`` (exclusive), ``cells``: expressing cells per rank bin.
    """

    gene_id: str
    symbol: str
    token: int
    cutoff: int
    cells_expressing: int
    cells_dropped: int
    rate: float
    quantiles: dict[str, float]
    histogram: pd.DataFrame = field(repr=False)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the histogram as a list of records)."""
        return {
            "gene_id": self.gene_id,
            "symbol": self.symbol,
            "token": self.token,
            "cutoff": self.cutoff,
            "cells_expressing": self.cells_expressing,
            "cells_dropped": self.cells_dropped,
            "rate": None if math.isnan(self.rate) else self.rate,
            "rank_quantiles": self.quantiles,
            "rank_histogram": self.histogram.to_dict(orient="records"),
        }

    def to_series(self) -> pd.Series:
        """The scalar fields and rank quantiles as one row (``rank_q0.5`` ...)."""
        row: dict[str, Any] = {
            "gene_id": self.gene_id,
            "symbol": self.symbol,
            "token": self.token,
            "cutoff": self.cutoff,
            "cells_expressing": self.cells_expressing,
            "cells_dropped": self.cells_dropped,
            "rate": self.rate,
        }
        row.update({f"rank_q{q}": v for q, v in self.quantiles.items()})
        return pd.Series(row)


def gene_drop(
    enc: EncodingStore,
    gene: str,
    cutoff: int = DEFAULT_CUTOFF,
    *,
    bin_width: int = 256,
    split_every: int = 8,
    compute: Compute | None = None,
) -> GeneDrop:
    """In how many expressing cells a gene is dropped at ``cutoff``, and its rank distribution.

    Computes :func:`gene_ranks` (reads all of ``tokens``, one int per cell comes back) with
    ``compute`` (default :func:`flow.cluster.compute`: the current client, else Dask's
    scheduler). Only passing cells count.

    Parameters
    ----------
    gene
        Ensembl ID (version suffix ignored) or symbol (case-insensitive).
    cutoff
        Model input size ``L``.
    bin_width
        Width in ranks of the histogram bins (bins start at rank 0).

    Raises
    ------
    InputError
        Unknown or ambiguous gene; cutoff below 1.
    """
    length_cutoff = _parse_cutoff(cutoff)
    if bin_width < 1:
        msg = f"bin_width must be at least 1, got {bin_width}."
        raise InputError(msg)
    table = enc.token_table()
    token = resolve_gene(enc, gene, table=table)
    run = compute or _default_compute()
    (ranks,) = run(gene_ranks(enc, token, split_every=split_every))
    keep = np.asarray(enc.cell_column("filter_pass")).astype(bool)
    ranks = np.asarray(ranks)[keep]
    ranks = ranks[ranks >= 0]
    expressing = int(ranks.size)
    dropped = int(np.count_nonzero(ranks >= length_cutoff))
    if expressing:
        values = np.quantile(ranks.astype(np.float64), QUANTILES)
        quantiles = {str(q): float(v) for q, v in zip(QUANTILES, values, strict=True)}
        n_bins = int(ranks.max()) // bin_width + 1
        counts = np.bincount(ranks // bin_width, minlength=n_bins)
    else:
        quantiles, n_bins, counts = {}, 0, np.zeros(0, np.int64)
    starts = np.arange(n_bins, dtype=np.int64) * bin_width
    histogram = pd.DataFrame(
        {"rank_from": starts, "rank_to": starts + bin_width, "cells": counts.astype(np.int64)}
    )
    return GeneDrop(
        gene_id=str(table["gene_id"][token]),
        symbol=str(table["symbol"][token]),
        token=token,
        cutoff=length_cutoff,
        cells_expressing=expressing,
        cells_dropped=dropped,
        rate=dropped / expressing if expressing else float("nan"),
        quantiles=quantiles,
        histogram=histogram,
    )


# --------------------------------------------------------------------------------------------
# all genes at once


def _dropped_block(
    reader: BandReader,
    lengths: np.ndarray,
    codes: np.ndarray,
    *,
    block: int,
    cutoff: int,
    n_groups: int,
    n_tokens: int,
    pad: int,
) -> np.ndarray:
    """Per (group, token): passing cells of one cell block holding the token at rank ``>= cutoff``.

    Reads the block's flat token bands from the one holding rank ``cutoff`` on (each band's
    entries from the first at rank ``>= cutoff``; no padding, one band in memory at a time);
    ``codes`` is each cell's group (0 .. n_groups-1), -1 for cells that do not pass. Returns a
    ``(1, n_groups, n_tokens)`` int64 block.
    """
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    keep = codes >= 0
    counts = np.zeros(n_groups * n_tokens, dtype=np.int64)
    width = reader.layout.band_width
    last = min(reader.layout.n_bands, -(-int(lengths.max(initial=0)) // width))
    for k in range(cutoff // width, last):
        part, taken = reader.take(block, k, lengths, cutoff, lengths)
        if not part.size:
            continue
        if n_groups == 1:
            kept = part if keep.all() else part[np.repeat(keep, taken)]
            counts += np.bincount(kept, minlength=n_tokens)
        else:
            code = np.repeat(codes.astype(np.intp), taken)
            live = code >= 0
            counts += np.bincount(
                part[live].astype(np.intp) + code[live] * n_tokens, minlength=n_groups * n_tokens
            )
    table = counts.reshape(n_groups, n_tokens)
    table[:, pad] = 0  # the pad token is never a gene
    return table[None]


@dataclass(frozen=True)
class DropRates:
    """Per-gene drop counts at a cutoff, as a lazy reduction (see :func:`drop_rates`).

    Attributes
    ----------
    cutoff
        Model input size ``L``.
    dropped
        Lazy ``(group, token)`` int64 counts of passing cells that hold the token at rank
        ``>= L`` (one group unless ``group_by`` was given), a single chunk.
    group_by
        The grouping column, or None.
    groups
        Group labels (``("all",)`` without grouping).
    """

    cutoff: int
    dropped: da.Array
    group_by: str | None
    groups: tuple[str, ...]
    codes: np.ndarray = field(repr=False)
    lengths: np.ndarray = field(repr=False)
    table: dict[str, np.ndarray] = field(repr=False)

    def compute(self, *, compute: Compute | None = None) -> np.ndarray:
        """Run the reduction (a compute boundary): the ``(group, token)`` counts."""
        run = compute or _default_compute()
        (counts,) = run(self.dropped)
        return np.asarray(counts, dtype=np.int64)

    def to_frame(
        self, dropped: np.ndarray | None = None, *, compute: Compute | None = None
    ) -> pd.DataFrame:
        """The per-gene table (computes the reduction unless ``dropped`` is given).

        Returns
        -------
        pandas.DataFrame
            One row per vocabulary gene found in the corpus (it has a median):
            ``token``, ``gene_id``, ``symbol``, ``cells_expressing`` (passing cells expressing
            it), ``cells_dropped`` (of those, cells where it ranks ``>= L``) and ``rate``
            (NaN when no cell expresses it); most dropped first (then by rate, then token).
            ``frame.attrs["cutoff"]`` is ``L``.
        """
        counts = self.compute(compute=compute) if dropped is None else np.asarray(dropped)
        total = counts.sum(axis=0)
        table = self.table
        rows = np.flatnonzero(
            _gene_tokens(table) & np.isfinite(np.asarray(table["median"], dtype=np.float64))
        )
        expressing = np.asarray(table["cells"], dtype=np.int64)[rows]
        lost = total[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(expressing > 0, lost / np.maximum(expressing, 1), np.nan)
        frame = pd.DataFrame(
            {
                "token": rows.astype(np.int64),
                "gene_id": _as_str(table["gene_id"][rows]),
                "symbol": _as_str(table["symbol"][rows]),
                "cells_expressing": expressing,
                "cells_dropped": lost.astype(np.int64),
                "rate": rate,
            }
        )
        order = np.lexsort((frame["token"].to_numpy(), -np.nan_to_num(rate, nan=-1.0), -lost))
        frame = frame.iloc[order].reset_index(drop=True)
        frame.attrs["cutoff"] = self.cutoff
        return frame

    def group_summary(
        self, dropped: np.ndarray | None = None, *, top: int = 5, compute: Compute | None = None
    ) -> pd.DataFrame:
        """Per group: passing cells, truncated cells, fraction truncated, median length, top
        dropped genes (computes the reduction unless ``dropped`` is given).

        ``top_dropped`` reads like ``"RPL13 (12), ACTB (9)"``: symbol (or gene ID) and the number
        of the group's cells that drop it.
        """
        counts = self.compute(compute=compute) if dropped is None else np.asarray(dropped)
        names = _as_str(self.table["symbol"])
        ids = _as_str(self.table["gene_id"])
        rows = []
        for g, label in enumerate(self.groups):
            members = self.codes == g
            lengths = self.lengths[members]
            truncated = int(np.count_nonzero(lengths > self.cutoff))
            order = np.lexsort((np.arange(counts.shape[1]), -counts[g]))[:top]
            best = [f"{names[t] or ids[t]} ({counts[g, t]:,})" for t in order if counts[g, t] > 0]
            rows.append(
                {
                    "group": label,
                    "cells": int(lengths.size),
                    "truncated": truncated,
                    "fraction_truncated": truncated / lengths.size
                    if lengths.size
                    else float("nan"),
                    "median_length": float(np.median(lengths)) if lengths.size else float("nan"),
                    "top_dropped": ", ".join(best),
                }
            )
        frame = pd.DataFrame(rows)
        frame.attrs["cutoff"] = self.cutoff
        frame.attrs["group_by"] = self.group_by
        return frame


def _group_codes(
    enc: EncodingStore, keep: np.ndarray, group_by: str | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-cell group code (-1 for cells that do not pass) and the group labels."""
    return group_codes(enc, keep, group_by, max_groups=MAX_GROUPS)


def _per_block_drops(
    enc: EncodingStore, cutoff: int, codes: np.ndarray, n_groups: int, n_tokens: int, name: str
) -> da.Array:
    """``(block, group, token)`` drop counts, one task per cell block reading its flat token
    bands at ranks ``>= cutoff`` (:func:`_dropped_block`), lazy."""
    lengths = enc.cell_array("length")
    cell_chunks = lengths.chunks[0]
    lazy_codes = da.from_array(
        codes, chunks=(cell_chunks,), name=f"flow-cell-groups-{tokenize(codes, cell_chunks)}"
    )
    layout = enc.layout
    reader = delayed(
        BandReader.of(
            enc._group(), "tokens", layout, bands=range(cutoff // layout.band_width, layout.n_bands)
        ),
        name=f"{name}-bands",
        traverse=False,
    )
    count = partial(
        _dropped_block, cutoff=cutoff, n_groups=n_groups, n_tokens=n_tokens, pad=enc.pad_token
    )
    out = f"{name}-chunk"
    dsk: dict[Any, Any] = {
        (out, b, 0, 0): (
            partial(count, block=b),
            reader.key,
            (lengths.name, b),
            (lazy_codes.name, b),
        )
        for b in range(len(cell_chunks))
    }
    deps: list[Any] = [lengths, lazy_codes, reader]
    graph = HighLevelGraph.from_collections(out, dsk, dependencies=deps)
    chunks = ((1,) * len(cell_chunks), (n_groups,), (n_tokens,))
    return da.Array(graph, out, chunks, meta=np.empty((0, 0, 0), dtype=np.int64))


def drop_rates(
    enc: EncodingStore,
    cutoff: int = DEFAULT_CUTOFF,
    *,
    group_by: str | None = None,
    split_every: int = 8,
) -> DropRates:
    """Per-gene drop counts at ``cutoff`` for all genes at once (lazy).

    One out-of-core reduction over ranks ``>= cutoff``: per cell block, one task reads the
    block's flat token bands from the one holding rank ``cutoff`` on, as stored (no padded
    dense view; one band in memory at a time), and bincounts the entries of passing cells at
    rank ``>= cutoff``; the blocks' tables are tree-summed (``split_every``). Bands wholly
    below ``cutoff`` are never read, nor bands past a block's longest cell; the band holding
    rank ``cutoff`` is read from its first entry at rank ``>= cutoff``; ``counts`` is never
    read. Graph size is O(number of cell blocks). Nothing is computed here: use
    :meth:`DropRates.to_frame` or :func:`write_drop_rates`.

    Parameters
    ----------
    enc
        An opened encoding store (chunks ``(block_size, rank_chunk)``, any sizes).
    cutoff
        Model input size ``L``.
    group_by
        A carried cell column (e.g. ``cell_type``): count per group as well (at most
        :data:`MAX_GROUPS` groups).
    split_every
        Fan-in of the tree sum.

    Returns
    -------
    DropRates
        ``.dropped`` is a lazy ``(group, token)`` int64 array (one chunk).

    Raises
    ------
    InputError
        Unknown ``group_by`` column or too many groups; cutoff below 1.
    """
    length_cutoff = _parse_cutoff(cutoff)
    table = enc.token_table()
    n_tokens = int(np.asarray(table["gene_id"]).size)
    keep = np.asarray(enc.cell_column("filter_pass")).astype(bool)
    codes, groups = _group_codes(enc, keep, group_by)
    tokens = enc.tokens  # the dense view: its name and cell chunks only (never computed here)
    n_groups = len(groups)
    name = f"flow-drop-rates-{tokenize(tokens, length_cutoff, codes, n_groups, split_every)}"
    if length_cutoff >= tokens.shape[1]:  # nothing is ever dropped: read nothing
        dropped = da.zeros((n_groups, n_tokens), dtype=np.int64, chunks=-1)
    else:
        per_block = _per_block_drops(enc, length_cutoff, codes, n_groups, n_tokens, name)
        dropped = da.reduction(
            per_block,
            np.sum,
            np.sum,
            axis=0,
            split_every=split_every,
            dtype=np.int64,
            meta=np.empty((0, 0), dtype=np.int64),
            name=f"{name}-sum",
        )
    return DropRates(length_cutoff, dropped, group_by, groups, codes, enc.lengths, table)


def write_drop_rates(
    rates: DropRates, path: str | os.PathLike[str], *, compute: Compute | None = None
) -> pd.DataFrame:
    """Compute the per-gene drop-rate table and write it (a compute boundary).

    The format follows the suffix: ``.csv`` (also ``.csv.gz``), ``.tsv`` or ``.parquet``.
    Returns the table written (see :meth:`DropRates.to_frame`).
    """
    text = os.fspath(path)
    writer = _table_writer(text)
    frame = rates.to_frame(compute=compute)
    writer(frame, text)
    return frame


# --------------------------------------------------------------------------------------------
# coverage


def attention_cost(input_size: Any) -> Any:
    """Dense attention cost relative to 2,048 tokens: ``(input_size / 2048) ** 2``."""
    return (np.asarray(input_size, dtype=np.float64) / REFERENCE_INPUT_SIZE) ** 2


def _passing_lengths(enc: EncodingStore) -> np.ndarray:
    keep = np.asarray(enc.cell_column("filter_pass")).astype(bool)
    lengths: np.ndarray = np.asarray(enc.lengths, dtype=np.int64)[keep]
    return lengths


def coverage(enc: EncodingStore, sizes: Sequence[int] | np.ndarray | None = None) -> pd.DataFrame:
    """The coverage curve: fraction of passing cells fully encoded at each input size.

    Reads the per-cell lengths only (small, in memory). A cell is fully encoded at input
    size ``L`` when its length (ranked genes) is ``<= L``.

    Parameters
    ----------
    sizes
        Input sizes ``L >= 1``. Default: every size from 1 to the longest passing cell (at
        least 4,096).

    Returns
    -------
    pandas.DataFrame
        ``input_size``, ``cells_covered``, ``fraction_covered`` (NaN without passing cells) and
        ``attention_cost`` (``(L / 2048) ** 2``).
    """
    lengths = _passing_lengths(enc)
    longest = int(lengths.max()) if lengths.size else 0
    grid = (
        np.arange(1, max(longest, 4096) + 1)
        if sizes is None
        else np.asarray(sizes, dtype=np.int64).ravel()
    )
    if grid.size and int(grid.min()) < 1:
        msg = f"Input sizes must be at least 1, got {int(grid.min())}."
        raise InputError(msg)
    covered_upto = np.cumsum(np.bincount(lengths, minlength=longest + 1))  # cells with length <= k
    covered = covered_upto[np.minimum(grid, longest)] if grid.size else np.zeros(0, np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = covered / lengths.size if lengths.size else np.full(grid.size, np.nan)
    return pd.DataFrame(
        {
            "input_size": grid.astype(np.int64),
            "cells_covered": covered.astype(np.int64),
            "fraction_covered": np.asarray(fraction, dtype=np.float64),
            "attention_cost": attention_cost(grid),
        }
    )


def parse_sizes(text: str) -> tuple[int, ...]:
    """Input sizes from text such as ``"2048,4096"`` (commas or spaces; ``_`` allowed in numbers).

    Raises
    ------
    InputError
        Not a list of positive integers.
    """
    items = [t for t in text.replace(",", " ").split() if t]
    try:
        sizes = tuple(int(t) for t in items)
    except ValueError as err:
        msg = f"Input sizes must be integers separated by commas, got {text!r}."
        raise InputError(msg) from err
    if not sizes or min(sizes) < 1:
        msg = f"Give one or more input sizes of at least 1, got {text!r}."
        raise InputError(msg)
    return sizes


def _format_cost(cost: float) -> str:
    return f"{cost:.1f}" if cost >= 0.95 or cost == 0 else f"{cost:.2g}"


def coverage_summary(enc: EncodingStore, sizes: Sequence[int] = (2048, 4096)) -> str:
    """One line on what each input size covers and costs (reads lengths only).

    Example: ``"2,048 covers 93.0% of cells at cost 1.0; 4,096 covers 99.4% at cost 4.0"``
    (passing cells; cost relative to 2,048 tokens).
    """
    if not len(sizes):
        msg = "Give at least one input size."
        raise InputError(msg)
    frame = coverage(enc, sizes)
    if not _passing_lengths(enc).size:
        return "no passing cells: coverage is undefined"
    parts = []
    for k, row in enumerate(frame.itertuples(index=False)):
        of_cells = " of cells" if k == 0 else ""
        parts.append(
            f"{row.input_size:,} covers {100 * row.fraction_covered:.1f}%{of_cells} "
            f"at cost {_format_cost(row.attention_cost)}"
        )
    return "; ".join(parts)
