"""Tests of the vectorized per-gene t-digests (flow.sketch._tdigest) against numpy references."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow.sketch import _tdigest as td
from flow.sketch._keysort import sort_key

from strategies import large_inputs, partitions, small_inputs, tied_inputs

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- numpy references


def ref_sorted(genes: np.ndarray, values: np.ndarray, n_genes: int) -> list[np.ndarray]:
    """Each gene's values, sorted (slow and obvious)."""
    return [np.sort(values[genes == g]) for g in range(n_genes)]


def ref_median(per_gene: list[np.ndarray]) -> np.ndarray:
    return np.array([np.median(x) if x.size else np.nan for x in per_gene])


def rank_error(x_sorted: np.ndarray, est: float) -> float:
    """Distance from 1/2 to the ECDF interval [F(est-), F(est)] (0 if 1/2 is inside)."""
    n = x_sorted.size
    below = np.searchsorted(x_sorted, est, side="left") / n
    upto = np.searchsorted(x_sorted, est, side="right") / n
    return float(max(0.0, below - 0.5, 0.5 - upto))


def middle_pair(x_sorted: np.ndarray) -> tuple[float, float]:
    n = x_sorted.size
    return float(x_sorted[(n - 1) // 2]), float(x_sorted[n // 2])


def tree_merge(parts: list[td.Digests], split_every: int) -> td.Digests:
    """Fixed tree of merges, as the Dask reduction does it."""
    while len(parts) > 1:
        parts = [td.merge(parts[i : i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def state_bytes(d: td.Digests) -> bytes:
    return b"".join(np.ascontiguousarray(a).tobytes() for a in td.to_arrays(d).values())


def check_invariants(d: td.Digests, genes: np.ndarray, n_genes: int) -> None:
    """Structure every digest must have, whatever its history."""
    assert d.offsets.dtype == np.int64
    assert d.weights.dtype == np.int64
    assert d.means.dtype == d.mins.dtype == d.maxs.dtype == np.float64
    assert d.n_genes == n_genes
    np.testing.assert_array_equal(d.counts, np.bincount(genes, minlength=n_genes))
    assert (np.diff(d.offsets) >= 0).all()
    assert (np.diff(d.offsets) <= d.compression // 2).all()
    assert (d.weights >= 1).all()
    assert (d.mins <= d.means).all()
    assert (d.means <= d.maxs).all()
    for g in range(n_genes):
        m = d.means[d.offsets[g] : d.offsets[g + 1]]
        assert (np.diff(m) >= 0).all()


# --------------------------------------------------------------------------- exactness


@SETTINGS
@given(data=small_inputs(), q=st.floats(0.0, 1.0))
def test_small_genes_are_exact(data: tuple[np.ndarray, np.ndarray, int, float], q: float) -> None:
    genes, values, n_genes, compression = data
    d = td.from_values(genes, values, n_genes, compression)
    check_invariants(d, genes, n_genes)
    per_gene = ref_sorted(genes, values, n_genes)
    assert (d.weights == 1).all()
    np.testing.assert_array_equal(td.median(d), ref_median(per_gene))  # bit-identical
    lo, hi = td.median_bracket(d)
    for g, x in enumerate(per_gene):
        if x.size:
            assert (lo[g], hi[g]) == middle_pair(x)
            np.testing.assert_allclose(td.quantile(d, q)[g], np.quantile(x, q), rtol=1e-12)
        else:
            assert np.isnan(lo[g])
            assert np.isnan(hi[g])


@SETTINGS
@given(data=small_inputs(), seed=st.integers(0, 2**32 - 1), split_every=st.integers(2, 5))
def test_small_genes_stay_exact_through_merges(
    data: tuple[np.ndarray, np.ndarray, int, float], seed: int, split_every: int
) -> None:
    genes, values, n_genes, compression = data
    labels = np.random.default_rng(seed).integers(0, 6, genes.size)
    parts = [
        td.from_values(genes[labels == i], values[labels == i], n_genes, compression)
        for i in range(6)
    ]
    d = tree_merge(parts, split_every)
    check_invariants(d, genes, n_genes)
    np.testing.assert_array_equal(td.median(d), ref_median(ref_sorted(genes, values, n_genes)))


@SETTINGS
@given(
    n=st.integers(1, 3000),
    compression=st.sampled_from([4.0, 9.0, 50.0, 200.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_built_bins_follow_the_uniform_scale(n: int, compression: float, seed: int) -> None:
    """Documented binning: rank r of n goes to bin floor(n_bins * (2r + 1) / (2n))."""
    x = np.random.default_rng(seed).lognormal(0, 1, n)
    d = td.from_values(np.zeros(n, np.int64), x, 1, compression)
    n_bins = int(compression) // 2
    ranks = np.arange(n)
    bins = ranks if n <= n_bins else (n_bins * (2 * ranks + 1)) // (2 * n)
    np.testing.assert_array_equal(d.weights, np.bincount(bins)[np.bincount(bins) > 0])
    xs = np.sort(x)
    first = np.cumsum(d.weights) - d.weights
    np.testing.assert_array_equal(d.mins, xs[first])
    np.testing.assert_array_equal(d.maxs, xs[first + d.weights - 1])


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), compression=st.sampled_from([4.0, 10.0, 50.0]))
def test_merge_of_exact_parts_equals_build_of_all(seed: int, compression: float) -> None:
    """Merging weight-1 centroids re-bins by mid-rank exactly as a build does."""
    rng = np.random.default_rng(seed)
    n_genes, n_bins = 3, int(compression) // 2
    parts, genes, values = [], [], []
    for _ in range(int(rng.integers(1, 8))):
        g = np.repeat(np.arange(n_genes), rng.integers(0, n_bins + 1, n_genes))
        v = rng.integers(1, 40, g.size) / 8.0  # ties across parts
        parts.append(td.from_values(g, v, n_genes, compression))
        genes.append(g)
        values.append(v)
    whole = td.from_values(np.concatenate(genes), np.concatenate(values), n_genes, compression)
    assert state_bytes(td.merge(parts)) == state_bytes(whole)


# --------------------------------------------------------------------------- accuracy


@FEW
@given(data=large_inputs())
def test_built_median_within_rank_bound(data: tuple[np.ndarray, np.ndarray, int, float]) -> None:
    genes, values, n_genes, compression = data
    d = td.from_values(genes, values, n_genes, compression)
    check_invariants(d, genes, n_genes)
    med = td.median(d)
    n_bins = int(compression) // 2
    for g, x in enumerate(ref_sorted(genes, values, n_genes)):
        if x.size == 0:
            assert np.isnan(med[g])
            continue
        # a fresh digest's bins hold at most n / n_bins + 1 values, and the estimate is
        # clamped to the (at most two) bins holding the middle ranks
        assert rank_error(x, med[g]) <= 2 / n_bins + 2 / x.size
        assert td.quantile(d, 0.0)[g] == x[0]
        assert td.quantile(d, 1.0)[g] == x[-1]


@FEW
@given(data=large_inputs(), st_data=st.data(), split_every=st.integers(2, 8))
def test_merge_of_any_partition_is_close_to_whole(
    data: tuple[np.ndarray, np.ndarray, int, float], st_data: st.DataObject, split_every: int
) -> None:
    genes, values, n_genes, compression = data
    parts_idx = st_data.draw(partitions(genes.size))
    parts = [td.from_values(genes[i], values[i], n_genes, compression) for i in parts_idx]
    d = tree_merge(parts, split_every)
    check_invariants(d, genes, n_genes)
    med = td.median(d)
    lo, hi = td.median_bracket(d)
    n_bins = int(compression) // 2
    for g, x in enumerate(ref_sorted(genes, values, n_genes)):
        if x.size == 0:
            assert np.isnan(med[g])
            assert np.isnan(lo[g])
            assert np.isnan(hi[g])
            continue
        assert rank_error(x, med[g]) <= 2 / n_bins
        a, b = middle_pair(x)
        assert lo[g] <= a <= b <= hi[g]
        assert lo[g] <= med[g] <= hi[g]
        assert td.quantile(d, 0.0)[g] == x[0]
        assert td.quantile(d, 1.0)[g] == x[-1]


def test_median_meets_relative_error_target_on_realistic_blocks() -> None:
    """Design target: p99 relative error <= 0.5% over genes with >= 1,000 nonzeros.

    Realistic-like data: negative-binomial counts, lognormal gene means and library sizes,
    two "cell types" in consecutive blocks; digests of blocks merged in a tree with
    split_every=8 (as the Dask reduction does).
    """
    rng = np.random.default_rng(7)
    n_genes, n_cells, n_blocks = 1500, 1000, 10
    base = rng.lognormal(0.0, 1.5, n_genes)
    types = [base * rng.lognormal(0.0, 0.7, n_genes) for _ in range(2)]
    digests, normalized = [], []
    for b in range(n_blocks):
        p = types[b * 2 // n_blocks]
        lib = rng.lognormal(np.log(1500.0), 0.4, n_cells)
        mu = lib[:, None] * (p / p.sum())[None, :]
        block = sp.csr_matrix(rng.poisson(rng.gamma(2.0, mu / 2.0)))
        n_counts = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
        digests.append(td.from_csr(block, n_counts))
        rows = np.repeat(np.arange(n_cells), np.diff(block.indptr))
        values = (block.data / n_counts[rows]) * 10_000.0
        normalized.append(sp.csr_matrix((values, block.indices, block.indptr), block.shape))
    d = tree_merge(digests, 8)

    csc = sp.csc_matrix(sp.vstack(normalized))
    ptr = csc.indptr
    exact = np.array([np.median(csc.data[ptr[g] : ptr[g + 1]]) for g in range(n_genes)])
    nnz = np.diff(ptr)
    np.testing.assert_array_equal(d.counts, nnz)
    sel = nnz >= 1000
    assert sel.sum() >= 200
    rel = np.abs(td.median(d)[sel] - exact[sel]) / exact[sel]
    assert np.percentile(rel, 99) <= 0.005


# --------------------------------------------------------------------------- brackets


@SETTINGS
@given(data=tied_inputs(), st_data=st.data(), split_every=st.integers(2, 8))
def test_median_bracket_contains_both_middle_values(
    data: tuple[np.ndarray, np.ndarray, int, float], st_data: st.DataObject, split_every: int
) -> None:
    genes, values, n_genes, compression = data
    parts_idx = st_data.draw(partitions(genes.size))
    parts = [td.from_values(genes[i], values[i], n_genes, compression) for i in parts_idx]
    for d in (td.from_values(genes, values, n_genes, compression), tree_merge(parts, split_every)):
        check_invariants(d, genes, n_genes)
        lo, hi = td.median_bracket(d)
        med = td.median(d)
        for g, x in enumerate(ref_sorted(genes, values, n_genes)):
            if x.size == 0:
                assert np.isnan(lo[g])
                assert np.isnan(hi[g])
                assert np.isnan(med[g])
                continue
            a, b = middle_pair(x)
            assert lo[g] <= a <= b <= hi[g]
            assert lo[g] <= med[g] <= hi[g]


def test_median_bracket_is_tight() -> None:
    rng = np.random.default_rng(3)
    n = 50_000
    x = rng.lognormal(0.0, 1.0, n)
    genes = np.zeros(n, np.int64)
    n_bins = int(td.DEFAULT_COMPRESSION) // 2
    d = td.from_values(genes, x, 1)
    lo, hi = td.median_bracket(d)
    inside = ((x >= lo[0]) & (x <= hi[0])).mean()
    # a fresh digest: exactly the bin(s) holding the middle ranks
    assert inside <= 2 / n_bins + 2 / n
    labels = rng.integers(0, 16, n)
    parts = [td.from_values(genes[labels == i], x[labels == i], 1) for i in range(16)]
    lo, hi = td.median_bracket(tree_merge(parts, 8))
    inside = ((x >= lo[0]) & (x <= hi[0])).mean()
    assert inside <= 8 / n_bins


def test_bracket_uses_min_and_max_as_values() -> None:
    """A weight-2 centroid is exactly its min and max: the bracket can be a single point."""
    d = td.Digests(
        offsets=np.array([0, 2]),
        means=np.array([1.5, 10.0]),
        weights=np.array([2, 2]),
        mins=np.array([1.0, 9.0]),
        maxs=np.array([2.0, 11.0]),
        compression=4.0,
    )
    # values {1, 2, 9, 11}: middle pair (2, 9); min/max-only bounds would give [1, 11]
    lo, hi = td.median_bracket(d)
    assert (lo[0], hi[0]) == (2.0, 9.0)
    # centres at ranks 0.5 and 2.5, target 1.5: halfway between the means
    assert td.median(d)[0] == 5.75


# --------------------------------------------------------------------------- determinism


@FEW
@given(data=large_inputs(), seed=st.integers(0, 2**32 - 1))
def test_deterministic_bytes(data: tuple[np.ndarray, np.ndarray, int, float], seed: int) -> None:
    genes, values, n_genes, compression = data
    a = td.from_values(genes, values, n_genes, compression)
    b = td.from_values(genes.copy(), values.copy(), n_genes, compression)
    assert state_bytes(a) == state_bytes(b)
    # the build sorts (gene, value) pairs fully: input order does not matter at all
    perm = np.random.default_rng(seed).permutation(genes.size)
    assert state_bytes(td.from_values(genes[perm], values[perm], n_genes, compression)) == (
        state_bytes(a)
    )
    labels = np.random.default_rng(seed).integers(0, 5, genes.size)
    parts = [
        td.from_values(genes[labels == i], values[labels == i], n_genes, compression)
        for i in range(5)
    ]
    copies = [pickle.loads(pickle.dumps(p)) for p in parts]
    assert state_bytes(td.merge(parts)) == state_bytes(td.merge(copies))
    assert state_bytes(tree_merge(parts, 2)) == state_bytes(tree_merge(copies, 2))


def test_merge_does_not_depend_on_internal_gene_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    n_genes = 300
    genes = rng.integers(0, n_genes, 200_000)
    values = rng.lognormal(0, 1, genes.size)
    labels = rng.integers(0, 8, genes.size)
    parts = [td.from_values(genes[labels == i], values[labels == i], n_genes) for i in range(8)]
    whole = state_bytes(td.merge(parts))
    ranges = td.gene_ranges
    monkeypatch.setattr(td, "gene_ranges", lambda items: ranges(items, 97))
    assert len(ranges(np.diff(parts[0].offsets), 97)) > 10
    assert state_bytes(td.merge(parts)) == whole


def test_lossy_sort_keys_are_repaired() -> None:
    """Many genes and values spanning the float range leave few bits for the value code.

    Values one ulp apart then share a code; the build must still sort them exactly.
    """
    n_genes = 2**20
    rng = np.random.default_rng(5)
    near = np.nextafter(1.0, 2.0, dtype=np.float64) + np.arange(3000) * np.spacing(1.0)
    values = np.concatenate([rng.permutation(near), [1e-300, 1e300]])
    genes = np.full(values.size, n_genes - 1)
    genes[-2:] = 0
    srt = sort_key(values, n_genes, lambda out: out.__setitem__(Ellipsis, genes))
    assert srt.shift > 0  # the test exercises the lossy path
    for compression in (10_000.0, 200.0):
        d = td.from_values(genes, values, n_genes, compression)
        check_invariants_sparse(d, genes, n_genes)
        x = np.sort(near)
        if compression > 2 * x.size:
            assert td.median(d)[-1] == np.median(x)
        a, b = middle_pair(x)
        lo, hi = td.median_bracket(d)
        assert lo[-1] <= a <= b <= hi[-1]
        s = slice(d.offsets[-2], d.offsets[-1])
        assert (np.diff(d.means[s]) > 0).all()
        first = np.cumsum(d.weights[s]) - d.weights[s]  # a fresh digest's bins are rank ranges
        np.testing.assert_array_equal(d.mins[s], x[first])
        np.testing.assert_array_equal(d.maxs[s], x[first + d.weights[s] - 1])


def check_invariants_sparse(d: td.Digests, genes: np.ndarray, n_genes: int) -> None:
    np.testing.assert_array_equal(d.counts, np.bincount(genes, minlength=n_genes))
    assert (d.mins <= d.means).all()
    assert (d.means <= d.maxs).all()


# --------------------------------------------------------------------------- edge cases


def test_no_genes_and_no_values() -> None:
    d = td.from_values(np.zeros(0, np.int64), np.zeros(0), 0)
    assert d.n_genes == 0
    assert d.counts.shape == (0,)
    assert td.median(d).shape == (0,)
    assert td.merge([d, d]).n_genes == 0
    e = td.from_values([], [], 4)
    assert np.isnan(td.median(e)).all()
    lo, hi = td.median_bracket(e)
    assert np.isnan(lo).all()
    assert np.isnan(hi).all()
    assert td.merge([e, td.empty(4)]).means.size == 0


def test_one_value_and_genes_never_seen() -> None:
    d = td.from_values([3], [2.5], 6)
    med = td.median(d)
    assert med[3] == 2.5
    assert np.isnan(np.delete(med, 3)).all()
    assert td.median_bracket(d)[0][3] == td.median_bracket(d)[1][3] == 2.5
    np.testing.assert_array_equal(d.counts, [0, 0, 0, 1, 0, 0])


@pytest.mark.parametrize("n", [1, 2, 99, 100, 101, 300, 5000])
def test_all_equal_values(n: int) -> None:
    v = 0.1  # the sum of 3 or 50 copies of 0.1, divided by 3 or 50, is not 0.1
    d = td.from_values(np.zeros(n, np.int64), np.full(n, v), 1)
    assert td.median(d)[0] == v
    assert (d.means == v).all()
    assert td.median_bracket(d) == (np.array([v]), np.array([v]))
    m = td.merge([d, d, d])
    assert td.median(m)[0] == v
    assert m.counts[0] == 3 * n


def test_gene_only_in_one_part_is_unchanged() -> None:
    rng = np.random.default_rng(2)
    a = td.from_values(np.zeros(5000, np.int64), rng.lognormal(0, 1, 5000), 3)
    b = td.from_values(np.full(400, 2), rng.lognormal(0, 1, 400), 3)
    m = td.merge([a, b])
    for g, src in ((0, a), (2, b)):
        s, t = slice(m.offsets[g], m.offsets[g + 1]), slice(src.offsets[g], src.offsets[g + 1])
        for name in ("means", "weights", "mins", "maxs"):
            np.testing.assert_array_equal(getattr(m, name)[s], getattr(src, name)[t])
    assert m.counts[1] == 0
    assert np.isnan(td.median(m)[1])


def test_merge_single_and_empty_parts() -> None:
    d = td.from_values([0, 1, 1], [1.0, 2.0, 3.0], 2)
    assert td.merge([d]) is d
    assert td.merge([td.empty(2), d, td.empty(2)]) is d
    with pytest.raises(ValueError, match="at least one"):
        td.merge([])
    with pytest.raises(ValueError, match="same n_genes and compression"):
        td.merge([d, td.empty(3)])
    with pytest.raises(ValueError, match="same n_genes and compression"):
        td.merge([d, td.empty(2, compression=50)])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf, -0.0])
def test_values_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="positive and finite"):
        td.from_values([0, 0], [1.0, bad], 1)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"gene indices must be in \[0, 2\)"):
        td.from_values([0, 2], [1.0, 1.0], 2)
    with pytest.raises(ValueError, match="gene indices"):
        td.from_values([-1], [1.0], 2)
    with pytest.raises(TypeError, match="integer gene indices"):
        td.from_values([0.0], [1.0], 2)
    with pytest.raises(ValueError, match="equal length"):
        td.from_values([0, 1], [1.0], 2)
    with pytest.raises(ValueError, match="compression"):
        td.from_values([0], [1.0], 1, compression=1.0)
    with pytest.raises(ValueError, match="n_genes"):
        td.empty(-1)
    with pytest.raises(ValueError, match="q must be in"):
        td.quantile(td.empty(1), 1.5)


# --------------------------------------------------------------------------- from_csr


def test_from_csr_uses_count_over_total_times_10000() -> None:
    # pairs where (c / n) * 1e4 differs from c * 1e4 / n and from c * (1e4 / n)
    pairs = [
        (c, n)
        for c in range(1, 40)
        for n in range(50, 400)
        if (c / n) * 10_000.0 != c * 10_000.0 / n and (c / n) * 10_000.0 != c * (10_000.0 / n)
    ][:25]
    assert len(pairs) == 25
    counts = np.array([c for c, _ in pairs], np.int32)
    totals = np.array([n for _, n in pairs], np.float64)
    block = sp.csr_matrix((counts, np.arange(25), np.arange(26)), shape=(25, 25))
    med = td.median(td.from_csr(block, totals))
    np.testing.assert_array_equal(med, (counts / totals) * 10_000.0)


def test_from_csr_ignores_explicit_zeros_and_sums_duplicates() -> None:
    data = np.array([3, 0, 5, 0, 2, 2], np.int64)
    indices = np.array([0, 1, 2, 0, 2, 2])
    indptr = np.array([0, 3, 6])
    block = sp.csr_matrix((data, indices, indptr), shape=(2, 3))  # row 1: explicit 0, dup 2+2
    n_counts = np.array([8.0, 4.0])
    d = td.from_csr(block, n_counts)
    np.testing.assert_array_equal(d.counts, [1, 0, 2])
    ref = td.from_values([0, 2, 2], [(3 / 8) * 1e4, (5 / 8) * 1e4, (4 / 4) * 1e4], 3)
    assert state_bytes(d) == state_bytes(ref)
    assert block.data.tolist() == [3, 0, 5, 0, 2, 2]  # input untouched


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(1, 120),
    n_genes=st.integers(1, 60),
    build_items=st.sampled_from([1, 7, 100, 1 << 16]),
)
def test_from_csr_matches_from_values_on_random_blocks(
    seed: int, n_cells: int, n_genes: int, build_items: int
) -> None:
    """The gene-range build of from_csr equals one sort of all (gene, value) pairs, whatever
    the range size (ties from equal counts and totals included)."""
    rng = np.random.default_rng(seed)
    dense = rng.poisson(0.5, (n_cells, n_genes)) * rng.integers(1, 4, (n_cells, n_genes))
    dense[0] = 0  # an empty cell
    block = sp.csr_array(dense.astype(np.float32))
    n_counts = dense.sum(axis=1) + rng.integers(1, 3, n_cells).astype(np.float64)
    rows, cols = np.nonzero(dense)
    values = (dense[rows, cols].astype(np.float64) / n_counts[rows]) * 10_000.0
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(td, "_BUILD_ITEMS", build_items)
        got = td.from_csr(block, n_counts, 30)
    assert state_bytes(got) == state_bytes(td.from_values(cols, values, n_genes, 30))


def test_from_csr_errors() -> None:
    block = sp.csr_matrix(np.array([[1, 0], [0, 2]]))
    with pytest.raises(TypeError, match="CSR"):
        td.from_csr(block.tocsc(), [1.0, 2.0])
    with pytest.raises(TypeError, match="CSR"):
        td.from_csr(block.toarray(), [1.0, 2.0])
    with pytest.raises(ValueError, match="one entry per row"):
        td.from_csr(block, [1.0])
    with pytest.raises(ValueError, match="positive and finite"):
        td.from_csr(sp.csr_matrix(np.array([[1, -1]])), [1.0])
    with pytest.raises(ValueError, match=r"n_counts must be positive and finite.*rows \[0\]"):
        td.from_csr(block, [0.0, 2.0])
    with pytest.raises(ValueError, match="n_counts must be positive and finite"):
        td.from_csr(block, [1.0, np.nan])
    assert td.from_csr(sp.csr_matrix((2, 2)), [0.0, 0.0]).counts.tolist() == [0, 0]


# --------------------------------------------------------------------------- state


def test_storage_round_trip_and_pickle() -> None:
    rng = np.random.default_rng(4)
    genes = rng.integers(0, 50, 20_000)
    d = td.from_values(genes, rng.lognormal(0, 1, genes.size), 50)
    arrays = td.to_arrays(d)
    assert set(arrays) == {"offsets", "means", "weights", "mins", "maxs", "compression"}
    assert all(a.ndim == 1 for k, a in arrays.items() if k != "compression")
    back = td.from_arrays({k: np.asarray(v).tolist() for k, v in arrays.items()})
    assert state_bytes(back) == state_bytes(d)
    assert back.compression == d.compression
    p = pickle.loads(pickle.dumps(d))
    assert state_bytes(p) == state_bytes(d)
    assert len(pickle.dumps(d)) < d.nbytes + 2000
    assert d.nbytes == sum(a.nbytes for k, a in arrays.items() if k != "compression")
    with pytest.raises(ValueError, match="missing"):
        td.from_arrays({k: v for k, v in arrays.items() if k != "mins"})


def test_state_is_validated() -> None:
    ok: dict[str, Any] = {
        "offsets": np.array([0, 1]),
        "means": np.array([1.0]),
        "weights": np.array([1]),
        "mins": np.array([1.0]),
        "maxs": np.array([1.0]),
        "compression": 10.0,
    }
    td.Digests(**ok)
    for change, error, match in (
        ({"weights": np.array([1.0])}, TypeError, "weights must be a numpy array of dtype int64"),
        ({"means": [1.0]}, TypeError, "means must be a numpy array of dtype float64"),
        ({"maxs": np.ones((1, 1))}, ValueError, "maxs must be 1-D"),
        ({"mins": np.array([1.0, 2.0])}, ValueError, "shape of means"),
        ({"offsets": np.array([0, 2])}, ValueError, "offsets must"),
        ({"offsets": np.array([1, 1])}, ValueError, "offsets must"),
        ({"compression": 1.0}, ValueError, "compression"),
    ):
        with pytest.raises(error, match=match):
            td.Digests(**{**ok, **change})
