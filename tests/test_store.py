"""The count store and the synthetic data generator."""

from __future__ import annotations

import itertools
import shutil
import warnings
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import flow._store_obs as store_obs
from flow import (
    IncompleteStoreError,
    InputError,
    SchemaError,
    StoreNotFoundError,
    open_counts,
    write_counts,
)
from flow._io import ChunkedWriter, create_flow_group, mark_complete
from flow._location import Location
from flow.datasets import write_synthetic
from flow.errors import FlowWarning
from flow.ingest._source import SourceInfo

from helpers import no_compute


@dataclass
class ArraySource:
    """A Source over an in-memory matrix (test input)."""

    matrix: sp.csr_matrix
    path: str = "memory.h5ad"
    barcodes: list[str] | None = None
    obs: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __post_init__(self) -> None:
        n, g = self.matrix.shape
        self.info = SourceInfo(
            path=self.path,
            format="h5ad",
            n_cells=n,
            n_genes=g,
            gene_ids=np.array([f"ENSG{i:011d}" for i in range(g)], dtype=object),
            gene_symbols=None,
            barcodes=np.array(self.barcodes or [f"c{i}" for i in range(n)], dtype=object),
            obs=self.obs,
            fingerprint="test",
        )

    def iter_blocks(self, n_cells):
        for i in range(0, self.matrix.shape[0], 3):  # odd read size: the writer re-blocks
            yield self.matrix[i : i + 3]


def _dense(store) -> np.ndarray:
    return np.asarray(
        sp.vstack([store.counts.blocks[i, 0].compute() for i in range(store.n_blocks)]).todense()
    )


@settings(max_examples=20, deadline=None)
@given(
    x=st.integers(1, 40).flatmap(
        lambda n: st.lists(
            st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=n, max_size=n
        )
    ),
    block_size=st.integers(1, 50),
)
def test_any_block_size_gives_the_same_content(tmp_path_factory, x, block_size):
    matrix = sp.csr_matrix(np.array(x, dtype=np.int64))
    path = tmp_path_factory.mktemp("s") / "s.zarr"
    store = write_counts([ArraySource(matrix)], path, block_size=block_size)
    assert store.counts.chunks[0] == tuple(
        min(block_size, len(x) - s) for s in range(0, len(x), block_size)
    )
    np.testing.assert_array_equal(_dense(store), matrix.toarray())
    back = ad.read_zarr(path)
    np.testing.assert_array_equal(back.X.toarray(), matrix.toarray())
    np.testing.assert_array_equal(back.obs["n_counts"], matrix.toarray().sum(axis=1))
    np.testing.assert_array_equal(back.obs["n_genes"], (matrix.toarray() > 0).sum(axis=1))
    assert store.attrs["dtype"] == "uint16"


def _unique_reference(barcodes: list[str]) -> list[str]:
    """The n-th repeat (n >= 1) of a barcode becomes ``<barcode>-n`` (no dashes in the input)."""
    seen: dict[str, int] = {}
    out = []
    for b in barcodes:
        out.append(f"{b}-{seen[b]}" if b in seen else b)
        seen[b] = seen.get(b, 0) + 1
    return out


@settings(max_examples=25, deadline=None)
@given(
    parts=st.lists(
        st.tuples(
            st.lists(st.text("wxyz", min_size=1, max_size=4), min_size=1, max_size=12),
            st.booleans(),  # has the numeric column
            st.booleans(),  # has the text column
            st.booleans(),  # has filter_pass
        ),
        min_size=1,
        max_size=4,
    ),
    step=st.integers(1, 5),
)
def test_obs_written_in_slices_matches_pandas(tmp_path_factory, parts, step):
    """obs is written a few cells at a time across sources; the table equals one built by
    pandas from the inputs (barcodes made unique, fills for sources without a column)."""
    sources, frames = [], []
    for k, (barcodes, has_int, has_text, has_filter) in enumerate(parts):
        n = len(barcodes)
        own = pd.DataFrame(index=pd.RangeIndex(n))
        if has_int:
            own["score"] = np.arange(n, dtype=np.int64) * (k + 1)
        if has_text:
            own["label"] = np.array([f"{k}-{i}" for i in range(n)], dtype=object)
        if has_filter:
            own["filter_pass"] = np.arange(n, dtype=np.int64) % 2
        matrix = sp.csr_matrix(np.ones((n, 2), dtype=np.int32))
        sources.append(ArraySource(matrix, path=f"s{k}.h5ad", barcodes=barcodes, obs=own))
        frames.append(own.assign(n_counts=2, n_genes=2, source=f"s{k}.h5ad"))
    path = tmp_path_factory.mktemp("obs") / "s.zarr"
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", FlowWarning)  # the duplicate barcodes warning
        patch.setattr(store_obs, "OBS_STEP", step)
        write_counts(sources, path, block_size=3)

    want = pd.concat(frames, ignore_index=True)
    if "label" in want:
        want["label"] = want["label"].fillna("")
    if "filter_pass" in want:  # a source without it: every cell passes; integers stay integers
        want["filter_pass"] = want["filter_pass"].fillna(1).astype(np.int64)
    got = ad.read_zarr(path).obs
    assert got.index.tolist() == _unique_reference([b for bs, *_ in parts for b in bs])
    assert got["source"].tolist() == want["source"].tolist()
    for name in ("n_counts", "n_genes", "score", "label", "filter_pass"):
        assert (name in got) == (name in want)
        if name in want:
            np.testing.assert_array_equal(got[name].to_numpy(), want[name].to_numpy())
            assert got[name].dtype.kind == want[name].dtype.kind
    zarr_obs = zarr.open_group(path, mode="r")["obs"]
    assert zarr_obs["_index"].chunks == (min(step, len(got)),)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    unit=st.integers(1, 6),
    grow=st.booleans(),
)
def test_chunked_writer_writes_every_value_once_in_order(tmp_path_factory, sizes, unit, grow):
    """Pieces of any size come out as one array equal to their concatenation, written in
    whole units only (each chunk once: a write never straddles a unit boundary)."""
    pieces = [
        np.arange(sum(sizes[:i]), sum(sizes[: i + 1]), dtype=np.int64) for i in range(len(sizes))
    ]
    total = sum(sizes)
    group = zarr.open_group(tmp_path_factory.mktemp("w") / "g.zarr", mode="w")
    array = group.create_array("a", shape=(0 if grow else total,), dtype=np.int32, chunks=(unit,))
    writes: list[tuple[int, int]] = []

    class Recording:  # the array, recording the slices written to it
        dtype = array.dtype

        def resize(self, shape):
            array.resize(shape)

        def __setitem__(self, where, values):
            writes.append((where.start, where.stop))
            array[where] = values

    writer = ChunkedWriter(Recording(), unit, grow=grow)
    for piece in pieces:
        writer.append(piece)
    assert writer.close() == total
    np.testing.assert_array_equal(array[:], np.arange(total))
    assert [w for w in writes if w[0] != w[1]] == writes  # no empty writes
    assert all(start % unit == 0 for start, _ in writes)
    assert all(stop % unit == 0 for _, stop in writes[:-1])
    assert all(a[1] == b[0] for a, b in itertools.pairwise(writes))  # in order


def test_explicit_zeros_dropped_and_wider_dtype(tmp_path):
    m = sp.csr_matrix(
        (np.array([0, 70_000, 3]), np.array([0, 1, 2]), np.array([0, 2, 3])), shape=(2, 3)
    )
    store = write_counts([ArraySource(m)], tmp_path / "a.zarr")
    assert store.attrs["dtype"] == "uint32"
    assert store.attrs["nnz"] == 2
    np.testing.assert_array_equal(_dense(store), m.toarray())


@pytest.mark.parametrize(
    ("late", "allow_non_integer", "dtype"),
    [
        ({10: 70_000}, False, "uint32"),
        ({10: 5_000_000_000}, False, "float64"),
        ({10: 70_000, 20: 2.5}, True, "float32"),
        ({20: 2.5, 22: 5_000_000_000}, True, "float32"),  # the first widening decides
        ({10: 5_000_000_000, 20: 2.5}, True, "float64"),
        ({10: 65_535}, False, "uint16"),
    ],
    ids=[
        "uint32",
        "float64",
        "uint32-then-float32",
        "float32-first",
        "float64-first",
        "uint16-max",
    ],
)
def test_a_late_count_that_needs_a_wider_dtype_widens_the_whole_store(
    tmp_path, late, allow_non_integer, dtype
):
    """Counts that do not fit uint16, found after many cells: the whole store gets the
    smallest dtype that holds them (decided, block by block in cell order, from the counting
    phase: cells are counted once, then written once, never rewritten)."""
    dense = (np.arange(26 * 5).reshape(26, 5) % 7).astype(np.float64)
    for row, value in late.items():
        dense[row, 2] = value
    done: list[int] = []
    store = write_counts(
        [ArraySource(sp.csr_matrix(dense))],
        tmp_path / "a.zarr",
        block_size=4,
        allow_non_integer=allow_non_integer,
        progress=lambda n, total: done.append(n),
    )
    assert store.attrs["dtype"] == dtype
    assert 1 + sum(b < a for a, b in itertools.pairwise(done)) <= 2  # counted, then written
    assert done[-1] == 26
    np.testing.assert_array_equal(_dense(store), dense)
    back = ad.read_zarr(tmp_path / "a.zarr")
    np.testing.assert_array_equal(back.X.toarray(), dense)
    np.testing.assert_array_equal(back.obs["n_counts"], dense.sum(axis=1))
    x = zarr.open_group(tmp_path / "a.zarr", mode="r")["X"]
    assert x["data"].shape == x["indices"].shape == (store.attrs["nnz"],)  # nothing left over
    assert store.attrs["nnz"] == int((dense != 0).sum())


def test_repeated_entries_of_a_cell_are_summed_into_a_wide_enough_dtype(tmp_path):
    """An input may list a cell's gene twice (summed): the sum decides the dtype, not the
    parts (40,000 twice does not fit uint16)."""
    m = sp.csr_matrix(
        (np.array([40_000, 40_000, 3]), np.array([0, 0, 2]), np.array([0, 2, 3])), shape=(2, 3)
    )
    store = write_counts([ArraySource(m)], tmp_path / "a.zarr")
    assert store.attrs["dtype"] == "uint32"
    np.testing.assert_array_equal(_dense(store), [[80_000, 0, 0], [0, 0, 3]])
    np.testing.assert_array_equal(store.obs["n_counts"], [80_000, 3])


def test_store_location_is_absolute_and_describe(tmp_path, monkeypatch):
    """A relative path is made absolute once (tasks read the same store from any directory);
    a Location opens the same store; describe() summarises it."""
    monkeypatch.chdir(tmp_path)
    m = sp.csr_matrix((np.arange(40 * 6).reshape(40, 6) % 5).astype(np.int32))
    store = write_counts([ArraySource(m)], "rel.zarr", block_size=16)
    assert store.url == str(tmp_path / "rel.zarr")
    assert store.location == Location(str(tmp_path / "rel.zarr"))
    assert store.storage_options is None
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    np.testing.assert_array_equal(_dense(store), m.toarray())
    again = open_counts(Location(str(tmp_path / "rel.zarr")))
    assert again.url == store.url
    assert again.fingerprint == store.fingerprint

    detected = (m.toarray() > 0).sum(axis=1)
    q = np.percentile(detected, [0, 50, 90, 99, 100])
    lines = store.describe().splitlines()
    assert lines[0] == f"count store {tmp_path / 'rel.zarr'}"
    assert lines[1] == f"  cells x genes: 40 x 6; nonzeros {m.nnz:,}; dtype uint16"
    assert lines[2] == (
        f"  detected genes per cell: min {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
        f"p99 {q[3]:.0f}, max {q[4]:.0f}"
    )
    assert lines[3:] == [
        "  blocks: 3 blocks of 16 cells (the last may be shorter)",
        "  sources:",
        "    memory.h5ad (h5ad, 40 cells)",
    ]


def test_non_integer_counts(tmp_path):
    m = sp.csr_matrix(np.array([[0.5, 2.0], [1.0, 0.0]]))
    with pytest.raises(
        InputError, match=r"memory\.h5ad: non-integer count 0\.5 at cell 0.*allow-non-integer"
    ):
        write_counts([ArraySource(m)], tmp_path / "a.zarr")
    with pytest.raises(IncompleteStoreError, match="flow convert"):
        open_counts(tmp_path / "a.zarr")  # what was half-written is not mistaken for a store
    store = write_counts([ArraySource(m)], tmp_path / "b.zarr", allow_non_integer=True)
    assert store.attrs["dtype"] == "float32"
    np.testing.assert_array_equal(_dense(store), m.toarray())


@pytest.mark.parametrize(
    ("value", "kind"),
    [(-1.0, "negative"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")],
)
def test_bad_counts_name_file_and_cell(tmp_path, value, kind):
    m = sp.csr_matrix(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, value]]))
    with pytest.raises(InputError, match=f"memory.h5ad: {kind} count .* at cell 2"):
        write_counts([ArraySource(m)], tmp_path / "a.zarr")


def test_several_sources_and_duplicate_barcodes(tmp_path):
    a = ArraySource(
        sp.csr_matrix(np.eye(3, dtype=np.int32)),
        path="a.h5ad",
        barcodes=["x", "y", "z"],
        obs=pd.DataFrame({"filter_pass": [1, 0, 1]}),
    )
    b = ArraySource(
        sp.csr_matrix(2 * np.eye(3, dtype=np.int32)), path="b.h5ad", barcodes=["x", "q", "r"]
    )
    with pytest.warns(UserWarning, match="1 duplicate cell barcodes"):
        store = write_counts([a, b], tmp_path / "ab.zarr", block_size=4)
    obs = store.obs
    assert list(obs.index) == ["x", "y", "z", "x-1", "q", "r"]
    assert list(obs["source"]) == ["a.h5ad"] * 3 + ["b.h5ad"] * 3
    assert list(obs["filter_pass"][:3]) == [1, 0, 1]
    np.testing.assert_array_equal(_dense(store), np.vstack([np.eye(3), 2 * np.eye(3)]))


def test_opening_reads_no_counts(tmp_path):
    store = write_synthetic(tmp_path / "s.zarr", 300, 50, seed=1, mean_genes=10, block_size=100)
    shutil.rmtree(tmp_path / "s.zarr" / "X" / "data" / "c")  # any read of counts now fails
    with no_compute():
        reopened = open_counts(tmp_path / "s.zarr")
        graph = reopened.counts[:150]
    assert reopened.counts.shape == (300, 50)
    assert reopened.obs.shape[0] == 300
    assert graph.shape == (150, 50)
    with pytest.raises(InputError, match=r"block [01] of the counts is damaged"):
        graph.compute()  # reading counts does need them: the graph is real
    assert store.fingerprint == reopened.fingerprint


def test_open_errors(tmp_path):
    with pytest.raises(StoreNotFoundError):
        open_counts(tmp_path / "missing.zarr")
    create_flow_group(tmp_path / "other.zarr", "medians", 1)
    with pytest.raises(SchemaError, match="not a flow counts store"):
        open_counts(tmp_path / "other.zarr")
    create_flow_group(tmp_path / "half.zarr", "counts", 1)
    with pytest.raises(IncompleteStoreError, match="unfinished"):
        open_counts(tmp_path / "half.zarr")


def test_finishing_a_store_removes_writes_cut_off_by_a_kill(tmp_path):
    """zarr writes a local chunk to ``<key>.<uuid>.partial`` and renames it: a worker killed
    mid-write leaves that file. Marking the store complete (every writer's last step)
    removes such files and nothing else."""
    root = create_flow_group(tmp_path / "s.zarr", "counts", 1)
    root.create_array("x", shape=(4,), chunks=(2,), dtype="i4")[:] = np.arange(4)
    chunks = tmp_path / "s.zarr" / "x" / "c"
    (chunks / "1.0123456789abcdef.partial").write_bytes(b"cut")
    (tmp_path / "s.zarr" / "x" / "c" / "7").mkdir()
    (chunks / "7" / "0.fedcba9876543210.partial").write_bytes(b"cut")
    mark_complete(root)
    assert sorted(p.name for p in chunks.rglob("*") if p.is_file()) == ["0", "1"]
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "s.zarr")["x"][:], np.arange(4))
    assert zarr.open_group(tmp_path / "s.zarr").attrs["flow"]["complete"] is True


def test_flow_info(tmp_path, capsys):
    from flow.cli import main

    write_synthetic(tmp_path / "s.zarr", 500, 80, seed=1, mean_genes=20, block_size=200)
    assert main(["info", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "500 x 80" in out
    assert "blocks: 3 blocks of 200 cells" in out
    assert "detected genes per cell" in out


def test_obs_columns_read_one_at_a_time_match_the_table(tmp_path):
    """obs_column / iter_obs_column give the columns of the full obs table, slice by slice:
    numbers keep their dtype, text and categories (missing ones too) come back as str."""
    n = 10
    obs = pd.DataFrame(
        {
            "label": pd.Categorical(["a", "b", None, "a", "c", "b", "a", None, "c", "a"]),
            "donor": [f"d{i % 3}" for i in range(n)],
            "score": np.linspace(0, 1, n),
            "ok": np.arange(n) % 2 == 0,
        }
    )
    m = sp.csr_matrix(np.arange(1, 6 * n + 1).reshape(n, 6) % 4)
    store = write_counts([ArraySource(m, obs=obs)], tmp_path / "a.zarr", block_size=4)
    table = store.obs
    assert store.obs_columns == list(table.columns)
    np.testing.assert_array_equal(store.obs_column("_index"), table.index.to_numpy(dtype=str))
    for name in table.columns:
        col = table[name]
        expected = col.to_numpy() if col.dtype.kind in "biuf" else col.astype(str).to_numpy(str)
        pieces = list(store.iter_obs_column(name, step=3))
        assert [p.size for p in pieces] == [3, 3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(pieces), expected)
        got = store.obs_column(name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected)
    assert list(store.obs_column("label")[[2, 7]]) == ["nan", "nan"]
    with pytest.raises(KeyError, match="no obs column 'nope'"):
        store.obs_column("nope")
