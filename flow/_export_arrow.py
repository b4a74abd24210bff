"""The model input of one block of cells, as numpy arrays and as Arrow record batches.

Private to :mod:`flow.export`: the pure kernels its shard tasks run (no dask, no I/O), and
:class:`ModelInput`, the input size and special tokens, checked once where they are given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pyarrow as pa

from ._version import __version__
from .encode._bands import BandReader, index_dtype
from .errors import InputError, VocabularyError

if TYPE_CHECKING:
    import numpy.typing as npt

    from .vocab import Preset

__all__ = [
    "BATCH_ROWS",
    "RESERVED",
    "ModelInput",
    "block_batches",
    "column_type",
    "export_schema",
    "features",
    "flat_batches",
    "model_input_arrays",
    "model_input_bands",
    "parse_specials",
]

#: Rows per Arrow record batch / Parquet row group (``datasets``' default writer batch size).
BATCH_ROWS = 1000

_INT32_MAX = int(np.iinfo(np.int32).max)
RESERVED = frozenset({"input_ids", "length"})
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
# what the model reads: input size and special tokens, checked once
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInput:
    """The model's input size (special tokens included) and its ``<cls>``/``<eos>`` token IDs
    (V2 models: both) or None (V1: neither). Checked when made (see :func:`parse_specials`);
    the values are kept as given."""

    input_size: int
    cls: int | None = None
    eos: int | None = None

    def __post_init__(self) -> None:
        parse_specials(self.input_size, self.cls, self.eos)

    @classmethod
    def of_preset(cls, preset: Preset, special: Mapping[str, Any]) -> ModelInput:
        """The model input of ``preset``, its special tokens looked up in ``special`` (the
        encoding's special tokens, name -> token ID).

        Raises
        ------
        VocabularyError
            The preset needs special tokens the encoding's vocabulary lacks.
        """
        wanted = {s: special.get(s) for s in (*preset.prepend, *preset.append)}
        missing = [s for s, v in wanted.items() if v is None]
        if missing:
            msg = f"Preset {preset.name} needs special tokens {missing}, which the encoding's vocabulary lacks."
            raise VocabularyError(msg)
        first = special.get(preset.prepend[0]) if preset.prepend else None
        last = special.get(preset.append[0]) if preset.append else None
        return cls(preset.input_size, first, last)

    @property
    def n_special(self) -> int:
        """Special tokens around the genes: 2 (V2) or 0 (V1)."""
        return 0 if self.cls is None else 2

    @property
    def max_genes(self) -> int:
        """Most genes of a cell that the model reads."""
        return int(self.input_size) - self.n_special

    def describe(self) -> str:
        """How the dataset records it (``dataset_info.json``'s description)."""
        return (
            f"Geneformer model input written by flow {__version__}: "
            f"input_size={self.input_size}, cls={self.cls}, eos={self.eos}"
        )


def parse_specials(input_size: int, cls: int | None, eos: int | None) -> int:
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


# --------------------------------------------------------------------------------------------
# numpy kernel
# --------------------------------------------------------------------------------------------


def model_input_arrays(
    tokens: np.ndarray, lengths: np.ndarray, *, model: ModelInput, row_offset: int = 0
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
    """Flat ``input_ids`` values (int32) and per-cell sizes (int64) of one block of cells.

    ``values[sum(sizes[:i]) : sum(sizes[:i + 1])]`` is cell ``i``'s model input.
    """
    tokens = np.asarray(tokens)
    lengths = np.asarray(lengths).reshape(-1)
    if tokens.ndim != 2 or tokens.shape[0] != lengths.shape[0]:
        msg = (
            f"tokens must be (n_cells, width) with one length per cell, "
            f"got {tokens.shape} and {lengths.shape}"
        )
        raise ValueError(msg)
    rows, width = tokens.shape
    genes = np.minimum(lengths.astype(np.int64, copy=False), model.max_genes)
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
    _check_int32(gene_values, row_offset, rows)
    sizes = genes + model.n_special
    if model.cls is None or model.eos is None:  # V1 (n_special == 0)
        return gene_values.astype(np.int32, copy=False), sizes
    ends = np.cumsum(sizes)
    starts = ends - sizes
    values = np.empty(int(ends[-1]) if rows else 0, dtype=np.int32)
    is_gene = np.ones(values.shape[0], dtype=bool)
    is_gene[starts] = False
    is_gene[ends - 1] = False
    values[is_gene] = gene_values
    values[starts] = model.cls
    values[ends - 1] = model.eos
    return values, sizes


def model_input_bands(
    reader: BandReader,
    block: int,
    lengths: np.ndarray,
    keep: np.ndarray | None,
    *,
    model: ModelInput,
    row_offset: int = 0,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.intp]]:
    """The model input of a block's kept cells, read from the flat rank bands of an encoding
    store (``reader``: its token bands) without padding: flat ``input_ids`` values (int32),
    per-row sizes (int64) and the block rows they are (the kept cells, in order).

    Reads, per band the input reaches, only that band's entries up to the last one a kept
    cell needs. The values equal :func:`model_input_arrays` on the dense rankings.
    """
    lengths = np.asarray(lengths).reshape(-1).astype(np.int64, copy=False)
    width = reader.layout.width
    if lengths.size and (lengths.min() < 0 or lengths.max() > width):
        bad = int(np.flatnonzero((lengths < 0) | (lengths > width))[0])
        msg = (
            f"cell {row_offset + bad}: length {int(lengths[bad])} does not fit its ranking of "
            f"{width} stored rank columns (the lengths do not belong to these tokens?)"
        )
        raise InputError(msg)
    rows = (
        np.arange(lengths.size)
        if keep is None
        else np.flatnonzero(np.asarray(keep, dtype=bool).reshape(-1))
    )
    genes = np.zeros(lengths.size, dtype=np.int64)  # ranks each cell gives (0: not exported)
    genes[rows] = np.minimum(lengths[rows], model.max_genes)
    sizes = genes[rows] + model.n_special
    ends = np.cumsum(sizes)
    values = np.empty(int(ends[-1]) if rows.size else 0, dtype=np.int32)
    dest = np.zeros(lengths.size, dtype=np.int64)  # where each cell's rank 0 goes
    dest[rows] = ends - sizes + (1 if model.n_special else 0)
    band_width = reader.layout.band_width
    n_bands = min(reader.layout.n_bands, -(-int(genes.max(initial=0)) // band_width))
    for k in range(n_bands):
        part, taken = reader.take(block, k, lengths, 0, genes)
        _check_int32(part, row_offset, lengths.size)
        # part holds each cell's ranks [512 k, ...) cell after cell: place them
        live = taken > 0
        starts = np.cumsum(taken) - taken
        index = np.arange(part.size, dtype=index_dtype(values.size))
        shift = (dest + band_width * k - starts)[live].astype(index.dtype)
        index += np.repeat(shift, taken[live])
        values[index] = part
    if model.cls is not None and model.eos is not None:
        values[ends - sizes] = model.cls
        values[ends - 1] = model.eos
    return values, sizes, rows


def _check_int32(values: np.ndarray, row_offset: int, rows: int) -> None:
    """Raise when token IDs do not fit ``input_ids`` (int32)."""
    if (
        values.size
        and not np.can_cast(values.dtype, np.int32)
        and (int(values.max()) > _INT32_MAX or int(values.min()) < 0)
    ):
        msg = (
            f"cells {row_offset}..{row_offset + rows}: token IDs outside "
            f"[0, {_INT32_MAX}] do not fit input_ids (int32)"
        )
        raise InputError(msg)


# --------------------------------------------------------------------------------------------
# Arrow tables of one block
# --------------------------------------------------------------------------------------------


def column_type(name: str, col: np.ndarray | da.Array) -> pa.DataType:
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


def features(schema: pa.Schema) -> dict[str, Any]:
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


def export_schema(column_types: Mapping[str, pa.DataType]) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(_IDS_TYPE)), pa.field("length", _LENGTH_TYPE)]
    fields += [pa.field(name, typ) for name, typ in column_types.items()]
    schema = pa.schema(fields)
    # The same schema metadata datasets' ArrowWriter writes: it restores the features on load.
    meta = {"info": {"features": features(schema)}}
    return schema.with_metadata({"huggingface": json.dumps(meta)})


def block_batches(
    tokens: np.ndarray,
    lengths: np.ndarray,
    keep: np.ndarray | None,
    columns: Mapping[str, np.ndarray],
    *,
    schema: pa.Schema,
    model: ModelInput,
    row_offset: int,
) -> list[pa.RecordBatch]:
    """Record batches of at most :data:`BATCH_ROWS` kept cells of one block (dense tokens)."""
    lengths = np.asarray(lengths).reshape(-1)
    rows = np.arange(lengths.shape[0])
    if keep is not None:
        rows = np.flatnonzero(np.asarray(keep, dtype=bool).reshape(-1))
    batches = []
    for start in range(0, max(rows.shape[0], 1), BATCH_ROWS):
        sel = rows[start : start + BATCH_ROWS]
        first = int(sel[0]) + row_offset if sel.size else row_offset
        whole = keep is None and sel.size == lengths.shape[0]
        values, sizes = model_input_arrays(
            tokens if whole else tokens[sel],
            lengths if whole else lengths[sel],
            model=model,
            row_offset=first,
        )
        batches.append(_record_batch(values, sizes, columns, None if whole else sel, schema, first))
    return batches


def flat_batches(
    values: np.ndarray,
    sizes: np.ndarray,
    rows: np.ndarray,
    columns: Mapping[str, np.ndarray],
    *,
    schema: pa.Schema,
    row_offset: int,
) -> list[pa.RecordBatch]:
    """Record batches of at most :data:`BATCH_ROWS` rows from the flat model input of a block's
    kept cells (``values``, ``sizes`` per row; ``rows``: the block rows they are): the same
    batches as :func:`block_batches` gives for the same cells."""
    ends = np.cumsum(sizes)
    batches = []
    for start in range(0, max(rows.shape[0], 1), BATCH_ROWS):
        stop = min(start + BATCH_ROWS, rows.shape[0])
        sel = rows[start:stop]
        first = int(sel[0]) + row_offset if sel.size else row_offset
        lo = int(ends[start - 1]) if start else 0
        hi = int(ends[stop - 1]) if stop > start else lo
        batch = _record_batch(values[lo:hi], sizes[start:stop], columns, sel, schema, first)
        batches.append(batch)
    return batches


def _record_batch(
    values: np.ndarray,
    sizes: np.ndarray,
    columns: Mapping[str, np.ndarray],
    sel: np.ndarray | None,
    schema: pa.Schema,
    first: int,
) -> pa.RecordBatch:
    """One record batch: ``input_ids`` from flat values and per-row sizes, ``length``, and the
    carried columns of rows ``sel`` (all rows with None)."""
    offsets = np.zeros(sizes.shape[0] + 1, dtype=np.int32)
    np.cumsum(sizes, out=offsets[1:])
    arrays = [
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=_IDS_TYPE)),
        pa.array(sizes, type=_LENGTH_TYPE),
    ]
    arrays += carried_arrays(columns, schema, sel, first)
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


def carried_arrays(
    columns: Mapping[str, np.ndarray], schema: pa.Schema, sel: np.ndarray | None, first: int
) -> list[pa.Array]:
    """The carried columns of the selected cells (all cells with ``sel`` None) as Arrow."""
    arrays = []
    for field in schema:
        if field.name in RESERVED:
            continue
        col = np.asarray(columns[field.name])
        try:
            arrays.append(
                pa.array(col if sel is None else col[sel], type=field.type, from_pandas=True)
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
            msg = f"column {field.name!r}, cells from {first}: values are not {field.type}"
            raise InputError(msg) from err
    return arrays
