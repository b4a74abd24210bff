"""The contract between input readers and the count-store writer.

A reader turns one input (file, directory or store) into a :class:`Source`: cheap metadata read
up front (shape, gene IDs, barcodes, cell metadata) and an iterator over consecutive blocks of
cells as CSR matrices, so the writer never holds more than one block of counts. Where the
format allows it, a source also reads any range of cells directly (:meth:`Source.read_rows`),
so that row ranges of one input can be read by separate tasks. A CSR source may also say,
without reading any count, how many entries are stored before given cells (an optional
``row_offsets(rows) -> numpy.ndarray | None``: its ``indptr`` at those rows), so that the
writer knows where every cell's values land before reading them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Iterator

    import pandas as pd

__all__ = [
    "Source",
    "SourceInfo",
    "check_block_size",
    "check_range",
    "empty_rows",
    "offsets_at",
]


@dataclass(frozen=True)
class SourceInfo:
    """Metadata of one input, read without reading its counts.

    Attributes
    ----------
    path : str
        The input as the user gave it (used in every message about it).
    format : str
        ``"h5ad"``, ``"10x-h5"``, ``"10x-mtx"``, ``"loom"`` or ``"anndata-zarr"``.
    n_cells, n_genes : int
        Shape of the matrix, cells in rows.
    gene_ids : numpy.ndarray
        One identifier per gene column (str), as found in the input.
    gene_symbols : numpy.ndarray or None
        Gene symbols (str) when the input has them.
    barcodes : numpy.ndarray
        One identifier per cell (str), as found in the input. flow's readers hold them as
        numpy ``StringDType`` (compact: about half the memory of ``str`` objects); any 1-D
        array of ``str`` works. The writer reads them a slice at a time.
    obs : pandas.DataFrame
        Cell metadata to carry (one row per cell, index ignored), e.g. ``filter_pass``.
    fingerprint : str
        :func:`flow._io.file_fingerprint` of the input.
    notes : list of str
        Things the user should be told (e.g. "CSC input: transposed through temporary files").
    """

    path: str
    format: str
    n_cells: int
    n_genes: int
    gene_ids: np.ndarray
    gene_symbols: np.ndarray | None
    barcodes: np.ndarray
    obs: pd.DataFrame
    fingerprint: str
    notes: list[str] = field(default_factory=list)


class Source(Protocol):
    """One input matrix, readable block by block (and, where the format allows it, by any
    range of cells)."""

    info: SourceInfo

    @property
    def supports_ranges(self) -> bool:
        """Whether :meth:`read_rows` reads a range of cells directly (without the cells
        before it): so ranges of one input can be read by separate tasks."""
        ...

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` (``0 <= start <= stop <= n_cells``) as one CSR matrix of all
        genes, exactly as :meth:`iter_blocks` gives them; opens the input for this read alone.

        Raises ``NotImplementedError`` when :attr:`supports_ranges` is False, and
        ``ValueError`` for a range outside the cells.
        """
        ...

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of at most ``n_cells`` cells (all genes), in cell order.

        Counts are returned as stored (any numeric dtype); the writer validates them. Each call
        starts again from the first cell, so a source can be read more than once.
        """
        ...


def check_block_size(n_cells: int) -> None:
    """Refuse a block size below one cell (``iter_blocks``)."""
    if n_cells < 1:
        msg = f"n_cells must be >= 1; got {n_cells}."
        raise ValueError(msg)


def check_range(start: int, stop: int, n_cells: int) -> None:
    """Refuse a cell range that is not ``0 <= start <= stop <= n_cells`` (``read_rows``)."""
    if not 0 <= start <= stop <= n_cells:
        msg = (
            f"rows {start}:{stop} are not a range of the {n_cells} cells (0 <= start <= stop <= n)."
        )
        raise ValueError(msg)


def empty_rows(info: SourceInfo, dtype: np.dtype[Any]) -> sp.csr_matrix:
    """A CSR matrix of no cells and the source's genes (what an empty row range reads)."""
    return sp.csr_matrix((0, info.n_genes), dtype=dtype)


def offsets_at(indptr: np.ndarray, rows: Any, n_cells: int) -> np.ndarray | None:
    """A CSR ``indptr`` at ``rows`` (for ``row_offsets``), or None when it cannot be trusted
    (not ``n_cells + 1`` long, not starting at 0, going down): the caller then reads the
    counts, whose checks name what is wrong with the file."""
    want = np.asarray(rows, dtype=np.int64)
    if indptr.shape != (n_cells + 1,) or (indptr.size and indptr[0] != 0):
        return None
    if bool((np.diff(indptr) < 0).any()):
        return None
    return indptr[want]
