"""Cell Ranger HDF5 matrices (v3 ``/matrix`` and v2 per-genome groups), and the feature filter
shared with 10x MEX directories (:mod:`flow.ingest.mtx`).

Cell Ranger stores genes x cells CSC, which is cells x genes CSR: opening reads the shape,
barcodes and features (in one open of the file); each block reads ``indptr`` of its cells and
the matching ranges of ``data`` and ``indices``. Files with several feature types (antibody
capture, CRISPR guides) keep only ``Gene Expression`` features, and say so in the source's
notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ._columns import as_str_array, check_ids, read_ids
from ._fs import fingerprint, guard_reads, input_errors
from ._hdf5 import h5_strings, open_h5
from ._source import SourceInfo, check_block_size, check_range, empty_rows, offsets_at
from ._transpose import csr_row_pieces, filter_columns, rebatch

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

    import h5py
    import scipy.sparse as sp

    from .._location import Location
    from ._options import ReadOptions

__all__ = [
    "GENE_EXPRESSION",
    "TENX_H5_OPTIONS",
    "TenxH5Source",
    "feature_filter",
    "read_10x_h5",
    "tenx_h5_from_file",
]

#: The feature type kept when a file has several.
GENE_EXPRESSION = "Gene Expression"
#: The format-specific options the 10x HDF5 reader takes.
TENX_H5_OPTIONS = ("genome",)

_FIX = "The file is not a complete Cell Ranger HDF5 matrix: re-download or re-export it."


def feature_filter(
    ids: np.ndarray,
    types: np.ndarray | None,
    genomes: np.ndarray | None,
    genome: str | None,
    path: str,
    notes: list[str],
) -> np.ndarray | None:
    """Column map (old -> new index, -1 = dropped) keeping Gene Expression (and ``genome``);
    None when every feature is kept."""
    keep = np.ones(len(ids), dtype=bool)
    if types is not None:
        kinds, counts = np.unique(types.astype(str), return_counts=True)
        if len(kinds) > 1 and GENE_EXPRESSION in kinds:
            keep &= types == GENE_EXPRESSION
            dropped = ", ".join(
                f"{k} x{c}"
                for k, c in zip(kinds.tolist(), counts.tolist(), strict=True)
                if k != GENE_EXPRESSION
            )
            notes.append(
                f"kept the {int(keep.sum())} '{GENE_EXPRESSION}' features of {len(ids)}; "
                f"dropped {dropped}."
            )
    if genome is None and genomes is not None and len(set(genomes.tolist())) > 1:
        notes.append(
            f"features of several genomes kept ({', '.join(sorted(set(genomes.tolist())))}); "
            "pass genome= to keep one."
        )
    if genome is not None:
        if genomes is None:
            msg = f"{path}: has no per-feature genome, so genome={genome!r} cannot be applied."
            raise InputError(msg)
        found = sorted(set(genomes.tolist()))
        if genome not in found:
            msg = f"{path}: has no genome {genome!r}; its genomes: {', '.join(found)}."
            raise InputError(msg)
        keep &= genomes == genome
        notes.append(f"kept the {int(keep.sum())} features of genome {genome!r}.")
    if keep.all():
        return None
    col_map = np.full(len(ids), -1, dtype=np.int64)
    col_map[keep] = np.arange(int(keep.sum()))
    return col_map


@dataclass(frozen=True)
class _Features:
    """The group holding the matrix, and its features as stored (before filtering)."""

    group: str
    ids: np.ndarray
    symbols: np.ndarray | None
    types: np.ndarray | None = None
    genomes: np.ndarray | None = None
    per_feature: bool = False  # v3: genome= filters features (v2: it chose the group)


def _genome_groups(fh: h5py.File) -> list[str]:
    return sorted(k for k, v in fh.items() if hasattr(v, "keys") and "indptr" in v and "genes" in v)


def _v3_features(fh: h5py.File, path: str) -> _Features:
    """Cell Ranger 3+: ``/matrix`` with ``features/{id,name,feature_type,genome}``."""
    features = fh["matrix/features"]
    if "id" not in features:
        msg = f"{path}: has no gene IDs (matrix/features/id). {_FIX}"
        raise InputError(msg)
    return _Features(
        "matrix",
        as_str_array(features["id"][:]),
        h5_strings(features, "name"),
        h5_strings(features, "feature_type"),
        h5_strings(features, "genome"),
        per_feature=True,
    )


def _v2_features(fh: h5py.File, path: str, genome: str | None) -> _Features:
    """Cell Ranger 2: one ``/<genome>`` group with ``genes`` and ``gene_names``."""
    groups = _genome_groups(fh)
    if not groups:
        msg = (
            f"{path}: is HDF5 but not a Cell Ranger matrix (no /matrix group with "
            "features, and no /<genome> group with indptr and genes). If it is an "
            "AnnData file, name it .h5ad or pass format='h5ad'."
        )
        raise InputError(msg)
    if genome is None and len(groups) > 1:
        msg = (
            f"{path}: holds several genomes ({', '.join(groups)}). Pass genome= "
            "(--genome) naming one of them."
        )
        raise InputError(msg)
    if genome is not None and genome not in groups:
        msg = f"{path}: has no genome {genome!r}; its genomes: {', '.join(groups)}."
        raise InputError(msg)
    group = genome or groups[0]
    return _Features(
        group, as_str_array(fh[group]["genes"][:]), h5_strings(fh[group], "gene_names")
    )


def _read_metadata(
    fh: h5py.File, path: str, genome: str | None
) -> tuple[_Features, int, int, np.ndarray, np.dtype[Any]]:
    """(features, n_all_genes, n_cells, barcodes, dtype) of an open Cell Ranger file."""
    v3 = "matrix" in fh and "features" in fh["matrix"]
    features = _v3_features(fh, path) if v3 else _v2_features(fh, path, genome)
    group = fh[features.group]
    missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in group]
    if missing:
        msg = f"{path}: /{features.group} lacks {', '.join(missing)}. {_FIX}"
        raise InputError(msg)
    n_all_genes, n_cells = (int(s) for s in group["shape"][:])
    dtype = np.dtype(group["data"].dtype)
    return features, n_all_genes, n_cells, read_ids(group["barcodes"]), dtype


class TenxH5Source:
    """A Cell Ranger HDF5 matrix read block by block (see :func:`read_10x_h5`)."""

    supports_ranges = True

    def __init__(
        self,
        location: Location,
        options: ReadOptions,
        *,
        info: SourceInfo,
        group: str,
        n_all_genes: int,
        col_map: np.ndarray | None,
        dtype: np.dtype[Any],
    ) -> None:
        self.info = info
        self._location = location
        self._options = options
        self._group = group
        self._n_all_genes = n_all_genes
        self._col_map = col_map
        self._dtype = dtype

    @classmethod
    def from_file(cls, fh: h5py.File, location: Location, options: ReadOptions) -> TenxH5Source:
        """Read the metadata from the open file ``fh`` (nothing else is opened)."""
        path = location.path
        with input_errors(location, "the metadata", (OSError, KeyError)):
            features, n_all_genes, n_cells, barcodes, dtype = _read_metadata(
                fh, path, options.genome
            )
        ids, symbols = features.ids, features.symbols
        check_ids(ids, n=n_all_genes, path=path, what="gene IDs", fix=_FIX)
        check_ids(barcodes, n=n_cells, path=path, what="barcodes", fix=_FIX)
        if n_cells == 0 or n_all_genes == 0:
            msg = f"{path}: the matrix is empty ({n_cells} cells x {n_all_genes} genes)."
            raise InputError(msg)
        notes: list[str] = []
        genome = options.genome if features.per_feature else None
        col_map = feature_filter(ids, features.types, features.genomes, genome, path, notes)
        if col_map is not None:
            kept = col_map >= 0
            ids = ids[kept]
            symbols = symbols[kept] if symbols is not None else None
        info = SourceInfo(
            path=path,
            format="10x-h5",
            n_cells=n_cells,
            n_genes=len(ids),
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=pd.DataFrame(index=pd.RangeIndex(n_cells)),
            fingerprint=fingerprint(location),
            notes=notes,
        )
        return cls(
            location,
            options,
            info=info,
            group=features.group,
            n_all_genes=n_all_genes,
            col_map=col_map,
            dtype=dtype,
        )

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells, reading only those cells.

        Counts are returned as stored; only columns of dropped feature types are removed.
        """
        check_block_size(n_cells)
        return guard_reads(self._location, self._blocks(n_cells))

    def row_offsets(self, rows: Sequence[int]) -> np.ndarray | None:
        """The stored entries before each of ``rows`` (increasing cell numbers, ``n_cells``
        allowed): the matrix's ``indptr`` at those rows, read without reading any count.
        None when feature types are dropped (their entries are among the stored ones)."""
        if self._col_map is not None:
            return None
        with input_errors(self._location, "the counts"), open_h5(self._location) as fh:
            indptr = np.asarray(fh[self._group]["indptr"][:], dtype=np.int64)
        return offsets_at(indptr, rows, self.info.n_cells)

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as one CSR matrix, reading only their entries."""
        check_range(start, stop, self.info.n_cells)
        n = max(1, stop - start)
        with input_errors(self._location, "the counts"):
            pieces = list(self._pieces(n, start, stop))
        return next(rebatch(pieces, n), empty_rows(self.info, self._dtype))

    def _pieces(self, n_cells: int, start: int, stop: int) -> Iterator[sp.csr_matrix]:
        info = self.info
        with open_h5(self._location) as fh:
            group = fh[self._group]
            pieces: Iterable[sp.csr_matrix] = csr_row_pieces(
                group["data"],
                group["indices"],
                group["indptr"],
                n_rows=info.n_cells,
                n_cols=self._n_all_genes,
                rows_per_read=self._options.read_size or n_cells,
                path=info.path,
                what=self._group,
                start=start,
                stop=stop,
            )
            col_map = self._col_map
            if col_map is not None:
                pieces = (filter_columns(p, col_map, info.n_genes) for p in pieces)
            yield from pieces

    def _blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        yield from rebatch(self._pieces(n_cells, 0, self.info.n_cells), n_cells)


def tenx_h5_from_file(fh: h5py.File, location: Location, options: ReadOptions) -> TenxH5Source:
    """:func:`read_10x_h5` of a file already open as ``fh``."""
    return TenxH5Source.from_file(fh, location, options)


def read_10x_h5(location: Location, options: ReadOptions) -> TenxH5Source:
    """Open a Cell Ranger HDF5 matrix (``filtered_feature_bc_matrix.h5``); reads metadata only.

    Options (see :class:`~flow.ingest.ReadOptions`): ``genome`` (Cell Ranger 2 files: the
    genome group to read, needed when there are several; Cell Ranger 3+ files: keep only
    this genome's features) and ``read_size`` (cells per read; default the block size). A URL
    is read range by range (metadata, then each block's rows), never downloaded whole.

    Raises
    ------
    InputError
        Not HDF5 or truncated, not a Cell Ranger layout, several genomes and none chosen, no
        gene IDs, barcodes not matching the matrix, or an empty matrix.
    """
    with open_h5(location) as fh:
        return TenxH5Source.from_file(fh, location, options)
