"""The AnnData reader shared by ``.h5ad`` (HDF5) and AnnData Zarr stores.

The AnnData on-disk encoding is the same in HDF5 and Zarr, so :class:`AnnDataSource` works on
any root group with ``group[key]`` access and sliceable arrays. Only metadata is read when a
source is made (in the caller's one open of the root): the matrix's encoding and shape,
``var`` (gene IDs and symbols) and the chosen ``obs`` columns. Counts are read block by block
in :meth:`AnnDataSource.iter_blocks`, each pass opening the root again:

- CSR (``X``, a layer or ``raw.X``): ``indptr[r0:r1+1]`` and the matching ranges of ``data`` and
  ``indices``, one block of cells at a time;
- dense: row slabs ``X[r0:r1]`` of at most 64 MB;
- CSC (genes in columns): the one layout that cannot be read by rows. It is transposed through
  temporary files (:func:`flow.ingest._transpose.bucket_transpose`), which the source's
  ``notes`` say.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ._columns import (
    as_str_array,
    attr_str,
    check_ids,
    is_group,
    read_cell_column,
    read_elem,
    read_ids,
    select_columns,
)
from ._fs import guard_reads, input_errors
from ._source import SourceInfo, check_block_size, check_range, empty_rows, offsets_at
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
    from collections.abc import Callable, Iterator, Sequence
    from contextlib import AbstractContextManager

    import scipy.sparse as sp

    from .._location import Location
    from ._options import ReadOptions

__all__ = ["ANNDATA_OPTIONS", "DEFAULT_ID_COLUMN", "SYMBOL_COLUMNS", "AnnDataSource"]

#: The format-specific options AnnData readers take.
ANNDATA_OPTIONS = ("layer", "use_raw", "gene_id_column", "obs_columns")
#: ``var`` columns holding gene symbols, in order of preference.
SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "gene_name", "feature_name")
#: Geneformer's gene ID column, used by default when present.
DEFAULT_ID_COLUMN = "ensembl_id"


@dataclass(frozen=True)
class _Matrix:
    """Where and how the counts are stored."""

    key: str  # "X", "layers/<name>" or "raw/X"
    layout: str  # "csr", "csc" or "dense"
    n_cells: int
    n_genes: int
    nnz: int  # 0 for dense
    dtype: np.dtype[Any]


class AnnDataSource:
    """An AnnData matrix (``X``, a layer or ``raw.X``) read block by block.

    Made by :meth:`from_root` (see :func:`flow.ingest.h5ad.read_h5ad` and
    :func:`flow.ingest.anndata_zarr.read_anndata_zarr`). The source holds its location,
    options and metadata, and no open handle: it pickles, and each pass opens the input.
    """

    def __init__(
        self,
        location: Location,
        options: ReadOptions,
        *,
        info: SourceInfo,
        matrix: _Matrix,
        open_root: Callable[[Location], AbstractContextManager[Any]],
        read_errors: tuple[type[Exception], ...],
    ) -> None:
        self.info = info
        self._location = location
        self._options = options
        self._matrix = matrix
        self._open_root = open_root
        self._read_errors = read_errors

    @classmethod
    def from_root(
        cls,
        root: Any,
        location: Location,
        options: ReadOptions,
        *,
        format: str,
        fingerprint: str,
        open_root: Callable[[Location], AbstractContextManager[Any]],
        read_errors: tuple[type[Exception], ...] = (OSError,),
    ) -> AnnDataSource:
        """Read the metadata from an open ``root`` group (nothing else is opened).

        ``open_root`` (a module-level function, so that the source pickles) opens the root
        again for each pass over the counts; ``read_errors`` are the exceptions a damaged
        input raises on reads (turned into :class:`InputError`).
        """
        path = location.path
        notes: list[str] = []
        with input_errors(location, "the metadata", (*read_errors, KeyError)):
            matrix = _matrix(root, path, options)
            var = "raw/var" if options.use_raw else "var"
            gene_ids, symbols = _read_var(root, var, path, matrix.n_genes, options.gene_id_column)
            barcodes, obs = _read_obs(root, path, matrix.n_cells, options.obs_columns, notes)
        if matrix.layout == "csc":
            gb = transpose_disk_bytes(matrix.nnz, matrix.dtype) / 1e9
            notes.append(
                f"{matrix.key} is stored CSC (genes in columns): transposed through temporary "
                f"files (about {gb:.2f} GB of temporary disk)."
            )
        info = SourceInfo(
            path=path,
            format=format,
            n_cells=matrix.n_cells,
            n_genes=matrix.n_genes,
            gene_ids=gene_ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=obs,
            fingerprint=fingerprint,
            notes=notes,
        )
        return cls(
            location,
            options,
            info=info,
            matrix=matrix,
            open_root=open_root,
            read_errors=read_errors,
        )

    @property
    def layout(self) -> str:
        """How the matrix is stored: ``"csr"``, ``"csc"`` or ``"dense"``."""
        return self._matrix.layout

    @property
    def supports_ranges(self) -> bool:
        """Whether :meth:`read_rows` reads a range of cells directly (CSR and dense: yes)."""
        return self._matrix.layout != "csc"

    def row_offsets(self, rows: Sequence[int]) -> np.ndarray | None:
        """The stored entries before each of ``rows`` (increasing cell numbers, ``n_cells``
        allowed): the CSR matrix's ``indptr`` at those rows, read without reading any count.
        None for a dense or CSC matrix (nothing records them)."""
        if self._matrix.layout != "csr":
            return None
        with (
            input_errors(self._location, "the counts", self._read_errors),
            self._open_root(self._location) as root,
        ):
            indptr = np.asarray(root[self._matrix.key]["indptr"][:], dtype=np.int64)
        return offsets_at(indptr, rows, self.info.n_cells)

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading only those cells' counts.

        Counts are returned as stored (dtype and values unchanged). For CSC input the first
        block comes after one pass over the whole matrix into temporary files.
        """
        check_block_size(n_cells)
        return guard_reads(self._location, self._blocks(n_cells), self._read_errors)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as one CSR matrix, reading only them (CSR and dense layouts).

        Raises
        ------
        NotImplementedError
            A CSC matrix (:attr:`supports_ranges` is False): read it with :meth:`iter_blocks`.
        """
        check_range(start, stop, self.info.n_cells)
        if not self.supports_ranges:
            msg = f"{self.info.path}: {self._matrix.key} is CSC; read it with iter_blocks."
            raise NotImplementedError(msg)
        with input_errors(self._location, "the counts", self._read_errors):
            return self._read_rows(start, stop)

    def _read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        with self._open_root(self._location) as root:
            pieces = list(self._row_pieces(root, stop - start, start=start, stop=stop))
        return next(
            rebatch(pieces, max(1, stop - start)), empty_rows(self.info, self._matrix.dtype)
        )

    def _row_pieces(
        self, root: Any, n_cells: int, *, start: int = 0, stop: int | None = None
    ) -> Iterator[sp.csr_matrix]:
        """CSR pieces of the rows ``start:stop`` (all rows by default) of a row-wise layout."""
        m, info = self._matrix, self.info
        elem = root[m.key]
        stop = info.n_cells if stop is None else stop
        if m.layout == "csr":
            return csr_row_pieces(
                elem["data"],
                elem["indices"],
                elem["indptr"],
                n_rows=info.n_cells,
                n_cols=info.n_genes,
                rows_per_read=self._options.read_size or max(1, n_cells),
                path=info.path,
                what=m.key,
                start=start,
                stop=stop,
            )
        rows = dense_rows_per_read(
            info.n_genes, m.dtype.itemsize, max(1, n_cells), self._options.read_size
        )
        return dense_row_pieces(elem, n_rows=stop, rows_per_read=rows, start=start)

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        m, info = self._matrix, self.info
        with self._open_root(self._location) as root:
            if m.layout != "csc":
                yield from rebatch(self._row_pieces(root, n_cells), n_cells)
                return
            elem = root[m.key]
            triplets = csc_triplets(
                elem["data"],
                elem["indices"],
                elem["indptr"],
                n_rows=info.n_cells,
                n_cols=info.n_genes,
                entries_per_read=self._options.read_size or ENTRIES_PER_READ,
                path=info.path,
                what=m.key,
            )
            yield from bucket_transpose(
                triplets,
                n_rows=info.n_cells,
                n_cols=info.n_genes,
                block_rows=n_cells,
                value_dtype=m.dtype,
                path=info.path,
                temp_dir=self._options.temp_dir,
            )


def _matrix(root: Any, path: str, options: ReadOptions) -> _Matrix:
    key = _matrix_key(root, path, layer=options.layer, use_raw=options.use_raw)
    matrix = _matrix_layout(root[key], path, key)
    if matrix.n_cells == 0 or matrix.n_genes == 0:
        msg = (
            f"{path}: the matrix {key} is empty ({matrix.n_cells} cells x {matrix.n_genes} "
            "genes). Pass a file (or layer) with counts."
        )
        raise InputError(msg)
    return matrix


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


def _matrix_layout(elem: Any, path: str, key: str) -> _Matrix:
    """The matrix's layout, shape, nnz (0 for dense) and dtype, from its metadata."""
    if is_group(elem):
        attrs = elem.attrs
        enc = attr_str(attrs.get("encoding-type"))
        if enc is None and attrs.get("h5sparse_format") is not None:  # anndata < 0.7
            enc = f"{attr_str(attrs.get('h5sparse_format'))}_matrix"
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
    return _Matrix(key, layout, n_cells, n_genes, nnz, dtype)


def _frame_layout(root: Any, key: str, path: str) -> tuple[str, list[str]]:
    """(index key, columns in order) of an AnnData dataframe group ``key``."""
    if key not in root:
        msg = f"{path}: has no {key!r} element, so it is not a complete AnnData file."
        raise InputError(msg)
    group = root[key]
    enc = attr_str(group.attrs.get("encoding-type")) if is_group(group) else None
    if enc != "dataframe":
        msg = (
            f"{path}: {key!r} uses an old AnnData layout ({enc or 'no encoding-type'}), which "
            "flow does not read. Re-save it with a current anndata: "
            "anndata.read_h5ad(old).write_h5ad(new)."
        )
        raise InputError(msg)
    index_key = attr_str(group.attrs.get("_index")) or "_index"
    order = group.attrs.get("column-order")
    columns = [str(attr_str(c)) for c in np.atleast_1d(order)] if order is not None else []
    return index_key, [c for c in columns if c in group]


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
    ids = as_str_array(read_elem(var[id_key]))
    fix = f"Pass gene_id_column= naming a {key} column with an ID for every gene."
    check_ids(ids, n=n_genes, path=path, what=f"gene IDs in {key}[{id_key!r}]", fix=fix)
    symbols = None
    for name in SYMBOL_COLUMNS:
        if name in columns and name != id_key:
            symbols = as_str_array(read_elem(var[name]))
            break
    return ids, symbols


def _read_obs(
    root: Any, path: str, n_cells: int, obs_columns: tuple[str, ...] | None, notes: list[str]
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
