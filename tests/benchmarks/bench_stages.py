"""Stage benchmarks (smoke mode in the normal suite), pinned task counts, and bounded memory.

Timing runs: ``pytest tests/benchmarks --benchmark-enable`` (per-block kernels) and
``python -m flow.bench`` (whole stages as commands, cells/s and peak RSS at several sizes).
"""

from __future__ import annotations

import math
import tracemalloc

import dask
import numpy as np
import pytest

from flow import medians as med
from flow.datasets import write_synthetic
from flow.encode import _kernels
from flow.encode.rank import rank_cells
from flow.encode.store import plan_encoding, write_encoding
from flow.query import drop_rates
from flow.vocab import vocabulary_from_genes

N_BLOCKS = 20
BLOCK = 200


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A seeded synthetic count store of 20 blocks (written once per module)."""
    path = tmp_path_factory.mktemp("bench") / "counts.zarr"
    return write_synthetic(path, N_BLOCKS * BLOCK, 2000, seed=11, mean_genes=300, block_size=BLOCK)


@pytest.fixture(scope="module")
def medians(store):
    return med.medians_of([store], compute=dask.compute)


@pytest.fixture(scope="module")
def plan(store, medians):
    vocab = vocabulary_from_genes(medians.gene_ids[np.isfinite(medians.medians)])
    return plan_encoding(store, medians, vocab)


def _tree_merges(n: int, split_every: int) -> int:
    total = 0
    while n > 1:
        n = math.ceil(n / split_every)
        total += n
    return total


def test_medians_task_count(store):
    _, graph = med.compute_medians(store, split_every=4)
    n_tasks = len(graph.__dask_graph__())
    # one read and one digest per block, plus the fixed merge tree
    assert n_tasks == 2 * N_BLOCKS + _tree_merges(N_BLOCKS, 4)


def test_tokenize_task_count(plan):
    ranked = rank_cells(
        plan.store.counts, plan.n_counts, plan.gene_map, plan.medians, width=plan.width, pad=0
    )
    graph = dict(ranked.tokens.__dask_graph__())
    # per block: read, n_counts slice (+ its source), rank, take tokens; plus the shared context
    per_block = {k for k in graph if isinstance(k, tuple)}
    assert len(per_block) <= 5 * N_BLOCKS
    assert len(graph) - len(per_block) <= 3
    assert len(ranked.tokens.__dask_layers__()) == 1


def test_drop_rates_task_count(tmp_path, plan):
    enc = write_encoding(plan, tmp_path / "enc.zarr", compute=dask.compute)
    rates = drop_rates(enc, 100, split_every=4)
    n_tasks = len(dict(rates.dropped.__dask_graph__()))
    # per block: one task reading its flat token bands at ranks >= 100 (whatever their number)
    # and counting, the block's lengths, group codes, sum; plus dask's sum tree and two shared
    # tasks (the band reader, the length array)
    per_block = 4
    assert n_tasks == per_block * N_BLOCKS + _tree_merges(N_BLOCKS, 4) + 2


def test_bench_digest_block(benchmark, store):
    from flow.sketch import _tdigest

    block = store.counts.blocks[0, 0].compute()
    n_counts = store.obs["n_counts"].to_numpy(dtype=np.float64)[:BLOCK]
    digests = benchmark(_tdigest.from_csr, block, n_counts)
    assert digests.n_genes == 2000


def test_bench_rank_block(benchmark, plan):
    block = plan.gene_map.apply(plan.store.counts.blocks[0, 0].compute())
    tokens, _, lengths = benchmark(
        _kernels.rank_block,
        block,
        plan.n_counts[:BLOCK],
        plan.medians,
        plan.gene_map.kept_tokens,
        plan.width,
        0,
    )
    assert tokens.shape == (BLOCK, plan.width)
    assert (lengths == np.diff(block.indptr)).all()


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_cells(tmp_path):
    """Peak traced memory of medians and of tokenize at 8 and at 24 blocks (3x the cells).

    Tokenize maps over blocks independently: flat but for its graph (~0.15 MB per block, small
    beside a 1,000-cell block). The medians' merge tree holds at most about ``split_every``
    digests per level, so it grows with the tree's fill and depth (log4 of the number of
    blocks), not with the cells.
    """
    peaks: dict[str, list[int]] = {"medians": [], "tokenize": []}
    for n_blocks in (8, 24):
        path = tmp_path / f"s{n_blocks}.zarr"
        store = write_synthetic(
            path, n_blocks * 1000, 3000, seed=2, mean_genes=400, block_size=1000
        )
        with dask.config.set(scheduler="threads", num_workers=2):
            tracemalloc.start()
            m = med.medians_of([store], compute=dask.compute)
            peaks["medians"].append(tracemalloc.get_traced_memory()[1])
            vocab = vocabulary_from_genes(m.gene_ids[np.isfinite(m.medians)])
            plan = plan_encoding(store, m, vocab)
            tracemalloc.reset_peak()
            write_encoding(plan, tmp_path / f"e{n_blocks}.zarr", compute=dask.compute)
            peaks["tokenize"].append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    assert peaks["tokenize"][1] < 1.25 * peaks["tokenize"][0], peaks
    assert peaks["medians"][1] < 2.0 * peaks["medians"][0], peaks
