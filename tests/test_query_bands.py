"""The drop-rate and dropped-gene queries read the flat rank bands directly: their answers equal
those of the dense ``(cell, rank)`` view (computed here whole, as a plain numpy reference) on a
store with cells deeper than 4,096 genes, cells of length 0, failing cells, grouped cells and an
uneven last block."""

from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import flow.query as q
from flow.encode.store import plan_encoding, write_encoding
from flow.medians import medians_of
from flow.store import write_counts
from flow.vocab import vocabulary_from_genes

from conftest import MatrixSource

N, GENES, BLOCK = 130, 6000, 32
KEEP = np.arange(N) % 6 != 2
GROUPS = np.array([f"g{i % 3}" for i in range(N)])


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory):
    """(encoding store, dense tokens, dense values): the dense view computed whole."""
    tmp = tmp_path_factory.mktemp("deep")
    rng = np.random.default_rng(3)
    n_genes = rng.integers(0, 1500, N)
    n_genes[1::8] = rng.integers(4100, 5900, n_genes[1::8].size)
    rows = []
    for i, n in enumerate(n_genes):
        pool = 40 if i % 10 == 7 else GENES  # genes 0..39 are not in the vocabulary
        cols = rng.choice(pool, size=int(min(n, pool) or 1), replace=False)
        data = rng.integers(1, 25, cols.size)
        rows.append(sp.csr_matrix((data, (np.zeros_like(cols), cols)), shape=(1, GENES)))
    obs = pd.DataFrame({"filter_pass": KEEP, "group": GROUPS})
    store = write_counts(
        [MatrixSource(sp.vstack(rows).tocsr(), obs)], tmp / "c.zarr", block_size=BLOCK
    )
    median_set = medians_of([store], method="exact", compute=dask.compute)
    vocab = vocabulary_from_genes(store.var.index.to_numpy(dtype=str)[40:])
    enc = write_encoding(plan_encoding(store, median_set, vocab), tmp / "e.zarr")
    tokens, values = dask.compute(enc.tokens, enc.values, scheduler="sync")
    return enc, np.asarray(tokens), np.asarray(values)


def _dense_drops(enc, tokens, cutoff, members):
    n_tokens = enc.token_table()["gene_id"].size
    out = np.zeros(n_tokens, np.int64)
    for i in np.flatnonzero(members):
        np.add.at(out, tokens[i, cutoff : enc.lengths[i]], 1)
    return out


def test_the_store_has_the_cases(deep) -> None:
    enc, _, _ = deep
    assert (enc.lengths > 4096).sum() >= 10
    assert (enc.lengths[KEEP] == 0).sum() >= 3
    assert enc.tokens.numblocks[0] == 5  # the last block is uneven


@pytest.mark.parametrize("cutoff", [1, 100, 511, 512, 513, 2048, 4095, 4096, 4097, 5000, 6000])
def test_drop_rates_equal_the_dense_view(deep, cutoff: int) -> None:
    enc, tokens, _ = deep
    rates = q.drop_rates(enc, cutoff, group_by="group")
    got = rates.compute()
    for g, label in enumerate(rates.groups):
        want = _dense_drops(enc, tokens, cutoff, KEEP & (label == GROUPS))
        assert np.array_equal(got[g], want), (cutoff, label)
    total = q.drop_rates(enc, cutoff, split_every=2).compute()[0]
    assert np.array_equal(total, _dense_drops(enc, tokens, cutoff, KEEP))


@pytest.mark.parametrize("cutoff", [1, 700, 4096])
def test_dropped_genes_equal_the_dense_view(deep, cutoff: int) -> None:
    enc, tokens, values = deep
    cells = np.arange(1, N, 4)  # every block; the deep cells (1::8) and some of length 0
    assert (enc.lengths[cells] == 0).sum() >= 3
    assert (enc.lengths[cells] > 4096).sum() >= 10
    for cell in cells:
        frame = q.dropped_genes(enc, cell, cutoff)
        length = int(enc.lengths[cell])
        want_tokens = tokens[cell, cutoff:length].astype(np.int64)
        assert np.array_equal(frame["token"].to_numpy(), want_tokens), cell
        # bit-identical values: the ranking's own arithmetic
        assert np.array_equal(frame["value"].to_numpy(), values[cell, cutoff:length]), cell
        assert frame["rank"].tolist() == list(range(cutoff, max(length, cutoff)))
        assert frame.attrs["length"] == length


def test_gene_ranks_equal_the_dense_view(deep) -> None:
    enc, tokens, _ = deep
    deep_cell = int(np.argmax(enc.lengths))
    picks = [int(tokens[deep_cell, r]) for r in (0, 511, 512, 4100, enc.lengths[deep_cell] - 1)]
    picks += [int(t) for t in np.random.default_rng(1).choice(tokens[tokens > 3], 5)]
    for token in picks:
        got = q.gene_ranks(enc, token, split_every=2).compute()
        want = np.full(N, -1)
        for i in range(N):
            hit = np.flatnonzero(tokens[i, : enc.lengths[i]] == token)
            if hit.size:
                want[i] = hit[0]
        assert np.array_equal(got, want), token
