"""Seeded synthetic count matrices that look like droplet scRNA-seq, of any size.

Model (per cell): a cell type picks a gene-expression profile (heavy-tailed lognormal gene
means with type-specific fold changes on a subset of genes); the library size is lognormal;
about 5% of cells are doublets (the mean profile of two types, about 1.8x the library size);
counts are negative binomial around ``library size x profile`` (mean ``mu``, variance
``mu + dispersion x mu^2``), independently per gene. Profile values and library sizes are
rounded to a 1% logarithmic grid (``mu = exp(0.01 m)`` for an integer ``m``), far below the
spread of either, so that every distribution the sampler needs is tabulated once.

Sampling is exact for that model, and sparse: the work per cell follows its detected genes,
not the number of genes (measured at 1,000 of 20,000 genes per cell: ~12,000 cells per
CPU-second, 17x drawing every gene; ~75 ns per count, a third of it sorting and random
numbers). Cells are drawn :data:`_BATCH` at a time, vectorised with numpy:

* Each profile's genes are sorted by expression and grouped in bins spanning 16 grid steps.
  Bins whose top gene is detected in a cell with probability 39% or more ("dense") get one
  uniform per gene, inverted through the tabulated negative binomial CDF (zeros dropped); means above
  :data:`_MU_BIG` are drawn as gamma-Poisson instead, redrawn while zero.
* Elsewhere ("sparse"), counts are drawn as the compound Poisson sum a negative binomial also
  is: ``NB(mu, r)`` (``r = 1 / dispersion``) is a ``Poisson(r log(1 + mu / r))`` number of
  clusters of logarithmic sizes (``P(k)`` proportional to ``theta^k / k``,
  ``theta = mu / (r + mu)``). The clusters of a bin's genes are the points of a Poisson
  process: drawn at the rate of the bin's top gene at uniform positions, each kept with
  probability ``rate(gene) / rate(top)`` (thinning, exact); a kept cluster gets a logarithmic
  size, and clusters on the same gene add up. Genes expected in fewer than 1 in 5,000 cells
  (at the median library size) share one last bin.
* Cell, gene and count are packed into one integer key, so a single sort of integers
  orders a batch into CSR (counts too large for the key are carried aside).

Cells are generated in fixed chunks of :data:`RNG_CHUNK` cells, each from its own seeded
stream, so the matrix is a function of the seed alone: the same whatever block size or row
ranges it is read in, and a million cells are never in memory at once.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError
from .ingest._source import SourceInfo, check_block_size, check_range
from .store import DEFAULT_BLOCK_SIZE, CountStore, write_counts

__all__ = ["SyntheticCounts", "synthetic_counts", "write_synthetic"]

RNG_CHUNK = 1024  # cells per seeded stream: the unit a matrix is generated in
_VERSION = 2  # of the generator, in the fingerprint (version 1 drew every gene of every cell)
_BATCH = 128  # cells drawn together: a batch's arrays stay cache-sized
_GRID = 0.01  # step of the log-expression grid
_LIBRARY_SIGMA = 0.35  # default sd of the log library size
_DOUBLET_DEPTH = 1.8  # library size of a doublet relative to a singlet
_SPAN = 8.0  # library sizes are clipped at 8 sd (probability ~1e-15)
_DENSE = 0.5  # expected clusters per gene from which a bin is drawn gene by gene
_BIN_WIDTH = 16  # grid steps per bin: a sparse cluster is kept with probability >= 85%
_TAIL = 2e-4  # rate (at the median library) below which the remaining genes share one bin
_COLUMNS = 24  # CDF columns tabulated; longer tails are walked on, term by term
_MU_BIG = 6.0  # means from which counts are drawn as gamma-Poisson
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

_Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]  # indptr (int64), genes (int32), counts


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class _Tail:
    """Where a tabulated CDF stops: its last term and value; the next term is the last one
    times ``theta * (k - 1 + shape) / k``."""

    theta: np.ndarray
    term: np.ndarray
    cdf: np.ndarray
    shape: float


@dataclass(frozen=True)
class _Tables:
    """Negative binomial quantities on the grid: entry ``i`` is ``mu = exp(_GRID (m0 + i))``."""

    mu: np.ndarray
    rate: np.ndarray  # expected clusters r log(1 + mu / r), = -log P(count = 0)
    zero: np.ndarray  # P(count = 0)
    nb: np.ndarray  # (_COLUMNS, M): P(count <= k), k = 1.._COLUMNS (2 where mu >= _MU_BIG)
    nb_tail: _Tail
    log: np.ndarray  # (_COLUMNS, M): rate x P(cluster size <= k), k = 1.._COLUMNS
    log_tail: _Tail
    big: int  # first entry with mu >= _MU_BIG


def _tables(m0: int, m1: int, r: float) -> _Tables:
    """Tabulate ``NB(mu, r)`` and its logarithmic cluster sizes for grid steps ``m0..m1``."""
    mu = np.exp(_GRID * np.arange(m0, m1 + 1))
    rate = r * np.log1p(mu / r)
    theta = mu / (r + mu)
    zero = np.exp(-rate)
    nb = np.empty((_COLUMNS, mu.size))
    log = np.empty((_COLUMNS, mu.size))
    pmf, cdf = zero, zero
    term = r * theta  # rate x P(size = 1): P(size = k) = theta^k / (k log(1 + mu / r))
    acc = term
    for k in range(1, _COLUMNS + 1):
        pmf = pmf * theta * ((k - 1 + r) / k)
        cdf = cdf + pmf
        nb[k - 1] = cdf
        log[k - 1] = acc
        if k < _COLUMNS:
            term = term * theta * (k / (k + 1))
            acc = acc + term
    big = int(np.searchsorted(mu, _MU_BIG))
    nb[:, big:] = 2.0  # never passed: these counts are drawn as gamma-Poisson
    return _Tables(
        mu=mu,
        rate=rate,
        zero=zero,
        nb=nb,
        nb_tail=_Tail(theta, pmf, nb[-1].copy(), r),
        log=log,
        log_tail=_Tail(theta, term, acc, 0.0),
        big=big,
    )


def _invert(x: np.ndarray, m: np.ndarray, columns: np.ndarray, tail: _Tail) -> np.ndarray:
    """``1 + #{k : x >= columns[k][m]}`` per entry, walking on past the table where needed:
    the inverse CDF of a count already known to be >= 1 (columns increase with ``k``)."""
    act = np.flatnonzero(x >= columns[0][m])
    passed = [act]
    for col in columns[1:]:
        if not act.size:
            break
        act = act[x[act] >= col[m[act]]]
        passed.append(act)
    counts = np.bincount(np.concatenate(passed), minlength=x.size) + 1
    if act.size:
        _walk(x, m, act, counts, tail)
    return counts


def _walk(x: np.ndarray, m: np.ndarray, act: np.ndarray, counts: np.ndarray, tail: _Tail) -> None:
    """Add to ``counts[act]`` the further terms of the CDF that ``x[act]`` passes (rare)."""
    theta, term, cdf = tail.theta[m[act]], tail.term[m[act]], tail.cdf[m[act]]
    k = _COLUMNS + 1
    while act.size:
        term = term * theta * ((k - 1 + tail.shape) / k)
        cdf = cdf + term
        keep = (x[act] >= cdf) & (term > 0)
        act, theta, term, cdf = act[keep], theta[keep], term[keep], cdf[keep]
        counts[act] += 1
        k += 1


# --------------------------------------------------------------------------- sampler


@dataclass(frozen=True)
class _Profiles:
    """Expression profiles (cell types, then their pairs), each with its genes sorted by
    expression, flattened row after row, and cut into bins."""

    pair: np.ndarray  # (T, T): profile of a cell of types (a, b)
    level: np.ndarray  # (R * G,): grid step of each sorted gene's profile value
    gene: np.ndarray  # (R * G,): gene index of each sorted gene (key dtype)
    bin_top: np.ndarray  # (R, B): level of the first gene of each bin
    bin_len: np.ndarray  # (R, B): genes per bin (float, just below: uniform positions)
    bin_start: np.ndarray  # (R, B): flat index of a bin's first gene
    bin_end: np.ndarray  # (R, B): flat index past a bin, relative to its row


def _profiles(profiles: np.ndarray, ref: int, tables: _Tables, m0: int, dtype: Any) -> _Profiles:
    """Sort and bin the profile of every cell type and pair of types.

    ``ref`` is the grid step of the median library size (to find the tail bin); ``m0`` the
    grid step of table entry 0.
    """
    t, g = profiles.shape
    a, b = np.triu_indices(t, 1)
    rows = np.vstack([profiles, 0.5 * (profiles[a] + profiles[b])])
    pair = np.repeat(np.arange(t)[:, None], t, axis=1)
    pair[a, b] = pair[b, a] = t + np.arange(a.size)
    level = np.rint(np.log(rows) / _GRID).astype(np.int64)
    order = np.argsort(-level, axis=1, kind="stable")
    level = np.take_along_axis(level, order, axis=1)
    top = level[:, :1]
    k = (top - level) // _BIN_WIDTH
    nominal = top + ref - m0 - _BIN_WIDTH * np.arange(int(k.max()) + 1)
    regular = (tables.rate[np.clip(nominal, 0, tables.rate.size - 1)] >= _TAIL).sum(axis=1)
    k = np.minimum(k, regular[:, None])  # the rest: one tail bin
    n_bins = int(k.max()) + 1
    lengths = np.stack([np.bincount(row, minlength=n_bins) for row in k])
    end = np.cumsum(lengths, axis=1)
    start = end - lengths
    return _Profiles(
        pair=pair,
        level=level.astype(np.int32).ravel(),
        gene=order.astype(dtype).ravel(),
        bin_top=np.take_along_axis(level, np.minimum(start, g - 1), axis=1),
        bin_len=np.nextafter(lengths.astype(np.float64), 0.0),
        bin_start=start + g * np.arange(rows.shape[0])[:, None],
        bin_end=end,
    )


class _Sampler:
    """Draws the counts of chunks of cells (see the module docstring).

    Parameters
    ----------
    profiles : numpy.ndarray
        ``(n_types, n_genes)`` expression profiles (rows sum to 1).
    depth : float
        Median library size of a singlet.
    r : float
        Negative binomial shape, ``1 / dispersion``.
    sigma : float
        Standard deviation of the log library size.
    """

    def __init__(
        self, profiles: np.ndarray, depth: float, r: float, sigma: float = _LIBRARY_SIGMA
    ) -> None:
        self.n_genes = profiles.shape[1]
        self.r = r
        self.sigma = sigma
        self.log_depth = float(np.log(depth))
        ref = round(self.log_depth / _GRID)
        span = round(_SPAN * sigma / _GRID)
        self.lmin = ref - span
        self.lmax = ref + round(np.log(_DOUBLET_DEPTH) / _GRID) + span
        levels = np.rint(np.log(profiles) / _GRID)  # pairs of types lie between these
        self.m0 = int(levels.min()) + self.lmin
        self.tables = _tables(self.m0, int(levels.max()) + self.lmax, r)
        self.gbits = max(1, (self.n_genes - 1).bit_length())
        cbits = (_BATCH - 1).bit_length()
        wide = cbits + self.gbits + 8 > 32  # a 32-bit key holds counts up to 255 at least
        self.dtype = np.dtype(np.uint64 if wide else np.uint32)
        self.vbits = (64 if wide else 32) - cbits - self.gbits
        self.profiles = _profiles(profiles, ref, self.tables, self.m0, self.dtype)

    def chunk(self, rng: np.random.Generator, types: np.ndarray, doublet: np.ndarray) -> _Chunk:
        """The counts of a chunk's cells, given their types and which are doublets."""
        n = types.shape[0]
        z = rng.standard_normal(n)
        row = np.where(doublet, self.profiles.pair[types[:, 0], types[:, 1]], types[:, 0])
        log_size = self.log_depth + self.sigma * z + np.log(_DOUBLET_DEPTH) * doublet
        lev = np.clip(np.rint(log_size / _GRID), self.lmin, self.lmax).astype(np.int64)
        lev -= self.m0
        parts = [
            self._batch(rng, row[i : i + _BATCH], lev[i : i + _BATCH]) for i in range(0, n, _BATCH)
        ]
        indptr = np.zeros(n + 1, np.int64)
        if not parts:
            return indptr, np.zeros(0, np.int32), np.zeros(0, np.int32)
        np.cumsum(np.concatenate([p[0] for p in parts]), out=indptr[1:])
        genes = np.concatenate([p[1] for p in parts])
        return indptr, genes, np.concatenate([p[2] for p in parts])

    def _batch(self, rng: np.random.Generator, row: np.ndarray, lev: np.ndarray) -> _Chunk:
        """Cells with profiles ``row`` and library grid steps ``lev`` (relative to the
        tables): detected genes per cell, their genes and counts, in CSR order."""
        p = self.profiles
        rate_top = self.tables.rate[p.bin_top[row] + lev[:, None]]  # (cells, bins)
        n_dense = (rate_top >= _DENSE).sum(axis=1)  # bins sorted: dense ones come first
        prefix = np.arange(row.size, dtype=self.dtype) << self.gbits
        aside: list[np.ndarray] = []  # keys and counts too large for a key
        dense = self._pack(self._dense(rng, row, lev, n_dense, prefix), aside)
        sparse = self._pack(self._sparse(rng, row, lev, n_dense, rate_top, prefix), aside)
        keys = np.concatenate([dense, sparse])
        keys.sort()
        counts = (keys & ((1 << self.vbits) - 1)).astype(np.int32)
        keys >>= self.vbits
        new = np.empty(keys.size, bool)
        new[:1] = True
        np.not_equal(keys[1:], keys[:-1], out=new[1:])
        again = np.flatnonzero(~new)
        if again.size:  # more clusters on a gene (sparse bins): add them to its first
            run = np.flatnonzero(np.diff(again, prepend=-2) != 1)  # starts of runs of repeats
            first = np.repeat(again[run] - 1, np.diff(np.append(run, again.size)))
            np.add.at(counts, first, counts[again])
            keys, counts = keys[new], counts[new]
        if aside:
            np.add.at(counts, np.searchsorted(keys, aside[0]), aside[1].astype(np.int32))
        indptr = np.searchsorted(keys, np.append(prefix, row.size << self.gbits))
        genes = (keys & ((1 << self.gbits) - 1)).astype(np.int32)
        return np.diff(indptr), genes, counts

    def _dense(
        self,
        rng: np.random.Generator,
        row: np.ndarray,
        lev: np.ndarray,
        n_dense: np.ndarray,
        prefix: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys (cell and gene) and counts of the dense bins' nonzero counts (one uniform
        per gene)."""
        p, t = self.profiles, self.tables
        slots = np.where(n_dense > 0, p.bin_end[row, np.maximum(n_dense - 1, 0)], 0)
        cell = np.repeat(np.arange(row.size), slots)
        flat = np.arange(cell.size) + (p.bin_start[row, 0] - (np.cumsum(slots) - slots))[cell]
        m = p.level[flat] + lev[cell]
        u = rng.random(cell.size)
        hit = np.flatnonzero(u >= t.zero[m])
        m, u = m[hit], u[hit]
        counts = _invert(u, m, t.nb, t.nb_tail)
        big = np.flatnonzero(m >= t.big)
        if big.size:
            counts[big] = self._gamma_poisson(rng, t.mu[m[big]])
        return prefix[cell[hit]] | p.gene[flat[hit]], counts

    def _pack(self, drawn: tuple[np.ndarray, np.ndarray], aside: list[np.ndarray]) -> np.ndarray:
        """``key << vbits | count``; a count too large for that is packed as 0 and kept in
        ``aside`` (keys, counts), to be added back after the sort."""
        keys, counts = drawn
        over = np.flatnonzero(counts >> self.vbits)
        if over.size:
            more = [keys[over], counts[over]]
            aside[:] = [np.concatenate(z) for z in zip(aside, more, strict=True)] if aside else more
            counts[over] = 0
        return (keys << self.vbits) | counts.astype(self.dtype)

    def _gamma_poisson(self, rng: np.random.Generator, mu: np.ndarray) -> np.ndarray:
        """``NB(mu, r)`` counts conditioned on > 0 (zeros redrawn: means here are large)."""
        counts = rng.poisson(rng.standard_gamma(self.r, mu.size) * (mu / self.r))
        zero = np.flatnonzero(counts == 0)
        while zero.size:
            counts[zero] = rng.poisson(rng.standard_gamma(self.r, zero.size) * (mu[zero] / self.r))
            zero = zero[counts[zero] == 0]
        return counts

    def _sparse(
        self,
        rng: np.random.Generator,
        row: np.ndarray,
        lev: np.ndarray,
        n_dense: np.ndarray,
        rate_top: np.ndarray,
        prefix: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keys and sizes of the sparse bins' clusters (one key per cluster: a gene with two
        clusters has two keys, whose counts add up)."""
        p, t = self.profiles, self.tables
        n_bins = rate_top.shape[1]
        length = p.bin_len[row]
        mean = np.where(np.arange(n_bins) >= n_dense[:, None], rate_top * length, 0.0)
        seg = np.repeat(np.arange(mean.size), rng.poisson(mean).ravel())
        pos = rng.random(seg.size) * length.ravel()[seg]
        slot = pos.astype(np.int64)
        x = (pos - slot) * rate_top.ravel()[seg]  # uniform on [0, rate of the bin's top)
        flat = slot + p.bin_start[row].ravel()[seg]
        m = p.level[flat] + np.repeat(lev, n_bins)[seg]
        kept = np.flatnonzero(x < t.rate[m])
        x, m, flat, seg = x[kept], m[kept], flat[kept], seg[kept]
        sizes = _invert(x, m, t.log, t.log_tail)  # x / rate(m) is uniform: reused
        return np.repeat(prefix, n_bins)[seg] | p.gene[flat], sizes


# --------------------------------------------------------------------------- public


def _numbered(prefix: str, n: int, width: int, suffix: str) -> np.ndarray:
    """``f"{prefix}{i:0{width}d}{suffix}"`` for ``i < n``, as numpy StringDType (vectorised:
    10M barcodes in seconds, half the memory of Python strings)."""
    width = max(width, len(str(max(n - 1, 0))))
    out = np.empty(n, dtype=np.dtypes.StringDType())
    step = 1 << 20
    for a in range(0, n, step):
        i = np.arange(a, min(a + step, n), dtype=np.int64)
        buf = np.empty((i.size, len(prefix) + width + len(suffix)), np.uint8)
        buf[:, : len(prefix)] = np.frombuffer(prefix.encode(), np.uint8)
        buf[:, len(prefix) + width :] = np.frombuffer(suffix.encode(), np.uint8)
        for j in range(len(prefix) + width - 1, len(prefix) - 1, -1):
            buf[:, j] = i % 10 + 48
            i //= 10
        out[a : a + buf.shape[0]] = buf.view(f"S{buf.shape[1]}").ravel().astype(out.dtype)
    return out


@dataclass
class SyntheticCounts:
    """A seeded synthetic count matrix, readable block by block (a :class:`flow.ingest.Source`).

    Nothing is generated until blocks or rows are read; the matrix is a function of the
    parameters alone (see the module docstring for the model and how it is drawn).

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
    library_sigma : float
        Standard deviation of the log library size (lognormal, clipped at 8 sd), in 0..2.
        At 1,000 genes per cell of 33,538, 0.35 gives a p99 of ~2.1x the median number of
        detected genes; 0.85 (p99 ~4.4x, max ~8x on 20k cells) is shaped like real droplet
        sets such as 90k PBMC cells (median 1,033, p99 4,541, max 7,383).
    """

    n_cells: int
    n_genes: int = 20_000
    seed: int = 0
    mean_genes: float = 1_000.0
    n_types: int = 6
    doublet_rate: float = 0.05
    dispersion: float = 0.3
    library_sigma: float = _LIBRARY_SIGMA
    info: SourceInfo = field(init=False, repr=False)
    _profiles: np.ndarray = field(init=False, repr=False)
    _depth: float = field(init=False, repr=False)
    _sampler: _Sampler = field(init=False, repr=False)

    #: Any range of cells is generated on its own (see :meth:`read_rows`).
    supports_ranges: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._check()
        rng = np.random.default_rng([self.seed, 0])
        base = rng.lognormal(mean=0.0, sigma=2.0, size=self.n_genes)  # heavy-tailed gene means
        profiles = np.tile(base, (self.n_types, 1))
        for t in range(self.n_types):  # each type up-regulates its own ~5% of genes
            markers = rng.choice(self.n_genes, size=max(1, self.n_genes // 20), replace=False)
            profiles[t, markers] *= rng.lognormal(1.5, 0.7, size=markers.size)
        self._profiles = profiles / profiles.sum(axis=1, keepdims=True)
        self._depth = self._depth_for(self.mean_genes)
        self._sampler = _Sampler(
            self._profiles, self._depth, 1.0 / self.dispersion, self.library_sigma
        )
        ids = np.array([f"ENSG{100_000 + 7 * g:011d}" for g in range(self.n_genes)], dtype=object)
        symbols = np.array([f"GENE{g}" for g in range(self.n_genes)], dtype=object)
        self.info = SourceInfo(
            path=f"synthetic:{self.n_cells}x{self.n_genes}:seed{self.seed}",
            format="synthetic",
            n_cells=self.n_cells,
            n_genes=self.n_genes,
            gene_ids=ids,
            gene_symbols=symbols,
            barcodes=_numbered("CELL", self.n_cells, 9, "-1"),
            obs=pd.DataFrame({"cell_type": self._cell_types()}),
            fingerprint=f"synthetic-v{_VERSION}-{self!r}",
        )

    def _check(self) -> None:
        if self.n_cells < 0 or self.n_genes < 1:
            msg = f"Need n_cells >= 0 and n_genes >= 1; got {self.n_cells} x {self.n_genes}."
            raise InputError(msg)
        if not 1 <= self.n_types <= len(_CELL_TYPES):
            msg = f"n_types must be in 1..{len(_CELL_TYPES)}; got {self.n_types}."
            raise InputError(msg)
        if not 0 <= self.library_sigma <= 2:
            msg = f"library_sigma (sd of the log library size) must be in 0..2; got {self.library_sigma}."
            raise InputError(msg)
        if not (self.dispersion > 0 and self.mean_genes > 0 and 0 <= self.doublet_rate <= 1):
            msg = (
                "Need dispersion > 0, mean_genes > 0 and 0 <= doublet_rate <= 1; got "
                f"{self.dispersion}, {self.mean_genes} and {self.doublet_rate}."
            )
            raise InputError(msg)

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
        names = np.asarray(_CELL_TYPES, dtype=object)
        for c0 in range(0, self.n_cells, RNG_CHUNK):
            types, doublet, _ = self._design(c0 // RNG_CHUNK)
            labels[c0 : c0 + len(types)] = np.where(doublet, "doublet", names[types[:, 0]])
        return labels

    def _design(self, chunk: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        """A chunk's cell types (two per cell), which cells are doublets, and its stream."""
        n = min(RNG_CHUNK, self.n_cells - chunk * RNG_CHUNK)
        rng = np.random.default_rng([self.seed, 1, chunk])
        types = rng.integers(0, self.n_types, size=(n, 2))
        doublet = rng.random(n) < self.doublet_rate
        return types, doublet, rng

    def _chunk(self, chunk: int) -> _Chunk:
        types, doublet, rng = self._design(chunk)
        return self._sampler.chunk(rng, types, doublet)

    def _rows(self, chunks: list[_Chunk], first: int, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` out of consecutive chunks, the first holding cell ``first``."""
        indptr, genes, counts = [np.zeros(1, np.int64)], [], []
        for indp, g, c in chunks:
            a, b = max(start - first, 0), min(stop - first, indp.size - 1)
            first += indp.size - 1
            if a >= b:
                continue
            lo, hi = indp[a], indp[b]
            indptr.append(indp[a + 1 : b + 1] - lo + indptr[-1][-1])
            genes.append(g[lo:hi])
            counts.append(c[lo:hi])
        shape = (stop - start, self.n_genes)
        if not genes:
            return sp.csr_matrix(shape, dtype=np.int32)
        return sp.csr_matrix(
            (np.concatenate(counts), np.concatenate(genes), np.concatenate(indptr)), shape=shape
        )

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        """Yield consecutive CSR blocks of ``n_cells`` cells (the last may be shorter).

        Chunks are generated on two threads, a few ahead of the block being read.
        """
        check_block_size(n_cells)
        n_chunks = -(-self.n_cells // RNG_CHUNK)
        ahead: deque[Future[_Chunk]] = deque()
        held: list[_Chunk] = []
        first = next_chunk = 0  # first cell of held[0]; next chunk to submit
        with ThreadPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
            for start in range(0, self.n_cells, n_cells):
                stop = min(start + n_cells, self.n_cells)
                while first + sum(c[0].size - 1 for c in held) < stop:
                    while next_chunk < n_chunks and len(ahead) < 4:
                        ahead.append(pool.submit(self._chunk, next_chunk))
                        next_chunk += 1
                    held.append(ahead.popleft().result())
                yield self._rows(held, first, start, stop)
                while held and first + held[0][0].size - 1 <= stop:
                    first += held.pop(0)[0].size - 1

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Cells ``start:stop`` as CSR, generating only the seeded chunks that hold them."""
        check_range(start, stop, self.n_cells)
        first = start // RNG_CHUNK
        chunks = [self._chunk(c) for c in range(first, -(-stop // RNG_CHUNK))]
        return self._rows(chunks, first * RNG_CHUNK, start, stop)

    def to_dense(self) -> np.ndarray:
        """The whole matrix as a dense array (for tests on small sizes)."""
        return np.asarray(self.read_rows(0, self.n_cells).toarray())


def synthetic_counts(
    n_cells: int, n_genes: int = 20_000, *, seed: int = 0, **kwargs: Any
) -> SyntheticCounts:
    """A seeded synthetic count matrix (lazy: nothing is generated until blocks are read).

    See :class:`SyntheticCounts` for the model and its parameters; ``kwargs`` are its other
    fields (``mean_genes``, ``n_types``, ``doublet_rate``, ``dispersion``, ``library_sigma``).
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

    ``kwargs`` are the other fields of :class:`SyntheticCounts` (``mean_genes``,
    ``library_sigma``, ...).

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
