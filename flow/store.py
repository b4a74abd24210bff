"""The count store: an AnnData-compatible Zarr v3 store of raw counts, cells in rows, CSR.

Layout (``anndata.read_zarr(path)`` opens it)::

    STORE.zarr/
      zarr.json            attrs: anndata encoding + "flow": {kind: "counts", schema_version,
                           complete, block_size, block_nnz_offsets, n_cells, n_genes, nnz,
                           dtype, sources, params, content_sha256}
      X/data               counts, smallest dtype that holds them (uint16/uint32, float32 for
                           non-integer input), Blosc zstd + bitshuffle, sharded
      X/indices            gene index per count (int32), same codecs
      X/indptr             row pointers (int64)
      obs/                 _index (barcodes), n_counts (total over all genes), n_genes
                           (detected genes), source (categorical), carried input columns
      var/                 _index (gene IDs as in the input), gene_symbol

Cells are grouped into fixed blocks of ``block_size`` cells, recorded in the store: every
later stage maps over that grid, and the nonzero offsets of the blocks are kept in the
attributes so a block is read without touching ``indptr`` of the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import anndata as ad  # ~0.1 s on top of flow's own imports (measured): not worth hiding
import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from dask.base import tokenize

from ._count_blocks import BlockReader, read_block
from ._count_tasks import (
    DIRECT_DTYPE,
    SCRATCH,
    Piece,
    PieceCounts,
    Reader,
    Runner,
    Segment,
    edge_shards,
    final_dtype,
    piece_offsets,
    plan_pieces,
)
from ._io import (
    COUNT_CODECS,
    ChunkedWriter,
    content_hasher,
    create_flow_group,
    flow_attrs,
    mark_complete,
    open_flow_group,
)
from ._location import Located, Location, LocationLike
from ._store_obs import (
    barcode_slices,
    carried_column,
    carried_obs,
    obs_array,
    obs_column_name,
    obs_group,
    unique_barcodes,
    write_obs,
    write_var,
)
from ._version import __version__
from .errors import InputError, SchemaError

if TYPE_CHECKING:
    from distributed import Client

    from .ingest._source import Source

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "BlockReader",
    "CountStore",
    "open_counts",
    "parse_filter_pass",
    "write_counts",
]

KIND = "counts"
SCHEMA_VERSION = 1
DEFAULT_BLOCK_SIZE = 4096
_SHARD = (
    1 << 22
)  # values per data/indices shard: one object per 4M nonzeros; the writer buffers one
_CHUNK = 1 << 18  # values per inner chunk


@dataclass(frozen=True)
class CountStore(Located):
    """An opened count store. Opening reads attributes only; counts are read by Dask tasks.

    Attributes
    ----------
    location : Location
        Where the store is (an absolute local path or a URL, with its storage options).
    counts : dask.array.Array
        ``(cell, gene)`` counts as lazy CSR blocks, chunked ``(block_size, n_genes)``.
    attrs : dict
        The store's ``attrs["flow"]``.
    """

    location: Location
    counts: da.Array
    attrs: dict[str, Any]

    @property
    def block_size(self) -> int:
        """Cells per block (the last block may be shorter)."""
        return int(self.attrs["block_size"])

    @property
    def n_blocks(self) -> int:
        """Number of cell blocks."""
        return len(self.attrs["block_nnz_offsets"]) - 1

    def block_reader(self) -> BlockReader:
        """What reads one block eagerly, inside a task (see :class:`BlockReader`)."""
        a = self.attrs
        return BlockReader(
            self.location,
            tuple(int(o) for o in a["block_nnz_offsets"]),
            self.block_size,
            int(a["n_cells"]),
            int(a["n_genes"]),
            np.dtype(a["dtype"]),
        )

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the stored counts: of the shape, then of each ``X/data`` shard's SHA-256
        (its values, then its gene indices), in order; identifies this content, and is
        computed by the shards' writers in parallel."""
        return str(self.attrs["content_sha256"])

    @cached_property
    def obs(self) -> pd.DataFrame:
        """Cell metadata (barcodes as index). Read on first access."""
        return _read_frame(self._group(), "obs")

    @cached_property
    def var(self) -> pd.DataFrame:
        """Gene metadata (gene IDs as index, ``gene_symbol``). Read on first access."""
        return _read_frame(self._group(), "var")

    @cached_property
    def obs_columns(self) -> list[str]:
        """Names of the obs columns, in order (reads attributes only)."""
        order: Any = self._group()["obs"].attrs.get("column-order", [])
        return [str(c) for c in order]

    def obs_column(self, name: str) -> np.ndarray:
        """One obs column as a numpy array (reads that column only; ``"_index"``: barcodes).

        Numeric and boolean columns keep their dtype; string and categorical columns come back
        as ``str``. Unlike :attr:`obs`, memory is one column's, not the whole table's.
        """
        if name in self._numeric_columns:
            return self._numeric_columns[name]
        pieces = list(self.iter_obs_column(name))
        column = np.concatenate(pieces) if len(pieces) != 1 else pieces[0]
        if column.dtype.kind in "biuf":  # per-cell numbers the stages share: read once
            column.flags.writeable = False
            self._numeric_columns[name] = column
        return column

    @cached_property
    def _numeric_columns(self) -> dict[str, np.ndarray]:
        """Numeric obs columns read so far (n_counts, n_genes, filter_pass, ...): 8 B a cell."""
        return {}

    def iter_obs_column(self, name: str, step: int = 1 << 16) -> Iterator[np.ndarray]:
        """One obs column in consecutive slices of ``step`` cells, read one slice at a time.

        ``"_index"`` gives the barcodes. Strings and categorical values come back as ``str``.

        Raises
        ------
        KeyError
            If the store has no such obs column.
        """
        obs: Any = self._group()["obs"]
        if name != "_index" and name not in self.obs_columns:
            msg = f"{self.url}: no obs column {name!r}; columns are {self.obs_columns}."
            raise KeyError(msg)
        elem: Any = obs[name]
        n = int(self.attrs["n_cells"])
        kind = elem.attrs.get("encoding-type")
        if kind == "categorical":
            categories = _as_str(np.asarray(ad.io.read_elem(elem["categories"])))
            values = np.append(categories, "nan")  # code -1: missing, shown as pandas does
            codes = elem["codes"]
            for a in range(0, n, step):
                yield values[np.asarray(codes[a : a + step])]
        elif kind in ("array", "string-array") and isinstance(elem, zarr.Array):
            for a in range(0, n, step):
                piece = np.asarray(elem[a : a + step])
                yield piece if piece.dtype.kind in "biuf" else _as_str(piece)
        else:  # other encodings (nullable arrays): anndata reads them whole
            whole = np.asarray(ad.io.read_elem(elem))
            for a in range(0, n, step):
                yield whole[a : a + step]
        if n == 0:
            yield np.zeros(0, dtype=str)

    def cells(self, n_counts_column: str = "n_counts") -> tuple[np.ndarray, np.ndarray]:
        """Each cell's total count (float64) and whether it passes the filter (reads 2 columns).

        The filter is the ``filter_pass`` column read by :func:`parse_filter_pass`; without
        that column every cell passes.

        Raises
        ------
        SchemaError
            If there is no ``n_counts_column``.
        InputError
            If ``filter_pass`` holds text that is neither true nor false.
        """
        if n_counts_column not in self.obs_columns:
            msg = f"{self.url}: no obs column {n_counts_column!r} for n_counts; columns are {self.obs_columns}."
            raise SchemaError(msg)
        n_counts = self.obs_column(n_counts_column).astype(np.float64)
        if "filter_pass" not in self.obs_columns:
            return n_counts, np.ones(n_counts.size, dtype=bool)
        return n_counts, parse_filter_pass(self.obs_column("filter_pass"), self.url)

    def describe(self) -> str:
        """A short human-readable summary of the store (reads the ``n_genes`` obs column only)."""
        a = self.attrs
        genes = self.obs_column("n_genes")
        q = np.percentile(genes, [0, 50, 90, 99, 100]) if genes.size else np.zeros(5)
        sources = "\n".join(
            f"    {s['path']} ({s['format']}, {s['n_cells']:,} cells)" for s in a["sources"]
        )
        return (
            f"count store {self.url}\n"
            f"  cells x genes: {a['n_cells']:,} x {a['n_genes']:,}; nonzeros {a['nnz']:,}; dtype {a['dtype']}\n"
            f"  detected genes per cell: min {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
            f"p99 {q[3]:.0f}, max {q[4]:.0f}\n"
            f"  blocks: {self.n_blocks:,} block{'s' if self.n_blocks != 1 else ''} of "
            f"{a['block_size']:,} cells (the last may be shorter)\n"
            f"  sources:\n{sources}"
        )

    def _group(self) -> zarr.Group:
        return open_flow_group(self.location, KIND)


_TRUE = frozenset({"1", "true", "t", "yes", "y"})
_FALSE = frozenset({"0", "false", "f", "no", "n", ""})


def parse_filter_pass(values: np.ndarray, where: str) -> np.ndarray:
    """``filter_pass`` as booleans: 1/True keeps a cell (upstream keeps ``== 1``).

    Numbers: exactly 1 keeps (NaN, 0 and anything else drop). Text: ``1``/``true``/``yes``
    keep, ``0``/``false``/``no``/empty drop (any case), anything else is an error, because
    ``astype(bool)`` would keep every non-empty string, ``"False"`` and ``"0"`` included.

    Examples
    --------
    >>> parse_filter_pass(np.array(["True", "no", "1"]), "x").tolist()
    [True, False, True]
    """
    if values.dtype.kind == "b":
        return values.astype(bool)
    if values.dtype.kind in "iuf":
        return np.asarray(values == 1)
    text = np.char.lower(np.char.strip(np.asarray(values, dtype=str)))
    known = np.isin(text, list(_TRUE | _FALSE))
    if not known.all():
        bad = sorted({str(v) for v in values[~known].tolist()})[:5]
        msg = (
            f"{where}: obs column 'filter_pass' has values {bad} that are neither 1/True "
            "(keep the cell) nor 0/False (drop it). Fix the column in the input."
        )
        raise InputError(msg)
    return np.isin(text, list(_TRUE))


def _as_str(values: np.ndarray) -> np.ndarray:
    """Strings of any numpy flavour (object, StringDType) as a fixed-width ``str`` array."""
    return values.astype(object).astype(str)


def _read_frame(group: zarr.Group, name: str) -> pd.DataFrame:
    frame = ad.io.read_elem(group[name])
    assert isinstance(frame, pd.DataFrame)  # anndata's dataframe encoding
    return frame


# --------------------------------------------------------------------------- reading


def open_counts(
    where: LocationLike, *, storage_options: Mapping[str, Any] | None = None
) -> CountStore:
    """Open a count store lazily.

    Reads only the store's attributes. The counts come back as a Dask array of
    ``scipy.sparse.csr_matrix`` blocks over the store's block grid: chunks are
    ``(block_size, ..., last), (n_genes,)``; each task opens the store and reads its own block.

    Parameters
    ----------
    where
        The store: a :class:`~flow._location.Location`, a local path or an fsspec URL.
    storage_options
        fsspec options of a URL; used only when ``where`` is not a Location.

    Raises
    ------
    StoreNotFoundError, SchemaError, IncompleteStoreError
        Nothing there, not a count store, or an unfinished one.
    """
    given = Location.of(where, storage_options)
    location = Location(given.url, given.storage_options)  # absolute: the same on any worker
    group = open_flow_group(location, KIND, finish_hint="run `flow convert` again")
    attrs = flow_attrs(group)
    offsets = [int(o) for o in attrs["block_nnz_offsets"]]
    n_cells, n_genes, bs = int(attrs["n_cells"]), int(attrs["n_genes"]), int(attrs["block_size"])
    row_chunks = tuple(min(bs, n_cells - start) for start in range(0, n_cells, bs)) or (0,)
    dtype = np.dtype(attrs["dtype"])
    name = f"flow-read-counts-{tokenize(location.url, attrs['content_sha256'])}"
    counts = da.map_blocks(
        read_block,
        location=location,
        offsets=np.asarray(offsets, dtype=np.int64),
        block_size=bs,
        n_genes=n_genes,
        dtype_str=dtype.str,
        chunks=(row_chunks, (n_genes,)),
        dtype=dtype,
        meta=sp.csr_matrix((0, 0), dtype=dtype),
        name=name,
    )
    return CountStore(location=location, counts=counts, attrs=attrs)


def write_counts(
    sources: Sequence[Source],
    where: LocationLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_non_integer: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: Any = None,
    client: Client | None = None,
) -> CountStore:
    """Write one or more inputs into a new count store (a compute boundary: reads everything).

    Cells of all sources are concatenated in order; their genes must be the same list or are
    united (first source's order, new genes appended). The store is marked complete only
    after the last write.

    The inputs are read by many tasks at once (see :mod:`flow._count_tasks`): one task per
    input file, and one per range of cells of a file whose reader reads ranges, validates
    every count, drops explicit zeros and sums repeated entries of a cell. When every input
    records where each cell's entries start (CSR h5ad, 10x HDF5, AnnData Zarr: their
    ``indptr``), that is one pass: each task writes the ``X/data`` shards inside its cells
    and hands the values of the shards at its edges to one small task per such shard. Else
    (or when a piece turns out not to match its ``indptr`` or to need more than uint16) two
    passes: the tasks count and spill, then, with every offset known, one task per shard
    writes it whole. The result is the same bytes whatever the path, the number of workers
    or the split. Memory per task is one piece of cells and one shard; this process holds one
    piece's per-cell counts at a time (all of them without a ``client``).

    Counts are stored as the smallest dtype that holds every one of them (repeated entries of a
    cell summed): uint16, else uint32, else float64 (float32 for non-integer counts), decided
    block by block in cell order once every count has been counted (nothing is rewritten).

    Parameters
    ----------
    sources
        Readers from :mod:`flow.ingest` (see :func:`flow.ingest.open_source`).
    where
        Output store (a :class:`~flow._location.Location`, local path or fsspec URL);
        replaced if it exists.
    block_size
        Cells per block of the store's fixed block grid.
    allow_non_integer
        Admit non-integer counts (stored as float32). Otherwise they are an error.
    storage_options
        fsspec options of a URL; used only when ``where`` is not a Location.
    progress
        Optional callable ``progress(n_cells_done, n_cells_total)``: cells counted, then
        (from 0 again) cells written.
    client
        A ``distributed.Client`` whose workers run the tasks (they must see the inputs and the
        output). None: dask's threaded scheduler, in this process.

    Raises
    ------
    InputError
        Negative, NaN/inf or (without ``allow_non_integer``) non-integer counts, an empty
        matrix, or sources without gene IDs; the message names the file and the cells.
    """
    if block_size < 1:
        msg = f"block_size must be a positive number of cells; got {block_size}."
        raise ValueError(msg)
    if not sources:
        msg = "No inputs given."
        raise InputError(msg)
    given = Location.of(where, storage_options)
    plan = _CountPlan.of(
        sources,
        Location(given.url, given.storage_options),  # absolute: the same from any directory
        block_size=block_size,
        allow_non_integer=allow_non_integer,
    )
    _write_store(plan, Runner(client, progress))
    return open_counts(plan.location)


@dataclass(frozen=True)
class _CountPlan:
    """What writing a count store needs, worked out from the sources' headers (no counts read).

    ``col_maps[i]`` maps source ``i``'s gene columns to the store's; ``carried`` maps each
    carried obs column as written to its input name; ``barcodes`` holds the barcodes made
    unique when the inputs repeat some (None: the sources' own barcodes are unique).
    """

    sources: tuple[Source, ...]
    location: Location
    block_size: int
    allow_non_integer: bool
    gene_ids: np.ndarray
    symbols: np.ndarray
    col_maps: tuple[np.ndarray, ...]
    n_cells: int
    barcodes: np.ndarray | None
    carried: dict[str, str]

    @classmethod
    def of(
        cls,
        sources: Sequence[Source],
        location: Location,
        *,
        block_size: int,
        allow_non_integer: bool,
    ) -> _CountPlan:
        """Check the sources' headers and plan the store (warns about repeated barcodes)."""
        gene_ids, symbols, col_maps = _gene_union(sources)
        n_cells = sum(s.info.n_cells for s in sources)
        if n_cells == 0:
            msg = f"{', '.join(s.info.path for s in sources)}: the matrix has no cells."
            raise InputError(msg)
        return cls(
            sources=tuple(sources),
            location=location,
            block_size=block_size,
            allow_non_integer=allow_non_integer,
            gene_ids=gene_ids,
            symbols=symbols,
            col_maps=tuple(col_maps),
            n_cells=n_cells,
            barcodes=unique_barcodes(sources),
            carried={obs_column_name(name): name for name in carried_obs(sources)},
        )

    @property
    def n_genes(self) -> int:
        """Genes (columns) of the store: the union of the sources' genes."""
        return len(self.gene_ids)

    def barcode_slices(self) -> Iterable[np.ndarray]:
        """All barcodes, unique, as consecutive slices (each call starts again)."""
        if self.barcodes is not None:
            return [self.barcodes]
        return barcode_slices(self.sources)

    def obs_columns(self) -> dict[str, Iterable[np.ndarray] | pd.Categorical]:
        """The obs columns written after the counts: barcodes, source, carried columns."""
        sources = self.sources
        paths = list(dict.fromkeys(s.info.path for s in sources))
        columns: dict[str, Iterable[np.ndarray] | pd.Categorical] = {
            "_index": self.barcode_slices(),
            "source": pd.Categorical.from_codes(  # codes, not a path string per cell
                np.repeat(
                    [paths.index(s.info.path) for s in sources], [s.info.n_cells for s in sources]
                ),
                categories=paths,
            ),
        }
        for out_name, name in self.carried.items():
            columns[out_name] = carried_column(name, sources)
        return columns

    def record(self) -> dict[str, Any]:
        """What the store records about its inputs and options (``attrs["flow"]``)."""
        sources = [
            {
                "path": s.info.path,
                "format": s.info.format,
                "n_cells": s.info.n_cells,
                "fingerprint": s.info.fingerprint,
                "notes": list(s.info.notes),
            }
            for s in self.sources
        ]
        return {
            "sources": sources,
            "params": {"allow_non_integer": self.allow_non_integer},
            "flow_version": __version__,
        }


def _write_store(plan: _CountPlan, runner: Runner) -> None:
    """Write the store: in one pass when every value's offset is known before reading (CSR
    inputs: their ``indptr``) and the counts fit uint16, else (or when a piece turns out not
    to fit: explicit zeros, repeated entries, wide or non-integer counts) in two: count every
    piece, then write whole shards at known offsets."""
    pieces = plan_pieces(plan.sources, plan.block_size)
    readers = runner.share(
        [
            Reader(src, col_map, plan.n_genes, plan.allow_non_integer, plan.block_size)
            for src, col_map in zip(plan.sources, plan.col_maps, strict=True)
        ]
    )
    offsets = piece_offsets(plan.sources, pieces)
    if offsets is None or not _write_direct(plan, runner, readers, pieces, offsets):
        _write_spilled(plan, runner, readers, pieces)


def _create(plan: _CountPlan) -> zarr.Group:
    """The store's root, marked incomplete (replacing whatever was there)."""
    return create_flow_group(  # first: a convert stopped at any point leaves an unfinished store
        plan.location,
        KIND,
        SCHEMA_VERSION,
        extra_attrs={"encoding-type": "anndata", "encoding-version": "0.1.0"},
    )


def _content_sha256(plan: _CountPlan, shard_digests: Iterable[str]) -> str:
    hasher = content_hasher()
    hasher.update(f"{plan.n_cells}x{plan.n_genes}".encode())
    for digest in shard_digests:
        hasher.update(digest.encode())
    return hasher.hexdigest()


def _write_direct(
    plan: _CountPlan, runner: Runner, readers: list[Any], pieces: list[Piece], offsets: np.ndarray
) -> bool:
    """One pass (see :func:`flow._count_tasks.count_direct`); False, with the store left
    unfinished, when a piece did not fit the plan."""
    writer = _CountWriter(_create(plan), plan, DIRECT_DTYPE, int(offsets[-1]))
    handles, summaries, edge_digests = runner.direct(
        readers, pieces, plan.location, offsets, _SHARD
    )
    if not all(fits for fits, _ in summaries) or None in edge_digests:
        return False
    digests: dict[int, str | None] = dict(
        zip((k for k, _ in edge_shards(offsets, _SHARD)), edge_digests, strict=True)
    )
    for _, written in summaries:
        digests.update(written)
    for i, piece in enumerate(pieces):
        writer.add(piece, runner.fetch(handles, i), int(offsets[i]))
    writer.finish(_content_sha256(plan, (str(digests[k]) for k in sorted(digests))))
    return True


def _write_spilled(
    plan: _CountPlan, runner: Runner, readers: list[Any], pieces: list[Piece]
) -> None:
    """Two phases: count every piece (spilling its nonzeros), then write whole shards."""
    root = _create(plan)
    root.create_group(SCRATCH)
    handles = runner.count(readers, pieces, plan.location, plan.n_cells)
    summaries = runner.summaries(handles)
    offsets = np.concatenate([[0], np.cumsum([s[0] for s in summaries], dtype=np.int64)])
    nnz = int(offsets[-1])
    writer = _CountWriter(root, plan, final_dtype([f for s in summaries for f in s[1]]), nnz)
    for i, piece in enumerate(pieces):
        writer.add(piece, runner.fetch(handles, i), int(offsets[i]))
    bounds = np.unique(np.append(np.arange(0, nnz, _SHARD, dtype=np.int64), nnz))
    spans = [
        (_segments(offsets, int(a), int(b)), int(a), int(b), (b - a) * plan.n_cells // nnz)
        for a, b in itertools.pairwise(bounds)
    ]
    digests = runner.write(plan.location, spans, _SHARD)
    del root[SCRATCH]
    writer.finish(_content_sha256(plan, (d for shard in digests for d in shard)))


def _segments(offsets: np.ndarray, start: int, stop: int) -> list[Segment]:
    """The pieces' spilled values that make up values ``start:stop`` of ``X/data``."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    return [
        (
            j,
            max(start, int(offsets[j])) - int(offsets[j]),
            min(stop, int(offsets[j + 1])) - int(offsets[j]),
        )
        for j in range(first, last)
        if offsets[j + 1] > offsets[j]
    ]


class _CountWriter:
    """The store's arrays and the parts the driver writes itself, in cell order: ``indptr``,
    ``n_genes`` and ``n_counts`` (a chunk at a time, from each piece's per-cell counts),
    then obs, var and the attributes. ``X/data`` and ``X/indices`` are created at their final
    size and written by the tasks, whole shards each.
    """

    def __init__(self, root: zarr.Group, plan: _CountPlan, dtype: np.dtype[Any], nnz: int) -> None:
        self.root, self.plan, self.dtype, self.nnz = root, plan, dtype, nnz
        self.x = self.root.create_group("X")
        self.x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        sharded: dict[str, Any] = {
            "chunks": (_CHUNK,),
            "shards": (_SHARD,),
            "compressors": COUNT_CODECS,
        }
        self.x.create_array("data", shape=(nnz,), dtype=dtype, **sharded)
        self.x.create_array("indices", shape=(nnz,), dtype=np.int32, **sharded)
        indptr = self.x.create_array(
            "indptr",
            shape=(plan.n_cells + 1,),
            dtype=np.int64,
            chunks=(min(plan.n_cells + 1, 1 << 20),),
            compressors=COUNT_CODECS,
        )
        self.indptr_out = ChunkedWriter(indptr, indptr.chunks[0])
        self.indptr_out.append(np.zeros(1, dtype=np.int64))
        self.obs = obs_group(self.root, ["n_counts", "n_genes", "source", *plan.carried])
        totals_dtype = np.float64 if dtype.kind == "f" else np.int64
        self.totals_out = obs_array(self.obs, "n_counts", totals_dtype, plan.n_cells)
        self.detected_out = obs_array(self.obs, "n_genes", np.int32, plan.n_cells)
        self.block_offsets = [0]

    def add(self, piece: Piece, counts: PieceCounts, offset: int) -> None:
        """Write a piece's per-cell arrays (its nonzeros start at ``offset`` in ``X/data``)."""
        if counts.nnz.size != piece.n_cells:
            src = self.plan.sources[piece.source].info
            msg = (
                f"{src.path}: expected {piece.n_cells} cells (rows {piece.start}:{piece.stop}), "
                f"read {counts.nnz.size}. The file is truncated or corrupt."
            )
            raise InputError(msg)
        ends = offset + np.cumsum(counts.nnz, dtype=np.int64)
        self.indptr_out.append(ends)
        self.totals_out.append(counts.totals)
        self.detected_out.append(counts.nnz)
        bs, n = self.plan.block_size, self.plan.n_cells
        stop = piece.row0 + piece.n_cells
        block_ends = list(range((piece.row0 // bs + 1) * bs, stop + 1, bs))
        if stop == n and n % bs:
            block_ends.append(n)
        self.block_offsets.extend(int(ends[r - piece.row0 - 1]) for r in block_ends)

    def finish(self, content_sha256: str) -> None:
        """Write obs and var, then mark the store complete (the tasks wrote X/data, indices)."""
        plan = self.plan
        for out in (self.indptr_out, self.totals_out, self.detected_out):
            out.close()
        self.x.attrs["shape"] = [plan.n_cells, plan.n_genes]
        write_obs(self.obs, plan.obs_columns(), plan.n_cells)
        var = pd.DataFrame(
            {"gene_symbol": plan.symbols.astype(str)}, index=pd.Index(plan.gene_ids.astype(str))
        )
        write_var(self.root, var)
        mark_complete(
            self.root,
            n_cells=plan.n_cells,
            n_genes=plan.n_genes,
            nnz=self.nnz,
            dtype=self.dtype.name,
            block_size=plan.block_size,
            block_nnz_offsets=self.block_offsets,
            content_sha256=content_sha256,
            **plan.record(),
        )


def _gene_union(sources: Sequence[Source]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Union of the sources' genes, their symbols, and each source's column -> union column.

    Genes are matched by (ID, occurrence): an ID repeated within an input stays a separate
    column, as in the input (tokenization sums such duplicates later).
    """
    ids: list[str] = []
    symbols: list[str] = []
    where: dict[tuple[str, int], int] = {}
    maps: list[np.ndarray] = []
    previous: np.ndarray | None = None
    for src in sources:
        info = src.info
        if info.n_genes == 0 or len(info.gene_ids) != info.n_genes:
            msg = f"{info.path}: no gene IDs for its {info.n_genes} gene columns."
            raise InputError(msg)
        if previous is not None and _same_genes(previous, info.gene_ids):
            maps.append(maps[-1])  # the same genes as the input before (a corpus): one map
            continue
        previous = info.gene_ids
        sym = info.gene_symbols if info.gene_symbols is not None else info.gene_ids
        seen: dict[str, int] = {}
        col_map = np.empty(info.n_genes, dtype=np.int64)
        for j, (gid, s) in enumerate(zip(map(str, info.gene_ids), map(str, sym), strict=True)):
            key = (gid, seen.get(gid, 0))
            seen[gid] = key[1] + 1
            if key not in where:
                where[key] = len(ids)
                ids.append(gid)
                symbols.append(s)
            col_map[j] = where[key]
        maps.append(col_map)
    return np.asarray(ids, dtype=object), np.asarray(symbols, dtype=object), maps


def _same_genes(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two inputs list the same gene IDs in the same order (compared as text)."""
    return len(a) == len(b) and bool(np.array_equal(a.astype(str), b.astype(str)))
