"""The state of the per-gene t-digests: :class:`Digests`, five flat gene-major arrays.

Part of :mod:`flow.sketch._tdigest` (which builds, merges and re-exports everything here):
the state, its checks, gene-range slicing (merges and queries work on ranges of about
131,000 centroids, for bounded memory and cache-sized working sets) and storage as flat
arrays. Numpy only; everything here is eager and cheap.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    import numpy.typing as npt

    F64 = npt.NDArray[np.float64]
    I64 = npt.NDArray[np.int64]

__all__ = [
    "CHUNK_ITEMS",
    "DEFAULT_COMPRESSION",
    "Digests",
    "check_compression",
    "concat",
    "empty",
    "from_arrays",
    "gene_ranges",
    "gene_slice",
    "bins_per_gene",
    "to_arrays",
]

DEFAULT_COMPRESSION: Final = 200.0
"""Default compression: at most 100 centroids per gene; genes with <= 100 values are exact.

Median relative error p99 ~0.25% after a merge tree on realistic data (module Notes of
:mod:`flow.sketch._tdigest`)."""

CHUNK_ITEMS: Final = 1 << 17
"""Centroids per gene range in merges and queries (bounds temporary memory)."""

_ARRAY_NAMES: Final = ("offsets", "means", "weights", "mins", "maxs")
_DTYPES: Final = {
    "offsets": np.int64,
    "means": np.float64,
    "weights": np.int64,
    "mins": np.float64,
    "maxs": np.float64,
}


# --------------------------------------------------------------------------- state


@dataclass(frozen=True, eq=False)
class Digests:
    """Centroids of one t-digest per gene, gene-major, as flat arrays.

    Parameters
    ----------
    offsets
        int64, shape ``(n_genes + 1,)``: the centroids of gene ``g`` are
        ``[offsets[g], offsets[g + 1])``.
    means
        float64, centroid means, ascending within each gene.
    weights
        int64, number of values merged into each centroid (at least 1).
    mins, maxs
        float64, smallest and largest value merged into each centroid.
    compression
        At most ``compression // 2`` centroids per gene; a gene with at most that many
        values keeps each value (its quantiles are exact).

    Raises
    ------
    TypeError
        If an array is not a numpy array of its dtype.
    ValueError
        If the shapes, the ends of ``offsets`` or ``compression`` are invalid (checks that
        do not read the data).
    """

    offsets: I64
    means: F64
    weights: I64
    mins: F64
    maxs: F64
    compression: float

    def __post_init__(self) -> None:
        for name, dtype in _DTYPES.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != dtype:
                got = f"{type(arr).__name__} of {getattr(arr, 'dtype', '?')}"
                msg = f"{name} must be a numpy array of dtype {np.dtype(dtype)}; got {got}."
                raise TypeError(msg)
            if arr.ndim != 1:
                msg = f"{name} must be 1-D; got shape {arr.shape}."
                raise ValueError(msg)
        n = self.means.shape
        for name in _ARRAY_NAMES[2:]:
            if getattr(self, name).shape != n:
                msg = f"{name} must have the shape of means {n}; got {getattr(self, name).shape}."
                raise ValueError(msg)
        if self.offsets.size < 1 or self.offsets[0] != 0 or self.offsets[-1] != n[0]:
            msg = (
                f"offsets must have n_genes + 1 entries, start at 0 and end at the number of "
                f"centroids ({n[0]}); got {self.offsets[:1]} ... {self.offsets[-1:]}."
            )
            raise ValueError(msg)
        check_compression(self.compression)

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.offsets.size - 1)

    @property
    def counts(self) -> I64:
        """Number of values of each gene (int64): the sum of its centroids' weights."""
        cw = np.zeros(self.weights.size + 1, np.int64)
        np.cumsum(self.weights, out=cw[1:])
        return cw[self.offsets[1:]] - cw[self.offsets[:-1]]

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's arrays."""
        return sum(int(getattr(self, name).nbytes) for name in _ARRAY_NAMES)


def check_compression(compression: float) -> float:
    c = float(compression)
    if not (c >= 2 and np.isfinite(c)):
        msg = f"compression must be a finite number >= 2; got {compression!r}."
        raise ValueError(msg)
    return c


def bins_per_gene(compression: float) -> int:
    return int(compression) // 2


def empty(n_genes: int, compression: float = DEFAULT_COMPRESSION) -> Digests:
    """Digests of ``n_genes`` genes that have seen no values.

    Parameters
    ----------
    n_genes
        Number of genes.
    compression
        Compression of the digests (see :class:`Digests`).

    Returns
    -------
    Digests
        No centroids; every gene's count is 0.

    Examples
    --------
    >>> empty(3).counts
    array([0, 0, 0])
    """
    if n_genes < 0:
        msg = f"n_genes must be >= 0; got {n_genes}."
        raise ValueError(msg)
    return Digests(
        offsets=np.zeros(n_genes + 1, np.int64),
        means=np.zeros(0, np.float64),
        weights=np.zeros(0, np.int64),
        mins=np.zeros(0, np.float64),
        maxs=np.zeros(0, np.float64),
        compression=check_compression(compression),
    )


def gene_slice(d: Digests, g0: int, g1: int) -> Digests:
    """Genes ``[g0, g1)`` of ``d`` (views of its arrays)."""
    a, b = int(d.offsets[g0]), int(d.offsets[g1])
    return Digests(
        d.offsets[g0 : g1 + 1] - a,
        d.means[a:b],
        d.weights[a:b],
        d.mins[a:b],
        d.maxs[a:b],
        d.compression,
    )


def concat(pieces: Sequence[Digests], compression: float) -> Digests:
    """Digests of consecutive gene ranges, joined."""
    sizes = np.cumsum([0, *(p.means.size for p in pieces)])
    offsets = np.concatenate(
        [
            np.zeros(1, np.int64),
            *(p.offsets[1:] + s for p, s in zip(pieces, sizes[:-1], strict=True)),
        ]
    )
    return Digests(
        offsets,
        np.concatenate([p.means for p in pieces]),
        np.concatenate([p.weights for p in pieces]),
        np.concatenate([p.mins for p in pieces]),
        np.concatenate([p.maxs for p in pieces]),
        compression,
    )


def gene_ranges(items: I64, target: int = CHUNK_ITEMS) -> list[tuple[int, int]]:
    """Consecutive gene ranges of about ``target`` items each (at least one gene each)."""
    n_genes = items.size
    if n_genes == 0:
        return []
    cum = np.cumsum(items)
    cuts = np.searchsorted(cum, np.arange(target, int(cum[-1]), target), side="right")
    edges = np.unique(np.r_[0, cuts, n_genes])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


# --------------------------------------------------------------------------- storage


def to_arrays(d: Digests) -> dict[str, npt.NDArray[np.generic]]:
    """The state as flat arrays for storage (for example one Zarr array each).

    Parameters
    ----------
    d
        The digests.

    Returns
    -------
    dict
        ``offsets``, ``means``, ``weights``, ``mins``, ``maxs`` (the state's own arrays, not
        copies) and a 0-d float64 ``compression``.
    """
    out: dict[str, npt.NDArray[np.generic]] = {n: getattr(d, n) for n in _ARRAY_NAMES}
    out["compression"] = np.asarray(d.compression, dtype=np.float64)
    return out


def from_arrays(arrays: Mapping[str, npt.ArrayLike]) -> Digests:
    """Digests from the arrays of :func:`to_arrays` (read back from storage).

    Parameters
    ----------
    arrays
        Mapping with the keys written by :func:`to_arrays`; array-likes are read into
        numpy arrays of the state's dtypes.

    Returns
    -------
    Digests
        The digests.

    Raises
    ------
    ValueError
        If a key is missing or the arrays are inconsistent.

    Examples
    --------
    >>> from flow.sketch._tdigest import from_values, median
    >>> d = from_values([0, 1, 1], [1.0, 2.0, 4.0], n_genes=2)
    >>> median(from_arrays(to_arrays(d)))
    array([1., 3.])
    """
    missing = [n for n in (*_ARRAY_NAMES, "compression") if n not in arrays]
    if missing:
        msg = f"digest arrays are missing {missing}; expected the keys of to_arrays()."
        raise ValueError(msg)
    return Digests(
        offsets=np.asarray(arrays["offsets"], dtype=np.int64).reshape(-1),
        means=np.asarray(arrays["means"], dtype=np.float64).reshape(-1),
        weights=np.asarray(arrays["weights"], dtype=np.int64).reshape(-1),
        mins=np.asarray(arrays["mins"], dtype=np.float64).reshape(-1),
        maxs=np.asarray(arrays["maxs"], dtype=np.float64).reshape(-1),
        compression=float(np.asarray(arrays["compression"])),
    )
