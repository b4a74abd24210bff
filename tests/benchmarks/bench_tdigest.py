"""Throughput of flow's vectorized t-digest against one ``crick.TDigest`` per gene.

Both sides start from the same CSR block of counts and the cells' total counts, compute the
normalized values ``(count / n_counts) * 10_000`` and digest them per gene:

- flow: :func:`flow.sketch._tdigest.from_csr` per block, :func:`~flow.sketch._tdigest.merge`
  of ``split_every`` block digests;
- crick (as upstream Geneformer): the block's values grouped by gene (CSC), one
  ``TDigest.update`` per gene and block, one ``TDigest.merge`` per gene to combine blocks.

Throughput is values per CPU-second (``time.process_time``; numpy and crick are single
threaded), the median of ``--repeats`` runs after a warm-up run (fresh memory is slow to
touch on first use here). "end to end" is one block's build plus its share of a fixed
merge tree with fan-in ``split_every`` (a merge of ``split_every`` digests counted
``1 / (split_every - 1)`` times per block, the share of a full tree).

Run as a script (prints a table)::

    python tests/benchmarks/bench_tdigest.py --cells 4000 --genes 20000 --blocks 8

Accuracy of the median after a fixed merge tree (16 blocks, ``split_every=8``; one cell type,
then 4 cell types in consecutive blocks), flow at several compressions and crick::

    python tests/benchmarks/bench_tdigest.py --accuracy

or with pytest-benchmark (small sizes, timing only with ``--benchmark-enable``)::

    pytest tests/benchmarks/bench_tdigest.py -p no:cacheprovider --benchmark-enable
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from flow._kernels import normalized_values
from flow.sketch import _tdigest as td

if TYPE_CHECKING:
    from collections.abc import Callable


# --------------------------------------------------------------------------- data


def gene_fractions(n_genes: int, *, seed: int = 0, sigma: float = 2.0) -> np.ndarray:
    """Heavy-tailed (lognormal) expected fraction of a cell's counts for each gene."""
    p = np.random.default_rng(seed).lognormal(0.0, sigma, n_genes)
    return p / p.sum()


def make_block(
    n_cells: int,
    p: np.ndarray,
    *,
    seed: int,
    dispersion: float = 2.0,
    lib_median: float = 2_500.0,
    lib_sigma: float = 0.4,
    rows_per_chunk: int = 500,
) -> sp.csr_matrix:
    """Negative-binomial counts: lognormal library sizes, gene fractions ``p``.

    With the defaults and 20,000 genes a cell has about 1,000-2,000 nonzero genes. The
    nonzero pattern is exact for NB(mean, dispersion); nonzero values are ``1 +`` a
    gamma-Poisson draw with the conditional mean (close to, not exactly, the NB tail).
    """
    rng = np.random.default_rng(seed)
    lib = rng.lognormal(np.log(lib_median), lib_sigma, n_cells)
    pieces = []
    r = dispersion
    for s in range(0, n_cells, rows_per_chunk):
        mu = (lib[s : s + rows_per_chunk, None] * p[None, :]).astype(np.float32)
        p0 = (1.0 + mu / r) ** (-r)
        nz = rng.random(mu.shape, dtype=np.float32) > p0
        rows, cols = np.nonzero(nz)
        m = (mu[rows, cols] / (1.0 - p0[rows, cols])).astype(np.float64)
        counts = 1 + rng.poisson(rng.gamma(r, np.maximum(m - 1.0, 1e-6) / r))
        pieces.append(sp.csr_matrix((counts.astype(np.int32), (rows, cols)), shape=mu.shape))
    return sp.csr_matrix(sp.vstack(pieces, format="csr"))


def row_sums(block: sp.csr_matrix) -> np.ndarray:
    """Total count per cell (float64)."""
    return np.asarray(block.sum(axis=1), dtype=np.float64).ravel()


# --------------------------------------------------------------------------- the two sides


def flow_build(block: sp.csr_matrix, n_counts: np.ndarray, compression: float) -> td.Digests:
    return td.from_csr(block, n_counts, compression)


def flow_merge(parts: list[td.Digests]) -> td.Digests:
    return td.merge(parts)


def crick_build(block: sp.csr_matrix, n_counts: np.ndarray, compression: float) -> list[Any]:
    """One crick digest per gene, fed the gene's values of this block (upstream's way)."""
    import crick  # optional (the comparison only): imported when used

    values = normalized_values(block.data, block.indptr, n_counts)
    csc = sp.csr_matrix((values, block.indices, block.indptr), shape=block.shape).tocsc()
    ptr, data = csc.indptr, csc.data
    digests = [crick.TDigest(compression) for _ in range(block.shape[1])]
    for g in np.flatnonzero(np.diff(ptr)):
        digests[g].update(data[ptr[g] : ptr[g + 1]])
    return digests


def crick_merge(parts: list[list[Any]]) -> list[Any]:
    import crick  # optional (the comparison only): imported when used

    out = []
    for per_gene in zip(*parts, strict=True):
        d = crick.TDigest(per_gene[0].compression)
        d.merge(*per_gene)
        out.append(d)
    return out


def crick_median(digests: list[Any]) -> np.ndarray:
    return np.array([d.quantile(0.5) if d.size() else np.nan for d in digests])


# --------------------------------------------------------------------------- timing


def cpu_median(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median CPU seconds of ``repeats`` calls after one warm-up call, and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return float(np.median(times)), out


def normalized(block: sp.csr_matrix, n_counts: np.ndarray) -> sp.csr_matrix:
    v = normalized_values(block.data, block.indptr, n_counts)
    return sp.csr_matrix((v, block.indices, block.indptr), shape=block.shape)


def exact_medians(
    blocks: list[sp.csr_matrix], n_counts: list[np.ndarray], genes_per_pass: int = 2500
) -> np.ndarray:
    """numpy reference: median of each gene's nonzero normalized values over all blocks."""
    vals = [normalized(b, nc) for b, nc in zip(blocks, n_counts, strict=True)]
    n_genes = blocks[0].shape[1]
    out = np.full(n_genes, np.nan)
    for g0 in range(0, n_genes, genes_per_pass):
        csc = sp.csc_matrix(sp.vstack([v[:, g0 : g0 + genes_per_pass] for v in vals]))
        ptr = csc.indptr
        for j in np.flatnonzero(np.diff(ptr)):
            out[g0 + j] = np.median(csc.data[ptr[j] : ptr[j + 1]])
    return out


def tree(parts: list[Any], merge: Callable[[list[Any]], Any], split_every: int) -> Any:
    """The fixed reduction tree of flow.sketch.reduce: neighbours in groups, level by level."""
    while len(parts) > 1:
        parts = [merge(parts[i : i + split_every]) for i in range(0, len(parts), split_every)]
    return parts[0]


def accuracy(
    *,
    cells: int,
    genes: int,
    blocks: int,
    cell_types: int,
    compressions: list[float],
    crick_compression: float,
    split_every: int,
) -> list[dict[str, float]]:
    """Median relative error after a tree merge of block digests, genes with >= 1,000 nonzeros.

    With ``cell_types > 1`` each type scales the gene fractions by lognormal(0, 1) and owns
    consecutive blocks (as corpora concatenated by dataset are).
    """
    p = gene_fractions(genes)
    rng = np.random.default_rng(123)
    types = (
        [p * rng.lognormal(0.0, 1.0, genes) for _ in range(cell_types)] if cell_types > 1 else [p]
    )
    data = [
        make_block(
            cells,
            types[(i * len(types)) // blocks] / types[(i * len(types)) // blocks].sum(),
            seed=1000 * cell_types + i,
        )
        for i in range(blocks)
    ]
    ncs = [row_sums(b) for b in data]
    exact = exact_medians(data, ncs)
    out = []
    sides: list[tuple[str, float]] = [("flow", c) for c in compressions]
    if crick_compression:
        sides.append(("crick", crick_compression))
    for side, c in sides:
        if side == "flow":
            d = tree(
                [flow_build(b, nc, c) for b, nc in zip(data, ncs, strict=True)],
                flow_merge,
                split_every,
            )
            est, n = td.median(d), d.counts
            cent = d.means.size / genes
            lo, hi = td.median_bracket(d)
            inside = np.zeros(genes, np.int64)
            for v in (normalized(b, nc) for b, nc in zip(data, ncs, strict=True)):
                m = (v.data >= lo[v.indices]) & (v.data <= hi[v.indices])
                inside += np.bincount(v.indices[m], minlength=genes)
        else:
            cd = tree(
                [crick_build(b, nc, c) for b, nc in zip(data, ncs, strict=True)],
                crick_merge,
                split_every,
            )
            est = crick_median(cd)
            n = np.array([int(x.size()) for x in cd])
            cent = sum(x.centroids().size for x in cd) / genes
        sel = n >= 1000
        rel = np.abs(est[sel] - exact[sel]) / exact[sel]
        row = {
            "side": side,
            "compression": c,
            "cell_types": cell_types,
            "genes_ge_1000": int(sel.sum()),
            "p50": float(np.percentile(rel, 50)),
            "p99": float(np.percentile(rel, 99)),
            "max": float(rel.max()),
            "centroids_per_gene": cent,
        }
        if side == "flow":
            frac = inside[sel] / n[sel]
            row["bracket_mean"] = float(frac.mean())
            row["bracket_p99"] = float(np.percentile(frac, 99))
            row["bytes_per_gene"] = d.nbytes / genes
        out.append(row)
    return out


def run(
    *,
    cells: int,
    genes: int,
    blocks: int,
    repeats: int,
    compression: float,
    crick_compression: float,
) -> dict[str, float]:
    p = gene_fractions(genes)
    data = [make_block(cells, p, seed=1 + i) for i in range(blocks)]
    ncs = [row_sums(b) for b in data]
    n_values = sum(b.nnz for b in data)
    res: dict[str, float] = {"values_per_block": n_values / blocks}

    t, _ = cpu_median(lambda: flow_build(data[0], ncs[0], compression), repeats)
    res["flow_build"] = data[0].nnz / t
    t, _ = cpu_median(lambda: crick_build(data[0], ncs[0], crick_compression), repeats)
    res["crick_build"] = data[0].nnz / t

    fparts = [flow_build(b, nc, compression) for b, nc in zip(data, ncs, strict=True)]
    cparts = [crick_build(b, nc, crick_compression) for b, nc in zip(data, ncs, strict=True)]
    t_fm, fm = cpu_median(lambda: flow_merge(fparts), repeats)
    t_cm, cm = cpu_median(lambda: crick_merge(cparts), max(1, repeats // 2))
    res["flow_merge"] = n_values / t_fm
    res["crick_merge"] = n_values / t_cm
    share = 1.0 / max(1, blocks - 1)  # share of one merge of `blocks` parts, per block
    for side, build, merge_t in (("flow", "flow_build", t_fm), ("crick", "crick_build", t_cm)):
        per_block = n_values / blocks / res[build] + merge_t * share
        res[f"{side}_end_to_end"] = n_values / blocks / per_block
    res["speedup_build"] = res["flow_build"] / res["crick_build"]
    res["speedup_merge"] = res["flow_merge"] / res["crick_merge"]
    res["speedup_end_to_end"] = res["flow_end_to_end"] / res["crick_end_to_end"]

    exact = exact_medians(data, ncs)
    n = fm.counts
    sel = n >= 1000
    for side, est in (("flow", td.median(fm)), ("crick", crick_median(cm))):
        rel = np.abs(est[sel] - exact[sel]) / exact[sel]
        res[f"{side}_relerr_p50"] = float(np.percentile(rel, 50))
        res[f"{side}_relerr_p99"] = float(np.percentile(rel, 99))
        res[f"{side}_relerr_max"] = float(rel.max())
    res["genes_ge_1000"] = float(sel.sum())
    res["flow_centroids_per_gene"] = fm.means.size / genes
    res["flow_bytes_per_gene"] = fm.nbytes / genes
    res["crick_centroids_per_gene"] = sum(d.centroids().size for d in cm) / genes
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=4000)
    ap.add_argument("--genes", type=int, default=20_000)
    ap.add_argument("--blocks", type=int, default=8, help="blocks merged in one merge")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compression", type=float, default=td.DEFAULT_COMPRESSION)
    ap.add_argument("--crick-compression", type=float, default=100.0)
    ap.add_argument("--accuracy", action="store_true", help="median error after a merge tree")
    ap.add_argument("--tree-blocks", type=int, default=16)
    ap.add_argument("--cell-types", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--compressions", type=float, nargs="+", default=[100.0, 200.0, 300.0])
    ap.add_argument("--split-every", type=int, default=8)
    a = ap.parse_args(argv)
    if a.accuracy:
        for types in a.cell_types:
            for row in accuracy(
                cells=a.cells,
                genes=a.genes,
                blocks=a.tree_blocks,
                cell_types=types,
                compressions=a.compressions,
                crick_compression=a.crick_compression,
                split_every=a.split_every,
            ):
                print(
                    "  ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in row.items()
                    )
                )
        return
    res = run(
        cells=a.cells,
        genes=a.genes,
        blocks=a.blocks,
        repeats=a.repeats,
        compression=a.compression,
        crick_compression=a.crick_compression,
    )
    for k, v in res.items():
        if k.startswith(("flow_", "crick_")) and k.endswith(("_build", "_merge", "_end_to_end")):
            print(f"{k:28s} {v / 1e6:10.2f} M values/s")
        else:
            print(f"{k:28s} {v:10.4g}")


# --------------------------------------------------------------------------- pytest-benchmark

SMALL = {"n_cells": 500, "n_genes": 2000}


def _small_block(seed: int = 1) -> tuple[sp.csr_matrix, np.ndarray]:
    p = gene_fractions(SMALL["n_genes"], sigma=1.5)
    b = make_block(SMALL["n_cells"], p, seed=seed, lib_median=600.0)
    return b, row_sums(b)


def test_bench_flow_build(benchmark: Any) -> None:
    b, nc = _small_block()
    d = benchmark(flow_build, b, nc, td.DEFAULT_COMPRESSION)
    assert int(d.counts.sum()) == b.nnz


def test_bench_crick_build(benchmark: Any) -> None:
    b, nc = _small_block()
    ds = benchmark(crick_build, b, nc, 100.0)
    assert sum(int(d.size()) for d in ds) == b.nnz


def test_bench_flow_merge(benchmark: Any) -> None:
    parts = [flow_build(*_small_block(seed), td.DEFAULT_COMPRESSION) for seed in range(1, 9)]
    d = benchmark(flow_merge, parts)
    assert int(d.counts.sum()) == sum(int(p.counts.sum()) for p in parts)


def test_bench_crick_merge(benchmark: Any) -> None:
    parts = [crick_build(*_small_block(seed), 100.0) for seed in range(1, 9)]
    ds = benchmark(crick_merge, parts)
    assert len(ds) == SMALL["n_genes"]


if __name__ == "__main__":
    main()
