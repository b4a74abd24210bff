"""Reading one block of a count store eagerly: the read every per-block task starts with
(:func:`flow.store.open_counts`'s Dask array, and tasks that read, rank and write a block in
one), with the check that a block's chunks are not missing or damaged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from ._location import Location
from .errors import InputError

__all__ = ["BlockReader", "read_block"]


def read_block(
    *,
    location: Location,
    offsets: Sequence[int],
    block_size: int,
    n_genes: int,
    dtype_str: str,
    block_info: dict[Any, Any] | None = None,
) -> sp.csr_matrix:
    """Read one block of cells as CSR (opened per task, so it is safe on any worker)."""
    assert block_info is not None
    (r0, r1), _ = block_info[None]["array-location"]
    return _read_rows(location, offsets, r0 // block_size, (r0, r1), n_genes, np.dtype(dtype_str))


def _read_rows(
    location: Location,
    offsets: Sequence[int],
    b: int,
    rows: tuple[int, int],
    n_genes: int,
    dtype: np.dtype[Any],
) -> sp.csr_matrix:
    """Block ``b`` (cells ``rows``) as canonical CSR, checked (see :func:`_check_block`)."""
    r0, r1 = rows
    p0, p1 = offsets[b], offsets[b + 1]
    x: Any = location.open_group(mode="r")["X"]
    indptr = np.asarray(x["indptr"][r0 : r1 + 1], dtype=np.int64) - p0
    data = np.asarray(x["data"][p0:p1], dtype=dtype)
    indices = np.asarray(x["indices"][p0:p1], dtype=np.int32)
    _check_block(data, indices, indptr, location.url, b)
    out = sp.csr_matrix((data, indices, indptr), shape=(r1 - r0, n_genes))
    out.has_canonical_format = True  # checked: rising indices in every row, no zeros
    return out


@dataclass(frozen=True)
class BlockReader:
    """Reads one block of a count store eagerly, in a task that does more with it (small and
    picklable: a graph holds it once, as a shared key)."""

    location: Location
    offsets: tuple[int, ...]  # the store's block_nnz_offsets
    block_size: int
    n_cells: int
    n_genes: int
    dtype: np.dtype[Any]

    def __call__(self, b: int) -> sp.csr_matrix:
        """Block ``b`` as canonical CSR (cells ``b * block_size`` onwards)."""
        r0 = b * self.block_size
        rows = (r0, min(r0 + self.block_size, self.n_cells))
        return _read_rows(self.location, self.offsets, b, rows, self.n_genes, self.dtype)


def _check_block(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, url: str, b: int
) -> None:
    """Detect missing or corrupt chunks: Zarr reads a missing chunk as zeros, silently.

    A count store holds no zero counts and strictly increasing gene indices within a cell, so
    a zero value or a non-increasing index inside a row means the block's data is damaged.
    """
    rising = indices[1:] > indices[:-1]  # no wider temporaries: blocks hold millions of values
    starts = indptr[1:-1]
    rising[starts[(starts > 0) & (starts < indices.size)] - 1] = True  # a new row may fall back
    if not data.all() or not rising.all():
        msg = (
            f"{url}: block {b} of the counts is damaged (missing or corrupt chunks in X/data or "
            "X/indices). Convert the input again."
        )
        raise InputError(msg)


# --------------------------------------------------------------------------- writing
