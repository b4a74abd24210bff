"""The synthetic generator (:mod:`flow.datasets`): a function of the seed, whatever the read,
and the documented model's statistics, checked against the model's analytic expectations."""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, replace

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.stats as st
from hypothesis import given
from hypothesis import strategies as hs

import flow.datasets as fd
from flow.datasets import RNG_CHUNK, SyntheticCounts, synthetic_counts, write_synthetic
from flow.errors import FlowError

# The documented model (module docstring of flow.datasets), written out independently here.
LIBRARY_SIGMA = 0.35
DOUBLET_DEPTH = 1.8
TYPE_NAMES = ("T cell", "B cell", "NK cell", "monocyte", "dendritic", "platelet")


def _csr(src: SyntheticCounts) -> sp.csr_matrix:
    return src.read_rows(0, src.info.n_cells)


def assert_same_csr(a: sp.csr_matrix, b: sp.csr_matrix) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    assert a.data.dtype == b.data.dtype == np.int32


# --------------------------------------------------------------------------- determinism


def test_a_function_of_the_seed_alone():
    a = _csr(synthetic_counts(2100, 300, seed=4, mean_genes=40))
    b = _csr(synthetic_counts(2100, 300, seed=4, mean_genes=40))
    assert_same_csr(a, b)
    c = _csr(synthetic_counts(2100, 300, seed=5, mean_genes=40))
    assert (a != c).nnz > 0.5 * a.nnz
    # canonical CSR: sorted, unique genes per cell, no stored zeros
    assert a.has_canonical_format
    assert a.has_sorted_indices
    assert (a.data > 0).all()
    assert a.indices.dtype == np.int32


def test_fingerprint_names_the_generator_version():
    src = synthetic_counts(10, 20, seed=1, mean_genes=5)
    assert src.info.fingerprint.startswith(f"synthetic-v{fd._VERSION}-")
    assert src.info.fingerprint != synthetic_counts(10, 20, seed=2, mean_genes=5).info.fingerprint


@functools.cache
def _reference() -> tuple[SyntheticCounts, sp.csr_matrix]:
    """A matrix over several RNG chunks, read whole once."""
    src = synthetic_counts(2 * RNG_CHUNK + 300, 250, seed=9, mean_genes=30, n_types=4)
    return src, _csr(src)


@given(
    block=hs.integers(1, 3 * RNG_CHUNK),
    cuts=hs.lists(hs.integers(0, 2 * RNG_CHUNK + 300), max_size=6),
)
def test_independent_of_block_size_and_row_ranges(block, cuts):
    src, whole = _reference()
    n = src.info.n_cells
    blocks = list(src.iter_blocks(block))
    assert [b.shape[0] for b in blocks[:-1]] == [block] * (len(blocks) - 1)
    assert_same_csr(sp.vstack(blocks, format="csr"), whole)
    bounds = sorted({0, n, *cuts})
    parts = [src.read_rows(a, b) for a, b in itertools.pairwise(bounds)]
    assert [p.shape for p in parts] == [(b - a, 250) for a, b in itertools.pairwise(bounds)]
    assert_same_csr(sp.vstack(parts, format="csr"), whole)


def test_synthetic_data_independent_of_read_size():
    src = synthetic_counts(1100, 100, seed=2, mean_genes=20)
    a = sp.vstack(list(src.iter_blocks(7)))
    b = sp.vstack(list(src.iter_blocks(1100)))
    assert (a != b).nnz == 0
    c = sp.vstack(list(synthetic_counts(1100, 100, seed=3, mean_genes=20).iter_blocks(500)))
    assert (a != c).nnz > 0


def test_edges_and_errors(tmp_path):
    assert list(synthetic_counts(0, 5).iter_blocks(10)) == []
    assert synthetic_counts(0, 5).to_dense().shape == (0, 5)
    src = synthetic_counts(5, 3, seed=1, mean_genes=2)
    assert src.read_rows(5, 5).shape == (0, 3)
    for bad in ((-1, 2), (3, 2), (0, 6)):
        with pytest.raises(ValueError, match="not a range of the"):
            src.read_rows(*bad)
    with pytest.raises(ValueError, match="n_cells must be >= 1"):
        next(src.iter_blocks(0))
    for kwargs in (
        {"n_genes": 0},
        {"n_types": 9},
        {"dispersion": 0.0},
        {"doublet_rate": 2.0},
        {"library_sigma": -0.1},
        {"library_sigma": float("nan")},
    ):
        with pytest.raises(FlowError):
            synthetic_counts(3, **{"n_genes": 4, **kwargs})
    store = write_synthetic(tmp_path / "s.zarr", 600, 300, seed=1, mean_genes=50, block_size=256)
    stored = sp.vstack([store.counts.blocks[i, 0].compute() for i in range(store.n_blocks)])
    want = synthetic_counts(600, 300, seed=1, mean_genes=50).to_dense()
    np.testing.assert_array_equal(stored.toarray(), want)


def test_barcodes_genes_and_cell_types():
    src = synthetic_counts(1500, 12, seed=3, mean_genes=4, n_types=3)
    info = src.info
    assert list(info.barcodes[:2]) == ["CELL000000000-1", "CELL000000001-1"]
    assert info.barcodes[1499] == "CELL000001499-1"
    assert len(set(info.barcodes)) == 1500
    assert list(info.gene_ids[:2]) == ["ENSG00000100000", "ENSG00000100007"]
    assert list(info.gene_symbols[:2]) == ["GENE0", "GENE1"]
    assert set(info.obs["cell_type"]) == {"T cell", "B cell", "NK cell", "doublet"}


# --------------------------------------------------------------------------- kernels


def _grid(mu: float, r: float) -> tuple[fd._Tables, int]:
    m = round(np.log(mu) / fd._GRID)
    tables = fd._tables(m - 5, m + 5, r)
    return tables, 5


@pytest.mark.parametrize("mu", [0.05, 0.8, 3.0, 5.9])
def test_the_nb_table_inverts_to_the_zero_truncated_nb(mu):
    """Dense bins: a uniform past P(0), inverted through the table (and walked on past its
    columns at mu = 5.9), is NB(mu, r) given > 0."""
    r = 1 / 0.3
    tables, i = _grid(mu, r)
    mu = tables.mu[i]
    rng = np.random.default_rng(1)
    u = tables.zero[i] + rng.random(200_000) * (1 - tables.zero[i])
    counts = fd._invert(u, np.full(u.size, i), tables.nb, tables.nb_tail)
    pmf = st.nbinom.pmf(np.arange(1, 400), r, r / (r + mu))
    _assert_distribution(counts, pmf / pmf.sum(), first=1)
    if mu > 5:
        assert counts.max() > fd._COLUMNS + 1  # the walk past the table was exercised


@pytest.mark.parametrize("mu", [0.01, 0.3, 0.55])
def test_the_cluster_table_inverts_to_logarithmic_sizes(mu):
    r = 1 / 0.3
    tables, i = _grid(mu, r)
    theta = tables.mu[i] / (r + tables.mu[i])
    x = np.random.default_rng(2).random(200_000) * tables.rate[i]
    sizes = fd._invert(x, np.full(x.size, i), tables.log, tables.log_tail)
    _assert_distribution(sizes, st.logser.pmf(np.arange(1, 60), theta), first=1)


def test_gamma_poisson_is_the_zero_truncated_nb():
    sampler = synthetic_counts(1, 10, seed=0, mean_genes=3)._sampler
    r, mu = sampler.r, 9.0
    counts = sampler._gamma_poisson(np.random.default_rng(3), np.full(100_000, mu))
    pmf = st.nbinom.pmf(np.arange(1, 400), r, r / (r + mu))
    _assert_distribution(counts, pmf / pmf.sum(), first=1)


def _assert_distribution(x: np.ndarray, pmf: np.ndarray, *, first: int) -> None:
    """Chi-square goodness of fit (cells with expected count >= 20 pooled into a tail)."""
    observed = np.bincount(x - first, minlength=pmf.size)[: pmf.size].astype(float)
    expected = pmf * x.size
    keep = expected >= 20
    cut = int(np.flatnonzero(keep)[-1]) + 1
    obs = np.append(observed[:cut], x.size - observed[:cut].sum())
    exp = np.append(expected[:cut], x.size - expected[:cut].sum())
    stat = ((obs - exp) ** 2 / np.maximum(exp, 1e-9)).sum()
    assert stat < st.chi2.ppf(1 - 1e-6, cut), (stat, cut, obs[:8], exp[:8])


# --------------------------------------------------------------------------- statistics


@dataclass
class Expected:
    """The documented model's analytic expectations for one set of parameters."""

    detected_mean: dict[str, float]  # per cell type (and "doublet")
    detected_sd: float  # over singlets
    gene_mean: np.ndarray  # (types, genes) mean count of singlets
    gene_var: np.ndarray  # (types, genes) variance of a singlet's count
    expressed: np.ndarray  # (types, genes) genes with a mean count >= 1 at the median library
    expressed_mean: np.ndarray  # (types,) expected number of them detected per cell
    expressed_sd: np.ndarray  # (types,) and its sd
    gene_detected: np.ndarray  # (types, genes) detection rate of singlets
    count_pmf: np.ndarray  # P(count = k | count > 0) over all singlet entries, k = 1..7
    total_mean: float  # mean library size of singlets
    log_total_sd: float  # sd of log total counts of singlets


def _expected(src: SyntheticCounts) -> Expected:
    """Integrate the model over the lognormal library size (Gauss-Hermite quadrature)."""
    z, w = np.polynomial.hermite_e.hermegauss(40)
    w = w / w.sum()
    r, p, sigma = 1.0 / src.dispersion, src._profiles, src.library_sigma
    size = src._depth * np.exp(sigma * z)  # (nodes,)

    def q(mu: np.ndarray) -> np.ndarray:  # P(count > 0)
        return st.nbinom.sf(0, r, r / (r + mu))

    mu = size[:, None, None] * p[None]  # (nodes, types, genes)
    det = q(mu)
    det_cell = det.sum(axis=2)  # (nodes, types): E[detected | z, type]
    var_cell = (det * (1 - det)).sum(axis=2)
    mean_types = w @ det_cell
    pairs = [0.5 * (p[a] + p[b]) for a in range(len(p)) for b in range(len(p))]
    dbl = q(DOUBLET_DEPTH * size[:, None, None] * np.array(pairs)[None]).sum(axis=2)
    within = w @ var_cell.mean(axis=1)
    between = w @ (det_cell**2).mean(axis=1) - (w @ det_cell.mean(axis=1)) ** 2
    pmf = st.nbinom.pmf(np.arange(8)[:, None, None, None], r, r / (r + mu[None]))  # k, n, t, g
    pmf_k = np.einsum("n,kntg->k", w, pmf)
    expressed = src._depth * p >= 1
    d_exp = (det * expressed[None]).sum(axis=2)  # (nodes, types)
    v_exp = w @ (det * (1 - det) * expressed[None]).sum(axis=2) + w @ d_exp**2 - (w @ d_exp) ** 2
    var_log = sigma**2 + w @ (1 / size) + src.dispersion * (p**2).sum(axis=1).mean()
    return Expected(
        detected_mean={
            **{TYPE_NAMES[t]: float(mean_types[t]) for t in range(len(p))},
            "doublet": float(w @ dbl.mean(axis=1)),
        },
        detected_sd=float(np.sqrt(within + between)),
        gene_mean=float(w @ size) * p,
        gene_var=np.einsum("n,ntg->tg", w, st.nbinom.var(r, r / (r + mu)))
        + (w @ size**2 - (w @ size) ** 2) * p**2,
        expressed=expressed,
        expressed_mean=w @ d_exp,
        expressed_sd=np.sqrt(v_exp),
        gene_detected=np.einsum("n,ntg->tg", w, det),
        count_pmf=pmf_k[1:] / (p.size - pmf_k[0]),  # entries sum to 1 over k >= 0
        total_mean=float(w @ size),
        log_total_sd=float(np.sqrt(var_log)),
    )


N_CELLS, N_GENES, MEAN_GENES = 12_000, 1_500, 150


@functools.cache
def _sample() -> tuple[SyntheticCounts, sp.csr_matrix, Expected]:
    src = synthetic_counts(N_CELLS, N_GENES, seed=21, mean_genes=MEAN_GENES)
    return src, _csr(src), _expected(src)


def _statistics_failures(src: SyntheticCounts, x: sp.csr_matrix, exp: Expected) -> list[str]:
    """Every documented statistic of ``x`` against the model's expectation ``exp``; the names
    of those outside their tolerance (a few standard errors, plus 1% for the 1% grid)."""
    types = src.info.obs["cell_type"].to_numpy()
    detected = np.diff(x.indptr)
    totals = np.asarray(x.sum(axis=1)).ravel()
    singlet = types != "doublet"
    failed = []

    def check(name: str, got: float, want: float, se: float, rel: float = 0.01) -> None:
        if abs(got - want) > 5 * se + rel * abs(want):
            failed.append(f"{name}: got {got:.4g}, expected {want:.4g} (se {se:.2g})")

    for name, want in exp.detected_mean.items():
        d = detected[types == name]
        check(f"detected genes of {name}", d.mean(), want, d.std() / np.sqrt(d.size))
    d = detected[singlet]
    check("sd of detected genes", d.std(), exp.detected_sd, d.std() / np.sqrt(2 * d.size), 0.03)
    check("median detected genes", float(np.median(d)), MEAN_GENES, 0.0, 0.1)
    check(
        "mean library size",
        totals[singlet].mean(),
        exp.total_mean,
        totals[singlet].std() / np.sqrt(d.size),
    )
    lt = np.log(totals[singlet])
    check(
        "sd of log library size", lt.std(), exp.log_total_sd, lt.std() / np.sqrt(2 * d.size), 0.03
    )
    n_dbl = int((~singlet).sum())
    se = np.sqrt(src.doublet_rate * (1 - src.doublet_rate) / x.shape[0])
    check("doublet fraction", n_dbl / x.shape[0], src.doublet_rate, se, 0.0)
    ratio = np.exp(np.log(totals[~singlet]).mean() - lt.mean())
    check(
        "doublet depth", ratio, DOUBLET_DEPTH, ratio * np.sqrt(lt.var() * (1 / n_dbl + 1 / d.size))
    )
    excess, var = 0.0, 0.0  # over all singlets: detected expressed genes minus expected
    for t, name in enumerate(TYPE_NAMES):  # per-gene means and detection rates, type by type
        xt = x[types == name]
        n = xt.shape[0]
        mean = np.asarray(xt.mean(axis=0)).ravel()
        zm = (mean - exp.gene_mean[t]) / np.sqrt(exp.gene_var[t] / n)
        det = np.bincount(xt.indices, minlength=x.shape[1]) / n
        want = exp.gene_detected[t]
        zd = (det - want) / np.sqrt(want * (1 - want) / n + 1e-12)
        zv = _variance_z(xt, exp.gene_var[t], exp.gene_mean[t] >= 0.05)
        # overdispersion: zeros of the well expressed genes (P(0) = (1 + mu / r)^-r)
        d = np.diff(xt[:, exp.expressed[t]].indptr)
        check(
            f"detected expressed genes of {name}",
            d.mean(),
            exp.expressed_mean[t],
            exp.expressed_sd[t] / np.sqrt(n),
            0.002,
        )
        excess, var = (
            excess + d.sum() - n * exp.expressed_mean[t],
            var + n * exp.expressed_sd[t] ** 2,
        )
        for what, zs in (("mean counts", zm), ("detection rates", zd), ("variances", zv)):
            big = zs[np.abs(zs) > 3]
            if (zs**2).mean() > 1.3 or np.abs(zs).max() > 6:
                failed.append(
                    f"{name} per-gene {what}: mean z^2 {(zs**2).mean():.2f}, {big.size} |z| > 3"
                )
    check("detected expressed genes, all types", excess, 0.0, np.sqrt(var), 0.0)
    values = x[singlet].data
    frac = np.bincount(values, minlength=8)[1:8] / values.size
    for k in range(1, 6):
        se = np.sqrt(frac[k - 1] * (1 - frac[k - 1]) / values.size)
        check(f"fraction of {k}s", frac[k - 1], exp.count_pmf[k - 1], se, 0.003)
    return failed


def _variance_z(x: sp.csr_matrix, want: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Per gene (of ``genes``): (sample variance - ``want``) / its standard error, the error
    from the sample's fourth central moment."""
    c = x[:, genes].toarray().astype(np.float64)
    c -= c.mean(axis=0)
    m2, m4 = (c**2).mean(axis=0), (c**4).mean(axis=0)
    return (m2 - want[genes]) / np.sqrt((m4 - m2**2) / x.shape[0])


def test_statistics_match_the_model():
    src, x, exp = _sample()
    assert _statistics_failures(src, x, exp) == []


def test_statistics_match_the_model_at_a_wider_library_size():
    """``library_sigma`` 0.85 (shaped like real droplet sets): the same statistics hold, and
    the tail of detected genes per cell is the wider one."""
    src = synthetic_counts(N_CELLS, N_GENES, seed=22, mean_genes=MEAN_GENES, library_sigma=0.85)
    x = _csr(src)
    # Per-gene variances are left out here: every gene's includes the spread of the cells'
    # library sizes, one lognormal sample shared by all genes, whose sample variance is skewed
    # (mostly below its mean) at sigma 0.85, so per-gene errors are correlated, not z-scores.
    failed = _statistics_failures(src, x, _expected(src))
    assert [f for f in failed if "variances" not in f] == []
    detected = np.diff(x.indptr)[(src.info.obs["cell_type"] != "doublet").to_numpy()]
    narrow = np.diff(_sample()[1].indptr)
    assert np.percentile(detected, 99) / np.median(detected) > 1.3 * (
        np.percentile(narrow, 99) / np.median(narrow)
    )


def test_the_statistics_would_catch_a_wrong_model(monkeypatch):
    """The same comparisons reject generators that are wrong in one respect each."""
    src, _, exp = _sample()

    def failures(**kwargs: float) -> list[str]:
        broken = synthetic_counts(N_CELLS, N_GENES, seed=21, mean_genes=MEAN_GENES, **kwargs)
        return _statistics_failures(src, _csr(broken), exp)

    tables = fd._tables
    with monkeypatch.context() as mp:  # Poisson counts: the sampler's r is huge
        mp.setattr(fd, "_tables", lambda m0, m1, r: tables(m0, m1, 1e6))
        assert any("fraction of" in f for f in failures())
    with monkeypatch.context() as mp:  # dispersion 0.25 instead of 0.3
        mp.setattr(fd, "_tables", lambda m0, m1, r: tables(m0, m1, 4.0))
        assert any("detected expressed genes, all" in f for f in failures())
    with monkeypatch.context() as mp:
        mp.setattr(fd, "_DOUBLET_DEPTH", 1.5)
        assert any("doublet" in f for f in failures())
    assert any("library size" in f or "sd of detected" in f for f in failures(library_sigma=0.3))
    with monkeypatch.context() as mp:  # no thinning in sparse bins: every cluster kept
        mp.setattr(fd._Sampler, "_sparse", _sparse_without_thinning(fd._Sampler._sparse))
        assert any("detection rates" in f or "detected genes" in f for f in failures())


def _sparse_without_thinning(sparse):
    """``_Sampler._sparse`` with every cluster of a bin kept (rate of a gene = its bin top's)."""

    def run(self, rng, row, lev, n_dense, rate_top, prefix):
        real = self.tables
        self.tables = replace(real, rate=np.full_like(real.rate, np.inf))
        try:
            return sparse(self, rng, row, lev, n_dense, rate_top, prefix)
        finally:
            self.tables = real

    return run


def test_synthetic_data_looks_like_droplets():
    src = synthetic_counts(3000, 2000, seed=5, mean_genes=300)
    x = src.to_dense()
    detected = (x > 0).sum(axis=1)
    assert 200 < np.median(detected) < 400  # mean_genes sets the depth
    means = x.mean(axis=0)
    assert means.max() > 50 * np.median(means[means > 0])  # heavy-tailed gene means
    var = x.var(axis=0)
    top = means > 1
    assert np.median(var[top] / means[top]) > 1.5  # overdispersed (negative binomial), not Poisson
    types = src.info.obs["cell_type"]
    assert 0.02 < (types == "doublet").mean() < 0.08
    assert types.nunique() == 7  # six types and doublets
    totals = x.sum(axis=1)
    assert totals.max() > 3 * np.median(totals)  # library-size spread


def test_counts_too_large_for_a_key_are_exact():
    """Two genes at ~1e8 library size: every count is carried aside of the packed keys."""
    src = synthetic_counts(400, 2, seed=6, mean_genes=1000)
    x = src.to_dense()
    assert (x >= 1 << src._sampler.vbits).mean() > 0.5
    single = (src.info.obs["cell_type"] != "doublet").to_numpy()
    want = src._depth * np.exp(LIBRARY_SIGMA**2 / 2) * src._profiles.mean(axis=0)
    got = x[single].mean(axis=0)
    se = x[single].std(axis=0) / np.sqrt(single.sum())
    assert (np.abs(got - want) < 5 * se + 0.01 * want).all()


# --------------------------------------------------------------------------- speed


@pytest.mark.parametrize(("n_genes", "per_cell"), [(20_000, 1000), (33_538, 1000), (33_538, 2000)])
def test_speed_is_measured(capsys, n_genes, per_cell):
    """Cells per CPU-second of one thread (printed only: a benchmark, not a timed test)."""
    src = synthetic_counts(4 * RNG_CHUNK, n_genes, seed=0, mean_genes=per_cell)
    src._chunk(0)
    t = time.process_time()
    nnz = sum(src._chunk(c)[1].size for c in range(1, 4))
    rate = 3 * RNG_CHUNK / (time.process_time() - t)
    with capsys.disabled():
        print(
            f"\nsynthetic generator: {rate:,.0f} cells per CPU-second, "
            f"{nnz / 3 / RNG_CHUNK:.0f} of {n_genes:,} genes per cell"
        )
    assert abs(nnz / 3 / RNG_CHUNK - per_cell) < 0.1 * per_cell  # mean_genes sets the depth
