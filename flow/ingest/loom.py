"""Loom files (as Geneformer's tokenizer reads them): genes in rows, cells in columns, dense.

The file is opened read-only with h5py (upstream Geneformer writes into its input looms; flow
never does). Opening reads the row attributes (gene IDs from ``ensembl_id``, or
``gene_id_column``; symbols from ``Gene``) and the column attributes (barcodes from ``CellID``
or ``obs_names``; ``n_counts``, ``filter_pass`` and other 1-D attributes carried as cell
metadata). Blocks read column slabs ``matrix[:, c0:c1]`` of at most 64 MB, aligned to the
file's chunks, and transpose them in memory: loom is chunked in both directions, so a column
slab reads only the chunks it covers.
"""

from __future__ import annotations

import html
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ._fs import fingerprint, is_url
from ._source import SourceInfo
from ._transpose import dense_row_pieces, dense_rows_per_read, rebatch
from .h5ad import (
    as_str_array,
    check_ids,
    guard_reads,
    input_errors,
    open_h5,
    read_ids,
    select_columns,
    text_column,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    import scipy.sparse as sp

__all__ = ["LoomSource", "open_loom"]

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


class LoomSource:
    """A loom matrix (genes x cells) read block by block (see :func:`open_loom`)."""

    def __init__(
        self,
        path: str,
        *,
        layer: str | None = None,
        gene_id_column: str | None = None,
        obs_columns: Sequence[str] | None = None,
        read_size: int | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._read_size = read_size
        self._storage_options = storage_options
        notes: list[str] = []
        with (
            input_errors(
                path, "the metadata", (OSError, KeyError), storage_options=storage_options
            ),
            open_h5(path, storage_options) as fh,
        ):
            if "matrix" not in fh or not hasattr(fh["matrix"], "shape"):
                msg = f"{path}: has no /matrix dataset, so it is not a loom file."
                raise InputError(msg)
            layers = sorted(fh["layers"].keys()) if "layers" in fh else []
            if layer is None or layer == "":
                self._key = "matrix"
            elif layer in layers:
                self._key = f"layers/{layer}"
            else:
                msg = (
                    f"{path}: has no layer {layer!r}. Its layers: "
                    f"{', '.join(map(repr, layers)) or 'none'}. Pass one of them, or none for "
                    "the main matrix."
                )
                raise InputError(msg)
            matrix = fh[self._key]
            if len(matrix.shape) != 2:
                msg = f"{path}: {self._key} has shape {matrix.shape}; expected genes x cells."
                raise InputError(msg)
            n_genes, n_cells = (int(s) for s in matrix.shape)
            self._dtype = np.dtype(matrix.dtype)
            self._chunk_cols = int(matrix.chunks[1]) if matrix.chunks else 1
            if self._dtype.kind not in "biuf":
                msg = f"{path}: {self._key} holds {self._dtype} values; counts must be numbers."
                raise InputError(msg)
            rows = fh.get("row_attrs", {})
            cols = fh.get("col_attrs", {})
            row_names, col_names = sorted(rows.keys()), sorted(cols.keys())
            id_key = gene_id_column or next((a for a in _ID_ATTRS if a in rows), None)
            if id_key is None or id_key not in rows:
                wanted = repr(gene_id_column) if gene_id_column else " or ".join(_ID_ATTRS)
                msg = (
                    f"{path}: has no row attribute {wanted} with gene IDs. Row attributes: "
                    f"{', '.join(map(repr, row_names)) or 'none'}. Pass gene_id_column= naming "
                    "the one that holds Ensembl IDs."
                )
                raise InputError(msg)
            fix = "Every row (gene) needs an ID: fix the loom's row attribute, or pick another."
            gene_ids = _loom_strings(rows[id_key][:])
            check_ids(
                gene_ids,
                n=n_genes,
                path=path,
                what=f"gene IDs in row attribute {id_key!r}",
                fix=fix,
            )
            sym_key = next((a for a in _SYMBOL_ATTRS if a in rows and a != id_key), None)
            symbols = _loom_strings(rows[sym_key][:]) if sym_key else None
            bc_key = next((a for a in _BARCODE_ATTRS if a in cols), None)
            if bc_key is None:
                barcodes = np.char.add("cell-", np.arange(n_cells).astype(np.dtypes.StringDType()))
                notes.append(
                    f"no CellID/obs_names column attribute: cells named cell-0..cell-{n_cells - 1}."
                )
            else:
                barcodes = read_ids(cols[bc_key], _loom_strings)
                check_ids(
                    barcodes,
                    n=n_cells,
                    path=path,
                    what=f"barcodes in column attribute {bc_key!r}",
                    fix="Fix the column attribute so that every cell has a name.",
                )
            available = [a for a in col_names if a != bc_key]
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
        if n_cells == 0 or n_genes == 0:
            msg = f"{path}: the matrix is empty ({n_cells} cells x {n_genes} genes)."
            raise InputError(msg)
        self.info = SourceInfo(
            path=path,
            format="loom",
            n_cells=n_cells,
            n_genes=n_genes,
            gene_ids=gene_ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=pd.DataFrame(data, index=pd.RangeIndex(n_cells)),
            fingerprint=fingerprint(path, storage_options),
            notes=notes,
        )

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading column slabs of the matrix.

        Values are returned as stored (loom matrices are usually float32).
        """
        if n_cells < 1:
            msg = f"n_cells must be >= 1; got {n_cells}."
            raise ValueError(msg)
        return guard_reads(
            self.info.path, self._blocks(n_cells), storage_options=self._storage_options
        )

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        info = self.info
        width = dense_rows_per_read(info.n_genes, self._dtype.itemsize, n_cells, self._read_size)
        if self._read_size is None and width >= self._chunk_cols:
            width -= width % self._chunk_cols  # whole chunks per read
        with open_h5(info.path, self._storage_options) as fh:
            matrix: Any = fh[self._key]
            pieces = dense_row_pieces(
                matrix, n_rows=info.n_cells, rows_per_read=width, transpose=True
            )
            yield from rebatch(pieces, n_cells)


def open_loom(
    path: str | os.PathLike[str],
    *,
    layer: str | None = None,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    read_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> LoomSource:
    """Open a loom file read-only as a :class:`~flow.ingest.Source` (reads attributes only).

    Parameters
    ----------
    path
        The ``.loom`` file.
    layer
        A loom layer to read instead of the main matrix.
    gene_id_column
        Row attribute with gene IDs (default ``ensembl_id``, else ``Accession``).
    obs_columns
        Column attributes to carry (default: all 1-D ones); ``n_counts`` and ``filter_pass``
        are carried whenever present.
    read_size
        Cells per read (default: as many as fit in 64 MB, in whole chunks).
    storage_options
        fsspec options when ``path`` is a URL (``s3://...``); ignored for local paths. A URL
        is read range by range (only the chunks of each column slab), never downloaded whole.

    Raises
    ------
    InputError
        Not HDF5 or truncated, no /matrix, no such layer, no gene IDs, attributes whose length
        does not match the matrix, or an empty matrix.
    """
    text = os.fspath(path)
    return LoomSource(
        text,
        layer=layer,
        gene_id_column=gene_id_column,
        obs_columns=obs_columns,
        read_size=read_size,
        storage_options=dict(storage_options or {}) if is_url(text) else None,
    )
