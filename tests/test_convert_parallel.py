"""Parallel convert: many tasks read the inputs (per file and per range of cells), whole shards
are written at offsets known after counting, and the store is the same bytes whatever the
split or the number of workers."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from distributed import Client

import flow._count_tasks as count_tasks
import flow.store as store_module
from flow import IncompleteStoreError, InputError, open_counts, pipeline, write_counts
from flow._count_tasks import Piece, final_dtype, plan_pieces
from flow.ingest import open_source
from flow.ingest._source import SourceInfo

from helpers import stored_files


def _h5ad(path: Path, x: sp.csr_matrix, *, prefix: str, dense: bool = False) -> Path:
    n, g = x.shape
    adata = ad.AnnData(
        X=x.toarray() if dense else x,
        obs=pd.DataFrame(
            {"batch": pd.Categorical([prefix] * n)},
            index=pd.Index([f"{prefix}-{i}" for i in range(n)]),
        ),
        var=pd.DataFrame(index=pd.Index([f"ENSG{j:011d}" for j in range(g)])),
    )
    adata.write_h5ad(path)
    return path


def _matrix(rng: np.random.Generator, n: int, g: int, density: float = 0.3) -> sp.csr_matrix:
    x = sp.random(n, g, density=density, format="csr", random_state=rng, dtype=np.float64)
    x.data = np.ceil(x.data * 50)
    return sp.csr_matrix(x.astype(np.int32))


class StreamSource:
    """A source that can only be read as one stream (like 10x MTX): no ranges."""

    supports_ranges = False

    def __init__(self, x: sp.csr_matrix, path: str, prefix: str) -> None:
        self.x = x
        n, g = x.shape
        self.info = SourceInfo(
            path=path,
            format="10x-mtx",
            n_cells=n,
            n_genes=g,
            gene_ids=np.array([f"ENSG{j:011d}" for j in range(g)], dtype=object),
            gene_symbols=None,
            barcodes=np.array([f"{prefix}-{i}" for i in range(n)], dtype=object),
            obs=pd.DataFrame(),
            fingerprint=path,
        )

    def iter_blocks(self, n_cells):
        for i in range(0, self.x.shape[0], 5):  # its own read size: the tasks re-block
            yield self.x[i : i + 5]

    def read_rows(self, start, stop):
        raise NotImplementedError


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 256 values (chunks of 64) and pieces of about 40 cells: many tasks."""
    monkeypatch.setattr(store_module, "_SHARD", 256)
    monkeypatch.setattr(store_module, "_CHUNK", 64)
    monkeypatch.setattr(count_tasks, "PIECE_CELLS", 40)


@pytest.fixture
def inputs(tmp_path, rng):
    """Three h5ad files (CSR, dense, CSR) and the matrix they make together."""
    parts = [_matrix(rng, n, 30) for n in (97, 41, 130)]
    paths = [
        _h5ad(tmp_path / "a.h5ad", parts[0], prefix="a"),
        _h5ad(tmp_path / "b.h5ad", parts[1], prefix="b", dense=True),
        _h5ad(tmp_path / "c.h5ad", parts[2], prefix="c"),
    ]
    return paths, sp.vstack(parts, format="csr")


def _sources(paths, stream_x=None):
    sources = [open_source(p) for p in paths]
    if stream_x is not None:
        sources.insert(1, StreamSource(stream_x, "stream.mtx", "s"))
    return sources


def _check_content(path: Path, x: sp.csr_matrix) -> None:
    back = ad.read_zarr(path)
    np.testing.assert_array_equal(back.X.toarray(), x.toarray())
    np.testing.assert_array_equal(back.obs["n_counts"], np.asarray(x.sum(axis=1)).ravel())
    np.testing.assert_array_equal(back.obs["n_genes"], np.diff(x.indptr))
    store = open_counts(path)
    bs = store.block_size
    indptr = x.indptr.astype(np.int64)
    want = [int(indptr[min(r, x.shape[0])]) for r in range(0, x.shape[0], bs)] + [x.nnz]
    assert store.attrs["block_nnz_offsets"] == want
    assert store.attrs["nnz"] == x.nnz


@pytest.mark.parametrize("piece_cells", [1, 7, 40, 10_000])
@pytest.mark.parametrize("block_size", [3, 16])
def test_any_split_gives_the_same_bytes(
    tmp_path, inputs, small_shards, monkeypatch, rng, piece_cells, block_size
):
    """Pieces of any size (one cell each up to whole files) and any mix of ranged and
    streamed sources: the same files, byte for byte, and the input's counts."""
    paths, x = inputs
    stream_x = _matrix(rng, 23, 30)
    want = sp.vstack([x[:97], stream_x, x[97:]], format="csr")
    monkeypatch.setattr(count_tasks, "PIECE_CELLS", 10_000)
    one = write_counts(_sources(paths, stream_x), tmp_path / "one.zarr", block_size=block_size)
    monkeypatch.setattr(count_tasks, "PIECE_CELLS", piece_cells)
    many = write_counts(_sources(paths, stream_x), tmp_path / "many.zarr", block_size=block_size)
    assert stored_files(one.url) == stored_files(many.url)
    assert one.fingerprint == many.fingerprint
    _check_content(tmp_path / "many.zarr", want)


def test_pieces_follow_the_block_grid_and_the_formats():
    """Ranged sources are cut into whole blocks of cells; streamed ones are one piece."""

    class Info:
        def __init__(self, n):
            self.info = type("I", (), {"n_cells": n})()

    ranged, stream = Info(25), Info(9)
    ranged.supports_ranges = True  # type: ignore[attr-defined]
    pieces = plan_pieces([ranged, stream, ranged], 4)  # type: ignore[list-item]
    step = 4 * -(-count_tasks.PIECE_CELLS // 4)
    assert pieces[0] == Piece(0, 0, min(25, step), 0, ranged=True)
    assert Piece(1, 0, 9, 25, ranged=False) in pieces
    assert pieces[-1].stop == 25
    assert pieces[-1].row0 + pieces[-1].n_cells == 59
    assert all(p.start % 4 == 0 for p in pieces)


@pytest.mark.parametrize(
    ("blocks", "dtype"),
    [
        ([], "uint16"),
        ([(False, 65_535.0)], "uint16"),
        ([(False, 1.0), (False, 65_536.0)], "uint32"),
        ([(False, 70_000.0), (True, 2.5)], "float32"),
        ([(True, 2.5), (False, 5e9)], "float32"),
        ([(False, 5e9), (True, 2.5)], "float64"),
        ([(False, 70_000.0), (False, 5e9)], "float64"),
    ],
)
def test_final_dtype_is_the_serial_writers(blocks, dtype):
    """The dtype a serial writer would end with, block by block in cell order."""
    assert final_dtype(blocks) == np.dtype(dtype)


def test_a_wide_count_in_a_late_piece_widens_the_store(tmp_path, small_shards, rng):
    dense = _matrix(rng, 300, 12).toarray()
    dense[290, 3] = 70_000
    x = sp.csr_matrix(dense)
    path = _h5ad(tmp_path / "a.h5ad", x, prefix="a")
    store = write_counts([open_source(path)], tmp_path / "s.zarr", block_size=8)
    assert store.attrs["dtype"] == "uint32"
    _check_content(tmp_path / "s.zarr", x)


def test_bad_counts_in_a_late_piece_name_the_file_and_cell(tmp_path, small_shards, rng):
    """A negative count in cell 201 of the second file: the file and that cell are named and
    the store is left unfinished (readers refuse it)."""
    dense = _matrix(rng, 250, 12).toarray().astype(np.float32)
    dense[201, 5] = -3
    x = sp.csr_matrix(dense)
    a = _h5ad(tmp_path / "a.h5ad", _matrix(rng, 60, 12), prefix="a")
    b = _h5ad(tmp_path / "b.h5ad", x, prefix="b")
    with pytest.raises(InputError, match=r"b\.h5ad: negative count -3\.0 at cell 201 "):
        write_counts([open_source(a), open_source(b)], tmp_path / "s.zarr", block_size=8)
    with pytest.raises(IncompleteStoreError):
        open_counts(tmp_path / "s.zarr")


def test_three_hundred_files_make_one_corpus(tmp_path, rng):
    """300 small inputs: one store, cells in input order, every file recorded as a source."""
    parts, paths = [], []
    for i in range(300):
        x = _matrix(rng, int(rng.integers(1, 6)), 8, density=0.5)
        parts.append(x)
        paths.append(_h5ad(tmp_path / f"f{i:03d}.h5ad", x, prefix=f"f{i}"))
    store = pipeline.convert(paths, tmp_path / "corpus.zarr", block_size=16)
    want = sp.vstack(parts, format="csr")
    _check_content(tmp_path / "corpus.zarr", want)
    assert [s["path"] for s in store.attrs["sources"]] == [os.fspath(p) for p in paths]
    sources = store.obs_column("source")
    np.testing.assert_array_equal(
        sources, np.repeat([os.fspath(p) for p in paths], [p.shape[0] for p in parts])
    )


@pytest.mark.distributed
def test_workers_write_the_bytes_threads_write(
    tmp_path, inputs, small_shards, local_cluster_address
):
    """On a cluster of 2 worker processes, from this process and from a task on a worker
    (an explicit client), the store is the threaded scheduler's, byte for byte; the reads
    and writes ran as many tasks."""
    paths, x = inputs
    local = pipeline.convert(paths, tmp_path / "local.zarr", block_size=16)
    with Client(local_cluster_address) as client, _test_sizes_on(client):
        direct = write_counts(
            [open_source(p) for p in paths],
            tmp_path / "direct.zarr",
            block_size=16,
            client=client,
        )
        remote = pipeline.convert(paths, tmp_path / "remote.zarr", block_size=16, client=client)
        prefixes = client.run_on_scheduler(_finished_prefixes)
    assert stored_files(local.url) == stored_files(direct.url) == stored_files(remote.url)
    assert local.fingerprint == direct.fingerprint == remote.fingerprint
    assert prefixes.get("flow-convert-count", 0) >= 2 * (97 // 40 + 1 + 130 // 40 + 1)
    assert prefixes.get("flow-convert-write", 0) >= 2 * (x.nnz // 256)
    _check_content(tmp_path / "remote.zarr", x)


def _patch_sizes(shard: int, chunk: int, piece_cells: int) -> None:
    """On a worker: the test's sizes (the coordinating task plans with them)."""
    store_module._SHARD = shard
    store_module._CHUNK = chunk
    count_tasks.PIECE_CELLS = piece_cells


@contextlib.contextmanager
def _test_sizes_on(client: Client) -> Iterator[None]:
    """This process's (patched) sizes on every worker meanwhile, flow's defaults after: the
    session cluster's workers serve other tests."""
    client.run(_patch_sizes, store_module._SHARD, store_module._CHUNK, count_tasks.PIECE_CELLS)
    try:
        yield
    finally:
        client.run(_patch_sizes, 1 << 22, 1 << 18, 8192)


def _finished_prefixes(dask_scheduler) -> dict[str, int]:
    return {
        name: int(p.state_counts.get("memory", 0) + p.state_counts.get("released", 0))
        for name, p in dask_scheduler.task_prefixes.items()
    }


def test_the_data_arrays_are_sized_once(tmp_path, inputs, small_shards):
    """X/data and X/indices are created at their final size (no resize, no leftovers)."""
    paths, x = inputs
    write_counts([open_source(p) for p in paths], tmp_path / "s.zarr", block_size=16)
    group = zarr.open_group(tmp_path / "s.zarr", mode="r")
    assert group["X/data"].shape == group["X/indices"].shape == (x.nnz,)
    assert group["X/data"].shards == (256,)


@pytest.mark.distributed
def test_many_inputs_are_opened_by_tasks_on_a_cluster(tmp_path, rng, local_cluster_address):
    """Enough inputs to open them as tasks: on a cluster (a task on a worker opens them),
    the same store as opened with threads here."""
    paths = [
        _h5ad(tmp_path / f"f{i}.h5ad", _matrix(rng, 3 + i, 6), prefix=f"f{i}")
        for i in range(pipeline.OPEN_IN_TASKS + 1)
    ]
    here = pipeline.convert(paths, tmp_path / "here.zarr", block_size=4)
    with Client(local_cluster_address) as client:
        there = pipeline.convert(paths, tmp_path / "there.zarr", block_size=4, client=client)
        prefixes = client.run_on_scheduler(_finished_prefixes)
    assert stored_files(here.url) == stored_files(there.url)
    assert prefixes.get("flow-convert-open", 0) >= len(paths)


# ------------------------------------------------------------- one pass (offsets known up front)


@pytest.fixture
def csr_inputs(tmp_path, rng):
    """Three CSR h5ad files (each cell's entries known from indptr) and their matrix."""
    parts = [_matrix(rng, n, 30) for n in (97, 41, 130)]
    paths = [_h5ad(tmp_path / f"{p}.h5ad", x, prefix=p) for p, x in zip("abc", parts, strict=True)]
    return paths, sp.vstack(parts, format="csr")


@pytest.fixture
def calls(monkeypatch):
    """How many one-pass and two-phase count tasks ran."""
    seen = {"direct": 0, "spilled": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(count_tasks, "count_direct", spy("direct", count_tasks.count_direct))
    monkeypatch.setattr(count_tasks, "count_piece", spy("spilled", count_tasks.count_piece))
    return seen


def _two_phase(monkeypatch):
    """Make the writer take the two-phase path (as for inputs without indptr)."""
    monkeypatch.setattr(store_module, "piece_offsets", lambda *a: None)


@pytest.mark.parametrize("piece_cells", [1, 7, 40, 10_000])
@pytest.mark.parametrize("block_size", [3, 16])
def test_csr_inputs_convert_in_one_pass_to_the_same_bytes(
    tmp_path, csr_inputs, small_shards, monkeypatch, calls, piece_cells, block_size
):
    """CSR inputs: every piece's offsets come from indptr, each count task writes the shards
    inside its piece and hands on its edges; the files are the two-phase writer's, byte for
    byte, for any split, and anndata reads the input's counts."""
    paths, x = csr_inputs
    monkeypatch.setattr(count_tasks, "PIECE_CELLS", piece_cells)
    direct = write_counts(
        [open_source(p) for p in paths], tmp_path / "d.zarr", block_size=block_size
    )
    assert calls == {
        "direct": len(plan_pieces([open_source(p) for p in paths], block_size)),
        "spilled": 0,
    }
    _two_phase(monkeypatch)
    spilled = write_counts(
        [open_source(p) for p in paths], tmp_path / "s.zarr", block_size=block_size
    )
    assert calls["spilled"] > 0
    assert stored_files(direct.url) == stored_files(spilled.url)
    assert direct.fingerprint == spilled.fingerprint
    assert direct.attrs["dtype"] == "uint16"
    _check_content(tmp_path / "d.zarr", x)


@pytest.mark.parametrize(
    ("change", "allow_non_integer", "dtype"),
    [
        ({250: 70_000}, False, "uint32"),  # a count past uint16, late
        ({5: 2.5}, True, "float32"),  # a non-integer count, early
        ({120: 0.0}, False, "uint16"),  # an explicit zero: fewer values than indptr says
    ],
    ids=["wide", "non-integer", "explicit-zero"],
)
def test_a_piece_that_does_not_fit_sends_the_store_to_two_phases(
    tmp_path, small_shards, monkeypatch, rng, calls, change, allow_non_integer, dtype
):
    """When a piece's counts need a wider dtype than uint16, or it holds fewer values than
    its indptr says, the one-pass write is dropped and the store is written in two phases:
    the same bytes as a two-phase write from the start, the right dtype and counts."""
    x = _matrix(rng, 300, 12, density=0.5).astype(np.float64)
    for row, value in change.items():
        assert x.indptr[row + 1] > x.indptr[row]
        x.data[x.indptr[row]] = value  # the cell's first stored entry (a zero stays stored)
    path = tmp_path / "a.h5ad"
    _h5ad(path, x, prefix="a")
    kw = {"block_size": 8, "allow_non_integer": allow_non_integer}
    store = write_counts([open_source(path)], tmp_path / "d.zarr", **kw)
    assert calls["direct"] > 0  # tried in one pass,
    assert calls["spilled"] > 0  # then fell back
    _two_phase(monkeypatch)
    spilled = write_counts([open_source(path)], tmp_path / "s.zarr", **kw)
    assert stored_files(store.url) == stored_files(spilled.url)
    assert store.attrs["dtype"] == dtype
    want = sp.csr_matrix(x.toarray())  # explicit zeros dropped
    _check_content(tmp_path / "d.zarr", want)


@pytest.mark.parametrize("sizes", [[5, 0, 3, 9, 1, 0], [1] * 9, [20], [0, 0], [4, 4, 4]])
@pytest.mark.parametrize("shard", [1, 3, 4, 7])
def test_every_shard_is_written_once_by_a_piece_or_as_an_edge(sizes, shard):
    """Each shard of X/data is either held whole by one piece or an edge fed, in order, by
    exactly the pieces it overlaps (a loop over every value as reference)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    owner = np.repeat(np.arange(len(sizes)), sizes)  # piece of each value
    edges = dict(count_tasks.edge_shards(offsets, shard))
    for k in range(-(-total // shard)):
        pieces = sorted(set(owner[k * shard : (k + 1) * shard].tolist()))
        places = [
            count_tasks.Place(int(offsets[i]), sizes[i], total, shard) for i in range(len(sizes))
        ]
        holders = [i for i, p in enumerate(places) if k in p.shards() and p.holds(k)]
        if len(pieces) == 1 and k not in edges:
            assert holders == pieces
        else:
            assert holders == []
            assert edges[k] == pieces
    assert all(k < -(-total // shard) for k in edges)


@pytest.mark.distributed
def test_one_pass_on_workers_writes_the_bytes_threads_write(
    tmp_path, csr_inputs, small_shards, local_cluster_address
):
    """CSR inputs on a cluster of 2 worker processes: the edges travel between workers as task
    results; the store is the threaded scheduler's, byte for byte."""
    paths, x = csr_inputs
    local = write_counts([open_source(p) for p in paths], tmp_path / "local.zarr", block_size=16)
    with Client(local_cluster_address) as client, _test_sizes_on(client):
        remote = write_counts(
            [open_source(p) for p in paths], tmp_path / "remote.zarr", block_size=16, client=client
        )
        prefixes = client.run_on_scheduler(_finished_prefixes)
    assert stored_files(local.url) == stored_files(remote.url)
    assert local.fingerprint == remote.fingerprint
    assert prefixes.get("flow-convert-edge", 0) > 0
    _check_content(tmp_path / "remote.zarr", x)


def test_real_10x_h5_and_anndata_zarr_convert_in_one_pass(
    tmp_path, pbmc_inputs, monkeypatch, calls
):
    """Real data: PBMC 1k (Cell Ranger h5) and PBMC 3k (h5ad, rewritten as AnnData Zarr CSR)
    give their indptr up front, convert in one pass, and match the two-phase writer's bytes
    and the inputs' counts."""
    monkeypatch.setattr(store_module, "_SHARD", 1 << 16)  # many shards and edges
    monkeypatch.setattr(store_module, "_CHUNK", 1 << 14)
    monkeypatch.setattr(count_tasks, "PIECE_CELLS", 300)
    adata = ad.read_h5ad(pbmc_inputs["h5ad"])
    adata.X = sp.csr_matrix(adata.X)
    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=3):
        warnings.filterwarnings("ignore", "zarr v3 autosharding will be", UserWarning)
        warnings.filterwarnings("ignore", "Consolidated metadata is currently", UserWarning)
        adata.write_zarr(tmp_path / "pbmc3k.zarr")
    paths = [pbmc_inputs["10x-h5"], tmp_path / "pbmc3k.zarr"]
    sources = [open_source(p) for p in paths]
    rows = [0, 5, sources[0].info.n_cells]
    assert sources[0].row_offsets(rows) is not None
    assert sources[1].row_offsets([0, 5]).tolist() == adata.X.indptr[[0, 5]].tolist()
    direct = write_counts(sources, tmp_path / "d.zarr", block_size=256)
    assert calls["direct"] > 0
    assert calls["spilled"] == 0
    _two_phase(monkeypatch)
    spilled = write_counts([open_source(p) for p in paths], tmp_path / "s.zarr", block_size=256)
    assert stored_files(direct.url) == stored_files(spilled.url)
    back = ad.read_zarr(tmp_path / "d.zarr")[sources[0].info.n_cells :]  # PBMC 3k's cells
    np.testing.assert_array_equal(back.obs["n_counts"], np.asarray(adata.X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(back.obs["n_genes"], np.diff(adata.X.indptr))
    np.testing.assert_array_equal(np.diff(back.X.indptr), np.diff(adata.X.indptr))
