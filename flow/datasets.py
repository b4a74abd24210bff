"""Seeded synthetic count matrices that look like droplet scRNA-seq, of any size.

Model (per cell): a cell type picks a gene-expression profile (heavy-tailed lognormal gene
means with type-specific fold changes on a subset of genes); the library size is lognormal;
about 5% of cells are doublets (the mean profile of two types, about 1.8x the library size);
counts are negative binomial (a gamma-Poisson mixture) around ``library size x profile``.

Cells are generated in fixed chunks of :data:`RNG_CHUNK` cells, each from its own seeded
stream, so the matrix is the same whatever block size it is read in, and a million cells are
never in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .ingest._source import SourceInfo
from .store import DEFAULT_BLOCK_SIZE, CountStore, write_counts

__all__ = ["SyntheticCounts", "synthetic_counts", "write_synthetic"]

RNG_CHUNK = 512
_CELL_TYPES = (
    "T cell",
    "B cell",
    "NK cell",
    "monocyte",
    "dendritic",
    "platelet",
    "erythroid",
    "stem",
)


@dataclass
class SyntheticCounts:
    """A seeded synthetic count matrix, readable block by block (a :class:`flow.ingest.Source`).

    Parameters
    ----------
    n_cells, n_genes : int
        Shape.
    seed : int
        Everything is determined by it.
    mean_genes : float
        Rough median number of detected genes per cell (sets the library size).
    n_types : int
        Number of cell types (<= 8).
    doublet_rate : float
        Fraction of doublets.
    dispersion : float
        Negative binomial dispersion (variance = mu + dispersion * mu^2).
    """

    n_cells: int
    n_genes: int = 20_000
    seed: int = 0
    mean_genes: float = 1_000.0
    n_types: int = 6
    doublet_rate: float = 0.05
    dispersion: float = 0.3
    info: SourceInfo = field(init=False, repr=False)
    _profiles: np.ndarray = field(init=False, repr=False)
    _depth: float = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.n_cells < 0 or self.n_genes < 1:
            msg = f"Need n_cells >= 0 and n_genes >= 1; got {self.n_cells} x {self.n_genes}."
            raise ValueError(msg)
        if not 1 <= self.n_types <= len(_CELL_TYPES):
            msg = f"n_types must be in 1..{len(_CELL_TYPES)}; got {self.n_types}."
            raise ValueError(msg)
        rng = np.random.default_rng([self.seed, 0])
        base = rng.lognormal(mean=0.0, sigma=2.0, size=self.n_genes)  # heavy-tailed gene means
        profiles = np.tile(base, (self.n_types, 1))
        for t in range(self.n_types):  # each type up-regulates its own ~5% of genes
            markers = rng.choice(self.n_genes, size=max(1, self.n_genes // 20), replace=False)
            profiles[t, markers] *= rng.lognormal(1.5, 0.7, size=markers.size)
        self._profiles = profiles / profiles.sum(axis=1, keepdims=True)
        self._depth = self._depth_for(self.mean_genes)
        ids = np.array([f"ENSG{100_000 + 7 * g:011d}" for g in range(self.n_genes)], dtype=object)
        symbols = np.array([f"GENE{g}" for g in range(self.n_genes)], dtype=object)
        barcodes = np.array([f"CELL{c:09d}-1" for c in range(self.n_cells)], dtype=object)
        self.info = SourceInfo(
            path=f"synthetic:{self.n_cells}x{self.n_genes}:seed{self.seed}",
            format="synthetic",
            n_cells=self.n_cells,
            n_genes=self.n_genes,
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=barcodes,
            obs=pd.DataFrame({"cell_type": self._cell_types()}),
            fingerprint=f"synthetic-{self!r}",
        )

    def _depth_for(self, genes: float) -> float:
        """Library size whose expected number of detected genes is ``genes`` (bisection)."""
        p = self._profiles.mean(axis=0)
        r = 1.0 / self.dispersion
        lo, hi = 1.0, 1e8
        for _ in range(60):
            mid = np.sqrt(lo * hi)
            detected = float(np.sum(1.0 - (r / (r + mid * p)) ** r))
            lo, hi = (mid, hi) if detected < genes else (lo, mid)
        return float(np.sqrt(lo * hi))

    def _cell_types(self) -> np.ndarray:
        labels = np.empty(self.n_cells, dtype=object)
        for c0 in range(0, self.n_cells, RNG_CHUNK):
            types, doublet, _ = self._chunk_design(c0 // RNG_CHUNK)
            names = np.asarray(_CELL_TYPES, dtype=object)[types[:, 0]]
            labels[c0 : c0 + len(names)] = np.where(doublet, "doublet", names)
        return labels

    def _chunk_design(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        n = min(RNG_CHUNK, self.n_cells - chunk * RNG_CHUNK)
        rng = np.random.default_rng([self.seed, 1, chunk])
        types = rng.integers(0, self.n_types, size=(n, 2))
        doublet = rng.random(n) < self.doublet_rate
        return types, doublet, rng

    def _chunk(self, chunk: int) -> sp.csr_matrix:
        types, doublet, rng = self._chunk_design(chunk)
        profile = np.where(
            doublet[:, None],
            0.5 * (self._profiles[types[:, 0]] + self._profiles[types[:, 1]]),
            self._profiles[types[:, 0]],
        )
        size = self._depth * rng.lognormal(0.0, 0.35, size=len(types)) * np.where(doublet, 1.8, 1.0)
        mu = (profile * size[:, None]).astype(np.float32)
        r = np.float32(1.0 / self.dispersion)
        lam = rng.standard_gamma(r, size=mu.shape, dtype=np.float32) * (mu / r)
        counts = rng.poisson(lam).astype(np.int32)
        return sp.csr_matrix(counts)

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells (the last may be shorter)."""
        n_chunks = -(-self.n_cells // RNG_CHUNK)
        pending: list[sp.csr_matrix] = []
        n_pending = 0
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for chunk in pool.map(self._chunk, range(n_chunks)):  # numpy RNG releases the GIL
                pending.append(chunk)
                n_pending += chunk.shape[0]
                while n_pending >= n_cells:
                    merged = sp.vstack(pending, format="csr")
                    yield merged[:n_cells]
                    rest = merged[n_cells:]
                    pending, n_pending = ([rest] if rest.shape[0] else []), rest.shape[0]
        if n_pending:
            yield sp.vstack(pending, format="csr")

    #: Any range of cells is generated on its own (see :meth:`read_rows`).
    supports_ranges: ClassVar[bool] = True

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as CSR, generating only the seeded chunks that hold them."""
        if not 0 <= start <= stop <= self.n_cells:
            msg = f"rows {start}:{stop} are not a range of the {self.n_cells} cells."
            raise ValueError(msg)
        first = start // RNG_CHUNK
        chunks = [self._chunk(c) for c in range(first, -(-stop // RNG_CHUNK))]
        if not chunks:
            return sp.csr_matrix((0, self.n_genes), dtype=np.int32)
        offset = first * RNG_CHUNK
        return sp.vstack(chunks, format="csr")[start - offset : stop - offset]

    def to_dense(self) -> np.ndarray:
        """The whole matrix as a dense array (for tests on small sizes)."""
        blocks = list(self.iter_blocks(max(self.n_cells, 1)))
        return np.asarray(sp.vstack(blocks).toarray()) if blocks else np.zeros((0, self.n_genes))


def synthetic_counts(
    n_cells: int, n_genes: int = 20_000, *, seed: int = 0, **kwargs: Any
) -> SyntheticCounts:
    """A seeded synthetic count matrix (lazy: nothing is generated until blocks are read).

    See :class:`SyntheticCounts` for the model and its parameters.
    """
    return SyntheticCounts(n_cells=n_cells, n_genes=n_genes, seed=seed, **kwargs)


def write_synthetic(
    path: str | os.PathLike[str],
    n_cells: int,
    n_genes: int = 20_000,
    *,
    seed: int = 0,
    block_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: Any = None,
    **kwargs: Any,
) -> CountStore:
    """Generate a synthetic matrix straight into a count store, block by block (computes).

    Examples
    --------
    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     store = write_synthetic(os.path.join(tmp, "s.zarr"), 600, 300, seed=1, mean_genes=50)
    ...     store.counts.shape
    (600, 300)
    """

    source = synthetic_counts(n_cells, n_genes, seed=seed, **kwargs)
    return write_counts(
        [source],
        path,
        block_size=block_size or DEFAULT_BLOCK_SIZE,
        storage_options=storage_options,
        progress=progress,
    )
