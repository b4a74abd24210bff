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
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr
from dask.base import tokenize

from . import __version__
from ._io import (
    COUNT_CODECS,
    ChunkedWriter,
    content_hasher,
    create_1d,
    create_flow_group,
    flow_attrs,
    mark_complete,
    open_flow_group,
    store_url,
    write_1d,
)
from .errors import FlowWarning, InputError, SchemaError

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
_OBS_STEP = 1 << 16  # cells per chunk of an obs column, and per slice written
_CARRIED_RESERVED = ("n_counts", "n_genes", "source")


class _WiderDtypeNeeded(Exception):
    """Internal: the counts need a wider dtype than the one being written; restart with it."""

    def __init__(self, dtype: np.dtype[Any]) -> None:
        self.dtype = dtype


@dataclass(frozen=True)
class CountStore:
    """An opened count store. Opening reads attributes only; counts are read by Dask tasks.

    Attributes
    ----------
    url : str
        Where the store is.
    counts : dask.array.Array
        ``(cell, gene)`` counts as lazy CSR blocks, chunked ``(block_size, n_genes)``.
    attrs : dict
        The store's ``attrs["flow"]``.
    """

    url: str
    counts: da.Array
    attrs: dict[str, Any]
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False)  # credentials

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
        pieces = list(self.iter_obs_column(name))
        return np.concatenate(pieces) if len(pieces) != 1 else pieces[0]

    def iter_obs_column(self, name: str, step: int = 1 << 16) -> Iterator[np.ndarray]:
        """One obs column in consecutive slices of ``step`` cells, read one slice at a time.

        ``"_index"`` gives the barcodes. Strings and categorical values come back as ``str``.

        Raises
        ------
        KeyError
            If the store has no such obs column.
        """
        import anndata as ad

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

    def _group(self) -> zarr.Group:
        return open_flow_group(self.url, KIND, storage_options=self.storage_options)


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
    import anndata as ad

    frame = ad.io.read_elem(group[name])
    assert isinstance(frame, pd.DataFrame)  # anndata's dataframe encoding
    return frame


# --------------------------------------------------------------------------- reading


def open_counts(
    path: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> CountStore:
    """Open a count store lazily.

    Reads only the store's attributes. The counts come back as a Dask array of
    ``scipy.sparse.csr_matrix`` blocks over the store's block grid: chunks are
    ``(block_size, ..., last), (n_genes,)``; each task opens the store and reads its own block.

    Raises
    ------
    StoreNotFoundError, SchemaError, IncompleteStoreError
        Nothing there, not a count store, or an unfinished one.
    """
    url = store_url(path)
    group = open_flow_group(
        url, KIND, storage_options=storage_options, finish_hint="run `flow convert` again"
    )
    attrs = flow_attrs(group)
    offsets = [int(o) for o in attrs["block_nnz_offsets"]]
    n_cells, n_genes, bs = int(attrs["n_cells"]), int(attrs["n_genes"]), int(attrs["block_size"])
    row_chunks = tuple(min(bs, n_cells - start) for start in range(0, n_cells, bs)) or (0,)
    dtype = np.dtype(attrs["dtype"])
    name = f"flow-read-counts-{tokenize(url, attrs['content_sha256'])}"
    counts = da.map_blocks(
        _read_block,
        url=url,
        offsets=np.asarray(offsets, dtype=np.int64),
        block_size=bs,
        n_genes=n_genes,
        dtype_str=dtype.str,
        storage_options=dict(storage_options or {}),
        chunks=(row_chunks, (n_genes,)),
        dtype=dtype,
        meta=sp.csr_matrix((0, 0), dtype=dtype),
        name=name,
    )
    return CountStore(url=url, counts=counts, attrs=attrs, storage_options=storage_options)


def _read_block(
    *,
    url: str,
    offsets: Sequence[int],
    block_size: int,
    n_genes: int,
    dtype_str: str,
    storage_options: Mapping[str, Any],
    block_info: dict[Any, Any] | None = None,
) -> sp.csr_matrix:
    """Read one block of cells as CSR (opened per task, so it is safe on any worker)."""
    assert block_info is not None
    (r0, r1), _ = block_info[None]["array-location"]
    b = r0 // block_size
    p0, p1 = offsets[b], offsets[b + 1]
    opts = None if "://" not in url or url.startswith("file://") else dict(storage_options)
    x: Any = zarr.open_group(url, mode="r", storage_options=opts)["X"]
    indptr = np.asarray(x["indptr"][r0 : r1 + 1], dtype=np.int64) - p0
    data = np.asarray(x["data"][p0:p1], dtype=np.dtype(dtype_str))
    indices = np.asarray(x["indices"][p0:p1], dtype=np.int32)
    _check_block(data, indices, indptr, url, b)
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
    path: str | os.PathLike[str],
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

    Parameters
    ----------
    sources
        Readers from :mod:`flow.ingest` (see :func:`flow.ingest.open_source`).
    path
        Output store (local path or fsspec URL); replaced if it exists.
    block_size
        Cells per block of the store's fixed block grid.
    allow_non_integer
        Admit non-integer counts (stored as float32). Otherwise they are an error.
    progress
        Optional callable ``progress(n_cells_done, n_cells_total)``.

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
    dtype: np.dtype[Any] = np.dtype(np.uint16)
    while True:
        try:
            return _write_counts(
                sources, path, block_size, dtype, allow_non_integer, storage_options, progress
            )
        except _WiderDtypeNeeded as wider:
            dtype = wider.dtype


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


def _barcodes(sources: Sequence[Source]) -> Iterable[np.ndarray]:
    """All barcodes as consecutive slices, made unique (``-1``, ``-2`` ... appended to
    repeats, with a warning).

    Uniqueness is checked on 64-bit hashes (8 bytes per cell), not on an index of the strings;
    only when two hashes are equal are the strings themselves compared.
    """

    def slices() -> Iterator[np.ndarray]:
        for src in sources:
            for a in range(0, src.info.n_cells, _OBS_STEP):
                yield np.asarray(src.info.barcodes[a : a + _OBS_STEP], dtype=object)

    hashes = np.concatenate([pd.util.hash_array(piece) for piece in slices()])
    hashes.sort()
    if not (hashes[1:] == hashes[:-1]).any():
        return slices()
    del hashes
    barcodes = pd.Index(
        np.concatenate([np.asarray(s.info.barcodes, dtype=object) for s in sources])
    )
    dup = barcodes.duplicated(keep="first")
    n_dup = int(dup.sum())
    counter = barcodes.to_series().groupby(barcodes).cumcount().to_numpy()
    fixed = np.where(dup, barcodes.astype(str) + "-" + counter.astype(str), barcodes.astype(str))
    while not pd.Index(fixed).is_unique:  # a made-up name can itself exist already
        again = pd.Index(fixed).duplicated(keep="first")
        fixed = np.where(again, fixed + "-dup", fixed)
    if n_dup:  # else: equal hashes of different strings
        warnings.warn(
            f"{n_dup} duplicate cell barcodes across the inputs were made unique by appending "
            "'-1', '-2', ... (the input column 'source' tells which file each cell came from).",
            FlowWarning,
            stacklevel=3,
        )
    return [np.asarray(fixed, dtype=object)]


def _carried_obs(sources: Sequence[Source]) -> list[str]:
    """Obs columns carried from the inputs: every column any source has, in first-seen order."""
    names: list[str] = []
    for src in sources:
        names.extend(c for c in map(str, src.info.obs.columns) if c not in names)
    return names


def _obs_column_name(name: str) -> str:
    return f"input_{name}" if name in _CARRIED_RESERVED else name


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


def _write_counts(
    sources: Sequence[Source],
    path: str | os.PathLike[str],
    block_size: int,
    dtype: np.dtype[Any],
    allow_non_integer: bool,
    storage_options: Mapping[str, Any] | None,
    progress: Any,
) -> CountStore:
    gene_ids, symbols, col_maps = _gene_union(sources)
    n_genes = len(gene_ids)
    n_cells = sum(s.info.n_cells for s in sources)
    if n_cells == 0:
        msg = f"{', '.join(s.info.path for s in sources)}: the matrix has no cells."
        raise InputError(msg)
    barcodes = _barcodes(sources)
    carried = _carried_obs(sources)

    url = store_url(path)
    root = create_flow_group(
        url,
        KIND,
        SCHEMA_VERSION,
        storage_options=storage_options,
        extra_attrs={"encoding-type": "anndata", "encoding-version": "0.1.0"},
    )
    x = root.create_group("X")
    x.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
    sharded: dict[str, Any] = {
        "chunks": (_CHUNK,),
        "shards": (_SHARD,),
        "compressors": COUNT_CODECS,
    }
    data = x.create_array("data", shape=(0,), dtype=dtype, **sharded)
    indices = x.create_array("indices", shape=(0,), dtype=np.int32, **sharded)
    hasher = content_hasher()
    hasher.update(f"{n_cells}x{n_genes}".encode())
    data_out = ChunkedWriter(data, _SHARD, grow=True, hasher=hasher)
    indices_out = ChunkedWriter(indices, _SHARD, grow=True, hasher=hasher)

    # per-cell arrays are written as the blocks go, a chunk at a time: none is held whole
    indptr = x.create_array(
        "indptr",
        shape=(n_cells + 1,),
        dtype=np.int64,
        chunks=(min(n_cells + 1, 1 << 20),),
        compressors=COUNT_CODECS,
    )
    indptr_out = ChunkedWriter(indptr, indptr.chunks[0])
    indptr_out.append(np.zeros(1, dtype=np.int64))
    carried_names = {_obs_column_name(name): name for name in carried}
    obs = _obs_group(root, ["n_counts", "n_genes", "source", *carried_names])
    totals_out = _obs_array(obs, "n_counts", np.float64 if dtype.kind == "f" else np.int64, n_cells)
    detected_out = _obs_array(obs, "n_genes", np.int32, n_cells)
    block_offsets = [0]
    row = 0
    pending: list[sp.csr_matrix] = []
    n_pending = 0

    def emit(block: sp.csr_matrix) -> None:
        nonlocal row
        indptr_out.append(block.indptr[1:].astype(np.int64) + block_offsets[-1])
        totals_out.append(np.asarray(block.sum(axis=1), dtype=np.float64).ravel())
        detected_out.append(np.diff(block.indptr))
        data_out.append(block.data)
        indices_out.append(block.indices)
        block_offsets.append(block_offsets[-1] + int(block.indptr[-1]))
        row += block.shape[0]
        if progress is not None:
            progress(row, n_cells)

    for src, col_map in zip(sources, col_maps, strict=True):
        seen = 0
        for raw in src.iter_blocks(block_size):
            block = sp.csr_matrix(raw)
            _validate(block, src.info.path, seen, allow_non_integer)
            wider = _needed_dtype(block, dtype)
            if wider is not None:
                raise _WiderDtypeNeeded(wider)
            block = sp.csr_matrix(
                (block.data, col_map[block.indices], block.indptr), shape=(block.shape[0], n_genes)
            )
            block.sum_duplicates()  # sorts indices; sums repeated columns of one cell
            block.eliminate_zeros()
            seen += block.shape[0]
            pending.append(block)
            n_pending += block.shape[0]
            while n_pending >= block_size:
                merged = sp.vstack(pending, format="csr") if len(pending) > 1 else pending[0]
                emit(merged[:block_size])
                rest = merged[block_size:]
                pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        if seen != src.info.n_cells:
            msg = (
                f"{src.info.path}: expected {src.info.n_cells} cells from its header, read "
                f"{seen}. The file is truncated or corrupt."
            )
            raise InputError(msg)
    if n_pending:
        emit(sp.vstack(pending, format="csr") if len(pending) > 1 else pending[0])

    nnz = data_out.close()
    indices_out.close()
    for out in (indptr_out, totals_out, detected_out):
        out.close()
    x.attrs["shape"] = [n_cells, n_genes]

    paths = list(dict.fromkeys(s.info.path for s in sources))
    columns: dict[str, Iterable[np.ndarray] | pd.Categorical] = {
        "_index": barcodes,
        "source": pd.Categorical.from_codes(  # codes, not a path string per cell
            np.repeat(
                [paths.index(s.info.path) for s in sources], [s.info.n_cells for s in sources]
            ),
            categories=paths,
        ),
    }
    for out_name, name in carried_names.items():
        columns[out_name] = _carried_column(name, sources)
    _write_obs(obs, columns, n_cells)
    var = pd.DataFrame({"gene_symbol": symbols.astype(str)}, index=pd.Index(gene_ids.astype(str)))
    _write_var(root, var)

    mark_complete(
        root,
        n_cells=n_cells,
        n_genes=n_genes,
        nnz=nnz,
        dtype=dtype.name,
        block_size=block_size,
        block_nnz_offsets=block_offsets,
        content_sha256=hasher.hexdigest(),
        sources=[
            {
                "path": s.info.path,
                "format": s.info.format,
                "n_cells": s.info.n_cells,
                "fingerprint": s.info.fingerprint,
                "notes": list(s.info.notes),
            }
            for s in sources
        ],
        params={"allow_non_integer": allow_non_integer},
        flow_version=__version__,
    )
    return open_counts(url, storage_options=storage_options)


def _carried_column(name: str, sources: Sequence[Source]) -> Iterable[np.ndarray] | pd.Categorical:
    """One obs column over all sources (consecutive slices); a source without it fills it in.

    The fill is 1 for ``filter_pass`` (no column means every cell passes, as in Geneformer),
    NaN for numbers and "" for text; booleans and numbers stay numbers when no fill is needed.
    When every source holds the column as a categorical (readers hold repetitive text so) it
    stays one, with the union of the categories; other text becomes ``str``.
    """
    from pandas.api.types import union_categoricals

    columns = [s.info.obs[name] if name in s.info.obs.columns else None for s in sources]
    present = [c for c in columns if c is not None]
    if all(isinstance(c.dtype, pd.CategoricalDtype) for c in present):
        fill = "1" if name == "filter_pass" else ""
        parts = [
            c.array
            if c is not None
            else pd.Categorical.from_codes(np.zeros(s.info.n_cells, np.int8), categories=[fill])
            for c, s in zip(columns, sources, strict=True)
        ]
        return union_categoricals(parts) if len(parts) > 1 else parts[0]
    numeric = all(c.dtype.kind in "biuf" for c in present)
    fill_value: Any = 1 if name == "filter_pass" else (np.nan if numeric else "")
    out_dtype = np.dtype(object)
    if numeric:  # as numpy concatenates them (NaN fills make integers float)
        fills = [np.asarray(fill_value).dtype] if len(present) < len(sources) else []
        out_dtype = np.result_type(*(c.dtype for c in present), *fills)

    def piece(column: pd.Series | None, a: int, b: int) -> np.ndarray:
        if column is None:
            return np.full(b - a, fill_value, dtype=out_dtype)
        values = np.asarray(column.iloc[a:b].to_numpy())
        if numeric:
            return values.astype(out_dtype)
        return np.asarray([_text(v) for v in values], dtype=object)

    return (
        piece(column, a, min(a + _OBS_STEP, src.info.n_cells))
        for column, src in zip(columns, sources, strict=True)
        for a in range(0, src.info.n_cells, _OBS_STEP)
    )


def _text(value: Any) -> str:
    """A cell's text value: missing ones (None, NaN) as ""."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _obs_group(root: zarr.Group, columns: list[str]) -> zarr.Group:
    """Create ``obs`` in anndata's dataframe encoding (columns written separately)."""
    obs = root.create_group("obs")
    obs.attrs.update(
        {
            "_index": "_index",
            "column-order": columns,
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
        }
    )
    return obs


def _obs_attrs(dtype: Any) -> dict[str, str]:
    """anndata's encoding attributes of a plain obs column of ``dtype``."""
    text = np.dtype(dtype).kind in "OUST"
    return {"encoding-type": "string-array" if text else "array", "encoding-version": "0.2.0"}


def _obs_array(obs: zarr.Group, name: str, dtype: Any, n_cells: int) -> ChunkedWriter:
    """A writer of one obs column (anndata's array encoding), filled in order."""
    attrs = _obs_attrs(dtype)
    return create_1d(obs, name, dtype, size=n_cells, chunk=_OBS_STEP, dim="cell", attrs=attrs)


def _write_obs(
    obs: zarr.Group, columns: Mapping[str, Iterable[np.ndarray] | pd.Categorical], n_cells: int
) -> None:
    """Write obs columns: categoricals with anndata, the others one slice at a time."""
    import anndata as ad

    for name, column in columns.items():
        if isinstance(column, pd.Categorical):  # one small code per cell
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr v3 string dtype spec warnings (third party)
                ad.io.write_elem(obs, name, column)
            continue
        pieces = iter(column)
        first = next(pieces)  # its dtype is the column's
        attrs = _obs_attrs(first.dtype)
        pieces = itertools.chain([first], pieces)
        write_1d(obs, name, pieces, size=n_cells, chunk=_OBS_STEP, dim="cell", attrs=attrs)


def _write_var(root: zarr.Group, var: pd.DataFrame) -> None:
    """Write var (one row per gene: small) with anndata, and the empty elements it expects."""
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr v3 string dtype spec warnings (third party)
        ad.io.write_elem(root, "var", var)
        for name in ("obsm", "obsp", "varm", "varp", "layers", "uns"):
            ad.io.write_elem(root, name, {})
