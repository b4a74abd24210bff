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

from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
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
    from .ingest._source import Source

__all__ = [
    "DEFAULT_BLOCK_SIZE",
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

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the stored counts (data, indices and shape): identifies this content."""
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
            f"  blocks: {self.n_blocks} ({a['block_size']:,} cells each, the last may be shorter)\n"
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
        _read_block,
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


def _read_block(
    *,
    location: Location,
    offsets: Sequence[int],
    block_size: int,
    n_genes: int,
    dtype_str: str,
    block_info: dict[Any, Any] | None = None,
) -> sp.csr_matrix:
    """Read one block of cells as CSR (opened per task, so it is safe on any worker)."""
    assert block_info is not None
    (r0, r1), _ = block_info[None]["array-location"]
    b = r0 // block_size
    p0, p1 = offsets[b], offsets[b + 1]
    x: Any = location.open_group(mode="r")["X"]
    indptr = np.asarray(x["indptr"][r0 : r1 + 1], dtype=np.int64) - p0
    data = np.asarray(x["data"][p0:p1], dtype=np.dtype(dtype_str))
    indices = np.asarray(x["indices"][p0:p1], dtype=np.int32)
    _check_block(data, indices, indptr, location.url, b)
    return sp.csr_matrix((data, indices, indptr), shape=(r1 - r0, n_genes))


def _check_block(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, url: str, b: int
) -> None:
    """Detect missing or corrupt chunks: Zarr reads a missing chunk as zeros, silently.

    A count store holds no zero counts and strictly increasing gene indices within a cell, so
    a zero value or a non-increasing index inside a row means the block's data is damaged.
    """
    rising = indices[1:] > indices[:-1]  # no wider temporaries: blocks hold millions of values
    starts = indptr[1:-1]
    rising[starts[(starts > 0) & (starts < indices.size)] - 1] = True  # a new row may fall back
    if not data.all() or not rising.all():
        msg = (
            f"{url}: block {b} of the counts is damaged (missing or corrupt chunks in X/data or "
            "X/indices). Convert the input again."
        )
        raise InputError(msg)


# --------------------------------------------------------------------------- writing


def write_counts(
    sources: Sequence[Source],
    where: LocationLike,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_non_integer: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> CountStore:
    """Write one or more inputs into a new count store (a compute boundary: reads everything).

    Cells of all sources are concatenated in order; their genes must be the same list or are
    united (first source's order, new genes appended). Blocks of counts are validated, their
    explicit zeros dropped, and written in whole shards, so memory holds one block and one shard
    whatever the input size. The store is marked complete only after the last write.

    Counts are stored as the smallest dtype that holds every one of them (repeated entries of a
    cell summed): uint16, else uint32, else float64 (float32 for non-integer counts). Inputs are streams, so that is known only
    once every count has been read: the store is written with uint16 first, and a count that
    does not fit stops that pass, which is then written again from the first cell with the
    wider dtype (at most three passes; real counts almost always fit uint16).

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
        Optional callable ``progress(n_cells_done, n_cells_total)`` (from 0 again when a pass
        is written again with a wider dtype).

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
    dtype: np.dtype[Any] | None = np.dtype(np.uint16)
    while dtype is not None:  # one pass per dtype tried: see above
        dtype = _write_pass(plan, dtype, progress)
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

    def input_blocks(self) -> Generator[sp.csr_matrix, None, None]:
        """Every block read from the sources, in cell order, validated, its columns mapped to
        the store's genes, repeated entries of a cell summed and explicit zeros dropped.

        Raises
        ------
        InputError
            Bad counts (see :func:`_validate`), or a source giving fewer or more cells than
            its header says.
        """
        for src, col_map in zip(self.sources, self.col_maps, strict=True):
            seen = 0
            for raw in src.iter_blocks(self.block_size):
                block = sp.csr_matrix(raw)
                _validate(block, src.info.path, seen, self.allow_non_integer)
                block = sp.csr_matrix(
                    (block.data, col_map[block.indices], block.indptr),
                    shape=(block.shape[0], self.n_genes),
                )
                block.sum_duplicates()  # sorts indices; sums repeated columns of one cell
                block.eliminate_zeros()
                seen += block.shape[0]
                yield block
            if seen != src.info.n_cells:
                msg = (
                    f"{src.info.path}: expected {src.info.n_cells} cells from its header, read "
                    f"{seen}. The file is truncated or corrupt."
                )
                raise InputError(msg)

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


def _write_pass(plan: _CountPlan, dtype: np.dtype[Any], progress: Any) -> np.dtype[Any] | None:
    """Write the whole store with counts as ``dtype``, from the first cell.

    Returns None when the store is written and marked complete, or the wider dtype a count
    needs: the pass then stops there, leaving an unfinished store for the next pass to replace.
    """
    writer = _CountWriter(plan, dtype, progress)
    blocks = plan.input_blocks()
    for block in blocks:
        wider = _needed_dtype(block, dtype)
        if wider is not None:
            blocks.close()
            return wider
        writer.add(block)
    writer.finish()
    return None


class _CountWriter:
    """One pass of writing a count store with counts as ``dtype``.

    Creating it creates the store (marked incomplete) and its arrays; :meth:`add` takes input
    blocks of any size and writes whole store blocks of ``block_size`` cells as they fill up
    (per-cell arrays too, a chunk at a time: none is held whole); :meth:`finish` writes the
    last block, obs, var and the attributes, and marks the store complete.
    """

    def __init__(self, plan: _CountPlan, dtype: np.dtype[Any], progress: Any) -> None:
        self.plan, self.dtype, self.progress = plan, dtype, progress
        self.root = create_flow_group(
            plan.location,
            KIND,
            SCHEMA_VERSION,
            extra_attrs={"encoding-type": "anndata", "encoding-version": "0.1.0"},
        )
        self.x = self.root.create_group("X")
        self.x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        sharded: dict[str, Any] = {
            "chunks": (_CHUNK,),
            "shards": (_SHARD,),
            "compressors": COUNT_CODECS,
        }
        data = self.x.create_array("data", shape=(0,), dtype=dtype, **sharded)
        indices = self.x.create_array("indices", shape=(0,), dtype=np.int32, **sharded)
        self.hasher = content_hasher()
        self.hasher.update(f"{plan.n_cells}x{plan.n_genes}".encode())
        self.data_out = ChunkedWriter(data, _SHARD, grow=True, hasher=self.hasher)
        self.indices_out = ChunkedWriter(indices, _SHARD, grow=True, hasher=self.hasher)
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
        self.row = 0
        self.pending: list[sp.csr_matrix] = []
        self.n_pending = 0

    def add(self, block: sp.csr_matrix) -> None:
        """Take the next input block; write every whole store block now complete."""
        size = self.plan.block_size
        self.pending.append(block)
        self.n_pending += block.shape[0]
        while self.n_pending >= size:
            merged = self._merged()
            self._write_block(merged[:size])
            rest = merged[size:]
            self.pending, self.n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]

    def _merged(self) -> sp.csr_matrix:
        return sp.vstack(self.pending, format="csr") if len(self.pending) > 1 else self.pending[0]

    def _write_block(self, block: sp.csr_matrix) -> None:
        """Append one store block to every array."""
        offset = self.block_offsets[-1]
        self.indptr_out.append(block.indptr[1:].astype(np.int64) + offset)
        self.totals_out.append(np.asarray(block.sum(axis=1), dtype=np.float64).ravel())
        self.detected_out.append(np.diff(block.indptr))
        self.data_out.append(block.data)
        self.indices_out.append(block.indices)
        self.block_offsets.append(offset + int(block.indptr[-1]))
        self.row += block.shape[0]
        if self.progress is not None:
            self.progress(self.row, self.plan.n_cells)

    def finish(self) -> None:
        """Write the last (shorter) block, obs and var, then mark the store complete."""
        plan = self.plan
        if self.n_pending:
            self._write_block(self._merged())
        nnz = self.data_out.close()
        self.indices_out.close()
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
            nnz=nnz,
            dtype=self.dtype.name,
            block_size=plan.block_size,
            block_nnz_offsets=self.block_offsets,
            content_sha256=self.hasher.hexdigest(),
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
    maps = []
    for src in sources:
        info = src.info
        if info.n_genes == 0 or len(info.gene_ids) != info.n_genes:
            msg = f"{info.path}: no gene IDs for its {info.n_genes} gene columns."
            raise InputError(msg)
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


def _validate(block: sp.csr_matrix, info_path: str, row0: int, allow_non_integer: bool) -> None:
    data = block.data
    if data.dtype.kind in "iu":
        bad = data < 0 if data.dtype.kind == "i" else None
        kind = "negative"
    else:
        finite = np.isfinite(data)
        if not finite.all():
            bad, kind = ~finite, "NaN or infinite"
        elif (data < 0).any():
            bad, kind = data < 0, "negative"
        elif not allow_non_integer and (np.floor(data) != data).any():
            bad, kind = np.floor(data) != data, "non-integer"
        else:
            bad = None
    if bad is not None and bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(block.indptr, k, side="right") - 1)
        msg = (
            f"{info_path}: {kind} count {data[k].item()!r} at cell {row0 + row} (0-based, in this "
            f"file), gene column {int(block.indices[k])}. Counts must be raw non-negative "
            "integers"
            + (
                ""
                if kind != "non-integer"
                else "; pass --allow-non-integer "
                "(allow_non_integer=True) to admit normalized or ambient-corrected values"
            )
            + "."
        )
        raise InputError(msg)


def _needed_dtype(block: sp.csr_matrix, current: np.dtype[Any]) -> np.dtype[Any] | None:
    """A wider dtype than ``current`` if the block's values need one, else None."""
    data = block.data
    if data.size == 0:
        return None
    if current.kind == "f":
        return None
    if data.dtype.kind == "f" and (np.floor(data) != data).any():
        return np.dtype(np.float32)
    top = data.max()
    if top > np.iinfo(current).max:
        return np.dtype(np.uint32) if top <= np.iinfo(np.uint32).max else np.dtype(np.float64)
    return None
