"""AnnData inputs: ``.h5ad`` files (read with h5py), and the reader shared with AnnData Zarr.

Only metadata is read when a source is opened: the matrix's encoding and shape, ``var`` (gene
IDs and symbols) and the chosen ``obs`` columns. Counts are read block by block in
:meth:`AnnDataSource.iter_blocks`:

- CSR (``X``, a layer or ``raw.X``): ``indptr[r0:r1+1]`` and the matching ranges of ``data`` and
  ``indices``, one block of cells at a time;
- dense: row slabs ``X[r0:r1]`` of at most 64 MB;
- CSC (genes in columns): the one layout that cannot be read by rows. It is transposed through
  temporary files (:func:`flow.ingest._transpose.bucket_transpose`), which the source's
  ``notes`` say.

The AnnData on-disk encoding is the same in HDF5 and Zarr, so :class:`AnnDataSource` works on
any root group with ``group[key]`` access and sliceable arrays; ``anndata.io.read_elem``
decodes the ``obs``/``var`` columns (categoricals, nullable and string arrays).
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import FlowError, InputError
from ._fs import H5_BLOCK_SIZE, fingerprint, is_url, open_input, redact
from ._source import SourceInfo
from ._transpose import (
    ENTRIES_PER_READ,
    bucket_transpose,
    csc_triplets,
    csr_row_pieces,
    dense_row_pieces,
    dense_rows_per_read,
    rebatch,
    transpose_disk_bytes,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence
    from contextlib import AbstractContextManager

    import h5py
    import scipy.sparse as sp

__all__ = [
    "ALWAYS_CARRIED",
    "SYMBOL_COLUMNS",
    "AnnDataSource",
    "as_str_array",
    "carried_column",
    "text_column",
    "check_ids",
    "read_ids",
    "guard_reads",
    "input_errors",
    "open_h5",
    "open_h5ad",
    "select_columns",
]

#: ``var`` columns holding gene symbols, in order of preference.
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name")
#: Geneformer's gene ID column, used by default when present.
DEFAULT_ID_COLUMN = "ensembl_id"
#: Cell columns carried whatever ``obs_columns`` says, when present.
ALWAYS_CARRIED = ("filter_pass", "n_counts")


# --------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def open_h5(path: str, storage_options: Mapping[str, Any] | None = None) -> Iterator[h5py.File]:
    """Open an HDF5 file read-only; a file HDF5 cannot open is an :class:`InputError`.

    A URL is opened with fsspec (``storage_options``) and handed to h5py as a file object
    with a read-ahead of :data:`~flow.ingest._fs.H5_BLOCK_SIZE`: HDF5 reads only the byte
    ranges it needs. Both are closed on exit, so each use opens its own handle.
    """
    import h5py

    with contextlib.ExitStack() as stack:
        try:
            if is_url(path):  # missing or unreachable: InputError from open_input
                raw = stack.enter_context(
                    open_input(path, storage_options, block_size=H5_BLOCK_SIZE)
                )
                fh = h5py.File(raw, "r")
            else:
                fh = h5py.File(path, "r")
        except FileNotFoundError as err:
            msg = f"{path}: no such file."
            raise InputError(msg) from err
        except OSError as err:
            msg = (
                f"{path}: cannot be opened as HDF5 ({redact(str(err), storage_options, keep=path)}"
                "). The file is truncated, corrupt or not HDF5: re-download or re-export it."
            )
            raise InputError(msg) from (None if storage_options else err)
        stack.enter_context(fh)
        yield fh


@contextlib.contextmanager
def input_errors(
    path: str,
    what: str,
    errors: tuple[type[Exception], ...] = (OSError,),
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[None]:
    """Turn read failures of the input (``errors``) into an :class:`InputError` naming it.

    A full disk or quota while transposing through temporary files is not the input's fault
    and propagates unchanged. ``storage_options`` (of a URL input) never appear in the
    message.
    """
    try:
        yield
    except FlowError:
        raise
    except errors as err:
        if isinstance(err, OSError) and err.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT):
            raise
        detail = redact(f"{type(err).__name__}: {err}", storage_options, keep=path)
        remote = " (or the connection to it failed)" if is_url(path) else ""
        msg = (
            f"{path}: reading {what} failed ({detail}). The file is truncated or "
            f"corrupt{remote}: re-download or re-export it."
        )
        raise InputError(msg) from (None if storage_options else err)


def guard_reads(
    path: str,
    blocks: Iterator[sp.csr_matrix],
    errors: tuple[type[Exception], ...] = (OSError,),
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[sp.csr_matrix]:
    """Pass ``blocks`` through :func:`input_errors`."""
    with input_errors(path, "the counts", errors, storage_options=storage_options):
        yield from blocks


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


def as_str_array(values: Any, *, missing: str | None = "") -> np.ndarray:
    """Values as an object array of ``str`` (bytes decoded as UTF-8; missing -> ``missing``)."""
    if isinstance(values, pd.Categorical | pd.api.extensions.ExtensionArray | pd.Series):
        values = np.asarray(values.astype(object))
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8", errors="replace").astype(object)
    if arr.dtype.kind == "U":
        return arr.astype(object)
    items = arr.ravel().tolist()
    if all(type(v) is str for v in items):  # the common case: nothing to decode or fill
        return np.asarray(items, dtype=object).reshape(arr.shape)
    out = np.empty(arr.shape, dtype=object)
    for i, v in enumerate(items):
        if _is_missing(v):
            out[i] = missing
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8", errors="replace")
        else:
            out[i] = str(v)
    return out


_ID_SLICE = 1 << 16  # identifiers decoded per slice


def _plain_strings(elem: Any) -> Any | None:
    """A plain 1-D text dataset (HDF5 or Zarr) as something to slice into, else None."""
    if _is_group(elem) or len(elem.shape) != 1:
        return None
    if _attr_str(elem.attrs.get("encoding-type")) not in (None, "string-array"):
        return None
    kind = getattr(elem.dtype, "kind", "")
    if kind not in ("O", "S", "U", "T"):
        return None
    return elem.asstr() if kind == "O" and hasattr(elem, "asstr") else elem


def read_ids(elem: Any, decode: Callable[[Any], np.ndarray] = as_str_array) -> np.ndarray:
    """A column of cell identifiers (barcodes) as a compact numpy ``StringDType`` array.

    ``StringDType`` holds a 15-character barcode in 16 bytes and an 18-character one in about
    40, where ``str`` objects take about 75. A plain text dataset (HDF5 or Zarr) is read and
    decoded a slice at a time, so the object form never exists whole; other encodings
    (categorical) are read by anndata and converted.
    """
    compact = np.dtypes.StringDType()
    rows = _plain_strings(elem)
    if rows is None:
        return decode(_read_elem(elem)).astype(compact)
    out = np.empty(elem.shape[0], dtype=compact)
    for a in range(0, elem.shape[0], _ID_SLICE):
        out[a : a + _ID_SLICE] = decode(rows[a : a + _ID_SLICE])
    return out


def read_cell_column(elem: Any) -> np.ndarray | pd.Categorical | None:
    """:func:`carried_column` of an obs element, reading a text dataset a slice at a time.

    Labels stored as plain text (a cell type per cell) become a categorical slice by slice,
    so the million strings never exist at once; mostly distinct text (IDs) is read whole.
    """
    from pandas.api.types import union_categoricals

    rows = _plain_strings(elem)
    n = 0 if rows is None else int(elem.shape[0])
    if rows is None or n == 0:
        return carried_column(_read_elem(elem))
    parts, distinct = [], pd.Index([], dtype=object)
    for a in range(0, n, _ID_SLICE):
        parts.append(pd.Categorical(as_str_array(rows[a : a + _ID_SLICE], missing=None)))
        distinct = distinct.union(parts[-1].categories)
        if 2 * len(distinct) > n:  # mostly distinct: IDs, kept as text
            return carried_column(_read_elem(elem))
    return union_categoricals(parts, sort_categories=True)


def text_column(values: Any) -> np.ndarray | pd.Categorical:
    """Text cell values, held compactly: a categorical with ``str`` categories (missing values
    missing), or ``str`` objects (missing ``None``) when most values are distinct (IDs).

    A column of a million cells holding a few labels costs a byte per cell, not a string each.
    """
    if isinstance(values, pd.Categorical):
        categories = as_str_array(values.categories)
        if pd.Index(categories).is_unique:
            return pd.Categorical.from_codes(values.codes, categories=categories)
        values = values.astype(object)  # categories equal as text (1 and "1"): regroup them
    strings = as_str_array(values, missing=None)
    labels = pd.Categorical(strings)
    return strings if 2 * len(labels.categories) > len(strings) else labels


def carried_column(values: Any) -> np.ndarray | pd.Categorical | None:
    """A cell column in a form the count store can carry, or None if it is not 1-D and simple.

    Numbers and booleans stay numeric; text and categoricals go through :func:`text_column`;
    nullable integers with missing values become float with NaN.
    """
    if isinstance(values, pd.Categorical):
        return text_column(values)
    if isinstance(values, pd.api.extensions.ExtensionArray):
        kind = getattr(values.dtype, "kind", "O")
        has_na = bool(np.asarray(values.isna()).any())
        if kind in "iuf" and has_na:
            return np.asarray(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if kind in "biuf" and not has_na:
            return np.asarray(values.to_numpy(dtype=values.dtype.numpy_dtype))
        return text_column(values)
    arr = np.asarray(values)
    if arr.ndim != 1:
        return None
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind in "OSUT":  # T: numpy's StringDType, as zarr v3 returns text
        return text_column(arr)
    return None


def select_columns(
    available: Sequence[str], requested: Sequence[str] | None, *, path: str, where: str
) -> list[str]:
    """The cell columns to carry: all of ``available`` or ``requested`` plus :data:`ALWAYS_CARRIED`."""
    if requested is None:
        return list(available)
    missing = [c for c in requested if c not in available]
    if missing:
        msg = (
            f"{path}: {where} has no column {', '.join(map(repr, missing))}. Available: "
            f"{', '.join(map(repr, available)) or 'none'}. Pass obs_columns from that list."
        )
        raise InputError(msg)
    return list(dict.fromkeys([*requested, *(c for c in ALWAYS_CARRIED if c in available)]))


def check_ids(ids: np.ndarray, *, n: int, path: str, what: str, fix: str) -> None:
    """Refuse identifiers of the wrong length or with empty values."""
    if len(ids) != n:
        msg = f"{path}: {len(ids)} {what} for a matrix with {n}; the file is inconsistent. {fix}"
        raise InputError(msg)
    empty = np.flatnonzero((ids == "") | (ids == "nan"))
    if empty.size:
        msg = (
            f"{path}: {empty.size} of {n} {what} are missing (first at position "
            f"{int(empty[0])}). {fix}"
        )
        raise InputError(msg)


def _attr_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _is_group(elem: Any) -> bool:
    return hasattr(elem, "keys")


def _frame_layout(root: Any, key: str, path: str) -> tuple[str, list[str]]:
    """(index key, columns in order) of an AnnData dataframe group ``key``."""
    if key not in root:
        msg = f"{path}: has no {key!r} element, so it is not a complete AnnData file."
        raise InputError(msg)
    group = root[key]
    enc = _attr_str(group.attrs.get("encoding-type")) if _is_group(group) else None
    if enc != "dataframe":
        msg = (
            f"{path}: {key!r} uses an old AnnData layout ({enc or 'no encoding-type'}), which "
            "flow does not read. Re-save it with a current anndata: "
            "anndata.read_h5ad(old).write_h5ad(new)."
        )
        raise InputError(msg)
    index_key = _attr_str(group.attrs.get("_index")) or "_index"
    order = group.attrs.get("column-order")
    columns = [str(_attr_str(c)) for c in np.atleast_1d(order)] if order is not None else []
    return index_key, [c for c in columns if c in group]


def _read_elem(elem: Any) -> Any:
    import anndata as ad

    return ad.io.read_elem(elem)


# --------------------------------------------------------------------------- the reader


class AnnDataSource:
    """An AnnData matrix (``X``, a layer or ``raw.X``) read block by block.

    Use :func:`open_h5ad` or :func:`flow.ingest.anndata_zarr.open_anndata_zarr`. Opening reads
    the matrix's encoding and shape, gene IDs, symbols, barcodes and the chosen ``obs``
    columns; the counts are read only by :meth:`iter_blocks`.

    Parameters
    ----------
    path
        The input, as given (named in every message).
    format
        ``"h5ad"`` or ``"anndata-zarr"``.
    open_root
        Returns a context manager giving the root group (an ``h5py.File`` or ``zarr.Group``).
    fingerprint
        Fingerprint of the input (:func:`flow._io.file_fingerprint` for files).
    layer, use_raw, gene_id_column, obs_columns, read_size, temp_dir
        See :func:`flow.ingest.open_source`.
    read_errors
        Exceptions raised by reads of a damaged input (turned into :class:`InputError`).
    storage_options
        The fsspec options of a URL input: used by ``open_root``, only kept here to hide
        them from messages.
    """

    def __init__(
        self,
        path: str,
        *,
        format: str,
        open_root: Callable[[], AbstractContextManager[Any]],
        fingerprint: str,
        layer: str | None = None,
        use_raw: bool = False,
        gene_id_column: str | None = None,
        obs_columns: Sequence[str] | None = None,
        read_size: int | None = None,
        temp_dir: str | os.PathLike[str] | None = None,
        read_errors: tuple[type[Exception], ...] = (OSError,),
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._open_root = open_root
        self._read_size = read_size
        self._temp_dir = temp_dir
        self._read_errors = read_errors
        self._storage_options = storage_options
        notes: list[str] = []
        with (
            input_errors(
                path, "the metadata", (*read_errors, KeyError), storage_options=storage_options
            ),
            open_root() as root,
        ):
            self._key = _matrix_key(root, path, layer=layer, use_raw=use_raw)
            self._layout, n_cells, n_genes, self._nnz, self._dtype = _matrix_layout(
                root[self._key], path, self._key
            )
            if n_cells == 0 or n_genes == 0:
                msg = (
                    f"{path}: the matrix {self._key} is empty ({n_cells} cells x {n_genes} "
                    "genes). Pass a file (or layer) with counts."
                )
                raise InputError(msg)
            gene_ids, symbols = _read_var(
                root, "raw/var" if use_raw else "var", path, n_genes, gene_id_column
            )
            barcodes, obs = _read_obs(root, path, n_cells, obs_columns, notes)
        if self._layout == "csc":
            gb = transpose_disk_bytes(self._nnz, self._dtype) / 1e9
            notes.append(
                f"{self._key} is stored CSC (genes in columns): transposed through temporary "
                f"files (about {gb:.2f} GB of temporary disk)."
            )
        self.info = SourceInfo(
            path=path,
            format=format,
            n_cells=n_cells,
            n_genes=n_genes,
            gene_ids=gene_ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=obs,
            fingerprint=fingerprint,
            notes=notes,
        )

    @property
    def layout(self) -> str:
        """How the matrix is stored: ``"csr"``, ``"csc"`` or ``"dense"``."""
        return self._layout

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading only those cells' counts.

        Counts are returned as stored (dtype and values unchanged). For CSC input the first
        block comes after one pass over the whole matrix into temporary files.
        """
        if n_cells < 1:
            msg = f"n_cells must be >= 1; got {n_cells}."
            raise ValueError(msg)
        return guard_reads(
            self.info.path,
            self._blocks(n_cells),
            self._read_errors,
            storage_options=self._storage_options,
        )

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        info = self.info
        with self._open_root() as root:
            elem = root[self._key]
            if self._layout == "csr":
                pieces = csr_row_pieces(
                    elem["data"],
                    elem["indices"],
                    elem["indptr"],
                    n_rows=info.n_cells,
                    n_cols=info.n_genes,
                    rows_per_read=self._read_size or n_cells,
                    path=info.path,
                    what=self._key,
                )
                yield from rebatch(pieces, n_cells)
            elif self._layout == "dense":
                rows = dense_rows_per_read(
                    info.n_genes, self._dtype.itemsize, n_cells, self._read_size
                )
                pieces = dense_row_pieces(elem, n_rows=info.n_cells, rows_per_read=rows)
                yield from rebatch(pieces, n_cells)
            else:
                triplets = csc_triplets(
                    elem["data"],
                    elem["indices"],
                    elem["indptr"],
                    n_rows=info.n_cells,
                    n_cols=info.n_genes,
                    entries_per_read=self._read_size or ENTRIES_PER_READ,
                    path=info.path,
                    what=self._key,
                )
                yield from bucket_transpose(
                    triplets,
                    n_rows=info.n_cells,
                    n_cols=info.n_genes,
                    block_rows=n_cells,
                    value_dtype=self._dtype,
                    path=info.path,
                    temp_dir=self._temp_dir,
                )


def _matrix_key(root: Any, path: str, *, layer: str | None, use_raw: bool) -> str:
    layers = list(root["layers"].keys()) if "layers" in root else []
    listed = ", ".join(map(repr, layers)) or "none"
    if use_raw and layer is not None:
        msg = f"{path}: pass layer= or use_raw=True, not both (raw has no layers)."
        raise InputError(msg)
    if use_raw:
        if "raw" not in root or "X" not in root["raw"]:
            msg = f"{path}: has no raw.X (use_raw=True). Drop use_raw to read X (layers: {listed})."
            raise InputError(msg)
        return "raw/X"
    if layer is not None:
        if layer not in layers:
            msg = (
                f"{path}: has no layer {layer!r}. Its layers: {listed}. Pass one of them, or "
                "no layer to read X."
            )
            raise InputError(msg)
        return f"layers/{layer}"
    if "X" not in root:
        msg = f"{path}: has no X matrix. Pass layer= (layers: {listed}) or use_raw=True."
        raise InputError(msg)
    return "X"


def _matrix_layout(elem: Any, path: str, key: str) -> tuple[str, int, int, int, np.dtype[Any]]:
    """(layout, n_cells, n_genes, nnz or 0 for dense, dtype) from the element's metadata."""
    if _is_group(elem):
        attrs = elem.attrs
        enc = _attr_str(attrs.get("encoding-type"))
        if enc is None and attrs.get("h5sparse_format") is not None:  # anndata < 0.7
            enc = f"{_attr_str(attrs.get('h5sparse_format'))}_matrix"
        shape = attrs.get("shape", attrs.get("h5sparse_shape"))
        parts = ("data", "indices", "indptr")
        if (
            enc not in ("csr_matrix", "csc_matrix")
            or shape is None
            or any(p not in elem for p in parts)
        ):
            msg = (
                f"{path}: {key} is encoded as {enc!r}; flow reads dense arrays and "
                "csr_matrix/csc_matrix. Re-save the matrix in one of these encodings."
            )
            raise InputError(msg)
        n_cells, n_genes = (int(s) for s in shape)
        dtype = np.dtype(elem["data"].dtype)
        layout, nnz = ("csr" if enc == "csr_matrix" else "csc"), int(elem["data"].shape[0])
    else:
        if len(elem.shape) != 2:
            msg = (
                f"{path}: {key} has shape {tuple(elem.shape)}; expected a 2-D cells x genes matrix."
            )
            raise InputError(msg)
        n_cells, n_genes = (int(s) for s in elem.shape)
        dtype, layout, nnz = np.dtype(elem.dtype), "dense", 0
    if dtype.kind not in "biuf":
        msg = f"{path}: {key} holds {dtype} values; counts must be numbers."
        raise InputError(msg)
    return layout, n_cells, n_genes, nnz, dtype


def _read_var(
    root: Any, key: str, path: str, n_genes: int, gene_id_column: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    index_key, columns = _frame_layout(root, key, path)
    var = root[key]
    names = [index_key, *columns]
    if gene_id_column is None:
        id_key = DEFAULT_ID_COLUMN if DEFAULT_ID_COLUMN in names else index_key
    elif gene_id_column in names:
        id_key = gene_id_column
    else:
        msg = (
            f"{path}: {key} has no column {gene_id_column!r} for gene IDs. Columns: "
            f"{', '.join(map(repr, columns)) or 'none'} (index: {index_key!r}). Pass one of them "
            "as gene_id_column, or none to use the index (var_names)."
        )
        raise InputError(msg)
    ids = as_str_array(_read_elem(var[id_key]))
    fix = f"Pass gene_id_column= naming a {key} column with an ID for every gene."
    check_ids(ids, n=n_genes, path=path, what=f"gene IDs in {key}[{id_key!r}]", fix=fix)
    symbols = None
    for name in SYMBOL_COLUMNS:
        if name in columns and name != id_key:
            symbols = as_str_array(_read_elem(var[name]))
            break
    return ids, symbols


def _read_obs(
    root: Any, path: str, n_cells: int, obs_columns: Sequence[str] | None, notes: list[str]
) -> tuple[np.ndarray, pd.DataFrame]:
    index_key, columns = _frame_layout(root, "obs", path)
    obs = root["obs"]
    barcodes = read_ids(obs[index_key])
    check_ids(
        barcodes,
        n=n_cells,
        path=path,
        what=f"cell barcodes in obs[{index_key!r}]",
        fix="Fix obs_names so that every cell has one.",
    )
    data: dict[str, Any] = {}
    skipped = []
    for name in select_columns(columns, obs_columns, path=path, where="obs"):
        values = read_cell_column(obs[name])
        if values is None or len(values) != n_cells:
            if obs_columns is not None and name in obs_columns:
                msg = f"{path}: obs column {name!r} is not a 1-D column of numbers or strings."
                raise InputError(msg)
            skipped.append(name)
            continue
        data[name] = values
    if skipped:
        notes.append(f"obs columns not carried (not 1-D numbers or strings): {', '.join(skipped)}.")
    return barcodes, pd.DataFrame(data, index=pd.RangeIndex(n_cells))


def open_h5ad(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    read_size: int | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> AnnDataSource:
    """Open an ``.h5ad`` file as a :class:`~flow.ingest.Source` (reads metadata only).

    See :func:`flow.ingest.open_source` for the parameters. The file is opened read-only with
    h5py, once for the metadata and once per :meth:`~AnnDataSource.iter_blocks` pass. A URL
    (``s3://...``) is read through fsspec with ``storage_options``, range by range.

    Raises
    ------
    InputError
        Not HDF5 or truncated, no such layer/raw, no gene IDs, barcodes that do not match the
        matrix, an empty matrix, or an encoding flow does not read.
    """
    text = os.fspath(path)
    options = dict(storage_options or {}) if is_url(text) else None
    with open_h5(text, options):  # report an unreadable file before fingerprinting it
        pass
    return AnnDataSource(
        text,
        format="h5ad",
        open_root=lambda: open_h5(text, options),
        fingerprint=fingerprint(text, options),
        layer=layer,
        use_raw=use_raw,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        read_size=read_size,
        temp_dir=temp_dir,
        storage_options=options,
    )
