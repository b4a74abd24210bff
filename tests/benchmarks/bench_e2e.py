"""Smoke tests of the end-to-end benchmarks (``python -m flow.bench``, issue 11's figures).

The floors of ``flow run`` and ``flow tokenize`` rank like a numpy reference; the bare-kernel
profile measures what it says (its flat layout has the bytes of the same rankings written at
once); the scheduler's cost and the projection's arithmetic; the bench's command line end to
end on a tiny input (slow: it runs several ``flow`` commands).
"""

from __future__ import annotations

import json
import os
import subprocess

import anndata as ad
import dask
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from flow import _bench_e2e, bench
from flow import medians as med
from flow._bench_e2e import (
    disk_bytes,
    floor_command,
    run_floor_command,
    v1_gene_ids,
    write_h5ad,
)
from flow._bench_floor import H5AD_BLOCK
from flow._bench_model import measure_model, projection, projection_table, scheduler_cost
from flow.datasets import write_synthetic
from flow.encode._bands import FLAT_CHUNK
from flow.encode._kernels import rank_block_flat
from flow.encode.store import RANKING_CODECS, write_encoding
from flow.pipeline import preset_dictionaries

N_CELLS = 5000  # more than one 4,096-cell block of the h5ad floor


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    """A synthetic h5ad whose genes are V1 IDs, then IDs outside the vocabulary."""
    ids = v1_gene_ids(30_000, seed=None)  # ~25k V1 IDs, then fillers
    genes = np.concatenate([ids[:900], ids[-300:]])
    path = str(tmp_path_factory.mktemp("e2e") / "in.h5ad")
    write_h5ad(path, N_CELLS, genes.size, seed=3, mean_genes=60, block=1000, gene_ids=genes)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A count store and its median set, as the bench's stages leave them."""
    path = tmp_path_factory.mktemp("work")
    store = write_synthetic(path / "counts.zarr", 900, 400, seed=5, mean_genes=80, block_size=256)
    med.write_medians(med.medians_of([store], compute=dask.compute), path / "medians.zarr")
    return str(path)


def _floor_output(out: str, n_cells: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """The floor's flat tokens and counts, blocks in order (cells one after another)."""
    starts = range(0, n_cells, block)
    tokens = [np.load(os.path.join(out, f"{r0}.tokens.npy")) for r0 in starts]
    counts = [np.load(os.path.join(out, f"{r0}.counts.npy")) for r0 in starts]
    return np.concatenate(tokens), np.concatenate(counts)


def _check_floor(x: sp.csr_matrix, n_counts, medians, tokens, out: str, block: int) -> None:
    """Each cell: the in-vocabulary genes with a count, values non-increasing (a floor's
    order: exact but for near-ties), counts those of the genes at each rank."""
    keep = np.flatnonzero(tokens >= 0)
    kept = x[:, keep].tocsr()
    kept.eliminate_zeros()
    kept.sort_indices()
    got_tokens, got_counts = _floor_output(out, x.shape[0], block)
    assert got_tokens.size == kept.nnz
    column = np.full(int(tokens.max()) + 1, -1, dtype=np.int64)  # token -> column of ``kept``
    column[tokens[keep]] = np.arange(keep.size)
    cols = column[got_tokens]
    cell = np.repeat(np.arange(x.shape[0]), np.diff(kept.indptr))  # the floor keeps cell order
    order = np.lexsort((cols, cell))
    np.testing.assert_array_equal(cols[order], kept.indices)  # same genes in every cell
    np.testing.assert_array_equal(got_counts[order], kept.data)  # with their counts
    values = got_counts / n_counts[cell] * 10_000.0 / medians[keep][cols]
    same_cell = cell[1:] == cell[:-1]
    rising = np.diff(values) > np.abs(values[1:]) * 2.0**-39
    assert not np.any(rising & same_cell)


def test_run_floor_ranks_like_numpy(h5ad, tmp_path):
    argv = run_floor_command(str(tmp_path), h5ad, 1)
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == str(N_CELLS)
    x = ad.read_h5ad(h5ad).X.tocsr()
    medians = np.load(argv[4])
    tokens = np.load(argv[5])
    v1 = preset_dictionaries("V1")["vocabulary"]
    token_of = dict(zip(v1.gene_ids.tolist(), v1.token_ids.tolist(), strict=True))
    assert (tokens >= 0).sum() == 900  # the fillers are outside the vocabulary
    assert [token_of[g] for g in ad.read_h5ad(h5ad).var.index[:900]] == tokens[:900].tolist()
    n_counts = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()  # over all genes
    _check_floor(x, n_counts, medians, tokens, argv[6], H5AD_BLOCK)


def test_tokenize_floor_ranks_like_numpy(work):
    argv = floor_command(work, 1)
    subprocess.run(argv, capture_output=True, check=True)
    root = zarr.open_group(os.path.join(work, "counts.zarr"), mode="r")
    x = ad.read_zarr(os.path.join(work, "counts.zarr")).X
    n_counts = np.asarray(root["obs"]["n_counts"][:], dtype=np.float64)
    medians, tokens = np.load(argv[4]), np.load(argv[5])
    _check_floor(sp.csr_matrix(x), n_counts, medians, tokens, argv[6], 256)


@pytest.mark.parametrize("like", [False, True])
def test_kernel_profile(work, capsys, like):
    flat = os.path.join(work, "flat.zarr")
    store = os.path.join(work, "counts.zarr")
    plan = _bench_e2e._plan(store, os.path.join(work, "medians.zarr"), None)
    argv = [store, "--medians", os.path.join(work, "medians.zarr"), "--flat", flat]
    if like:  # the chunks and codecs of an encoding store's bands (the same here)
        enc = os.path.join(work, "encoding.zarr")
        write_encoding(plan, enc, compute=dask.compute, overwrite=True)
        argv += ["--like", enc]
    _bench_e2e.main(argv)
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not os.path.exists(flat)
    # the same rankings, ranked here and written at once with the same codecs and chunks
    edges = np.cumsum((0, *plan.store.counts.chunks[0]))
    parts = [
        rank_block_flat(
            plan.gene_map.apply(plan.store.counts.blocks[b, 0].compute()),
            plan.n_counts[edges[b] : edges[b + 1]],
            plan.medians,
            plan.gene_map.kept_tokens,
        )
        for b in range(plan.store.n_blocks)
    ]
    tokens = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts]).astype(plan.count_dtype)
    assert got["entries"] == tokens.size == int(plan.n_genes.sum())
    ref = zarr.open_group(os.path.join(work, "ref.zarr"), mode="w", zarr_format=3)
    for name, values, fill in (
        ("tokens", tokens, plan.vocab.pad_token or 0),
        ("counts", counts, 0),
    ):
        ref.create_array(
            name, data=values, chunks=(FLAT_CHUNK,), compressors=RANKING_CODECS, fill_value=fill
        )
    assert got["flat_bytes"] == disk_bytes(os.path.join(work, "ref.zarr"))
    nnz = np.diff(np.asarray(plan.store.attrs["block_nnz_offsets"]))
    one = got["one_block"]
    assert one["block_nnz"] == nnz.max()
    assert nnz[one["block"]] == nnz.max()
    assert one["traced_peak"] > 8 * one["block_nnz"]  # at least the values, in float64
    assert one["rss_peak"] >= one["rss_before"] > 0
    assert got["kernel_s"] > 0
    assert got["cells"] == 900


@pytest.mark.distributed
def test_scheduler_cost(local_cluster_address):
    from distributed import Client

    with Client(local_cluster_address, set_as_default=False) as client:
        got = scheduler_cost(client, 50)
    assert got["tasks"] == 51
    assert got["per_task_s"] == pytest.approx(got["seconds"] / 51)


def test_projection_arithmetic():
    row = {
        "cells": 100_000,
        "workers": 2,
        "tokenize-noop": {"seconds": 3.0},
        "cluster_start_s": 2.0,
        "convert": {"seconds": 23.0},
        "tokenize": {"seconds": 13.0},
        "export": {"seconds": 8.0},
    }
    stage = {"tasks_fixed": 4.0, "tasks_per_block": 3.0, "driver_fixed_s": 1.0}
    model = {
        "cluster_start_s": 9.0,
        "scheduler": {"per_task_s": 0.001},
        "block_size": 1000,
        "stages": {
            "convert": {**stage, "driver_per_cell_s": 1e-5},
            "tokenize": {**stage, "driver_per_cell_s": 0.0},
            "export": {**stage, "driver_per_cell_s": 0.0},
        },
    }
    rows = projection(row, model, cells=1e6, workers=10)
    convert = rows[0]
    # convert: work = 23 - (3 + 2) (start-up) - (1 + 1e-5 * 1e5) = 16 s for 1e5 cells, 2 workers
    assert convert["rate_per_worker"] == pytest.approx(1e5 / 16 / 2)
    assert convert["parallel_s"] == pytest.approx(1e6 / (10 * 1e5 / 32))
    assert convert["tasks"] == 4 + 3 * 1000
    assert convert["scheduler_s"] == pytest.approx(3.004)
    assert convert["driver_s"] == pytest.approx(1 + 10)
    assert rows[3] == {"stage": "start-up (once)", "total_s": 5.0}
    total = rows[-1]
    assert total["total_s"] == pytest.approx(sum(r["total_s"] for r in rows[:-1]))
    assert total["serial_s"] == pytest.approx(5.0 + 3 * 3.004 + 11 + 1 + 1)
    table = projection_table(rows, cells=1e6, workers=10)
    assert "| convert |" in table
    assert "Serial" in table


@pytest.mark.slow
@pytest.mark.distributed
def test_measure_model(h5ad, tmp_path):
    small = str(tmp_path / "small.h5ad")
    write_h5ad(small, 1000, 1200, seed=4, mean_genes=60, gene_ids=v1_gene_ids(1200))
    got = measure_model(
        [(1000, small), (N_CELLS, h5ad)], str(tmp_path), n_tasks=100, block_size=500
    )
    assert got["scheduler"]["tasks"] == 101
    for stage in ("convert", "tokenize", "export"):
        m = got["stages"][stage]
        tasks = [r["tasks"] for r in m["measured"]]
        assert tasks[0] > 0
        # 10 blocks run more tasks than 2 (convert reads pieces of 8,192 cells: one here)
        assert tasks[1] > tasks[0] if stage != "convert" else tasks[1] >= tasks[0]
        assert m["tasks_per_block"] == pytest.approx((tasks[1] - tasks[0]) / 8)


@pytest.mark.slow
def test_bench_command_line(tmp_path, capsys):
    out = tmp_path / "bench.json"
    stages = "convert,medians,tokenize,tokenize-floor,kernel,run,run-floor"
    argv = ["--cells", "600", "--genes", "1500", "--genes-per-cell", "80", "--workers", "0"]
    argv += ["--stages", stages, "--workdir", str(tmp_path / "w"), "--out", str(out)]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    for stage in ("convert", "tokenize", "tokenize-noop", "run", "run-floor", "tokenize-floor"):
        assert row[stage]["seconds"] > 0, stage
    ratios = row["ratios"]
    assert ratios["run/run-floor"] == pytest.approx(
        row["run"]["seconds"] / row["run-floor"]["seconds"]
    )
    assert ratios["encoding bands bytes/no padding"] == pytest.approx(
        row["encoding_band_bytes"] / row["kernel_profile"]["flat_bytes"]
    )
    assert "| 600 | run/run-floor |" in printed
    assert not os.path.exists(tmp_path / "w" / "n600")  # not kept
