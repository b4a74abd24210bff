"""The encoding store: every cell's full ranking, queryable past any cutoff.

Layout (Zarr v3, schema 2; :meth:`EncodingStore.dataset` gives an :class:`xarray.Dataset`
with dimensions ``cell``, ``rank``, ``token``)::

    bands/<k>/tokens (entry)  ranks [512 k, 512 (k + 1)) of every cell, one cell after another
                              (flat, ragged: storage follows the rankings, not the deepest
                              cell; see :mod:`flow.encode._bands`)
    bands/<k>/counts (entry)  the count of the gene at each of those ranks
    band_start (block, band)  where each cell block's region starts in each band
    length (cell)             ranked (detected, in-vocabulary) genes per cell
    cell (cell)               barcodes; n_counts, filter_pass and carried obs columns beside
    token_gene_id, token_symbol, token_median, token_cells (token)
                              the vocabulary: gene of each token, its median, and in how many
                              (passing) cells it is expressed
    block_done (block)        which cell blocks are written (resume after a kill)
    block_token_cells (block, token)
                              per-block expressing-cell counts (summed into token_cells)
    attrs["flow"]             kind "encoding", complete, fingerprints of counts, medians and
                              vocabulary, parameters, special tokens

Readers see ``tokens``, ``counts`` and ``values`` as lazy ``(cell, rank)`` arrays chunked
(block, 512), each chunk built from one band of one block (padding filled in memory), so ranks
0..L-1 never touch the tail. Writers own whole chunks: each task writes its cell block's region
of every band (whole chunks of the flat arrays), then marks the block done. A rerun with the same inputs writes only the blocks not done and
gives byte-identical arrays.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph
from zarr.codecs import BloscCodec, BloscShuffle

from .._genes import GeneMapping, normalize_gene_ids
from .._io import (
    DEFAULT_CODECS,
    checked,
    create_flow_group,
    flow_attrs,
    mark_complete,
    open_flow_group,
    write_1d,
)
from .._location import Located, Location, LocationLike
from .._version import __version__
from ..cluster import compute as cluster_compute
from ..errors import (
    IncompleteStoreError,
    InputError,
    OutputExistsError,
    SchemaError,
    VocabularyError,
)
from ..medians import MedianSet
from ..vocab import GeneMap, Vocabulary, build_gene_map
from ._bands import BandLayout, read_band_chunk, split_bands, write_band
from ._kernels import ranked_values
from .rank import RankContext, flat_context, rank_flat

if TYPE_CHECKING:
    from ..store import BlockReader, CountStore

__all__ = [
    "EncodingStore",
    "blocks_of_chunk",
    "invalidate_blocks",
    "open_encoding",
    "plan_encoding",
    "write_encoding",
]

KIND = "encoding"
#: 2: ragged rank bands (``bands/<k>/...``); 1 (dense ``tokens``/``counts``) is refused.
SCHEMA_VERSION = 2
DEFAULT_RANK_CHUNK = 512
#: Blosc lz4 + byte shuffle: measured here on a 4,096-cell block, half the write time of zstd
#: (0.10 s vs 0.19 s for tokens + values) and faster reads, for about 10% more bytes.
RANKING_CODECS = checked((BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.shuffle),))
_RESERVED = frozenset(
    {
        "tokens",
        "counts",
        "values",
        "length",
        "cell",
        "n_counts",
        "filter_pass",
        "block_done",
        "block_token_cells",
        "band_start",
        "bands",
        "token_gene_id",
        "token_symbol",
        "token_median",
        "token_cells",
    }
)


@dataclass(frozen=True)
class EncodingPlan:
    """Everything decided before any block is ranked (cheap: metadata only)."""

    store: CountStore
    gene_map: GeneMap
    vocab: Vocabulary
    medians: np.ndarray  # per kept column
    n_counts: np.ndarray
    keep: np.ndarray
    width: int
    rank_chunk: int
    params: dict[str, Any]
    n_without_median: int
    n_genes: np.ndarray  # the store's detected genes per cell (read once: width, cell table)

    @property
    def count_dtype(self) -> np.dtype[Any]:
        """dtype of the counts at each rank: the store's, wider where duplicates are summed."""
        dtype = np.dtype(self.store.attrs["dtype"])
        if self.gene_map.has_duplicates and dtype == np.uint16:
            return np.dtype(np.uint32)
        return dtype

    @property
    def fingerprint(self) -> str:
        """Identifies the inputs and parameters: a resumed run must match it."""
        return hashlib.sha256(json.dumps(self.params, sort_keys=True).encode()).hexdigest()


def _vocab_with_medians(
    vocab: Vocabulary, median_set: MedianSet
) -> tuple[Vocabulary, np.ndarray, int]:
    """The vocabulary restricted to genes that have a median, and those medians."""
    table = dict(
        zip(
            normalize_gene_ids(median_set.gene_ids).tolist(),
            median_set.medians.tolist(),
            strict=True,
        )
    )
    med = np.array([table.get(g, np.nan) for g in vocab.gene_ids.tolist()], dtype=np.float64)
    ok = np.isfinite(med) & (med > 0)
    if not ok.any():
        msg = (
            "No vocabulary gene has a median in the median set: they describe different genes "
            "(check that both use Ensembl IDs of the same species)."
        )
        raise VocabularyError(msg)
    restricted = Vocabulary(
        vocab.gene_ids[ok], vocab.token_ids[ok], dict(vocab.special), vocab.pad_token
    )
    return restricted, med[ok], int((~ok).sum())


def plan_encoding(
    store: CountStore,
    median_set: MedianSet,
    vocab: Vocabulary,
    *,
    gene_mapping: GeneMapping | None = None,
    n_counts_column: str = "n_counts",
    rank_chunk: int = DEFAULT_RANK_CHUNK,
) -> EncodingPlan:
    """Decide the gene map, medians per column and the width of an encoding (reads metadata).

    Takes the opened count store, median set, vocabulary and (optional) gene mapping; the
    store's genes are collapsed as the median set's were (:func:`flow.vocab.build_gene_map`).
    """
    usable, med, n_missing = _vocab_with_medians(vocab, median_set)
    gene_map = build_gene_map(store.var.index.to_numpy(dtype=str), usable, gene_mapping)
    order = usable.index_of(gene_map.kept_gene_ids)
    n_counts, keep = store.cells(n_counts_column)
    n_genes = store.obs_column("n_genes")
    width = max(1, int(n_genes.max()) if n_genes.size else 1)
    params = {
        "counts": store.fingerprint,
        "medians": median_set.fingerprint,
        "vocabulary": vocab.fingerprint,
        "gene_mapping": None if gene_mapping is None else gene_mapping.fingerprint,
        "n_counts_column": n_counts_column,
        # the cells' totals and filter come from obs, which the counts fingerprint does not cover
        "cells": hashlib.sha256(n_counts.tobytes() + keep.tobytes()).hexdigest(),
        "width": width,
        "rank_chunk": rank_chunk,
        "schema_version": SCHEMA_VERSION,
    }
    return EncodingPlan(
        store,
        gene_map,
        usable,
        med[order],
        n_counts,
        keep,
        width,
        rank_chunk,
        params,
        n_missing,
        n_genes,
    )


# --------------------------------------------------------------------------- writing


def _open_or_create(
    plan: EncodingPlan, location: Location, *, overwrite: bool
) -> tuple[zarr.Group, str]:
    """The store to write and what was found there: ``"new"``, ``"resumed"`` (an unfinished
    store of the same plan) or ``"complete"`` (a finished one of the same plan: nothing to do).

    Anything else at ``location`` (another plan, another kind of store, other files) is
    replaced only with ``overwrite``; otherwise :class:`~flow.errors.OutputExistsError`.
    """
    if not location.exists():
        return _create(plan, location), "new"
    try:
        group = open_flow_group(location, KIND, mode="r+", require_complete=False)
        meta = flow_attrs(group)
    except (FileNotFoundError, ValueError):
        meta, group = {}, None
    if group is not None and meta.get("plan") == plan.fingerprint:
        return group, "complete" if meta.get("complete") else "resumed"
    if not overwrite:
        what = (
            "an encoding store written from other inputs or parameters"
            if meta.get("kind") == KIND
            else "something that is not an encoding store of this run"
        )
        msg = (
            f"{location.url} holds {what}: pass --overwrite (overwrite=True) to replace it, "
            "or choose another output."
        )
        raise OutputExistsError(msg)
    return _create(plan, location), "new"


def _create(plan: EncodingPlan, location: Location) -> zarr.Group:
    """Lay out a fresh store: the ranking arrays, the cell table, the token table, the plan."""
    store = plan.store
    n_cells = int(store.attrs["n_cells"])
    cell_chunk = max(1, min(store.block_size, n_cells))
    root = create_flow_group(location, KIND, SCHEMA_VERSION)
    layout = BandLayout.plan(n_cells, cell_chunk, plan.rank_chunk, plan.width)
    _create_arrays(root, plan, layout)
    _write_cell_table(root, plan, n_cells, cell_chunk)
    _write_token_table(root, plan)
    # The plan is recorded last: a store killed while being laid out is created afresh on rerun.
    meta = flow_attrs(root)
    meta["bands"] = layout.to_attrs()
    meta["plan"] = plan.fingerprint
    root.attrs["flow"] = meta
    return root


def _create_arrays(root: zarr.Group, plan: EncodingPlan, layout: BandLayout) -> None:
    """The banded rankings, lengths, band starts and per-block bookkeeping, all unwritten."""
    vocab = plan.vocab
    flat: dict[str, Any] = {
        "shape": (layout.flat_size,),
        "chunks": (layout.flat_chunk,),
        "dimension_names": ("entry",),
        "compressors": RANKING_CODECS,
    }
    for k in range(layout.n_bands):
        band = root.create_group(f"bands/{k}")
        band.create_array("tokens", dtype=vocab.token_dtype, fill_value=vocab.pad_token, **flat)
        band.create_array("counts", dtype=plan.count_dtype, fill_value=0, **flat)
    n_cells, cell_chunk, n_blocks = layout.n_cells, layout.block_size, layout.n_blocks
    starts = root.create_array(
        "band_start",
        shape=(n_blocks, layout.n_bands),
        dtype=np.int64,
        chunks=(max(1, n_blocks), max(1, layout.n_bands)),
        dimension_names=("block", "band"),
        compressors=DEFAULT_CODECS,
    )
    starts[...] = layout.band_start()
    root.create_array(
        "length",
        shape=(n_cells,),
        dtype=np.int32,
        chunks=(cell_chunk,),
        dimension_names=("cell",),
        compressors=DEFAULT_CODECS,
    )
    root.create_array(
        "block_done",
        shape=(n_blocks,),
        dtype=bool,
        chunks=(1,),
        fill_value=False,
        dimension_names=("block",),
        compressors=DEFAULT_CODECS,
    )
    n_tokens = vocab.n_tokens
    root.create_array(
        "block_token_cells",
        shape=(n_blocks, n_tokens),
        dtype=np.int32,
        chunks=(1, n_tokens),
        fill_value=0,
        dimension_names=("block", "token"),
        compressors=DEFAULT_CODECS,
    )


def _write_cell_table(root: zarr.Group, plan: EncodingPlan, n_cells: int, cell_chunk: int) -> None:
    """Barcodes, totals, filter and carried obs columns, copied a slice at a time: memory does
    not grow with the number of cells."""
    store = plan.store
    step = cell_chunk * max(1, (1 << 16) // cell_chunk)
    cells: dict[str, Iterable[np.ndarray]] = {
        "cell": store.iter_obs_column("_index", step),
        "n_counts": [plan.n_counts],
        "filter_pass": [plan.keep],
    }
    for name in store.obs_columns:
        if name not in ("n_counts", "filter_pass"):
            out = name if name not in _RESERVED else f"obs_{name}"
            cells[out] = [plan.n_genes] if name == "n_genes" else store.iter_obs_column(name, step)
    for name, pieces in cells.items():
        write_1d(root, name, pieces, size=n_cells, chunk=cell_chunk, dim="cell")


def _write_token_table(root: zarr.Group, plan: EncodingPlan) -> None:
    """Per token: its gene ID (or special token), the store's symbol for it, and its median."""
    vocab, store, gene_map = plan.vocab, plan.store, plan.gene_map
    n_tokens = vocab.n_tokens
    gene_of_token = np.full(n_tokens, "", dtype=object)
    for special, tok in vocab.special.items():
        gene_of_token[tok] = special
    gene_of_token[vocab.token_ids] = vocab.gene_ids
    median_of_token = np.full(n_tokens, np.nan)
    median_of_token[gene_map.kept_tokens] = plan.medians
    symbol_of_token = np.full(n_tokens, "", dtype=object)
    var_symbols = (
        store.var["gene_symbol"].to_numpy(dtype=str)
        if "gene_symbol" in store.var
        else store.var.index.to_numpy(dtype=str)
    )
    col = gene_map.column
    first = np.unique(col[col >= 0], return_index=True)[1]
    matched = np.flatnonzero(col >= 0)[first]
    symbol_of_token[gene_map.kept_tokens[col[matched]]] = var_symbols[matched]
    token_table = {
        "token_gene_id": gene_of_token.astype(str),
        "token_symbol": symbol_of_token.astype(str),
        "token_median": median_of_token,
    }
    for name, values in token_table.items():
        write_1d(root, name, [values], size=n_tokens, chunk=n_tokens, dim="token")


def _token_cells(
    tokens: np.ndarray, lengths: np.ndarray, keep: np.ndarray, n_tokens: int
) -> np.ndarray:
    """In how many of the kept cells each token is expressed (flat rankings: each token once
    per ranking)."""
    kept = np.repeat(keep.astype(bool), lengths)
    return np.bincount(tokens[kept], minlength=n_tokens)[:n_tokens].astype(np.int32)


def _tokenize_block(
    read: BlockReader,
    ctx: RankContext,
    n_counts: np.ndarray,
    keep: np.ndarray,
    location: Location,
    b: int,
    n_tokens: int,
) -> int:
    """Read, rank and write block ``b``: the whole of a block's work, one task."""
    r0 = b * read.block_size
    return _write_block(rank_flat(read(b), n_counts, ctx, r0), keep, location, b, r0, n_tokens)


def _write_block(
    part: tuple[np.ndarray, np.ndarray, np.ndarray],
    keep: np.ndarray,
    location: Location,
    b: int,
    r0: int,
    n_tokens: int,
) -> int:
    """Write one ranked block (flat rankings) into its regions of the bands, then mark it done."""
    tokens, counts, lengths = part
    root: Any = location.open_group(mode="r+")
    layout = BandLayout.from_attrs(root.attrs["flow"]["bands"])
    starts = root["band_start"][b, :]
    pad = root["bands/0/tokens"].fill_value if layout.n_bands else 0
    band_tokens = split_bands(tokens, lengths, layout.band_width)
    band_counts = split_bands(counts, lengths, layout.band_width)
    for k, (tok, cnt) in enumerate(zip(band_tokens, band_counts, strict=True)):
        band = root[f"bands/{k}"]
        write_band(band["tokens"], int(starts[k]), tok, pad)
        write_band(band["counts"], int(starts[k]), cnt, 0)
    root["length"][r0 : r0 + lengths.size] = lengths
    root["block_token_cells"][b, :] = _token_cells(tokens, lengths, keep, n_tokens)
    root["block_done"][b] = True
    return b


def _mark_complete(root: Any, plan: EncodingPlan, n_written: int) -> None:
    """Sum the per-block token counts, record what the store holds, and mark it complete."""
    n_tokens = plan.vocab.n_tokens
    totals = np.zeros(n_tokens, dtype=np.int64)
    for b in range(plan.store.n_blocks):  # (n_blocks x n_tokens) int32: small
        totals += np.asarray(root["block_token_cells"][b, :], dtype=np.int64)
    write_1d(root, "token_cells", [totals], size=n_tokens, chunk=n_tokens, dim="token")
    vocab = plan.vocab
    mark_complete(
        root,
        counts=plan.store.fingerprint,
        counts_url=plan.store.url,
        medians=plan.params["medians"],
        vocabulary=plan.params["vocabulary"],
        params=plan.params,
        special={k: int(v) for k, v in vocab.special.items()},
        pad_token=int(vocab.pad_token or 0),
        n_cells=int(plan.store.attrs["n_cells"]),
        width=plan.width,
        block_size=plan.store.block_size,
        n_genes_matched=plan.gene_map.n_matched,
        n_genes_kept=plan.gene_map.n_kept,
        n_duplicates_summed=plan.gene_map.n_duplicates_summed,
        n_vocab_genes_without_median=plan.n_without_median,
        blocks_written_last_run=n_written,
        flow_version=__version__,
    )


def write_encoding(
    plan: EncodingPlan,
    where: LocationLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    compute: Callable[..., Any] = cluster_compute,
    overwrite: bool = False,
    say: Callable[[str], None] | None = None,
) -> EncodingStore:
    """Rank every cell and write the encoding store (a compute boundary); returns it, opened.

    Rerunning is safe: a finished store of the same inputs and parameters is returned as it is
    (nothing recomputed); an unfinished one is resumed (only the blocks not yet marked done are
    computed); anything else at ``where`` is replaced only with ``overwrite``. ``say`` is told
    which of these happened. ``compute`` runs graphs (default :func:`flow.cluster.compute`).
    ``storage_options`` is used only when ``where`` is not already a
    :class:`~flow._location.Location`.

    Raises
    ------
    OutputExistsError
        ``where`` holds another encoding store, or something else, and not ``overwrite``.
    """
    location = Location.of(where, storage_options)
    root: Any
    root, found = _open_or_create(plan, location, overwrite=overwrite)
    tell = say or (lambda text: None)
    if found == "complete":
        tell(f"{location.url} is already complete for these inputs and parameters: nothing to do")
        return EncodingStore(location, flow_attrs(root))
    done = np.asarray(root["block_done"][:], dtype=bool)
    todo = [b for b in range(plan.store.n_blocks) if not done[b]]
    if found == "resumed":
        tell(
            f"resuming {location.url}: {int(done.sum()):,} of {done.size:,} blocks already "
            f"written, {len(todo):,} to go"
        )
    graph = encoding_graph(plan, location, todo)
    if todo:
        compute(graph)
    _mark_complete(root, plan, len(todo))
    return EncodingStore(location, flow_attrs(root))


def encoding_graph(
    plan: EncodingPlan,
    where: LocationLike,
    blocks: Sequence[int],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Delayed:
    """The lazy graph that ranks and writes the given cell blocks into an existing store: a
    task per block (read, rank, write) and two shared keys (block reader, rank context)."""
    location = Location.of(where, storage_options)
    ctx = flat_context(plan.gene_map, plan.medians, plan.count_dtype)
    edges = np.cumsum((0, *plan.store.counts.chunks[0]))
    tok = tokenize(plan.fingerprint, location.url)
    read = delayed(plan.store.block_reader(), name=f"flow-read-counts-{tok}", traverse=False)
    shared = delayed(ctx, name=f"flow-rank-context-{tok}", traverse=False)
    writes = [
        delayed(_tokenize_block, pure=True)(
            read,
            shared,
            plan.n_counts[edges[b] : edges[b + 1]],
            plan.keep[edges[b] : edges[b + 1]],
            location,
            b,
            plan.vocab.n_tokens,
            dask_key_name=(f"flow-tokenize-write-{tok}", b),
        )
        for b in blocks
    ]
    return delayed(list, pure=True)(writes, dask_key_name=f"flow-tokenize-{tok}")


# --------------------------------------------------------------------------- reading


def _as_object(block: np.ndarray) -> np.ndarray:
    return block.astype(object)


@dataclass(frozen=True)
class EncodingStore(Located):
    """An opened encoding store (lazy: arrays are read by Dask tasks on demand).

    ``location`` is where it is (path or URL and storage options); ``attrs`` its
    ``attrs["flow"]``. Built by :func:`open_encoding` and :func:`write_encoding`; the group is
    opened once, read-only, and every array is read through it.
    """

    location: Location
    attrs: dict[str, Any]
    _opened: Any = field(default=None, compare=False, repr=False)  # the group, once opened

    def _group(self) -> Any:
        """The store's group, opened (and checked complete) once, read-only."""
        if self._opened is None:
            object.__setattr__(self, "_opened", _open_group(self.location))
        return self._opened

    @cached_property
    def layout(self) -> BandLayout:
        """Where each block's bands are (:mod:`flow.encode._bands`)."""
        return BandLayout.from_attrs(self.attrs["bands"])

    def _banded(self, name: str) -> da.Array:
        """The dense ``(cell, rank)`` view of ``bands/<k>/<name>``: one task per (block, band),
        reading that block's lengths and its slice of that band only."""
        group, layout = self._group(), self.layout
        sources = [group[f"bands/{k}/{name}"] for k in range(layout.n_bands)]
        dtype = sources[0].dtype if sources else np.dtype(np.int32)
        tok = tokenize(self.url, self.attrs.get("plan"), name)
        shared = delayed(
            (sources, np.asarray(group["band_start"][...])), name=f"flow-{name}-bands-{tok}"
        )
        lengths = da.from_zarr(group["length"], chunks=(layout.block_size,))
        out = f"flow-{name}-{tok}"
        dsk: dict[Any, Any] = {
            (out, b, k): (read_band_chunk, (lengths.name, b), shared.key, b, k, layout)
            for b in range(lengths.numblocks[0])
            for k in range(layout.n_bands)
        }
        graph = HighLevelGraph.from_collections(out, dsk, dependencies=[lengths, shared])
        chunks = (lengths.chunks[0], layout.band_chunks())
        return da.Array(graph, out, chunks, meta=np.empty((0, 0), dtype))

    @cached_property
    def tokens(self) -> da.Array:
        """``(cell, rank)`` token IDs, pad-filled past each cell's end, as a lazy Dask array
        chunked (block, 512); a chunk reads one band of one block."""
        return self._banded("tokens")

    @cached_property
    def counts(self) -> da.Array:
        """``(cell, rank)`` the count of the gene at each rank (0 past the end), lazy, chunked
        like :attr:`tokens`."""
        return self._banded("counts")

    @cached_property
    def values(self) -> da.Array:
        """``(cell, rank)`` float64 value at each rank (count / n_counts x 10,000 / median), lazy.

        Computed from ``counts`` with the fixed value arithmetic of the ranking, so it is
        bit-identical to the values the cells were ranked by; 0 past each cell's end.
        """
        n_counts = self.cell_array("n_counts").astype(np.float64)
        medians = np.nan_to_num(self.token_table()["median"].astype(np.float64), nan=1.0)
        return da.map_blocks(
            _values_block,
            self.counts,
            self.tokens,
            n_counts[:, None],
            delayed(
                medians, name=f"flow-token-medians-{tokenize(self.url, self.attrs.get('plan'))}"
            ),
            dtype=np.float64,
            meta=np.empty((0, 0), np.float64),
            name=f"flow-values-{tokenize(self.url, self.attrs.get('plan'))}",
        )

    def cell_array(self, name: str) -> da.Array:
        """A per-cell array (see :meth:`cell_column`) as a lazy Dask array on the cell blocks."""
        arr = da.from_zarr(self._group()[name], chunks=(self.tokens.chunks[0],))
        if arr.dtype.kind == "T":  # numpy StringDType: str objects, as cell_column gives them
            arr = arr.map_blocks(_as_object, dtype=object)
        return arr

    @cached_property
    def lengths(self) -> np.ndarray:
        """Ranked genes per cell (int32, one per cell; small)."""
        return np.asarray(self._group()["length"][:])

    def cell_column(self, name: str) -> np.ndarray:
        """One per-cell array (``cell``, ``n_counts``, ``filter_pass`` or a carried column)."""
        values = np.asarray(self._group()[name][:])
        return values.astype(object) if values.dtype.kind == "T" else values  # numpy StringDType

    @cached_property
    def obs_columns(self) -> list[str]:
        """Names of the carried per-cell columns."""
        group = self._group()
        names = []
        for name, arr in group.arrays():
            dims = getattr(arr.metadata, "dimension_names", None)
            if dims == ("cell",) and name not in ("length", "cell", "n_counts", "filter_pass"):
                names.append(name)
        return sorted(names)

    def token_table(self) -> dict[str, np.ndarray]:
        """Per token: gene ID, symbol, median and expressing cells (small)."""
        group = self._group()
        return {
            k: np.asarray(group[f"token_{k}"][:]) for k in ("gene_id", "symbol", "median", "cells")
        }

    @property
    def pad_token(self) -> int:
        """The pad token."""
        return int(self.attrs["pad_token"])

    def dataset(self) -> xr.Dataset:
        """The store as an :class:`xarray.Dataset` with a ``cell`` coordinate (barcodes).

        ``tokens``, ``counts`` and ``values`` (cell, rank) are lazy Dask arrays (as
        :attr:`tokens`); ``length``, ``n_counts``, ``filter_pass`` and the carried obs columns
        (cell) and the token table (``token_gene_id``, ``token_symbol``, ``token_median``,
        ``token_cells``; dimension ``token``) beside them. Reads the barcodes (the index);
        the bookkeeping arrays (bands, block flags) are left out.
        """
        cell_vars = {
            name: ("cell", self.cell_array(name))
            for name in ("length", "n_counts", "filter_pass", *self.obs_columns)
        }
        token_vars = {f"token_{k}": ("token", v) for k, v in self.token_table().items()}
        ranks = {name: (("cell", "rank"), getattr(self, name)) for name in _RANKINGS}
        return xr.Dataset(
            {**ranks, **cell_vars, **token_vars},
            coords={"cell": self.cell_column("cell")},
            attrs={"flow": dict(self.attrs)},
        )

    def describe(self) -> str:
        """A short summary of the encoding store (reads the lengths and the filter)."""
        a = self.attrs
        lengths = self.lengths
        keep = self.cell_column("filter_pass").astype(bool)
        empty = int(np.sum(keep & (lengths == 0)))
        return (
            f"encoding store {self.url}: {a['n_cells']:,} cells ({int(keep.sum()):,} passing filter), "
            f"the longest ranking {int(lengths.max(initial=0)):,} genes; "
            f"{a['n_genes_kept']:,} vocabulary genes matched "
            f"({a['n_duplicates_summed']:,} duplicate IDs summed); {empty:,} passing cells with no "
            f"vocabulary gene (kept with length 0)"
        )


_RANKINGS = ("tokens", "counts", "values")


def _values_block(
    counts: np.ndarray, tokens: np.ndarray, n_counts: np.ndarray, medians: np.ndarray
) -> np.ndarray:
    return ranked_values(counts, np.ravel(n_counts), medians[tokens])


def open_encoding(
    where: LocationLike, *, storage_options: Mapping[str, Any] | None = None
) -> EncodingStore:
    """Open an encoding store (reads attributes only).

    ``storage_options`` is used only when ``where`` is not already a
    :class:`~flow._location.Location`.

    Raises
    ------
    IncompleteStoreError
        The writer was stopped: rerun ``flow tokenize`` with the same arguments to finish it.
    """
    location = Location.of(where, storage_options)
    group = _open_group(location)
    return EncodingStore(location, flow_attrs(group), group)


def _open_group(location: Location, *, mode: str = "r", require_complete: bool = True) -> Any:
    """The store's group, checked: an encoding store of this schema, finished (if required).

    Raises
    ------
    SchemaError
        Another kind of store, or an encoding store of another schema (e.g. the dense layout
        of schema 1): it must be written again with ``flow tokenize``.
    IncompleteStoreError
        The writer was stopped (``require_complete``).
    """
    group = open_flow_group(location, KIND, mode=mode, require_complete=False)
    meta = flow_attrs(group)
    found = meta.get("schema_version")
    if found != SCHEMA_VERSION:
        msg = (
            f"{location.url} is an encoding store of schema {found}, this flow reads schema "
            f"{SCHEMA_VERSION}: re-run `flow tokenize` (with --overwrite) to rewrite it."
        )
        raise SchemaError(msg)
    if require_complete and not meta.get("complete", False):
        msg = (
            f"The {KIND} store {location.url!r} is unfinished (its writer was stopped): "
            "rerun the same `flow tokenize` command to finish it."
        )
        raise IncompleteStoreError(msg)
    return group


def blocks_of_chunk(
    enc: EncodingStore, array_path: str, chunk_coords: tuple[int, ...]
) -> list[int]:
    """The cell blocks whose data chunk ``chunk_coords`` of array ``array_path`` holds.

    ``bands/<k>/tokens`` and ``bands/<k>/counts``: the block owning that region of the band;
    per-cell arrays (``length``, ``cell``, ``n_counts``, ``filter_pass``, obs columns): the
    blocks of the chunk's cells; ``block_done`` and ``block_token_cells``: the block of the
    chunk's row. ``[]`` for arrays not written per block (the token table, ``band_start``):
    ``token_cells`` is summed again whenever a tokenize run finishes; the rest is laid out when
    the store is created (rewrite it with ``flow tokenize --overwrite``).
    Reads array metadata only. Pass the blocks to :func:`invalidate_blocks`.
    """
    layout = enc.layout
    parts = array_path.strip("/").split("/")
    if parts[0] == "bands" and len(parts) == 3:
        return layout.blocks_of_flat_chunk(int(chunk_coords[0]))
    if parts[0] in ("block_done", "block_token_cells"):
        b = int(chunk_coords[0])
        return [b] if 0 <= b < layout.n_blocks else []
    array = enc._group()[array_path.strip("/")]
    if getattr(array.metadata, "dimension_names", None) != ("cell",):
        return []
    step = int(array.chunks[0])
    first = int(chunk_coords[0]) * step
    last = min(first + step, layout.n_cells) - 1
    if first > last:
        return []
    return list(range(first // layout.block_size, last // layout.block_size + 1))


def invalidate_blocks(
    where: EncodingStore | LocationLike,
    blocks: Sequence[int],
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Mark cell blocks not done, and the store unfinished: ``flow tokenize`` with the same
    arguments (a resume) then recomputes exactly these blocks and finishes the store again.

    ``where``: an opened :class:`EncodingStore` or its location (``storage_options`` used only
    for a path or URL). Even with no blocks, the store is marked unfinished, so the next run
    sums ``token_cells`` again. A compute boundary of its own (writes flags only).

    Raises
    ------
    InputError
        A block number outside the store.
    """
    location = (
        where.location if isinstance(where, EncodingStore) else Location.of(where, storage_options)
    )
    root = _open_group(location, mode="r+", require_complete=False)
    flags = root["block_done"]
    bad = [b for b in blocks if not 0 <= int(b) < flags.shape[0]]
    if bad:
        msg = f"{location.url} has blocks 0..{flags.shape[0] - 1}, not {bad[0]}: check the block numbers."
        raise InputError(msg)
    meta = flow_attrs(root)
    meta["complete"] = False
    root.attrs["flow"] = meta  # first: a store stopped here is never taken for finished
    for b in sorted({int(b) for b in blocks}):
        flags[b] = False
