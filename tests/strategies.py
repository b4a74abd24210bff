"""Hypothesis strategies shared by the tests: count matrices, CSR blocks, chunkings, digests' inputs.

Import them as ``from strategies import tied_blocks`` (``tests/`` is on ``sys.path``, like
``helpers`` and ``reference``). Strategies that draw a seed and build the data with numpy keep
examples small to shrink and large enough to matter; those drawing elements one by one are for
small, adversarial cases (ties, explicit zeros, extreme floats).
"""

from __future__ import annotations

import itertools
from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

__all__ = [
    "axis_chunks",
    "chunked_arrays",
    "chunking",
    "count_matrices",
    "csr_blocks",
    "large_inputs",
    "numpy_values",
    "partitions",
    "positive_floats",
    "small_inputs",
    "small_matrices",
    "tied_blocks",
    "tied_inputs",
]

# --------------------------------------------------------------------------- chunkings


@st.composite
def chunking(draw: st.DrawFn, n: int) -> tuple[int, ...]:
    """Irregular chunks of ``n`` (zero-size chunks included now and then)."""
    if n == 0:
        return (0,)
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=min(n, 6))))
    bounds = [0, *cuts, n]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


@st.composite
def axis_chunks(draw: st.DrawFn, n: int) -> tuple[int, ...]:
    """Irregular chunks of an axis of length ``n >= 1``, every chunk non-empty (one chunk too)."""
    cuts = draw(st.sets(st.integers(1, n - 1), max_size=min(n - 1, 5))) if n > 1 else set()
    bounds = [0, *sorted(cuts), n]
    return tuple(b - a for a, b in itertools.pairwise(bounds))


@st.composite
def chunked_arrays(
    draw: st.DrawFn, max_dims: int = 3, max_side: int = 12
) -> tuple[np.ndarray, da.Array]:
    """A small integer array and the same array as Dask with irregular chunks on every axis."""
    ndim = draw(st.integers(1, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=ndim, max_size=ndim)))
    x = draw(npst.arrays(np.int32, shape, elements=st.integers(0, 100)))
    chunks = tuple(draw(axis_chunks(n)) for n in shape)
    return x, da.from_array(x, chunks=chunks)


# --------------------------------------------------------------------------- count matrices


@st.composite
def count_matrices(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """A cells x genes int64 count matrix of a drawn density (all-zero up to dense) and its seed."""
    n_cells, n_genes = draw(st.integers(1, 40)), draw(st.integers(1, 12))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 70_000, size=(n_cells, n_genes)) * (
        rng.random((n_cells, n_genes)) < density
    )
    return x.astype(np.int64), seed


@st.composite
def small_matrices(draw: st.DrawFn) -> dict[str, Any]:
    """Parameters of a small synthetic count store (:func:`flow.datasets.write_synthetic`)."""
    n_cells = draw(st.integers(1, 70))
    n_genes = draw(st.integers(6, 30))
    mean_genes = draw(st.integers(1, max(1, n_genes // 2)))
    return {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "mean_genes": mean_genes,
        "seed": draw(st.integers(0, 2**16)),
        "fraction": draw(st.sampled_from([0.6, 0.8, 1.0])),
        "levels": draw(st.sampled_from([1, 3, 50])),
        "odd_block": draw(st.integers(1, n_cells)),
    }


@st.composite
def csr_blocks(
    draw: st.DrawFn, max_cells: int = 20, max_genes: int = 15
) -> tuple[sp.csr_array, np.ndarray, np.ndarray]:
    """A CSR block of counts, per-cell totals ``n_counts`` and the same counts dense.

    Integer or float counts with explicitly stored zeros, and per-cell totals that are not the
    row sums (anything positive and finite, with awkward last bits).
    """
    n_cells = draw(st.integers(0, max_cells))
    n_genes = draw(st.integers(1, max_genes))
    dtype = draw(st.sampled_from([np.uint16, np.int32, np.int64, np.float32, np.float64]))
    if np.issubdtype(dtype, np.integer):
        elements: st.SearchStrategy[Any] = st.integers(
            0, int(np.iinfo(dtype).max) if dtype == np.uint16 else 70_000
        )
    else:
        width = 32 if dtype == np.float32 else 64  # zero, or not so small that values underflow
        elements = st.just(0.0) | st.floats(2.0**-20, 2.0**20, width=width)
    dense = draw(npst.arrays(dtype, (n_cells, n_genes), elements=elements))
    stored = draw(npst.arrays(np.bool_, (n_cells, n_genes)))  # True: stored (zero or not)
    stored |= dense != 0
    lengths = stored.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    totals = st.one_of(
        st.floats(1e-3, 1e9, allow_nan=False, allow_infinity=False),
        st.integers(1, 10**7).map(float),
    )
    n_counts = np.array(draw(st.lists(totals, min_size=n_cells, max_size=n_cells)), np.float64)
    _, indices = np.nonzero(stored)  # row-major, like dense[stored]
    return sp.csr_array((dense[stored], indices, indptr), shape=dense.shape), n_counts, dense


@st.composite
def tied_blocks(draw: st.DrawFn, max_cells: int = 12, max_genes: int = 30) -> dict[str, Any]:
    """Small integer counts and a few repeated medians: many exact ties."""
    n_cells = draw(st.integers(1, max_cells))
    n_genes = draw(st.integers(1, max_genes))
    counts = draw(
        npst.arrays(np.int32, (n_cells, n_genes), elements=st.integers(0, 3), fill=st.just(0))
    )
    median_pool = draw(
        st.lists(
            st.sampled_from([0.5, 1.0, 1.0 + 2**-52, 1.5, 2.0, 3.0, 0.1, 7.25, 1e-3, 1e3]),
            min_size=1,
            max_size=4,
        )
    )
    medians = np.array(
        draw(st.lists(st.sampled_from(median_pool), min_size=n_genes, max_size=n_genes))
    )
    tokens = np.array(draw(st.permutations(range(4, 4 + n_genes))), dtype=np.uint16)
    n_counts = counts.sum(axis=1) + np.array(
        draw(st.lists(st.integers(0, 5), min_size=n_cells, max_size=n_cells))
    )
    n_counts = np.where(n_counts == 0, 1, n_counts).astype(np.float64)
    width = draw(st.integers(0, n_genes + 2))
    return {
        "counts": counts,
        "medians": medians,
        "tokens": tokens,
        "n_counts": n_counts,
        "width": width,
    }


# --------------------------------------------------------------------------- t-digest inputs

positive_floats = st.floats(
    min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False
)


@st.composite
def small_inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Few values per gene (at most compression // 2): digests must be exact."""
    compression = float(draw(st.sampled_from([4, 9, 20, 50, 200])))
    n_genes = draw(st.integers(1, 5))
    cap = int(compression) // 2
    genes: list[int] = []
    values: list[float] = []
    kind = draw(st.sampled_from(["float", "int", "wide"]))
    for g in range(n_genes):
        k = draw(st.integers(0, cap))
        if kind == "float":
            vals = draw(st.lists(st.floats(0.01, 1e4), min_size=k, max_size=k))
        elif kind == "int":
            vals = [float(v) for v in draw(st.lists(st.integers(1, 5), min_size=k, max_size=k))]
        else:
            vals = draw(st.lists(positive_floats, min_size=k, max_size=k))
        genes += [g] * k
        values += vals
    perm = draw(st.permutations(range(len(values))))
    return (
        np.asarray(genes, np.int64)[list(perm)],
        np.asarray(values, np.float64)[list(perm)],
        n_genes,
        compression,
    )


def numpy_values(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positive values of a named distribution (``large_inputs`` draws the kind)."""
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, n)
    if kind == "integers":  # many ties
        return rng.integers(1, 12, n).astype(np.float64)
    if kind == "bimodal":
        return np.where(rng.random(n) < 0.5, rng.lognormal(0, 0.2, n), rng.lognormal(3, 0.2, n))
    if kind == "normalized":  # count / n_counts * 10_000, as in a corpus
        return (rng.integers(1, 4, n) / rng.integers(500, 5000, n)) * 10_000.0
    raise AssertionError(kind)


@st.composite
def large_inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Up to ~20,000 values per gene from numpy distributions (hypothesis draws the seed)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    compression = float(draw(st.sampled_from([50, 100, 200])))
    n_genes = draw(st.integers(1, 4))
    genes, values = [], []
    for g in range(n_genes):
        n = draw(st.one_of(st.integers(0, 300), st.integers(2_000, 20_000)))
        kind = draw(st.sampled_from(["lognormal", "integers", "bimodal", "normalized"]))
        genes.append(np.full(n, g))
        values.append(numpy_values(kind, n, rng))
    gg, vv = np.concatenate(genes), np.concatenate(values)
    perm = rng.permutation(gg.size)
    return gg[perm], vv[perm], n_genes, compression


@st.composite
def partitions(draw: st.DrawFn, n: int) -> list[np.ndarray]:
    """Indices of ``n`` values split into parts: random, or contiguous by value rank."""
    n_parts = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    labels = rng.integers(0, n_parts, n)
    return [np.flatnonzero(labels == i) for i in range(n_parts)]


@st.composite
def tied_inputs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Integer-valued data with many duplicates, any sizes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_genes = draw(st.integers(1, 4))
    compression = float(draw(st.sampled_from([4, 10, 30, 200])))
    genes, values = [], []
    for g in range(n_genes):
        n = draw(st.one_of(st.integers(0, 60), st.integers(200, 3000)))
        top = draw(st.integers(1, 30))
        genes.append(np.full(n, g))
        values.append(rng.integers(1, top + 1, n).astype(np.float64))
    return np.concatenate(genes), np.concatenate(values), n_genes, compression
