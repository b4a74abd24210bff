"""Loom files (as Geneformer's tokenizer reads them): genes in rows, cells in columns, dense.

The file is opened read-only with h5py (upstream Geneformer writes into its input looms; flow
never does), once for all the metadata: the row attributes (gene IDs from ``ensembl_id``, or
``gene_id_column``; symbols from ``Gene``) and the column attributes (barcodes from ``CellID``
or ``obs_names``; ``n_counts``, ``filter_pass`` and other 1-D attributes carried as cell
metadata). Blocks read column slabs ``matrix[:, c0:c1]`` of at most 64 MB, aligned to the
file's chunks, and transpose them in memory: loom is chunked in both directions, so a column
slab reads only the chunks it covers.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ._columns import as_str_array, check_ids, read_ids, select_columns, text_column
from ._fs import fingerprint, guard_reads, input_errors
from ._hdf5 import open_h5
from ._source import SourceInfo, check_block_size, check_range, empty_rows
from ._transpose import dense_row_pieces, dense_rows_per_read, rebatch

if TYPE_CHECKING:
    from collections.abc import Iterator

    import h5py
    import scipy.sparse as sp

    from .._location import Location
    from ._options import ReadOptions

__all__ = ["LOOM_OPTIONS", "LoomSource", "loom_from_file", "read_loom"]

#: The format-specific options the loom reader takes.
LOOM_OPTIONS = ("layer", "gene_id_column", "obs_columns")

_ID_ATTRS = ("ensembl_id", "Accession")
_SYMBOL_ATTRS = ("Gene", "gene_symbol", "gene_name")
_BARCODE_ATTRS = ("CellID", "obs_names", "cell_id")


def _loom_strings(values: np.ndarray, *, missing: str | None = "") -> np.ndarray:
    """Decode loom strings (bytes; loompy escapes non-ASCII characters as XML references)."""
    out = as_str_array(values, missing=missing)
    for i, s in enumerate(out.tolist()):
        if isinstance(s, str) and "&" in s:
            out[i] = html.unescape(s)
    return out


def _carried(values: np.ndarray) -> np.ndarray | pd.Categorical | None:
    if values.ndim != 1:
        return None
    if values.dtype.kind in "biuf":
        return values
    if values.dtype.kind in "OSU":
        return text_column(_loom_strings(values, missing=None))
    return None


@dataclass(frozen=True)
class _Matrix:
    """The loom matrix read: its key, shape (genes x cells), dtype and chunk width."""

    key: str
    n_genes: int
    n_cells: int
    dtype: np.dtype[Any]
    chunk_cols: int


def _matrix(fh: h5py.File, path: str, layer: str | None) -> _Matrix:
    if "matrix" not in fh or not hasattr(fh["matrix"], "shape"):
        msg = f"{path}: has no /matrix dataset, so it is not a loom file."
        raise InputError(msg)
    layers = sorted(fh["layers"].keys()) if "layers" in fh else []
    if layer is None or layer == "":
        key = "matrix"
    elif layer in layers:
        key = f"layers/{layer}"
    else:
        msg = (
            f"{path}: has no layer {layer!r}. Its layers: "
            f"{', '.join(map(repr, layers)) or 'none'}. Pass one of them, or none for "
            "the main matrix."
        )
        raise InputError(msg)
    matrix = fh[key]
    if len(matrix.shape) != 2:
        msg = f"{path}: {key} has shape {matrix.shape}; expected genes x cells."
        raise InputError(msg)
    n_genes, n_cells = (int(s) for s in matrix.shape)
    dtype = np.dtype(matrix.dtype)
    if dtype.kind not in "biuf":
        msg = f"{path}: {key} holds {dtype} values; counts must be numbers."
        raise InputError(msg)
    return _Matrix(key, n_genes, n_cells, dtype, int(matrix.chunks[1]) if matrix.chunks else 1)


def _genes(
    rows: Any, path: str, n_genes: int, gene_id_column: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(gene IDs, symbols or None) from the row attributes."""
    id_key = gene_id_column or next((a for a in _ID_ATTRS if a in rows), None)
    if id_key is None or id_key not in rows:
        wanted = repr(gene_id_column) if gene_id_column else " or ".join(_ID_ATTRS)
        msg = (
            f"{path}: has no row attribute {wanted} with gene IDs. Row attributes: "
            f"{', '.join(map(repr, sorted(rows.keys()))) or 'none'}. Pass gene_id_column= "
            "naming the one that holds Ensembl IDs."
        )
        raise InputError(msg)
    fix = "Every row (gene) needs an ID: fix the loom's row attribute, or pick another."
    gene_ids = _loom_strings(rows[id_key][:])
    what = f"gene IDs in row attribute {id_key!r}"
    check_ids(gene_ids, n=n_genes, path=path, what=what, fix=fix)
    sym_key = next((a for a in _SYMBOL_ATTRS if a in rows and a != id_key), None)
    return gene_ids, _loom_strings(rows[sym_key][:]) if sym_key else None


def _barcodes(cols: Any, path: str, n_cells: int, notes: list[str]) -> tuple[np.ndarray, str]:
    """(barcodes, the column attribute they come from or "") from the column attributes."""
    bc_key = next((a for a in _BARCODE_ATTRS if a in cols), None)
    if bc_key is None:
        notes.append(
            f"no CellID/obs_names column attribute: cells named cell-0..cell-{n_cells - 1}."
        )
        return np.char.add("cell-", np.arange(n_cells).astype(np.dtypes.StringDType())), ""
    barcodes = read_ids(cols[bc_key], _loom_strings)
    check_ids(
        barcodes,
        n=n_cells,
        path=path,
        what=f"barcodes in column attribute {bc_key!r}",
        fix="Fix the column attribute so that every cell has a name.",
    )
    return barcodes, bc_key


def _cell_columns(
    cols: Any,
    path: str,
    n_cells: int,
    obs_columns: tuple[str, ...] | None,
    skip: str,
    notes: list[str],
) -> pd.DataFrame:
    """The column attributes to carry (all 1-D ones but ``skip``, or ``obs_columns``)."""
    available = [a for a in sorted(cols.keys()) if a != skip]
    data: dict[str, Any] = {}
    skipped = []
    for name in select_columns(available, obs_columns, path=path, where="col_attrs"):
        values = _carried(cols[name][:])
        if values is None or len(values) != n_cells:
            if obs_columns is not None and name in obs_columns:
                msg = f"{path}: column attribute {name!r} is not 1-D numbers or strings for every cell."
                raise InputError(msg)
            skipped.append(name)
            continue
        data[name] = values
    if skipped:
        notes.append(
            f"column attributes not carried (not 1-D, one per cell): {', '.join(skipped)}."
        )
    return pd.DataFrame(data, index=pd.RangeIndex(n_cells))


class LoomSource:
    """A loom matrix (genes x cells) read block by block (see :func:`read_loom`)."""

    supports_ranges = True

    def __init__(
        self, location: Location, options: ReadOptions, *, info: SourceInfo, matrix: _Matrix
    ) -> None:
        self.info = info
        self._location = location
        self._options = options
        self._matrix = matrix

    @classmethod
    def from_file(cls, fh: h5py.File, location: Location, options: ReadOptions) -> LoomSource:
        """Read the metadata from the open file ``fh`` (nothing else is opened)."""
        path = location.path
        notes: list[str] = []
        with input_errors(location, "the metadata", (OSError, KeyError)):
            matrix = _matrix(fh, path, options.layer)
            rows, cols = fh.get("row_attrs", {}), fh.get("col_attrs", {})
            gene_ids, symbols = _genes(rows, path, matrix.n_genes, options.gene_id_column)
            barcodes, bc_key = _barcodes(cols, path, matrix.n_cells, notes)
            obs = _cell_columns(cols, path, matrix.n_cells, options.obs_columns, bc_key, notes)
        if matrix.n_cells == 0 or matrix.n_genes == 0:
            msg = f"{path}: the matrix is empty ({matrix.n_cells} cells x {matrix.n_genes} genes)."
            raise InputError(msg)
        info = SourceInfo(
            path=path,
            format="loom",
            n_cells=matrix.n_cells,
            n_genes=matrix.n_genes,
            gene_ids=gene_ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=obs,
            fingerprint=fingerprint(location),
            notes=notes,
        )
        return cls(location, options, info=info, matrix=matrix)

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading column slabs of the matrix.

        Values are returned as stored (loom matrices are usually float32).
        """
        check_block_size(n_cells)
        return guard_reads(self._location, self._blocks(n_cells))

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as one CSR matrix, reading only their column slabs."""
        check_range(start, stop, self.info.n_cells)
        with input_errors(self._location, "the counts"):
            pieces = list(self._pieces(max(1, stop - start), start, stop))
        return next(
            rebatch(pieces, max(1, stop - start)), empty_rows(self.info, self._matrix.dtype)
        )

    def _pieces(self, n_cells: int, start: int, stop: int) -> Iterator[sp.csr_matrix]:
        m, read_size = self._matrix, self._options.read_size
        width = dense_rows_per_read(m.n_genes, m.dtype.itemsize, n_cells, read_size)
        if read_size is None and width >= m.chunk_cols:
            width -= width % m.chunk_cols  # whole chunks per read
        with open_h5(self._location) as fh:
            matrix: Any = fh[m.key]
            yield from dense_row_pieces(
                matrix, n_rows=stop, rows_per_read=width, transpose=True, start=start
            )

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        yield from rebatch(self._pieces(n_cells, 0, self.info.n_cells), n_cells)


def loom_from_file(fh: h5py.File, location: Location, options: ReadOptions) -> LoomSource:
    """:func:`read_loom` of a file already open as ``fh``."""
    return LoomSource.from_file(fh, location, options)


def read_loom(location: Location, options: ReadOptions) -> LoomSource:
    """Open a loom file read-only as a :class:`~flow.ingest.Source` (reads attributes only).

    Options (see :class:`~flow.ingest.ReadOptions`): ``layer`` (a loom layer instead of the
    main matrix), ``gene_id_column`` (row attribute with gene IDs; default ``ensembl_id``,
    else ``Accession``), ``obs_columns`` (column attributes to carry; default all 1-D ones;
    ``n_counts`` and ``filter_pass`` whenever present) and ``read_size`` (cells per read;
    default as many as fit in 64 MB, in whole chunks). A URL is read range by range (only the
    chunks of each column slab), never downloaded whole.

    Raises
    ------
    InputError
        Not HDF5 or truncated, no /matrix, no such layer, no gene IDs, attributes whose length
        does not match the matrix, or an empty matrix.
    """
    with open_h5(location) as fh:
        return LoomSource.from_file(fh, location, options)
