"""Export the model input of an encoding as a Hugging Face dataset directory or as Parquet.

The model input for an input size ``L`` is a view of the encoding store's full rankings: the
first ``L`` tokens of each cell (V1), or ``<cls>``, the first ``L - 2`` tokens and ``<eos>``
(V2), exactly as upstream Geneformer truncates (``input_ids[0:L-2]``, then ``<cls>`` inserted
first and ``<eos>`` last). Only the rank columns the model needs are read.

:func:`write_model_dataset` is a writer (a documented compute boundary). Every cell block is
one Dask task that writes its own shard file from its own block; nothing is built in memory
whole. A last task removes stale shards of a previous run and writes the small metadata files,
after all shards exist. The Hugging Face layout is the one ``datasets.Dataset.save_to_disk``
writes, so ``datasets.load_from_disk(path)`` opens it::

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
import os
import posixpath
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import dask.array as da
import numpy as np
import pyarrow as pa
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from . import __version__
from ._io import store_url
from .errors import ChunkingError, InputError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["model_input_block", "write_model_dataset"]

ExportFormat = Literal["hf", "parquet"]

#: Rows per Arrow record batch / Parquet row group (``datasets``' default writer batch size).
BATCH_ROWS = 1000

_INT32_MAX = int(np.iinfo(np.int32).max)
_INFO_FILE = "dataset_info.json"  # datasets.config.DATASET_INFO_FILENAME
_STATE_FILE = "state.json"  # datasets.config.DATASET_STATE_JSON_FILENAME
_SUCCESS_FILE = "_SUCCESS"
_RESERVED = frozenset({"input_ids", "length"})
_SHARD_PATTERNS = {
    "hf": re.compile(r"data-\d{5,}-of-\d{5,}\.arrow"),
    "parquet": re.compile(r"part-\d{5,}\.parquet"),
}
_MARKERS = (_STATE_FILE, _INFO_FILE, _SUCCESS_FILE)

# Arrow type -> ``datasets.Value`` dtype name (``str(pa.float32())`` is "float", not "float32").
_VALUE_DTYPES: dict[pa.DataType, str] = {
    pa.bool_(): "bool",
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.string(): "string",
}
_IDS_TYPE = pa.int32()
_LENGTH_TYPE = pa.int64()


# --------------------------------------------------------------------------------------------
# numpy kernel
# --------------------------------------------------------------------------------------------


def _parse_specials(input_size: int, cls: int | None, eos: int | None) -> int:
    """Validate the input size and special tokens; return the number of special tokens."""
    if isinstance(input_size, bool) or not isinstance(input_size, int | np.integer):
        msg = f"input_size must be an int, got {type(input_size).__name__}"
        raise TypeError(msg)
    if (cls is None) != (eos is None):
        msg = (
            f"give both cls and eos (V2 models: <cls> first, <eos> last) or neither (V1), "
            f"got cls={cls!r}, eos={eos!r}"
        )
        raise ValueError(msg)
    n_special = 0 if cls is None else 2
    for name, tok in (("cls", cls), ("eos", eos)):
        if tok is not None and not (0 <= int(tok) <= _INT32_MAX):
            msg = f"{name} must be a token ID in [0, {_INT32_MAX}], got {tok!r}"
            raise ValueError(msg)
    if input_size < n_special + 1:
        kind = (
            "with <cls> and <eos> (at least 3: two special tokens and one gene)"
            if n_special
            else "(at least 1)"
        )
        msg = f"input_size {input_size} is too small {kind}"
        raise ValueError(msg)
    return n_special


def _model_input_arrays(
    tokens: np.ndarray,
    lengths: np.ndarray,
    *,
    input_size: int,
    cls: int | None,
    eos: int | None,
    row_offset: int = 0,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Flat ``input_ids`` values (int32) and per-cell sizes (int64) of one block of cells.

    ``values[sum(sizes[:i]) : sum(sizes[:i + 1])]`` is cell ``i``'s model input.
    """
    n_special = _parse_specials(input_size, cls, eos)
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths).reshape(-1)
    if tokens.ndim != 2 or tokens.shape[0] != lengths.shape[0]:
        msg = (
            f"tokens must be (n_cells, width) with one length per cell, "
            f"got {tokens.shape} and {lengths.shape}"
        )
        raise ValueError(msg)
    rows, width = tokens.shape
    genes = np.minimum(lengths.astype(np.int64, copy=False), input_size - n_special)
    if rows and (genes.min() < 0 or genes.max() > width):
        bad = int(np.flatnonzero((genes < 0) | (genes > width))[0])
        msg = (
            f"cell {row_offset + bad}: length {int(lengths[bad])} does not fit its ranking of "
            f"{width} stored rank columns (the lengths do not belong to these tokens?)"
        )
        raise InputError(msg)
    w = int(genes.max()) if rows else 0
    # row-major boolean selection: cell by cell, each in rank order
    gene_values = tokens[:, :w][np.arange(w) < genes[:, None]]
    if (
        gene_values.size
        and not np.can_cast(gene_values.dtype, np.int32)
        and (int(gene_values.max()) > _INT32_MAX or int(gene_values.min()) < 0)
    ):
        msg = (
            f"cells {row_offset}..{row_offset + rows}: token IDs outside "
            f"[0, {_INT32_MAX}] do not fit input_ids (int32)"
        )
        raise InputError(msg)
    sizes = genes + n_special
    if cls is None or eos is None:  # V1 (n_special == 0)
        return gene_values.astype(np.int32, copy=False), sizes
    ends = np.cumsum(sizes)
    starts = ends - sizes
    values = np.empty(int(ends[-1]) if rows else 0, dtype=np.int32)
    is_gene = np.ones(values.shape[0], dtype=bool)
    is_gene[starts] = False
    is_gene[ends - 1] = False
    values[is_gene] = gene_values
    values[starts] = cls
    values[ends - 1] = eos
    return values, sizes


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
    values, sizes = _model_input_arrays(tokens, lengths, input_size=input_size, cls=cls, eos=eos)
    if not sizes.shape[0]:
        return []
    return np.split(values, np.cumsum(sizes)[:-1])


# --------------------------------------------------------------------------------------------
# Arrow tables of one block
# --------------------------------------------------------------------------------------------


def _column_type(name: str, col: np.ndarray | da.Array) -> pa.DataType:
    """The Arrow type of a carried column (str, int, float or bool), checked at call time."""
    kind = col.dtype.kind
    typ: pa.DataType | None = None
    if kind in "biuf":
        typ = pa.from_numpy_dtype(col.dtype)
    elif kind == "U":
        typ = pa.string()
    elif kind == "O":
        if isinstance(col, da.Array):
            typ = pa.string()  # cannot look inside without computing: strings, checked per block
        else:
            try:
                typ = pa.array(col, from_pandas=True).type
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                msg = f"column {name!r}: object values must be all str, int, float or bool"
                raise TypeError(msg) from err
            if pa.types.is_null(typ):
                typ = pa.string()
    if typ not in _VALUE_DTYPES:
        msg = (
            f"column {name!r} has dtype {col.dtype}; carried columns must be str, int, "
            f"float or bool"
        )
        raise TypeError(msg)
    return typ


def _features(schema: pa.Schema) -> dict[str, Any]:
    """``datasets`` features (as in ``dataset_info.json``) of the export schema."""
    feats: dict[str, Any] = {}
    for field in schema:
        if field.name == "input_ids":
            feats[field.name] = {
                "feature": {"dtype": _VALUE_DTYPES[_IDS_TYPE], "_type": "Value"},
                "_type": "List",
            }
        else:
            feats[field.name] = {"dtype": _VALUE_DTYPES[field.type], "_type": "Value"}
    return feats


def _export_schema(column_types: Mapping[str, pa.DataType]) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(_IDS_TYPE)), pa.field("length", _LENGTH_TYPE)]
    fields += [pa.field(name, typ) for name, typ in column_types.items()]
    schema = pa.schema(fields)
    # The same schema metadata datasets' ArrowWriter writes: it restores the features on load.
    meta = {"info": {"features": _features(schema)}}
    return schema.with_metadata({"huggingface": json.dumps(meta)})


def _block_batches(
    tokens: np.ndarray,
    lengths: np.ndarray,
    keep: np.ndarray | None,
    columns: Mapping[str, np.ndarray],
    *,
    schema: pa.Schema,
    input_size: int,
    cls: int | None,
    eos: int | None,
    row_offset: int,
) -> list[pa.RecordBatch]:
    """Record batches of at most :data:`BATCH_ROWS` kept cells of one block."""
    lengths = np.asarray(lengths).reshape(-1)
    rows = np.arange(lengths.shape[0])
    if keep is not None:
        rows = np.flatnonzero(np.asarray(keep, dtype=bool).reshape(-1))
    batches = []
    for start in range(0, max(rows.shape[0], 1), BATCH_ROWS):
        sel = rows[start : start + BATCH_ROWS]
        first = int(sel[0]) + row_offset if sel.size else row_offset
        whole = keep is None and sel.size == lengths.shape[0]
        values, sizes = _model_input_arrays(
            tokens if whole else tokens[sel],
            lengths if whole else lengths[sel],
            input_size=input_size,
            cls=cls,
            eos=eos,
            row_offset=first,
        )
        offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int32)
        np.cumsum(sizes, out=offsets[1:])
        arrays = [
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=_IDS_TYPE)),
            pa.array(sizes, type=_LENGTH_TYPE),
        ]
        for field in schema:
            if field.name in _RESERVED:
                continue
            col = np.asarray(columns[field.name])
            try:
                arrays.append(
                    pa.array(col if whole else col[sel], type=field.type, from_pandas=True)
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
                msg = f"column {field.name!r}, cells from {first}: values are not {field.type}"
                raise InputError(msg) from err
        batches.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return batches


# --------------------------------------------------------------------------------------------
# tasks (plain arguments only: no open files, locks or clients in the graph)
# --------------------------------------------------------------------------------------------


def _fs(url: str, storage_options: Mapping[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    options = {} if "://" not in url or url.startswith("file://") else dict(storage_options or {})
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, str(root)


def _prepare_dir(url: str, storage_options: Mapping[str, Any] | None) -> str:
    """Create the directory and remove the completion markers: a killed run is never complete."""
    fs, root = _fs(url, storage_options)
    fs.makedirs(root, exist_ok=True)
    for name in _MARKERS:
        path = posixpath.join(root, name)
        if fs.exists(path):
            fs.rm(path)
    return url


def _write_shard(
    tokens: np.ndarray,
    lengths: np.ndarray,
    keep: np.ndarray | None,
    columns: dict[str, np.ndarray],
    ready: str,
    *,
    name: str,
    fmt: ExportFormat,
    schema: pa.Schema,
    input_size: int,
    cls: int | None,
    eos: int | None,
    row_offset: int,
    storage_options: Mapping[str, Any] | None,
) -> int:
    """Write one cell block's shard file; return the number of rows written."""
    batches = _block_batches(
        tokens,
        lengths,
        keep,
        columns,
        schema=schema,
        input_size=input_size,
        cls=cls,
        eos=eos,
        row_offset=row_offset,
    )
    fs, root = _fs(ready, storage_options)
    with fs.open(posixpath.join(root, name), "wb") as sink:
        if fmt == "hf":
            with pa.ipc.new_stream(sink, schema) as writer:
                for batch in batches:
                    if batch.num_rows:
                        writer.write_batch(batch)
        else:
            import pyarrow.parquet as pq

            with pq.ParquetWriter(sink, schema) as pwriter:
                for batch in batches:
                    if batch.num_rows:
                        pwriter.write_batch(batch)
    return sum(batch.num_rows for batch in batches)


def _finalize(
    n_rows: list[int],
    *,
    url: str,
    fmt: ExportFormat,
    names: list[str],
    schema: pa.Schema,
    fingerprint: str,
    description: str,
    storage_options: Mapping[str, Any] | None,
) -> str:
    """After all shards: remove stale shards, then write the metadata files (last)."""
    fs, root = _fs(url, storage_options)
    current = set(names)
    for entry in fs.ls(root, detail=False):
        base = posixpath.basename(str(entry).rstrip("/"))
        if base not in current and any(p.fullmatch(base) for p in _SHARD_PATTERNS.values()):
            fs.rm(posixpath.join(root, base))
    if fmt == "parquet":
        with fs.open(posixpath.join(root, _SUCCESS_FILE), "wb"):
            pass
        return url
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
        "description": description,
        "features": _features(schema),
        "homepage": "",
        "license": "",
    }
    with fs.open(posixpath.join(root, _STATE_FILE), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=2, sort_keys=True)
    with fs.open(posixpath.join(root, _INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return url


# --------------------------------------------------------------------------------------------
# argument parsing and dask wiring
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


def write_model_dataset(
    tokens: da.Array,
    lengths: da.Array | np.ndarray,
    path: str | os.PathLike[str],
    *,
    input_size: int,
    cls: int | None = None,
    eos: int | None = None,
    keep: np.ndarray | da.Array | None = None,
    columns: Mapping[str, np.ndarray | da.Array] | None = None,
    format: ExportFormat = "hf",
    compute: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> str | Delayed:
    """Write the model input of an encoding as a Hugging Face dataset or Parquet directory.

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
    path
        Output directory (local path or fsspec URL such as ``s3://bucket/prefix``). Created
        if missing. The directory belongs to the export: shard files and metadata files of a
        previous export there are replaced; other files are left alone.
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
        ``"hf"``: a directory that ``datasets.load_from_disk`` opens (what
        ``Dataset.save_to_disk`` writes: ``data-00000-of-000NN.arrow`` Arrow stream shards,
        ``dataset_info.json``, ``state.json``). ``"parquet"``: ``part-00000.parquet`` ...
        and a ``_SUCCESS`` marker, read by ``pyarrow.parquet.read_table`` and
        ``pandas.read_parquet``.
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
    ...     out = write_model_dataset(
    ...         tokens, lengths, tmp, input_size=4, cls=2, eos=3, format="parquet"
    ...     )
    ...     import pyarrow.parquet as pq
    ...
    ...     pq.read_table(out).column("input_ids").to_pylist()
    [[2, 7, 5, 3], [2, 4, 3], [2, 6, 8, 3]]
    """
    fmt = _parse_format(format)
    n_special = _parse_specials(input_size, cls, eos)
    tokens = _parse_tokens(tokens)
    cell_chunks = tuple(int(c) for c in tokens.chunks[0])
    n_cells = int(tokens.shape[0])
    lengths_da: da.Array
    if isinstance(lengths, da.Array):
        lengths_da = lengths
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
        lengths_da = da.from_array(
            _cell_array("lengths", lengths, cell_chunks), chunks=(cell_chunks,)
        )
    if not np.issubdtype(lengths_da.dtype, np.integer):
        msg = f"lengths must be integers, got dtype {lengths_da.dtype}"
        raise TypeError(msg)
    keep_arr = None
    if keep is not None:
        keep_arr = _cell_array("keep", keep, cell_chunks)
        if keep_arr.dtype != bool:
            msg = f"keep must be boolean (one per cell), got dtype {keep_arr.dtype}"
            raise TypeError(msg)
    cols: dict[str, np.ndarray | da.Array] = {}
    for name, col in (columns or {}).items():
        if not isinstance(name, str) or name in _RESERVED:
            msg = (
                f"column name {name!r} is reserved or not a string: rename it "
                f"(input_ids and length are the model input)"
            )
            raise ValueError(msg)
        cols[name] = _cell_array(f"column {name!r}", col, cell_chunks)
    schema = _export_schema({name: _column_type(name, col) for name, col in cols.items()})

    # Lazy head of the ranking: only the rank chunks the model reads, one chunk along rank.
    width = min(input_size - n_special, int(tokens.shape[1]))
    head = tokens[:, :width]
    if head.numblocks[1] != 1:
        head = head.rechunk({1: -1})  # concatenates the few rank chunks of each block
    url = store_url(path)
    token = tokenize(head, lengths_da, keep_arr, cols, url, fmt, input_size, cls, eos, __version__)
    names = _shard_names(fmt, len(cell_chunks))

    options = dict(storage_options) if storage_options else None
    ready = delayed(_prepare_dir, pure=True)(
        url, options, dask_key_name=f"flow-export-prepare-{token}"
    )
    token_parts = head.to_delayed().ravel()
    length_parts = lengths_da.to_delayed().ravel()
    keep_parts = (
        _cell_parts(keep_arr, cell_chunks) if keep_arr is not None else [None] * len(cell_chunks)
    )
    col_parts = {name: _cell_parts(col, cell_chunks) for name, col in cols.items()}
    offsets = np.cumsum((0, *cell_chunks))
    shards = [
        delayed(_write_shard, pure=True)(
            token_parts[i],
            length_parts[i],
            keep_parts[i],
            {name: parts[i] for name, parts in col_parts.items()},
            ready,
            name=names[i],
            fmt=fmt,
            schema=schema,
            input_size=input_size,
            cls=cls,
            eos=eos,
            row_offset=int(offsets[i]),
            storage_options=options,
            dask_key_name=(f"flow-export-shard-{token}", i),
        )
        for i in range(len(cell_chunks))
    ]
    description = (
        f"Geneformer model input written by flow {__version__}: input_size={input_size}, "
        f"cls={cls}, eos={eos}"
    )
    result: Delayed = delayed(_finalize, pure=True)(
        shards,
        url=url,
        fmt=fmt,
        names=names,
        schema=schema,
        fingerprint=token[:16],
        description=description,
        storage_options=options,
        dask_key_name=f"flow-export-finalize-{token}",
    )
    if compute:
        return str(result.compute())
    return result
