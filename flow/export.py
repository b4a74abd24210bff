"""Export the model input of an encoding as a Hugging Face dataset directory or as Parquet.

The model input for an input size ``L`` is a view of the encoding store's full rankings: the
first ``L`` tokens of each cell (V1), or ``<cls>``, the first ``L - 2`` tokens and ``<eos>``
(V2), exactly as upstream Geneformer truncates (``input_ids[0:L-2]``, then ``<cls>`` inserted
first and ``<eos>`` last). Only the rank columns the model needs are read: from an encoding
store, each block's flat rank bands below the input size, as stored (no padding).

:func:`write_model_dataset` is the export stage: an opened encoding store and a preset in, a
dataset directory out. :func:`write_model_arrays` does the same from plain Dask arrays (any
tokens, lengths and per-cell columns). Both are writers (a documented compute boundary). Every
cell block is one Dask task that writes its own shard file from its own block; nothing is
built in memory whole. A last task removes stale shards of a previous run and writes the
small metadata files, after all shards exist. The Hugging Face layout is the one
``datasets.Dataset.save_to_disk`` writes, so ``datasets.load_from_disk(path)`` opens it::

    path/
        data-00000-of-000NN.arrow    Arrow IPC *stream* files, one per cell block
        dataset_info.json            {"features": ...} (written last)
        state.json                   {"_data_files": [...], "_fingerprint": ..., ...} (written last)

The Parquet layout is a directory of ``part-00000.parquet`` ... (one per cell block) plus an empty
``_SUCCESS`` marker written last; ``pyarrow.parquet.read_table(path)`` and
``pandas.read_parquet(path)`` read it (they skip names starting with ``_``).

Columns: ``input_ids`` (list of int32, the type ``datasets`` itself gives a column of that name),
``length`` (int64, ``len(input_ids)`` after the special tokens, as upstream), then the carried
cell metadata columns. The export does not import ``datasets``.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from ._export_arrow import (
    BATCH_ROWS,
    RESERVED,
    ModelInput,
    block_batches,
    column_type,
    export_schema,
    features,
    flat_batches,
    model_input_arrays,
    model_input_bands,
)
from ._location import Location, LocationLike
from ._version import __version__
from .encode._bands import BandReader
from .errors import ChunkingError, InputError

if TYPE_CHECKING:
    from .encode.store import EncodingStore
    from .vocab import Preset

__all__ = [
    "BATCH_ROWS",
    "CELL_ID",
    "export_summary",
    "model_input_block",
    "write_model_arrays",
    "write_model_dataset",
]

#: The column of an export that holds each row's cell identifier (the barcode).
CELL_ID = "cell_id"

ExportFormat = Literal["hf", "parquet"]

_INFO_FILE = "dataset_info.json"  # datasets.config.DATASET_INFO_FILENAME
_STATE_FILE = "state.json"  # datasets.config.DATASET_STATE_JSON_FILENAME
_SUCCESS_FILE = "_SUCCESS"
_SHARD_PATTERNS = {
    "hf": re.compile(r"data-\d{5,}-of-\d{5,}\.arrow"),
    "parquet": re.compile(r"part-\d{5,}\.parquet"),
}
_MARKERS = (_STATE_FILE, _INFO_FILE, _SUCCESS_FILE)


# --------------------------------------------------------------------------------------------
# numpy kernel (the pure kernels are in flow._export_arrow)
# --------------------------------------------------------------------------------------------


def model_input_block(
    tokens: np.ndarray,
    lengths: np.ndarray,
    *,
    input_size: int,
    cls: int | None,
    eos: int | None,
) -> list[np.ndarray]:
    """The model input of every cell of one block (numpy; eager).

    Parameters
    ----------
    tokens
        ``(n_cells, width)`` full ranking of one block, highest value first, pad-filled past
        each cell's length. Only the first ``input_size`` (V1) or ``input_size - 2`` (V2)
        columns are looked at.
    lengths
        ``(n_cells,)`` number of ranked genes per cell.
    input_size
        Model input size, special tokens included (2,048 for V1 models, 4,096 for V2).
    cls, eos
        ``<cls>`` and ``<eos>`` token IDs (V2), or both None (V1).

    Returns
    -------
    list of numpy.ndarray
        One int32 array per cell: the first ``min(length, input_size)`` tokens (V1), or
        ``[cls] + first min(length, input_size - 2) tokens + [eos]`` (V2), which is upstream
        Geneformer's truncation exactly. A cell of length 0 gives ``[]`` (V1) or
        ``[cls, eos]`` (V2).

    Raises
    ------
    ValueError
        ``input_size`` below 1 (V1) or 3 (V2), or only one of ``cls`` and ``eos`` given.
    InputError
        A length does not fit the ranking (negative, or more genes than stored columns).

    Examples
    --------
    >>> import numpy as np
    >>> tokens = np.array([[7, 5, 9, 0], [4, 0, 0, 0]], dtype=np.uint16)
    >>> [
    ...     a.tolist()
    ...     for a in model_input_block(tokens, np.array([3, 1]), input_size=2, cls=None, eos=None)
    ... ]
    [[7, 5], [4]]
    >>> [
    ...     a.tolist()
    ...     for a in model_input_block(tokens, np.array([3, 0]), input_size=4, cls=2, eos=3)
    ... ]
    [[2, 7, 5, 3], [2, 3]]
    """
    model = ModelInput(input_size, cls, eos)
    values, sizes = model_input_arrays(tokens, lengths, model=model)
    if not sizes.shape[0]:
        return []
    return np.split(values, np.cumsum(sizes)[:-1])


# --------------------------------------------------------------------------------------------
# tasks (plain arguments only: no open files, locks or clients in the graph)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardSpec:
    """What every task of one export shares: where, which format, the schema, the model."""

    location: Location
    fmt: ExportFormat
    schema: pa.Schema
    model: ModelInput


def _prepare_dir(location: Location) -> str:
    """Create the directory and remove the completion markers: a killed run is never complete."""
    fs, root = location.fs()
    fs.makedirs(root, exist_ok=True)
    for name in _MARKERS:
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path)
    return location.url


def _write_batches(batches: list[pa.RecordBatch], spec: _ShardSpec, name: str) -> int:
    """Write one shard file of record batches (empty ones skipped); return its rows."""
    fs, root = spec.location.fs()
    with fs.open(posixpath.join(root, name), "wb") as sink:
        if spec.fmt == "hf":
            with pa.ipc.new_stream(sink, spec.schema) as writer:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_batch(batch)
        else:
            with pq.ParquetWriter(sink, spec.schema) as pwriter:
                for batch in batches:
                    if batch.num_rows:
                        pwriter.write_batch(batch)
    return sum(batch.num_rows for batch in batches)


def _write_shard(
    tokens: np.ndarray,
    lengths: np.ndarray,
    keep: np.ndarray | None,
    columns: dict[str, np.ndarray],
    ready: str,
    *,
    spec: _ShardSpec,
    name: str,
    row_offset: int,
) -> int:
    """Write one cell block's shard file from its dense rank columns (after ``ready``: the
    directory is prepared); return the number of rows written."""
    batches = block_batches(
        tokens, lengths, keep, columns, schema=spec.schema, model=spec.model, row_offset=row_offset
    )
    return _write_batches(batches, spec, name)


@dataclass(frozen=True)
class _StoreCells:
    """The per-cell arrays of an encoding store an export shard reads for its own block: one
    shared key of the graph, where dask arrays would add a task per block and column."""

    length: Any  # zarr arrays, (cell,)
    filter_pass: Any
    columns: dict[str, Any]  # exported name -> array

    @classmethod
    def of(cls, group: Any, columns: dict[str, str]) -> _StoreCells:
        """``columns``: exported name -> the store's array name."""
        return cls(group["length"], group["filter_pass"], {k: group[v] for k, v in columns.items()})

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Lengths, the filter and the columns of cells ``start .. stop - 1``."""
        columns = {}
        for name, arr in self.columns.items():
            values = np.asarray(arr[start:stop])
            columns[name] = values.astype(object) if values.dtype.kind == "T" else values
        keep = np.asarray(self.filter_pass[start:stop]).astype(bool)
        return np.asarray(self.length[start:stop]), keep, columns


def _write_band_shard(
    reader: BandReader,
    cells: _StoreCells,
    ready: str,
    *,
    block: int,
    spec: _ShardSpec,
    name: str,
    row_offset: int,
    n_cells: int,
) -> int:
    """Write one cell block's shard file read straight from the encoding store: its flat token
    bands (only the bands and entries the model input needs; nothing padded) and its cells'
    lengths, filter and columns."""
    lengths, keep, columns = cells.read(row_offset, row_offset + n_cells)
    values, sizes, rows = model_input_bands(
        reader, block, lengths, keep, model=spec.model, row_offset=row_offset
    )
    batches = flat_batches(values, sizes, rows, columns, schema=spec.schema, row_offset=row_offset)
    return _write_batches(batches, spec, name)


def _finalize(n_rows: list[int], *, spec: _ShardSpec, names: list[str], fingerprint: str) -> str:
    """After all shards (``n_rows``: what each wrote): remove stale shards, then write the
    metadata files (last)."""
    fs, root = spec.location.fs()
    current = set(names)
    for entry in fs.ls(root, detail=False):
        base = posixpath.basename(str(entry).rstrip("/"))
        if base not in current and any(p.fullmatch(base) for p in _SHARD_PATTERNS.values()):
            fs.rm(posixpath.join(root, base))
    if spec.fmt == "parquet":
        with fs.open(posixpath.join(root, _SUCCESS_FILE), "wb"):
            pass
        return spec.location.url
    state: dict[str, Any] = {
        "_data_files": [{"filename": name} for name in names],
        "_fingerprint": fingerprint,
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    info = {
        "citation": "",
        "description": spec.model.describe(),
        "features": features(spec.schema),
        "homepage": "",
        "license": "",
    }
    with fs.open(posixpath.join(root, _STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    with fs.open(posixpath.join(root, _INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return spec.location.url


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------


def _parse_format(fmt: str) -> ExportFormat:
    if fmt == "hf":
        return "hf"
    if fmt == "parquet":
        return "parquet"
    msg = f"unknown export format {fmt!r}: use 'hf' (Hugging Face dataset directory) or 'parquet'"
    raise ValueError(msg)


def _parse_tokens(tokens: da.Array) -> da.Array:
    if not isinstance(tokens, da.Array):
        msg = (
            f"tokens must be a dask array (cell, rank), got {type(tokens).__name__}; "
            f"wrap it with dask.array.from_array"
        )
        raise TypeError(msg)
    if tokens.ndim != 2:
        msg = f"tokens must be 2-D (cell, rank), got shape {tokens.shape}"
        raise ValueError(msg)
    if not np.issubdtype(tokens.dtype, np.integer):
        msg = f"tokens must hold integer token IDs, got dtype {tokens.dtype}"
        raise TypeError(msg)
    return tokens


def _cell_array(
    name: str, x: np.ndarray | da.Array, cell_chunks: tuple[int, ...]
) -> np.ndarray | da.Array:
    """A per-cell array checked against the cell axis (numpy stays numpy)."""
    n_cells = sum(cell_chunks)
    arr = x if isinstance(x, da.Array) else np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != n_cells:
        msg = f"{name} must hold one value per cell ({n_cells},), got shape {arr.shape}"
        raise ValueError(msg)
    return arr


def _cell_parts(x: np.ndarray | da.Array, cell_chunks: tuple[int, ...]) -> list[Any]:
    """Per cell block: the numpy slice, or the Delayed block of a dask array (rechunked, 1-D)."""
    if isinstance(x, da.Array):
        arr: da.Array = x
        if arr.chunks[0] != cell_chunks:
            arr = arr.rechunk((cell_chunks,))  # 1-D, cheap
        return list(arr.to_delayed().ravel())
    bounds = np.cumsum((0, *cell_chunks))
    return [x[bounds[i] : bounds[i + 1]] for i in range(len(cell_chunks))]


def _shard_names(fmt: ExportFormat, n_blocks: int) -> list[str]:
    if fmt == "hf":
        return [f"data-{i:05d}-of-{n_blocks:05d}.arrow" for i in range(n_blocks)]
    return [f"part-{i:05d}.parquet" for i in range(n_blocks)]


def _parse_lengths(lengths: da.Array | np.ndarray, tokens: da.Array) -> da.Array:
    """``lengths`` as a dask array on the cell chunks of ``tokens`` (numpy is split so)."""
    cell_chunks = tuple(int(c) for c in tokens.chunks[0])
    n_cells = int(tokens.shape[0])
    out: da.Array
    if isinstance(lengths, da.Array):
        out = lengths
        if lengths.ndim != 1 or lengths.shape[0] != n_cells:
            msg = f"lengths must be (cell,) with {n_cells} cells, got shape {lengths.shape}"
            raise ValueError(msg)
        if tuple(lengths.chunks[0]) != cell_chunks:
            msg = (
                f"lengths and tokens must have the same cell chunks, got {lengths.chunks[0]} and "
                f"{tokens.chunks[0]}. Try lengths.rechunk(tokens.chunks[0])"
            )
            raise ChunkingError(msg)
    else:
        out = da.from_array(_cell_array("lengths", lengths, cell_chunks), chunks=(cell_chunks,))
    if not np.issubdtype(out.dtype, np.integer):
        msg = f"lengths must be integers, got dtype {out.dtype}"
        raise TypeError(msg)
    return out


def _parse_keep(
    keep: np.ndarray | da.Array | None, cell_chunks: tuple[int, ...]
) -> np.ndarray | da.Array | None:
    if keep is None:
        return None
    out = _cell_array("keep", keep, cell_chunks)
    if out.dtype != bool:
        msg = f"keep must be boolean (one per cell), got dtype {out.dtype}"
        raise TypeError(msg)
    return out


def _parse_columns(
    columns: Mapping[str, np.ndarray | da.Array] | None, cell_chunks: tuple[int, ...]
) -> dict[str, np.ndarray | da.Array]:
    out: dict[str, np.ndarray | da.Array] = {}
    for name, col in (columns or {}).items():
        if not isinstance(name, str) or name in RESERVED:
            msg = (
                f"column name {name!r} is reserved or not a string: rename it "
                f"(input_ids and length are the model input)"
            )
            raise ValueError(msg)
        out[name] = _cell_array(f"column {name!r}", col, cell_chunks)
    return out


@dataclass(frozen=True)
class _CellInputs:
    """The checked inputs of an export: tokens, and per-cell arrays along its cell chunks."""

    tokens: da.Array
    lengths: da.Array
    keep: np.ndarray | da.Array | None
    columns: dict[str, np.ndarray | da.Array]

    @classmethod
    def parse(
        cls,
        tokens: da.Array,
        lengths: da.Array | np.ndarray,
        keep: np.ndarray | da.Array | None,
        columns: Mapping[str, np.ndarray | da.Array] | None,
    ) -> _CellInputs:
        """Check shapes, dtypes and chunks at call time (nothing is computed)."""
        tokens = _parse_tokens(tokens)
        cell_chunks = tuple(int(c) for c in tokens.chunks[0])
        return cls(
            tokens=tokens,
            lengths=_parse_lengths(lengths, tokens),
            keep=_parse_keep(keep, cell_chunks),
            columns=_parse_columns(columns, cell_chunks),
        )

    @property
    def cell_chunks(self) -> tuple[int, ...]:
        """Cells per block: one shard is written per block."""
        return tuple(int(c) for c in self.tokens.chunks[0])

    def schema(self) -> pa.Schema:
        """The export's Arrow schema (raises TypeError for a column of another type)."""
        return export_schema({name: column_type(name, c) for name, c in self.columns.items()})

    def head(self, model: ModelInput) -> da.Array:
        """The rank columns the model reads, one chunk along rank (lazy; no other is read)."""
        width = min(model.max_genes, int(self.tokens.shape[1]))
        head = self.tokens[:, :width]
        if head.numblocks[1] != 1:
            head = head.rechunk({1: -1})  # concatenates the few rank chunks of each block
        return head


# --------------------------------------------------------------------------------------------
# dask wiring and the writers
# --------------------------------------------------------------------------------------------


def _export_graph(
    cells: _CellInputs,
    location: Location,
    fmt: ExportFormat,
    model: ModelInput,
    *,
    store: tuple[BandReader, _StoreCells] | None = None,
) -> Delayed:
    """The lazy export: prepare the directory, one shard task per cell block, then finalize.

    With ``store`` (the token bands and per-cell arrays of the encoding store ``cells`` are
    lazy views of), each shard task reads its block's flat bands and cells itself: the views
    are never computed, and a block is one task; they still name the export, so both ways give
    the same keys and files.
    """
    schema = cells.schema()
    head = cells.head(model)
    url = location.url
    token = tokenize(
        head,
        cells.lengths,
        cells.keep,
        cells.columns,
        url,
        fmt,
        model.input_size,
        model.cls,
        model.eos,
        __version__,
    )
    chunks = cells.cell_chunks
    names = _shard_names(fmt, len(chunks))
    spec = _ShardSpec(Location(url, location.storage_options), fmt, schema, model)
    ready = delayed(_prepare_dir, pure=True)(
        spec.location, dask_key_name=f"flow-export-prepare-{token}"
    )
    offsets = np.cumsum((0, *chunks))
    if store is None:
        first = head.to_delayed().ravel()
        length_parts = cells.lengths.to_delayed().ravel()
        keep_parts = [None] * len(chunks) if cells.keep is None else _cell_parts(cells.keep, chunks)
        col_parts = {name: _cell_parts(col, chunks) for name, col in cells.columns.items()}
        shards = [
            delayed(_write_shard, pure=True)(
                first[i],
                length_parts[i],
                keep_parts[i],
                {name: parts[i] for name, parts in col_parts.items()},
                ready,
                spec=spec,
                name=names[i],
                row_offset=int(offsets[i]),
                dask_key_name=(f"flow-export-shard-{token}", i),
            )
            for i in range(len(chunks))
        ]
    else:
        bands = delayed(store[0], name=f"flow-export-bands-{token}", traverse=False)
        per_cell = delayed(store[1], name=f"flow-export-cells-{token}", traverse=False)
        shards = [
            delayed(_write_band_shard, pure=True)(
                bands,
                per_cell,
                ready,
                block=i,
                spec=spec,
                name=names[i],
                row_offset=int(offsets[i]),
                n_cells=int(chunks[i]),
                dask_key_name=(f"flow-export-shard-{token}", i),
            )
            for i in range(len(chunks))
        ]
    result: Delayed = delayed(_finalize, pure=True)(
        shards,
        spec=spec,
        names=names,
        fingerprint=token[:16],
        dask_key_name=f"flow-export-finalize-{token}",
    )
    return result


def write_model_arrays(
    tokens: da.Array,
    lengths: da.Array | np.ndarray,
    output: LocationLike,
    *,
    input_size: int,
    cls: int | None = None,
    eos: int | None = None,
    keep: np.ndarray | da.Array | None = None,
    columns: Mapping[str, np.ndarray | da.Array] | None = None,
    format: ExportFormat = "hf",
    storage_options: Mapping[str, Any] | None = None,
    compute: bool = True,
) -> str | Delayed:
    """Write the model input of rankings given as arrays as a Hugging Face dataset or Parquet
    directory (:func:`write_model_dataset` does it from an encoding store and a preset).

    This is a writer: with ``compute=True`` (default) it runs the export on the current Dask
    scheduler and returns when the directory is complete. Each cell block is one task
    (``flow-export-shard-...``) that reads only the rank columns the model needs from its own
    block and writes its own shard file; a last task (``flow-export-finalize-...``) removes
    stale shards of a previous export into the same directory and writes the metadata files.
    Works on the distributed scheduler (tasks hold plain arguments: no open files or locks).

    Parameters
    ----------
    tokens
        ``(cell, rank)`` full rankings as token IDs (integer dtype), pad-filled past each
        cell's length. Any chunking: one shard is written per cell chunk; rank chunks past
        the input size are never read.
    lengths
        ``(cell,)`` ranked genes per cell. A dask array must have the cell chunks of
        ``tokens``; a numpy array is split along them.
    output
        Output directory (a :class:`~flow._location.Location`, local path or fsspec URL such
        as ``s3://bucket/prefix``), created if missing. Shard and metadata files of a previous
        export there are replaced; other files are left alone.
    input_size
        Model input size, special tokens included (2,048 for V1 models, 4,096 for V2).
    cls, eos
        ``<cls>`` and ``<eos>`` token IDs for V2 models (both), or None for V1 (neither).
    keep
        Boolean per cell: the cells to export (``filter_pass``). None exports every cell.
        Cells with no ranked gene are exported (length 0, or 2 with the special tokens).
    columns
        Carried cell metadata, one value per cell (str, int, float or bool), written after
        ``input_ids`` and ``length`` under their names.
    format
        ``"hf"``: what ``Dataset.save_to_disk`` writes (``datasets.load_from_disk`` opens it);
        ``"parquet"``: Parquet parts and a ``_SUCCESS`` marker (layouts: see :mod:`flow.export`).
    storage_options
        fsspec options of a URL; used only when ``output`` is not a Location.
    compute
        If False, return a :class:`dask.delayed.Delayed` that does the whole export (shards,
        then metadata) when computed; building it reads and writes nothing.

    Returns
    -------
    str or Delayed
        The output directory as an absolute path or URL (or a Delayed returning it).

    Raises
    ------
    ValueError
        ``input_size`` below 3 with special tokens (below 1 without), only one of ``cls`` and
        ``eos``, an unknown ``format``, lengths or per-cell arrays not matching the cells, a
        reserved column name. :class:`~flow.errors.ChunkingError` (a ValueError) when the cell
        chunks of ``lengths`` differ from those of ``tokens``.
    TypeError
        ``tokens`` not a dask array of integers, or a carried column of another type.
    InputError
        At compute time, naming the cell: a length that does not fit the stored ranking, or
        token IDs that do not fit int32.

    Notes
    -----
    ``input_ids`` is list<int32> (``datasets`` stores a column named ``input_ids`` as int32
    too, which is what upstream Geneformer's tokenizer writes), ``length`` is int64. Cell
    order is preserved. The memory of a task is bounded by its cell block.

    Examples
    --------
    >>> import tempfile, dask.array as da, numpy as np
    >>> tokens = da.from_array(
    ...     np.array([[7, 5, 9], [4, 0, 0], [6, 8, 0]], np.uint16), chunks=(2, 3)
    ... )
    >>> lengths = da.from_array(np.array([3, 1, 2], np.int32), chunks=2)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     out = write_model_arrays(
    ...         tokens, lengths, tmp, input_size=4, cls=2, eos=3, format="parquet"
    ...     )
    ...     import pyarrow.parquet as pq
    ...
    ...     pq.read_table(out).column("input_ids").to_pylist()
    [[2, 7, 5, 3], [2, 4, 3], [2, 6, 8, 3]]
    """
    fmt = _parse_format(format)
    model = ModelInput(input_size, cls, eos)
    cells = _CellInputs.parse(tokens, lengths, keep, columns)
    graph = _export_graph(cells, Location.of(output, storage_options), fmt, model)
    if compute:
        return str(graph.compute())
    return graph


def write_model_dataset(
    enc: EncodingStore,
    output: LocationLike,
    *,
    preset: Preset,
    format: ExportFormat = "hf",
    obs_columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    compute: bool = True,
) -> str | Delayed:
    """Write the model input of an encoding store, as ``preset`` defines it, as a Hugging Face
    dataset or Parquet directory: the export stage.

    Every row carries the cell's identifier (column :data:`CELL_ID`, the barcode), so rows map
    back to cells although cells failing ``filter_pass`` are left out.

    A writer, as :func:`write_model_arrays` (same files, same task names): with
    ``compute=True`` (default) it runs the export on the current Dask scheduler; with
    ``compute=False`` it returns the lazy :class:`~dask.delayed.Delayed` and writes nothing
    (it reads only the store's band starts). Each cell block of the store is one shard task
    that reads its block's flat token bands directly (:class:`~flow.encode._bands.BandReader`:
    bands ``0 .. ceil(max_genes / 512) - 1``, each only up to the last entry a passing cell
    needs; no dense padded view) and the block's length, ``filter_pass`` and carried columns,
    one task per block; it builds the Arrow list arrays from offsets and flat values.

    Parameters
    ----------
    enc
        An opened encoding store (:func:`flow.encode.store.open_encoding`).
    output
        Output directory (a :class:`~flow._location.Location`, local path or fsspec URL).
        Shard and metadata files of a previous export there are replaced.
    preset
        Input size and special tokens (:func:`flow.vocab.resolve_preset`): V2 puts the
        encoding's ``<cls>`` first and ``<eos>`` last.
    format
        ``"hf"`` (``datasets.load_from_disk``) or ``"parquet"``.
    obs_columns
        The carried cell columns to export too (default: all of them); an unknown name is an
        :class:`~flow.errors.InputError` listing the columns there are.
    storage_options
        fsspec options of a URL; used only when ``output`` is not a Location.
    compute
        If False, return the lazy export (a Delayed returning the output directory).

    Returns
    -------
    str or Delayed
        The output directory as an absolute path or URL (or a Delayed returning it).

    Raises
    ------
    VocabularyError
        The preset needs special tokens (``<cls>``, ``<eos>``) the encoding's vocabulary
        lacks. Other errors as :func:`write_model_arrays`.
    """
    model = ModelInput.of_preset(preset, enc.attrs["special"])
    chosen = list(enc.obs_columns) if obs_columns is None else list(obs_columns)
    unknown = sorted(set(chosen) - set(enc.obs_columns))
    if unknown:
        msg = (
            f"obs columns {unknown} are not in the encoding store {enc.url}; "
            f"its carried columns are {enc.obs_columns}."
        )
        raise InputError(msg)
    names = {CELL_ID: "cell", **{name: name for name in chosen}}  # exported -> stored
    columns = {k: enc.cell_array(v) for k, v in names.items()}  # lazy: types and naming only
    fmt = _parse_format(format)
    keep = enc.cell_array("filter_pass").astype(bool)
    cells = _CellInputs.parse(enc.tokens, enc.cell_array("length"), keep, columns)
    layout = enc.layout
    head = range(min(layout.n_bands, -(-model.max_genes // layout.band_width)))
    reader = BandReader.of(enc._group(), "tokens", layout, bands=head)
    store = (reader, _StoreCells.of(enc._group(), names))
    location = Location.of(output, storage_options)
    graph = _export_graph(cells, location, fmt, model, store=store)
    return str(graph.compute()) if compute else graph


def export_summary(enc: EncodingStore, preset: Preset) -> str:
    """How many rows an export of ``enc`` has and how many were cut at the preset's input size
    (reads the lengths and the filter: small)."""
    keep = enc.cell_column("filter_pass").astype(bool)
    lengths = enc.lengths[keep]
    truncated = int(np.sum(lengths > preset.max_genes))
    return (
        f"{int(keep.sum()):,} rows (the cells passing filter_pass, with their {CELL_ID}); "
        f"{truncated:,} truncated to {preset.max_genes:,} genes"
    )
