"""TileDB-SOMA experiments (what CELLxGENE Census serves), read with ``tiledbsoma``.

An experiment is a TileDB group: ``obs`` (one row per cell), and measurements under ``ms``
(``ms/RNA``), each with ``var`` (one row per gene) and X layers (``X/raw``, ``X/data``, ...:
sparse arrays of ``soma_dim_0`` = cell, ``soma_dim_1`` = gene, ``soma_data``). Rows are
identified by ``soma_joinid``, which need not run from 0 without gaps (cells kept by an obs
filter do not), so flow orders cells and genes by their joinids and maps them to positions.

Opening reads metadata only: the X layer's schema, ``var`` (gene IDs and symbols) and the
chosen ``obs`` columns (with an optional value filter on the cells). Counts are read by
:meth:`SomaSource.read_rows`, one range of cells per query of the X layer (a slice of joinids
when they are consecutive, else the joinids themselves), so memory is bounded by the block,
never by X. Every read opens the array again, at the timestamp the metadata was read at, so
all reads see the same version of an experiment that is being written to.

``tiledbsoma`` is an optional dependency (``pip install 'flow[soma]'``), imported only when a
SOMA input is read.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError
from ._anndata import SYMBOL_COLUMNS
from ._columns import as_str_array, carried_column, check_ids, select_columns
from ._source import SourceInfo, check_block_size, check_range, empty_rows
from .anndata_zarr import store_fingerprint

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    import pyarrow as pa

    from .._location import Location
    from ._options import ReadOptions

__all__ = [
    "BARCODE_COLUMNS",
    "DEFAULT_LAYERS",
    "DEFAULT_MEASUREMENT",
    "ID_COLUMNS",
    "SOMA_OPTIONS",
    "SomaSource",
    "is_soma_experiment",
    "read_soma",
    "tiledb_config",
]

#: The format-specific options the SOMA reader takes (``layer`` names the X layer).
SOMA_OPTIONS = ("layer", "gene_id_column", "obs_columns", "measurement", "obs_filter")
#: The measurement read unless another is named.
DEFAULT_MEASUREMENT = "RNA"
#: X layers tried in order when none is named (Census: ``raw``; ``from_anndata``: ``data``).
DEFAULT_LAYERS = ("raw", "counts", "data")
#: ``var`` columns holding gene IDs, in order of preference (Census: ``feature_id``;
#: ``tiledbsoma.io.from_anndata`` writes ``var_names`` as ``var_id``).
ID_COLUMNS = ("feature_id", "ensembl_id", "gene_ids", "gene_id", "var_id")
#: ``obs`` columns holding barcodes, in order of preference (``from_anndata``: ``obs_id``).
BARCODE_COLUMNS = ("obs_id", "barcode", "barcodes", "cell_id")
#: Entries of a directory that make it a SOMA experiment (with ``ms``): a TileDB group.
GROUP_ENTRIES = frozenset({"__tiledb_group.tdb", "__group"})

_JOINID = "soma_joinid"
_INSTALL = "Install it with: pip install 'flow[soma]' (or pip install tiledbsoma)."
#: fsspec's S3 options and the TileDB configuration keys they are.
_S3_KEYS = {
    "key": "vfs.s3.aws_access_key_id",
    "secret": "vfs.s3.aws_secret_access_key",
    "token": "vfs.s3.aws_session_token",
    "region_name": "vfs.s3.region",
}


def is_soma_experiment(entries: Mapping[str, bool] | set[str]) -> bool:
    """Whether a directory with these entries is a SOMA experiment (a TileDB group with
    ``ms``)."""
    names = set(entries)
    return bool(names & GROUP_ENTRIES) and "ms" in names


def _soma() -> Any:
    """The ``tiledbsoma`` module (an optional dependency), or an InputError saying how to
    install it."""
    try:
        import tiledbsoma
    except ImportError as err:
        msg = f"reading a TileDB-SOMA experiment needs the tiledbsoma package ({err}). {_INSTALL}"
        raise InputError(msg) from None
    return tiledbsoma


def _first_line(err: BaseException) -> str:
    """A tiledbsoma error's message without the C++ call stack it may append."""
    lines = str(err).strip().splitlines()
    name = type(err).__name__
    text = lines[0].removeprefix(f"{name}: ") if lines else ""
    return f"{name}: {text}" if text else name


# ----------------------------------------------------------------------------- context


def tiledb_config(location: Location) -> dict[str, str]:
    """The TileDB configuration for a location: its storage options in TileDB's words.

    TileDB reads URLs itself (not through fsspec). Options that are TileDB configuration
    keys (``vfs.*``, ``sm.*``, ``rest.*``, ``soma.*``: e.g. ``soma.init_buffer_bytes``, the
    size of tiledbsoma's read buffers, to bound a read's memory) pass as they are; fsspec's
    S3 options are translated (``anon`` -> ``vfs.s3.no_sign_request``,
    ``key``/``secret``/``token``, ``client_kwargs={"endpoint_url": ..., "region_name":
    ...}``); other options are fsspec's alone (they still serve to look the experiment up and
    fingerprint it). Local paths take none.
    """
    options = location.options or {}
    config: dict[str, str] = {}
    flat = {**options, **dict(options.get("client_kwargs") or {})}
    for key, value in flat.items():
        if key.startswith(("vfs.", "sm.", "rest.", "soma.")):
            config[key] = str(value).lower() if isinstance(value, bool) else str(value)
        elif key in _S3_KEYS and value is not None:
            config[_S3_KEYS[key]] = str(value)
    if flat.get("anon"):
        config["vfs.s3.no_sign_request"] = "true"
    endpoint = flat.get("endpoint_url")
    if endpoint:
        scheme, _, host = str(endpoint).rpartition("://")
        config["vfs.s3.endpoint_override"] = host.rstrip("/")
        config["vfs.s3.scheme"] = scheme or "https"
        config["vfs.s3.use_virtual_addressing"] = "false"
    return config


@functools.lru_cache(maxsize=8)
def _context(config: tuple[tuple[str, str], ...]) -> Any:
    """One ``SOMATileDBContext`` per configuration and process (contexts hold thread pools)."""
    return _soma().SOMATileDBContext(tiledb_config=dict(config))


def _context_of(location: Location) -> Any:
    return _context(tuple(sorted(tiledb_config(location).items())))


def _uri(location: Location) -> str:
    """What TileDB opens: an absolute local path, or the URL."""
    return location.local_path if location.is_local else location.path


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class _Layout:
    """What reads of the counts need: the X layer and the cells and genes by joinid."""

    x_uri: str
    timestamp: int
    cells: np.ndarray  # the cells' obs joinids, ascending (int64)
    genes: np.ndarray  # the genes' var joinids, ascending (int64)
    dtype: np.dtype[Any]
    config: tuple[tuple[str, str], ...]


def _pick_measurement(exp: Any, path: str, measurement: str) -> Any:
    names = sorted(exp.ms.keys()) if "ms" in exp else []
    if measurement not in names:
        msg = (
            f"{path}: the SOMA experiment has no measurement {measurement!r}. Its "
            f"measurements: {', '.join(map(repr, names)) or 'none'}. Pass one as measurement= (--measurement)."
        )
        raise InputError(msg)
    return exp.ms[measurement]


def _pick_layer(ms: Any, path: str, measurement: str, layer: str | None) -> tuple[str, Any]:
    names = sorted(ms.X.keys()) if "X" in ms else []
    name = layer or next((n for n in DEFAULT_LAYERS if n in names), None)
    if name is None or name not in names:
        wanted = repr(layer) if layer else " or ".join(map(repr, DEFAULT_LAYERS))
        msg = (
            f"{path}: measurement {measurement!r} has no X layer {wanted}. Its X layers: "
            f"{', '.join(map(repr, names)) or 'none'}. Pass layer= (--layer) naming the one "
            "with raw counts."
        )
        raise InputError(msg)
    x = ms.X[name]
    if getattr(x, "soma_type", "") != "SOMASparseNDArray":
        msg = f"{path}: X layer {name!r} is a {x.soma_type}; flow reads sparse X layers only."
        raise InputError(msg)
    dtype = np.dtype(x.schema.field("soma_data").type.to_pandas_dtype())
    if dtype.kind not in "biuf":
        msg = f"{path}: X layer {name!r} holds {dtype} values; counts must be numbers."
        raise InputError(msg)
    return name, x


def _read_table(frame: Any, columns: list[str], value_filter: str | None, path: str) -> pa.Table:
    """Columns of a SOMA dataframe (all its rows, or those ``value_filter`` keeps)."""
    try:
        return frame.read(column_names=columns, value_filter=value_filter).concat()
    except Exception as err:  # tiledbsoma reports a bad filter as SOMAError/ValueError
        if value_filter is None:
            raise
        msg = (
            f"{path}: the obs filter {value_filter!r} cannot be applied ({_first_line(err)}). "
            "Write it in TileDB-SOMA's value_filter syntax, e.g. \"cell_type == 'B cell'\"."
        )
        raise InputError(msg) from None


def _genes(
    var: Any, path: str, measurement: str, gene_id_column: str | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(gene IDs, symbols or None, var joinids), ordered by joinid."""
    names = [n for n in var.schema.names if n != _JOINID]
    id_col = gene_id_column or next((c for c in ID_COLUMNS if c in names), None)
    if id_col is None or id_col not in names:
        wanted = repr(gene_id_column) if gene_id_column else " or ".join(map(repr, ID_COLUMNS))
        msg = (
            f"{path}: ms/{measurement}/var has no column {wanted} with gene IDs. Its columns: "
            f"{', '.join(map(repr, names)) or 'none'}. Pass gene_id_column= "
            "(--gene-id-column) naming the one that holds Ensembl IDs."
        )
        raise InputError(msg)
    sym_col = next((c for c in SYMBOL_COLUMNS if c in names and c != id_col), None)
    table = _read_table(var, [_JOINID, id_col, *([sym_col] if sym_col else [])], None, path)
    order = np.argsort(table[_JOINID].to_numpy(), kind="stable")
    joinids = table[_JOINID].to_numpy()[order]
    ids = as_str_array(table[id_col].to_pandas())[order]
    fix = "Every gene needs an ID: fix the var column, or pick another with gene_id_column=."
    check_ids(ids, n=len(ids), path=path, what=f"gene IDs in var column {id_col!r}", fix=fix)
    symbols = None
    if sym_col:
        symbols = as_str_array(table[sym_col].to_pandas())[order]
    return ids, symbols, joinids


def _cells(
    obs: Any, path: str, options: ReadOptions, obs_filter: str | None, notes: list[str]
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(obs joinids, barcodes, carried columns) of the cells read, ordered by joinid."""
    names = [n for n in obs.schema.names if n != _JOINID]
    bc_col = next((c for c in BARCODE_COLUMNS if c in names), None)
    available = [n for n in names if n != bc_col]
    carried = select_columns(available, options.obs_columns, path=path, where="obs")
    columns = [_JOINID, *([bc_col] if bc_col else []), *carried]
    table = _read_table(obs, columns, obs_filter, path)
    joinids = table[_JOINID].to_numpy()
    order = np.argsort(joinids, kind="stable")
    joinids = joinids[order]
    if bc_col is None:
        notes.append("obs has no obs_id column: cells named by their soma_joinid.")
        barcodes = joinids.astype(np.dtypes.StringDType())
    else:
        barcodes = as_str_array(table[bc_col].to_pandas())[order]
        fix = "Fix the obs column so that every cell has a name."
        check_ids(barcodes, n=len(barcodes), path=path, what=f"barcodes in obs {bc_col!r}", fix=fix)
        barcodes = barcodes.astype(np.dtypes.StringDType())
    data: dict[str, Any] = {}
    skipped = []
    for name in carried:
        values = carried_column(table[name].to_pandas().array)
        if values is None:
            if options.obs_columns is not None and name in options.obs_columns:
                msg = f"{path}: obs column {name!r} is not 1-D numbers, booleans or text."
                raise InputError(msg)
            skipped.append(name)
            continue
        data[name] = values[order] if isinstance(values, np.ndarray) else values.take(order)
    if skipped:
        notes.append(
            f"obs columns not carried (not numbers, booleans or text): {', '.join(skipped)}."
        )
    return joinids, barcodes, pd.DataFrame(data, index=pd.RangeIndex(len(joinids)))


def _fingerprint(location: Location, layout: _Layout, measurement: str, layer: str) -> str:
    """The experiment's files (relative paths and sizes, as for a Zarr store) and what is read
    of them (measurement, layer, cells, genes)."""
    h = hashlib.sha256(store_fingerprint(location).encode())
    h.update(f"\0{measurement}\0{layer}\0".encode())
    h.update(layout.cells.tobytes())
    h.update(layout.genes.tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- the source


def _positions(joinids: np.ndarray, found: np.ndarray) -> np.ndarray | None:
    """Where each of ``found`` is in the ascending ``joinids``; None if one is not there."""
    if len(joinids) and joinids[0] == 0 and joinids[-1] == len(joinids) - 1:
        return None if len(found) and int(found.max()) >= len(joinids) else found
    pos = np.searchsorted(joinids, found)
    inside = pos < len(joinids)
    if not inside.all() or not np.array_equal(joinids[pos], found):
        return None
    return pos


class SomaSource:
    """An X layer of a TileDB-SOMA experiment, read by ranges of cells (see :func:`open_soma`).

    Cells are the experiment's ``obs`` rows (those an obs filter keeps) in ``soma_joinid``
    order, genes the measurement's ``var`` rows in ``soma_joinid`` order. The source holds its
    location, the joinids and no open handle: it pickles, and each read opens the array.
    """

    supports_ranges = True

    def __init__(self, location: Location, *, info: SourceInfo, layout: _Layout) -> None:
        self.info = info
        self._location = location
        self._layout = layout

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as one CSR matrix: one query of the X layer for their joinids."""
        check_range(start, stop, self.info.n_cells)
        if start == stop:
            return empty_rows(self.info, self._layout.dtype)
        with self._open() as array:
            return self._read(array, start, stop)

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, one query of the X layer each.

        Values are returned as stored (``soma_data``'s type).
        """
        check_block_size(n_cells)
        return self._blocks(n_cells)

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        with self._open() as array:
            for start in range(0, self.info.n_cells, n_cells):
                yield self._read(array, start, min(start + n_cells, self.info.n_cells))

    def _open(self) -> Any:
        soma, layout = _soma(), self._layout
        try:
            return soma.SparseNDArray.open(
                layout.x_uri, context=_context(layout.config), tiledb_timestamp=layout.timestamp
            )
        except (soma.SOMAError, OSError) as err:
            msg = (
                f"{self.info.path}: the X layer cannot be opened ({_first_line(err)}). The "
                "experiment was moved or deleted, or cannot be reached from here."
            )
            raise InputError(msg) from None

    def _read(self, array: Any, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` from the open X layer ``array``."""
        cells = self._layout.cells[start:stop]
        first, last = int(cells[0]), int(cells[-1])
        consecutive = last - first + 1 == len(cells)
        coords = (slice(first, last),) if consecutive else (cells,)
        rows, cols, values = [], [], []
        try:
            for table in array.read(coords=coords).tables():
                rows.append(table["soma_dim_0"].to_numpy())
                cols.append(table["soma_dim_1"].to_numpy())
                values.append(table["soma_data"].to_numpy())
        except (_soma().SOMAError, OSError) as err:
            msg = (
                f"{self.info.path}: reading the counts of cells {start}:{stop} failed "
                f"({_first_line(err)}). The experiment is damaged or cannot be reached."
            )
            raise InputError(msg) from None
        dtype = self._layout.dtype
        row = np.concatenate(rows) if rows else np.empty(0, np.int64)
        col = np.concatenate(cols) if cols else np.empty(0, np.int64)
        data = np.concatenate(values).astype(dtype, copy=False) if values else np.empty(0, dtype)
        row = row - first if consecutive else np.searchsorted(cells, row)
        gene = _positions(self._layout.genes, col)
        if gene is None:
            msg = (
                f"{self.info.path}: the X layer has counts of genes that are not in var (cells "
                f"{start}:{stop}); the experiment is inconsistent."
            )
            raise InputError(msg)
        shape = (len(cells), self.info.n_genes)
        block = sp.csr_matrix((data, (row, gene)), shape=shape, dtype=dtype)
        block.sum_duplicates()  # also sorts each row's genes
        return block


@contextlib.contextmanager
def _metadata_errors(location: Location, error: type[Exception]) -> Iterator[None]:
    """A failed read of the experiment's metadata (damaged, or unreachable midway) as an
    InputError naming it."""
    try:
        yield
    except (error, OSError) as err:
        msg = (
            f"{location.path}: reading the experiment's metadata failed ({_first_line(err)}). "
            "It is damaged or could not be reached: check it with tiledbsoma."
        )
        raise InputError(msg) from None


def _open_metadata(
    location: Location, options: ReadOptions, notes: list[str]
) -> tuple[SourceInfo, _Layout]:
    """Everything but the counts, in one open of the experiment."""
    soma, path = _soma(), location.path
    measurement = options.measurement or DEFAULT_MEASUREMENT
    config = tuple(sorted(tiledb_config(location).items()))
    try:
        exp = soma.Experiment.open(_uri(location), context=_context(config))
    except (soma.SOMAError, OSError, TypeError) as err:
        msg = (
            f"{path}: cannot be opened as a TileDB-SOMA experiment ({_first_line(err)}). Pass "
            "the experiment's folder or URL (the one holding obs and ms)."
        )
        raise InputError(msg) from None
    with exp, _metadata_errors(location, soma.SOMAError):
        ms = _pick_measurement(exp, path, measurement)
        layer, x = _pick_layer(ms, path, measurement, options.layer)
        gene_ids, symbols, genes = _genes(ms.var, path, measurement, options.gene_id_column)
        cells, barcodes, obs = _cells(exp.obs, path, options, options.obs_filter, notes)
        dtype = np.dtype(x.schema.field("soma_data").type.to_pandas_dtype())
        layout = _Layout(x.uri, int(exp.tiledb_timestamp_ms), cells, genes, dtype, config)
    if len(cells) == 0 or len(genes) == 0:
        kept = f" (obs filter {options.obs_filter!r})" if options.obs_filter else ""
        msg = f"{path}: the matrix is empty ({len(cells)} cells{kept} x {len(genes)} genes)."
        raise InputError(msg)
    notes.append(f"TileDB-SOMA measurement {measurement!r}, X layer {layer!r}.")
    info = SourceInfo(
        path=path,
        format="soma",
        n_cells=len(cells),
        n_genes=len(genes),
        gene_ids=gene_ids,
        gene_symbols=symbols,
        barcodes=barcodes,
        obs=obs,
        fingerprint=_fingerprint(location, layout, measurement, layer),
        notes=notes,
    )
    return info, layout


def read_soma(location: Location, options: ReadOptions) -> SomaSource:
    """Open a TileDB-SOMA experiment as a :class:`~flow.ingest.Source` (reads metadata only).

    Options (see :class:`~flow.ingest.ReadOptions`): ``measurement`` (default ``RNA``),
    ``layer`` (the X layer; default the first of ``raw``, ``counts``, ``data``),
    ``gene_id_column`` (``var`` column with gene IDs; default the first of
    :data:`ID_COLUMNS` present: ``feature_id`` as in CELLxGENE Census, ``ensembl_id``, ...,
    ``var_id``, the ``var_names`` of ``tiledbsoma.io.from_anndata``), ``obs_columns`` (cell
    columns to carry; default all 1-D ones, ``n_counts`` and ``filter_pass`` whenever
    present) and ``obs_filter`` (read only the cells an ``obs`` value filter keeps).
    Barcodes come from ``obs_id`` (else the cells are named by their ``soma_joinid``).

    A URL (``s3://...``) is read by TileDB itself: its storage options are translated to
    TileDB configuration (see :func:`tiledb_config`; TileDB keys such as ``vfs.s3.region``
    may be given directly).

    Raises
    ------
    InputError
        tiledbsoma not installed, not a SOMA experiment, no such measurement or X layer (the
        message lists those present), no gene IDs, an obs filter that cannot be applied, or
        no cells or genes.
    """
    notes: list[str] = []
    info, layout = _open_metadata(location, options, notes)
    return SomaSource(location, info=info, layout=layout)
