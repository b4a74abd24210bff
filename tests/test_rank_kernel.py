"""The numpy kernels of the encoding against slow references: ``flow.encode._kernels`` (the exact
rank kernel), its Dask wiring ``flow.encode.rank``, and the shared ``flow._kernels``
(normalisation rule, canonical CSR, single-chunk check)."""

from __future__ import annotations

import itertools
from typing import Any

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp
from dask.array.utils import assert_eq
from hypothesis import given, settings
from hypothesis import strategies as st

import flow._kernels as base
import flow.encode._kernels as K
from flow.encode._kernels import rank_block, ranked_values, value_matrix
from flow.encode.rank import rank_cells
from flow.errors import ChunkingError, InputError
from flow.sketch import _tdigest as td
from flow.vocab import Vocabulary, build_gene_map

from helpers import no_compute
from reference import reference_rank_cell, upstream_rank_cell
from strategies import axis_chunks, chunked_arrays, csr_blocks, tied_blocks

PAD = 0


def values_at_ranks(ranked, ranked_counts, n_counts, medians, tokens) -> np.ndarray:
    """float64 values at each rank from the ranked counts (what the encoding store derives)."""
    median_of_token = np.ones(int(np.max(tokens)) + 1 if np.size(tokens) else 1)
    median_of_token[np.asarray(tokens)] = medians
    safe = np.where(ranked_counts > 0, ranked, np.asarray(tokens)[0] if np.size(tokens) else 0)
    return ranked_values(ranked_counts, n_counts, median_of_token[safe])


def _reference_values(row: np.ndarray, n: float, medians: np.ndarray, tokens: np.ndarray) -> list:
    """Values of the reference ranking, in ranked order (Python floats)."""
    pairs = [
        (((float(c) / float(n)) * 10000.0) / float(medians[j]), int(tokens[j]))
        for j, c in enumerate(row.tolist())
        if c > 0
    ]
    return [v for v, _ in sorted(pairs, key=lambda p: (-p[0], p[1]))]


def check_against_reference(
    dense: np.ndarray,
    block: Any,
    n_counts: np.ndarray,
    medians: np.ndarray,
    tokens: np.ndarray,
    width: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ranked, counts, lengths = rank_block(block, n_counts, medians, tokens, width, PAD)
    values = values_at_ranks(ranked, counts, n_counts, medians, tokens)
    n_cells = dense.shape[0]
    assert ranked.shape == (n_cells, width)
    assert counts.shape == (n_cells, width)
    assert lengths.shape == (n_cells,)
    assert ranked.dtype == np.asarray(tokens).dtype
    assert counts.dtype == block.dtype
    assert lengths.dtype == np.int32
    for i in range(n_cells):
        ref = reference_rank_cell(dense[i], n_counts[i], medians, tokens)
        k = min(width, ref.size)
        assert lengths[i] == ref.size == int((dense[i] > 0).sum())
        np.testing.assert_array_equal(ranked[i, :k], ref[:k])
        assert (ranked[i, k:] == PAD).all()
        ref_values = np.array(_reference_values(dense[i], n_counts[i], medians, tokens)[:k])
        np.testing.assert_array_equal(values[i, :k], ref_values)  # bit for bit
        assert (values[i, k:] == 0).all()
    return ranked, values, lengths


# ------------------------------------------------------------------------------ properties


@given(tied_blocks())
def test_equals_reference_with_ties(case: dict[str, Any]) -> None:
    counts = case["counts"]
    check_against_reference(
        counts,
        sp.csr_matrix(counts),
        case["n_counts"],
        case["medians"],
        case["tokens"],
        case["width"],
    )


@given(tied_blocks(), st.sampled_from([1, 2, 3, 5, 9]))
def test_equals_reference_with_truncated_keys(case: dict[str, Any], value_bits: int) -> None:
    """Force the value field down to a few bits: the exact re-sort must repair every row."""
    counts = case["counts"]
    old = K._MAX_VALUE_BITS
    K._MAX_VALUE_BITS = value_bits
    try:
        check_against_reference(
            counts,
            sp.csr_array(counts),
            case["n_counts"],
            case["medians"],
            case["tokens"],
            case["width"],
        )
    finally:
        K._MAX_VALUE_BITS = old


@given(tied_blocks(), st.integers(1, 40))
def test_independent_of_slicing(case: dict[str, Any], slice_nnz: int) -> None:
    counts = case["counts"]
    args = (case["n_counts"], case["medians"], case["tokens"], case["width"], PAD)
    whole = rank_block(sp.csr_matrix(counts), *args)
    old = K._SLICE_NNZ
    K._SLICE_NNZ = slice_nnz  # type: ignore[misc]
    try:
        sliced = rank_block(sp.csr_matrix(counts), *args)
    finally:
        K._SLICE_NNZ = old  # type: ignore[misc]
    for a, b in zip(whole, sliced, strict=True):
        np.testing.assert_array_equal(a, b)


@given(tied_blocks(), st.integers(0, 2**32 - 1))
def test_independent_of_column_order_and_storage(case: dict[str, Any], seed: int) -> None:
    """Permuted columns, unsorted CSR indices, split duplicates and explicit zeros: same result."""
    counts, med, tok = case["counts"], case["medians"], case["tokens"]
    args = (case["n_counts"], case["width"], PAD)
    expected = rank_block(sp.csr_matrix(counts), args[0], med, tok, args[1], PAD)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(counts.shape[1])
    got = rank_block(sp.csr_matrix(counts[:, perm]), args[0], med[perm], tok[perm], args[1], PAD)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    # COO with every count split into 1s (duplicates), explicit zeros, shuffled order
    rows, cols = np.nonzero(counts)
    reps = counts[rows, cols]
    r = np.concatenate([np.repeat(rows, reps), rng.integers(0, counts.shape[0], 5)])
    c = np.concatenate([np.repeat(cols, reps), rng.integers(0, counts.shape[1], 5)])
    d = np.concatenate([np.ones(reps.sum(), np.int32), np.zeros(5, np.int32)])
    order = rng.permutation(r.size)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r[order], minlength=counts.shape[0]))])
    by_row = np.argsort(r[order], kind="stable")
    messy = sp.csr_matrix((d[order][by_row], c[order][by_row], indptr), shape=counts.shape)
    if reps.sum() > 1 and reps.max() > 1:
        assert not messy.has_canonical_format  # split counts are duplicates
    got = rank_block(messy, args[0], med, tok, args[1], PAD)
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=300)
@given(
    tied_blocks(),
    st.integers(0, 2**32 - 1),
    st.sampled_from([2, 5, 64]),
    st.sampled_from([0.0, 0.05, 1.0]),
)
def test_unsorted_unique_rows_rank_as_sorted_ones(
    case: dict[str, Any], seed: int, value_bits: int, max_resorted: float
) -> None:
    """``rows_unique``: each row's entries shuffled (no column twice) are ranked as they are,
    with no sort first; ties (many in these blocks) still come out in token order, also when
    truncated value fields send rows to the exact re-sort; and when the first slice's ties
    make the block sort its rows first (``max_resorted``: 1.0 never, 0.0 at the first tie)."""
    order = np.argsort(case["tokens"])  # columns in token order: rows are left as they are
    counts = case["counts"][:, order]
    args = (case["n_counts"], case["medians"][order], case["tokens"][order])
    expected = K.rank_block_flat(sp.csr_array(counts), *args)
    x = sp.csr_array(counts)
    rng = np.random.default_rng(seed)
    shuffled = np.concatenate(
        [rng.permutation(np.arange(a, b)) for a, b in itertools.pairwise(x.indptr)]
        or [np.zeros(0, np.int64)]
    ).astype(np.int64)
    loose = sp.csr_array((x.data[shuffled], x.indices[shuffled], x.indptr), shape=x.shape)
    old = K._MAX_VALUE_BITS, K._MAX_RESORTED
    K._MAX_VALUE_BITS, K._MAX_RESORTED = value_bits, max_resorted
    try:
        got = K.rank_block_flat(loose, *args, rows_unique=True)
    finally:
        K._MAX_VALUE_BITS, K._MAX_RESORTED = old
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)


@given(tied_blocks())
def test_row_invariants(case: dict[str, Any]) -> None:
    counts = case["counts"]
    full = counts.shape[1]
    ranked, ranked_counts, lengths = rank_block(
        sp.csr_matrix(counts), case["n_counts"], case["medians"], case["tokens"], full, PAD
    )
    values = values_at_ranks(
        ranked, ranked_counts, case["n_counts"], case["medians"], case["tokens"]
    )
    for i in range(counts.shape[0]):
        n = int(lengths[i])
        detected = set(case["tokens"][counts[i] > 0].tolist())
        assert sorted(ranked[i, :n].tolist()) == sorted(detected)  # a permutation
        assert (ranked[i, n:] == PAD).all()
        assert bool(np.all(np.diff(values[i, :n]) <= 0))  # non-increasing
        assert (values[i, :n] > 0).all()
    # truncation keeps a prefix
    w = max(full // 2, 1)
    short = rank_block(
        sp.csr_matrix(counts), case["n_counts"], case["medians"], case["tokens"], w, PAD
    )
    np.testing.assert_array_equal(short[0], ranked[:, :w])
    np.testing.assert_array_equal(short[1], ranked_counts[:, :w])
    np.testing.assert_array_equal(short[2], lengths)


@settings(max_examples=20)
@given(st.integers(0, 2**32 - 1))
def test_parity_with_upstream_outside_ties(seed: int) -> None:
    """Continuous medians: no ties, so upstream's unstable argsort gives the same tokens."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, (8, 60)) * (rng.random((8, 60)) < 0.5)
    medians = rng.lognormal(0.5, 0.7, 60)
    tokens = (rng.permutation(60) + 2).astype(np.uint16)
    n_counts = counts.sum(1) * 1.7 + 1
    ranked, ranked_counts, lengths = rank_block(
        sp.csr_matrix(counts), n_counts, medians, tokens, 60, PAD
    )
    values = values_at_ranks(ranked, ranked_counts, n_counts, medians, tokens)
    for i in range(8):
        up = upstream_rank_cell(counts[i], n_counts[i], medians, tokens)
        vals = values[i, : lengths[i]]
        assert np.unique(vals).size == vals.size  # really no ties
        np.testing.assert_array_equal(ranked[i, : lengths[i]], up)


@given(tied_blocks())
def test_upstream_differs_only_within_ties(case: dict[str, Any]) -> None:
    counts, med, tokens = case["counts"], case["medians"], case["tokens"]
    n_genes = counts.shape[1]
    ranked, _, lengths = rank_block(
        sp.csr_matrix(counts), case["n_counts"], med, tokens, n_genes, PAD
    )
    col_of = {int(t): j for j, t in enumerate(tokens)}
    for i in range(counts.shape[0]):
        n_c = case["n_counts"][i]
        up = upstream_rank_cell(counts[i], n_c, med, tokens)
        n = int(lengths[i])
        assert up.size == n

        def value(t: int, i: int = i, n_c: float = n_c) -> float:
            j = col_of[int(t)]
            return ((float(counts[i, j]) / n_c) * 10000.0) / float(med[j])

        ours = ranked[i, :n].tolist()
        # identical float64 value sequences ...
        assert [value(t) for t in up] == [value(t) for t in ours]
        # ... so tokens differ only inside groups of equal values, as sets
        groups: dict[float, tuple[set[int], set[int]]] = {}
        for t_up, t_ours in zip(up.tolist(), ours, strict=True):
            groups.setdefault(value(t_ours), (set(), set()))[0].add(t_ours)
            groups.setdefault(value(t_up), (set(), set()))[1].add(t_up)
        assert all(a == b for a, b in groups.values())


# ------------------------------------------------------------------------------ edge cases


def test_exact_float64_ties_and_near_ties() -> None:
    """Equal values tie (token order), values one ulp apart never do."""
    m = np.array([1.0, 1.0, np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0), 2.0, 0.5])
    tokens = np.array([9, 5, 7, 8, 6, 4], dtype=np.uint16)
    counts = np.array([[1, 1, 1, 1, 2, 0], [1, 1, 1, 1, 1, 1]])
    n = np.array([10.0, 10.0])
    ranked, _, lengths = rank_block(sp.csr_matrix(counts), n, m, tokens, 6, PAD)
    # row 0: token 6 (2/2=1*k) ties with tokens 5, 9 (1/1); 8 (smaller median) first of those
    assert ranked[0].tolist() == [8, 5, 6, 9, 7, 0]
    assert ranked[1].tolist() == [4, 8, 5, 9, 7, 6]
    assert lengths.tolist() == [5, 6]


def test_wide_value_range_with_near_equal_values() -> None:
    """A value range that forces truncation at full key width; distinct values 1 ulp apart."""
    rng = np.random.default_rng(7)
    n_genes = 400
    medians = 1.0 + np.arange(n_genes)[::-1] * 2.0**-50  # increasing values along columns
    medians[::40] = 1e-9  # huge values widen the range
    tokens = np.arange(2, n_genes + 2, dtype=np.uint16)
    counts = (rng.random((30, n_genes)) < 0.7).astype(np.int32)
    n_counts = counts.sum(1).astype(np.float64) + 3
    check_against_reference(counts, sp.csr_matrix(counts), n_counts, medians, tokens, n_genes)


def test_empty_cells_and_blocks() -> None:
    counts = np.array([[0, 0, 0], [0, 2, 0], [0, 0, 0]])
    n = np.array([0.0, 5.0, 0.0])  # n_counts 0 is fine for a cell without counts
    ranked, ranked_counts, lengths = rank_block(
        sp.csr_matrix(counts), n, np.ones(3), np.arange(1, 4), 2, PAD
    )
    assert lengths.tolist() == [0, 1, 0]
    assert ranked.tolist() == [[0, 0], [2, 0], [0, 0]]
    assert ranked_counts.tolist() == [[0, 0], [2, 0], [0, 0]]
    values = values_at_ranks(ranked, ranked_counts, n, np.ones(3), np.arange(1, 4))
    assert values[1, 0] == (2 / 5) * 10000
    assert values[0, 0] == 0
    ranked, values, lengths = rank_block(
        sp.csr_matrix((0, 3), dtype=np.int32),
        np.zeros(0),
        np.ones(3),
        np.arange(1, 4, dtype=np.uint8),
        4,
        PAD,
    )
    assert ranked.shape == (0, 4)
    assert ranked.dtype == np.uint8
    ranked, _, lengths = rank_block(sp.csr_matrix(counts), n, np.ones(3), np.arange(1, 4), 0, PAD)
    assert ranked.shape == (3, 0)
    assert lengths.tolist() == [0, 1, 0]


def test_float_counts_and_dense_input() -> None:
    counts = np.array([[0.5, 0.0, 2.25], [1.0, 1.0, 0.0]], dtype=np.float32)
    med = np.array([1.0, 2.0, 3.0])
    tok = np.array([10, 11, 12], dtype=np.uint16)
    n = np.array([2.75, 2.0])
    check_against_reference(counts, counts, n, med, tok, 3)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("bad", [-1.0, np.nan])
def test_bad_counts_name_the_cell(bad: float) -> None:
    counts = np.ones((4, 3))
    counts[2, 1] = bad
    with pytest.raises(InputError, match=r"cell 2\b") as info:
        rank_block(sp.csr_matrix(counts), np.full(4, 3.0), np.ones(3), np.arange(3), 3, 9)
    assert ("NaN" if np.isnan(bad) else "negative") in str(info.value)
    with pytest.raises(InputError, match=r"cell 102 \(row 2 of this block\)"):
        rank_block(
            sp.csr_matrix(counts), np.full(4, 3.0), np.ones(3), np.arange(3), 3, 9, row_offset=100
        )


def test_negative_integer_counts() -> None:
    counts = sp.csr_matrix(np.array([[1, 0], [0, -3]], dtype=np.int32))
    with pytest.raises(InputError, match=r"negative \(-3\) count in cell 1"):
        rank_block(counts, np.array([1.0, 1.0]), np.ones(2), np.arange(2), 2, 5)


@pytest.mark.parametrize("bad_n", [0.0, -2.0, np.nan, np.inf])
def test_bad_n_counts(bad_n: float) -> None:
    counts = np.array([[1, 2], [3, 0]])
    with pytest.raises(InputError, match=r"n_counts .* cell 1"):
        rank_block(sp.csr_matrix(counts), np.array([3.0, bad_n]), np.ones(2), np.arange(2), 2, 5)


def test_bad_medians_only_matter_when_used() -> None:
    counts = sp.csr_matrix(np.array([[1, 0, 2]]))
    ok = rank_block(counts, np.array([3.0]), np.array([1.0, np.nan, 2.0]), np.arange(3), 3, 5)
    assert ok[0].tolist() == [[0, 2, 5]]  # 1/3e4/1 vs 2/3e4/2: equal values, token order
    with pytest.raises(InputError, match="token 2"):
        rank_block(counts, np.array([3.0]), np.array([1.0, 1.0, 0.0]), np.arange(3), 3, 5)


def test_argument_checks() -> None:
    x = sp.csr_matrix(np.ones((2, 3)))
    with pytest.raises(InputError, match="one entry per cell"):
        rank_block(x, np.ones(3), np.ones(3), np.arange(3), 3, 9)
    with pytest.raises(InputError, match="one entry per column"):
        rank_block(x, np.ones(2), np.ones(2), np.arange(3), 3, 9)
    with pytest.raises(InputError, match="fit the token dtype"):
        rank_block(x, np.ones(2), np.ones(3), np.arange(3, dtype=np.uint8), 3, 256)
    with pytest.raises(InputError, match="unique"):
        rank_block(x, np.ones(2), np.ones(3), np.array([1, 3, 1]), 3, 9)
    with pytest.raises(InputError, match="integers"):
        rank_block(x, np.ones(2), np.ones(3), np.array([1.0, 2.0, 3.0]), 3, 9)
    with pytest.raises(InputError, match="width"):
        rank_block(x, np.ones(2), np.ones(3), np.arange(3), -1, 9)


# ------------------------------------------------------------------------------ values


def test_value_matrix_fixed_arithmetic() -> None:
    """Exactly ((count / n) * 10000) / median in float64; other orders give other bits."""
    rng = np.random.default_rng(3)
    counts = rng.integers(1, 50, (50, 40)).astype(np.float64)
    n = rng.integers(100, 100_000, 50).astype(np.float64)
    med = rng.lognormal(0.0, 1.0, 40)
    got = value_matrix(sp.csr_matrix(counts), n, med)
    assert got.dtype == np.float64
    dense = got.toarray()
    ref = np.array(
        [
            [((float(c) / float(n[i])) * 10000.0) / float(med[j]) for j, c in enumerate(row)]
            for i, row in enumerate(counts)
        ]
    )
    assert np.array_equal(dense, ref)
    # upstream's dense expression agrees bit for bit...
    assert np.array_equal(dense, counts / n[:, None] * 10000 / med)
    # ...while scipy's sparse division (multiply by reciprocals) or other orders differ
    assert not np.array_equal(dense, counts * (1 / n[:, None]) * 10000 * (1 / med))
    assert not np.array_equal(dense, counts * 10000 / (n[:, None] * med))


def test_value_matrix_keeps_pattern() -> None:
    x = sp.csr_matrix((np.array([0, 3]), np.array([0, 2]), np.array([0, 1, 2])), shape=(2, 3))
    got = value_matrix(x, np.array([1.0, 6.0]), np.array([1.0, 1.0, 4.0]))
    assert got.nnz == 2
    assert got.toarray().tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 1250.0]]


# ------------------------------------------------------------------------------ canonical CSR


@given(
    st.integers(1, 12),
    st.integers(1, 20),
    st.integers(0, 80),
    st.integers(0, 2**32 - 1),
    st.sampled_from([np.int32, np.float32, np.int64]),
    st.integers(1, 50),
)
def test_canonical_csr_equals_scipy(
    n_rows: int, n_cols: int, nnz: int, seed: int, dtype: type, slice_nnz: int
) -> None:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.integers(0, n_rows, nnz))
    cols = rng.integers(0, n_cols, nnz)  # unsorted, with duplicates
    data = rng.integers(0, 4, nnz).astype(dtype)  # explicit zeros too
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    messy = sp.csr_array((data, cols.astype(np.int32), indptr), shape=(n_rows, n_cols))
    expected = messy.copy()
    expected.sum_duplicates()
    old = base._SLICE_NNZ
    base._SLICE_NNZ = slice_nnz  # type: ignore[misc]
    try:
        got = base.canonical_csr(messy)
    finally:
        base._SLICE_NNZ = old  # type: ignore[misc]
    assert got.has_sorted_indices
    assert got.dtype == messy.dtype
    np.testing.assert_array_equal(got.toarray(), messy.toarray())
    # same structure as scipy's, except that scipy also drops the zeros it sums to
    kept = expected.copy()
    kept.eliminate_zeros()
    dropped = got.copy()
    dropped.eliminate_zeros()
    np.testing.assert_array_equal(dropped.indptr, kept.indptr)
    np.testing.assert_array_equal(dropped.indices, kept.indices)
    np.testing.assert_array_equal(dropped.data, kept.data)
    assert np.array_equal(messy.data, data)  # input untouched


# ------------------------------------------------------------------------------ flow._kernels


def reference_normalized(data: np.ndarray, indptr: np.ndarray, n_counts: np.ndarray) -> np.ndarray:
    """``(count / n_counts) * 10000`` with Python floats, entry by entry (slow and obvious)."""
    out = [
        (float(data[k]) / float(n_counts[i])) * 10000.0
        for i in range(indptr.size - 1)
        for k in range(int(indptr[i]), int(indptr[i + 1]))
    ]
    return np.array(out, dtype=np.float64)


@given(csr_blocks())
def test_normalized_values_equals_reference(block: tuple[Any, np.ndarray, np.ndarray]) -> None:
    x, n_counts, dense = block
    got = base.normalized_values(x.data, x.indptr, n_counts)
    assert got.dtype == np.float64
    assert got.shape == x.data.shape
    ref = reference_normalized(x.data, x.indptr, n_counts)
    assert got.tobytes() == ref.tobytes()  # bit for bit
    # upstream's dense expression, at the stored entries, agrees too
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    np.testing.assert_array_equal(got, ((dense / n_counts[:, None]) * 10_000)[rows, x.indices])
    # the one rule: the encoding's values with median 1 (x / 1.0 is exact), the medians' values
    assert value_matrix(x, n_counts, np.ones(x.shape[1])).data.tobytes() == ref.tobytes()
    assert base.normalize(x.data, n_counts[rows]).tobytes() == ref.tobytes()
    assert base.TARGET_SUM == 10_000.0


@given(csr_blocks())
def test_normalized_values_feed_the_digests(block: tuple[Any, np.ndarray, np.ndarray]) -> None:
    """The t-digests of a block hold exactly the normalised nonzero values (few per gene)."""
    x, n_counts, _ = block
    d = td.from_csr(sp.csr_matrix(x), n_counts, compression=100.0)  # <= 50 values: exact
    values = base.normalized_values(x.data, x.indptr, n_counts)
    keep = x.data > 0
    for g in range(x.shape[1]):
        want = np.sort(values[keep & (x.indices == g)])
        got = d.means[d.offsets[g] : d.offsets[g + 1]]
        assert got.tobytes() == want.tobytes()


@given(
    st.lists(
        st.tuples(
            st.integers(0, 3), st.sampled_from([0.0, -1.0, 0.5, 7.0, np.nan, np.inf, -np.inf])
        )
    )
)
def test_bad_n_counts_reference(cells: list[tuple[int, float]]) -> None:
    lengths = np.array([c[0] for c in cells], np.int64)
    n_counts = np.array([c[1] for c in cells], np.float64)
    want = [length > 0 and not (0 < n < float("inf")) for length, n in cells]
    assert base.bad_n_counts(lengths, n_counts).tolist() == want


@given(chunked_arrays(), st.data())
def test_require_single_chunk(arrays: tuple[np.ndarray, da.Array], data: st.DataObject) -> None:
    x, dx = arrays
    axis = data.draw(st.integers(0, x.ndim - 1), label="axis")
    with no_compute():  # metadata only
        if dx.numblocks[axis] == 1:
            assert base.require_single_chunk(dx, axis, name="counts") is dx
            fixed = dx
        else:
            with pytest.raises(ChunkingError) as info:
                base.require_single_chunk(dx, axis, name="counts", dim="genes")
            assert isinstance(info.value, ValueError)  # callers catching ValueError still do
            msg = str(info.value)
            assert f"one chunk along axis {axis} (genes)" in msg
            assert f"got {dx.numblocks[axis]} chunks" in msg
            assert f"counts.rechunk({{{axis}: -1}})" in msg
            fixed = base.require_single_chunk(dx.rechunk({axis: -1}), axis, name="counts")
    assert fixed.numblocks[axis] == 1
    assert_eq(fixed, x)


# ------------------------------------------------------------------------------ flow.encode.rank


@settings(deadline=None, max_examples=15)
@given(tied_blocks(), st.data())
def test_rank_cells_equals_kernel_for_any_cell_chunks(
    case: dict[str, Any], data: st.DataObject
) -> None:
    """The lazy ranking of a chunked matrix equals one kernel call on the whole matrix."""
    counts, med, tok = case["counts"], case["medians"], case["tokens"]
    n_cells, n_genes = counts.shape
    ids = np.array([f"ENSG{t:011d}" for t in tok])
    extra = [f"ENSG{9_000_000 + i:011d}" for i in range(3)]  # vocabulary genes not in the store
    vocab = Vocabulary(
        gene_ids=np.array([*ids, *extra]),
        token_ids=np.array([*tok.tolist(), 100, 101, 102]),
        special={"<pad>": 0},
    )
    perm = np.array(data.draw(st.permutations(range(n_genes)), label="store order"), np.int64)
    gene_map = build_gene_map(ids[perm], vocab, min_genes=1)  # store columns: genes perm
    med_kept = med[np.argsort(tok)]  # kept genes are in token order
    cell_chunks = data.draw(axis_chunks(n_cells), label="cell chunks")
    dx = da.from_array(counts[:, perm], chunks=(cell_chunks, -1))
    width = case["width"]
    with no_compute():
        ranked = rank_cells(dx, case["n_counts"], gene_map, med_kept, width=width, pad=PAD)
    tok = tok.astype(vocab.token_dtype)
    want = rank_block(counts, case["n_counts"], med, tok, width, PAD)  # columns in vocab order
    assert ranked.tokens.chunks == (cell_chunks, (width,))
    assert_eq(ranked.tokens, want[0])
    assert_eq(ranked.counts, want[1])
    assert_eq(ranked.lengths, want[2])
    if n_genes > 1:
        with pytest.raises(ChunkingError, match="genes"):
            rank_cells(
                dx.rechunk({1: 1}), case["n_counts"], gene_map, med_kept, width=width, pad=PAD
            )
