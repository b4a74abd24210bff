"""Export of the model input: Hugging Face dataset directories and Parquet, checked with the
``datasets`` library itself against a plain-Python reference of upstream Geneformer's truncation."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import zarr
from dask.delayed import Delayed
from hypothesis import given, settings
from hypothesis import strategies as st

from flow._export_arrow import ModelInput, model_input_arrays, model_input_bands
from flow.encode._bands import BandLayout, BandReader, gather, split_bands
from flow.encode.store import plan_encoding, write_encoding
from flow.errors import ChunkingError, InputError, VocabularyError
from flow.export import export_summary, model_input_block, write_model_arrays, write_model_dataset
from flow.medians import medians_of
from flow.store import write_counts
from flow.vocab import CLS as CLS_NAME
from flow.vocab import EOS as EOS_NAME
from flow.vocab import resolve_preset, vocabulary_from_genes

from conftest import MatrixSource
from helpers import no_compute
from strategies import chunking

datasets = pytest.importorskip("datasets")

PAD = 0
CLS, EOS = 2, 3
VOCAB = 3_000  # gene tokens are 4 .. VOCAB + 3


# ----------------------------------------------------------------------------------------------
# data and references
# ----------------------------------------------------------------------------------------------


def rankings(rng: np.random.Generator, n_cells: int, width: int, *, dtype=np.uint16, p_empty=0.1):
    """Pad-filled full rankings: distinct gene tokens per cell, ``lengths[i]`` of them."""
    lengths = rng.integers(0, width + 1, n_cells).astype(np.int32)
    lengths[rng.random(n_cells) < p_empty] = 0
    tokens = np.full((n_cells, width), PAD, dtype=dtype)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.choice(VOCAB, size=n, replace=False) + 4
    return tokens, lengths


def reference_input_ids(tokens, lengths, input_size, cls=None, eos=None):
    """Upstream Geneformer, written out: the ranked genes, cut, then <cls> first and <eos> last."""
    out = []
    for row, n in zip(tokens, lengths, strict=True):
        ids = [int(t) for t in row[:n]]
        if cls is not None:
            ids = ids[0 : input_size - 2]
            ids = [cls, *ids, eos]
        else:
            ids = ids[0:input_size]
        out.append(ids)
    return out


def split(n: int, sizes) -> tuple[int, ...]:
    """Cut ``n`` into consecutive chunks of the given sizes (cycled), last one uneven."""
    out, i = [], 0
    while sum(out) < n:
        out.append(min(sizes[i % len(sizes)], n - sum(out)))
        i += 1
    return tuple(out) or (0,)


def as_dask(tokens, lengths, cell_chunks, rank_chunk=None):
    rank_chunk = rank_chunk or max(tokens.shape[1], 1)
    dt = da.from_array(tokens, chunks=(cell_chunks, rank_chunk))
    dl = da.from_array(lengths, chunks=(cell_chunks,))
    return dt, dl


def load_hf(path) -> dict[str, list]:
    ds = datasets.load_from_disk(os.fspath(path))
    return ds.to_dict()


def shard_files(path, pattern="data-*.arrow"):
    return sorted(p.name for p in Path(path).glob(pattern))


# ----------------------------------------------------------------------------------------------
# numpy kernel
# ----------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(0, 30),
    width=st.integers(0, 12),
    input_size=st.integers(3, 16),
    special=st.booleans(),
)
def test_model_input_block_equals_upstream_truncation(seed, n_cells, width, input_size, special):
    rng = np.random.default_rng(seed)
    tokens, lengths = rankings(rng, n_cells, width)
    cls, eos = (CLS, EOS) if special else (None, None)
    got = model_input_block(tokens, lengths, input_size=input_size, cls=cls, eos=eos)
    want = reference_input_ids(tokens, lengths, input_size, cls, eos)
    assert [g.tolist() for g in got] == want
    assert all(g.dtype == np.int32 for g in got)


def test_model_input_block_edge_cases():
    tokens = np.array([[9, 8, 7, 0], [0, 0, 0, 0], [5, 0, 0, 0]], dtype=np.uint16)
    lengths = np.array([3, 0, 1])
    v1 = model_input_block(tokens, lengths, input_size=2, cls=None, eos=None)
    assert [a.tolist() for a in v1] == [[9, 8], [], [5]]
    v2 = model_input_block(tokens, lengths, input_size=3, cls=CLS, eos=EOS)
    assert [a.tolist() for a in v2] == [[CLS, 9, EOS], [CLS, EOS], [CLS, 5, EOS]]
    v2_long = model_input_block(tokens, lengths, input_size=4096, cls=CLS, eos=EOS)
    assert [a.tolist() for a in v2_long] == [[CLS, 9, 8, 7, EOS], [CLS, EOS], [CLS, 5, EOS]]


def test_model_input_block_rejects_lengths_past_the_ranking():
    tokens = np.zeros((3, 2), dtype=np.uint16)
    with pytest.raises(InputError, match="cell 2"):
        model_input_block(tokens, np.array([0, 2, 3]), input_size=10, cls=None, eos=None)
    with pytest.raises(InputError, match="cell 0"):
        model_input_block(tokens, np.array([-1, 0, 0]), input_size=10, cls=None, eos=None)


def test_model_input_block_rejects_tokens_outside_int32():
    tokens = np.array([[2**31, 1]], dtype=np.uint64)
    with pytest.raises(InputError, match="int32"):
        model_input_block(tokens, np.array([2]), input_size=5, cls=None, eos=None)


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets: load_from_disk
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_size", "cls", "eos"),
    [(5, None, None), (1, None, None), (5, CLS, EOS), (3, CLS, EOS), (40, CLS, EOS)],
    ids=["V1-5", "V1-1", "V2-5", "V2-3", "V2-over-width"],
)
@pytest.mark.parametrize(
    "cell_sizes", [(7, 3, 11), (1,), (100,)], ids=["irregular", "1-row", "one"]
)
def test_hf_export_equals_reference(tmp_path, rng, input_size, cls, eos, cell_sizes):
    tokens, lengths = rankings(rng, 57, 12)
    dt, dl = as_dask(tokens, lengths, split(57, cell_sizes), rank_chunk=4)
    out = write_model_arrays(dt, dl, tmp_path / "ds", input_size=input_size, cls=cls, eos=eos)
    assert out == os.path.abspath(tmp_path / "ds")

    ds = datasets.load_from_disk(out)
    assert ds.column_names == ["input_ids", "length"]
    assert ds.features["input_ids"] == datasets.List(datasets.Value("int32"))
    assert ds.features["length"] == datasets.Value("int64")
    want = reference_input_ids(tokens, lengths, input_size, cls, eos)
    got = ds.to_dict()
    assert got["input_ids"] == want
    assert got["length"] == [len(ids) for ids in want]
    if cls is not None:
        assert all(ids[0] == cls and ids[-1] == eos for ids in got["input_ids"])
        assert got["length"] == [min(int(n), input_size - 2) + 2 for n in lengths]
    else:
        assert got["length"] == [min(int(n), input_size) for n in lengths]


def test_hf_export_matches_what_upstream_geneformer_writes(tmp_path, rng):
    """Upstream: Dataset.from_dict({"input_ids": arrays, **metadata}).map(truncate + specials)."""
    tokens, lengths = rankings(rng, 40, 9, p_empty=0.0)
    lengths = np.maximum(lengths, 1)  # upstream's map cannot handle a cell with no gene
    for i in range(len(lengths)):
        tokens[i, : lengths[i]] = rng.choice(VOCAB, size=lengths[i], replace=False) + 4
    cell_type = np.array([f"type{i % 3}" for i in range(40)])
    input_size = 6

    upstream = datasets.Dataset.from_dict(
        {
            "input_ids": [tokens[i, : lengths[i]].astype(np.int64) for i in range(40)],
            "cell_type": cell_type.tolist(),
        }
    )

    def format_cell_features(example):  # Geneformer TranscriptomeTokenizer.create_dataset
        example["input_ids"] = example["input_ids"][0 : input_size - 2]
        example["input_ids"] = np.insert(example["input_ids"], 0, CLS)
        example["input_ids"] = np.insert(example["input_ids"], len(example["input_ids"]), EOS)
        example["length"] = len(example["input_ids"])
        return example

    upstream = upstream.map(format_cell_features)
    dt, dl = as_dask(tokens, lengths, (13, 27))
    out = write_model_arrays(
        dt,
        dl,
        tmp_path / "ds",
        input_size=input_size,
        cls=CLS,
        eos=EOS,
        columns={"cell_type": cell_type},
    )
    ours = datasets.load_from_disk(out)
    for name in upstream.column_names:
        assert ours.features[name] == upstream.features[name], name
        assert ours[name] == upstream[name], name


def test_columns_and_keep(tmp_path, rng):
    n = 50
    tokens, lengths = rankings(rng, n, 8)
    keep = rng.random(n) < 0.6
    keep[:3] = False  # a first block without any kept cell
    columns = {
        "cell_type": np.array([f"t{i % 4}" for i in range(n)]),  # numpy unicode
        "barcode": np.array([f"AC{i:04d}-1" for i in range(n)], dtype=object),  # object str
        "n_counts": rng.integers(100, 10_000, n).astype(np.int32),
        "percent_mito": rng.random(n),
        "doublet": rng.random(n) < 0.1,
        "organ": pd.Categorical(["blood", "lung"] * (n // 2)),
    }
    dt, dl = as_dask(tokens, lengths, (3, 10, 1, 20, 16), rank_chunk=3)
    out = write_model_arrays(
        dt, dl, tmp_path / "ds", input_size=4, cls=CLS, eos=EOS, keep=keep, columns=columns
    )
    ds = datasets.load_from_disk(out)
    assert ds.column_names == ["input_ids", "length", *columns]
    assert ds.num_rows == int(keep.sum())
    got = ds.to_dict()
    want = [
        ids
        for ids, k in zip(reference_input_ids(tokens, lengths, 4, CLS, EOS), keep, strict=True)
        if k
    ]
    assert got["input_ids"] == want
    for name, col in columns.items():
        assert got[name] == np.asarray(col)[keep].tolist(), name
    feats = ds.features
    assert feats["cell_type"] == datasets.Value("string")
    assert feats["barcode"] == datasets.Value("string")
    assert feats["organ"] == datasets.Value("string")
    assert feats["n_counts"] == datasets.Value("int32")
    assert feats["percent_mito"] == datasets.Value("float64")
    assert feats["doublet"] == datasets.Value("bool")


def test_keep_and_columns_as_dask_arrays(tmp_path, rng):
    n = 30
    tokens, lengths = rankings(rng, n, 6)
    keep = rng.random(n) < 0.5
    score = rng.random(n).astype(np.float32)
    dt, _ = as_dask(tokens, lengths, (8, 8, 14))
    out = write_model_arrays(
        dt,
        lengths,  # numpy lengths are split along the cell chunks of tokens
        tmp_path / "ds",
        input_size=5,
        keep=da.from_array(keep, chunks=7),  # other chunks: a cheap 1-D rechunk
        columns={"score": da.from_array(score, chunks=(8, 8, 14))},
    )
    got = load_hf(out)
    assert got["input_ids"] == [
        ids for ids, k in zip(reference_input_ids(tokens, lengths, 5), keep, strict=True) if k
    ]
    np.testing.assert_array_equal(np.array(got["score"], dtype=np.float32), score[keep])


def test_cells_of_length_zero_are_kept(tmp_path):
    tokens = np.array([[0, 0], [7, 0], [0, 0]], dtype=np.uint16)
    lengths = np.array([0, 1, 0], dtype=np.int32)
    dt, dl = as_dask(tokens, lengths, (2, 1))
    v1 = load_hf(write_model_arrays(dt, dl, tmp_path / "v1", input_size=3))
    assert v1 == {"input_ids": [[], [7], []], "length": [0, 1, 0]}
    v2 = load_hf(write_model_arrays(dt, dl, tmp_path / "v2", input_size=3, cls=CLS, eos=EOS))
    assert v2 == {"input_ids": [[CLS, EOS], [CLS, 7, EOS], [CLS, EOS]], "length": [2, 3, 2]}


def test_no_cells_at_all(tmp_path):
    dt, dl = as_dask(np.zeros((0, 4), np.uint16), np.zeros(0, np.int32), (0,))
    ds = datasets.load_from_disk(
        write_model_arrays(dt, dl, tmp_path / "ds", input_size=4, cls=CLS, eos=EOS)
    )
    assert ds.num_rows == 0
    assert ds.column_names == ["input_ids", "length"]


@settings(deadline=None, max_examples=15)
@given(
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(0, 40),
    width=st.integers(1, 10),
    input_size=st.integers(3, 12),
    special=st.booleans(),
)
def test_any_chunking_gives_the_same_dataset(data, seed, n_cells, width, input_size, special):
    rng = np.random.default_rng(seed)
    tokens, lengths = rankings(rng, n_cells, width)
    keep = rng.random(n_cells) < 0.8
    tag = np.arange(n_cells, dtype=np.int64)
    cls, eos = (CLS, EOS) if special else (None, None)
    cells = data.draw(chunking(n_cells), label="cell chunks")
    rank_chunk = data.draw(st.integers(1, width), label="rank chunk")
    dt, dl = as_dask(tokens, lengths, cells, rank_chunk)
    with tempfile.TemporaryDirectory() as tmp:
        out = write_model_arrays(
            dt, dl, tmp, input_size=input_size, cls=cls, eos=eos, keep=keep, columns={"tag": tag}
        )
        got = load_hf(out)
        assert len(shard_files(tmp)) == len(cells)
    want = reference_input_ids(tokens, lengths, input_size, cls, eos)
    assert got["input_ids"] == [ids for ids, k in zip(want, keep, strict=True) if k]
    assert got["length"] == [len(ids) for ids in got["input_ids"]]
    assert got["tag"] == tag[keep].tolist()  # cell order preserved


# ----------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------


def test_parquet_equals_hf(tmp_path, rng):
    n = 45
    tokens, lengths = rankings(rng, n, 10)
    keep = rng.random(n) < 0.7
    columns = {
        "cell_type": np.array([f"t{i % 5}" for i in range(n)]),
        "n_counts": rng.integers(0, 9, n),
    }
    dt, dl = as_dask(tokens, lengths, (10, 4, 31), rank_chunk=3)
    kwargs = {"input_size": 6, "cls": CLS, "eos": EOS, "keep": keep, "columns": columns}
    hf = datasets.load_from_disk(write_model_arrays(dt, dl, tmp_path / "hf", **kwargs))
    out = write_model_arrays(dt, dl, tmp_path / "pq", format="parquet", **kwargs)

    assert sorted(p.name for p in Path(out).iterdir()) == [
        "_SUCCESS",
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    table = pq.read_table(out)
    assert table.column_names == hf.column_names
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.to_pydict() == hf.to_dict()
    frame = pd.read_parquet(out)
    assert [list(v) for v in frame["input_ids"]] == hf["input_ids"]
    assert frame["length"].tolist() == hf["length"]
    assert frame["cell_type"].tolist() == hf["cell_type"]
    # The Parquet schema carries datasets' features too
    assert datasets.Features.from_arrow_schema(table.schema) == hf.features


# ----------------------------------------------------------------------------------------------
# shards, re-export, laziness, what is read
# ----------------------------------------------------------------------------------------------


def test_one_shard_per_block_and_stale_shards_removed(tmp_path, rng):
    tokens, lengths = rankings(rng, 40, 6)
    path = tmp_path / "ds"
    dt, dl = as_dask(tokens, lengths, split(40, [7]))  # 6 blocks
    write_model_arrays(dt, dl, path, input_size=4)
    assert shard_files(path) == [f"data-{i:05d}-of-00006.arrow" for i in range(6)]
    state = json.loads((path / "state.json").read_text())
    assert [f["filename"] for f in state["_data_files"]] == shard_files(path)
    (path / "notes.txt").write_text("mine")

    dt, dl = as_dask(tokens, lengths, (15, 25))  # 2 blocks into the same directory
    write_model_arrays(dt, dl, path, input_size=5, cls=CLS, eos=EOS)
    assert shard_files(path) == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    assert (path / "notes.txt").read_text() == "mine"  # other files are left alone
    assert load_hf(path)["input_ids"] == reference_input_ids(tokens, lengths, 5, CLS, EOS)

    # Parquet into the same directory replaces the HF export (pyarrow would read notes.txt)
    (path / "notes.txt").unlink()
    dt, dl = as_dask(tokens, lengths, (40,))
    write_model_arrays(dt, dl, path, input_size=5, format="parquet")
    assert shard_files(path) == []
    assert not (path / "state.json").exists()
    assert shard_files(path, "part-*.parquet") == ["part-00000.parquet"]
    assert pq.read_table(path).column("input_ids").to_pylist() == reference_input_ids(
        tokens, lengths, 5
    )


def test_failed_export_is_not_mistaken_for_a_finished_one(tmp_path, rng):
    tokens, lengths = rankings(rng, 20, 5)
    path = tmp_path / "ds"
    dt, dl = as_dask(tokens, lengths, (10, 10))
    write_model_arrays(dt, dl, path, input_size=4)
    bad = lengths.copy()
    bad[15] = 6  # longer than the 5 stored ranks: the second block fails
    dt, dl = as_dask(tokens, bad, (10, 10))
    with pytest.raises(InputError, match="cell 15"):
        write_model_arrays(dt, dl, path, input_size=8)
    assert not (path / "state.json").exists()
    with pytest.raises(FileNotFoundError):
        datasets.load_from_disk(os.fspath(path))


def test_compute_false_is_lazy_and_names_its_tasks(tmp_path, rng):
    tokens, lengths = rankings(rng, 30, 6)
    dt, dl = as_dask(tokens, lengths, (12, 18))
    path = tmp_path / "ds"
    with no_compute():
        lazy = write_model_arrays(dt, dl, path, input_size=4, cls=CLS, eos=EOS, compute=False)
        lazy_pq = write_model_arrays(dt, dl, path, input_size=4, format="parquet", compute=False)
    assert isinstance(lazy, Delayed)
    assert not path.exists()  # nothing written while building

    graph = dict(lazy.__dask_graph__())
    prefixes = [k[0] if isinstance(k, tuple) else k for k in graph]
    assert sum(p.startswith("flow-export-shard-") for p in prefixes) == 2
    assert sum(p.startswith("flow-export-finalize-") for p in prefixes) == 1
    assert str(lazy.key).startswith("flow-export-finalize-")
    # identical calls give identical keys; another format gives others
    again = write_model_arrays(dt, dl, path, input_size=4, cls=CLS, eos=EOS, compute=False)
    assert again.key == lazy.key != lazy_pq.key

    assert lazy.compute() == os.path.abspath(path)
    assert load_hf(path)["input_ids"] == reference_input_ids(tokens, lengths, 4, CLS, EOS)


def test_only_the_needed_rank_columns_are_read(tmp_path, rng):
    tokens, lengths = rankings(rng, 20, 4)
    head = da.from_array(tokens, chunks=(7, 2))

    def poison(block):
        msg = "the tail of the ranking was read"
        raise AssertionError(msg)

    tail = da.zeros((20, 100), dtype=np.uint16, chunks=(7, 50)).map_blocks(poison, dtype=np.uint16)
    full = da.concatenate([head, tail], axis=1)  # lengths <= 4, so the model never needs the tail
    dl = da.from_array(lengths, chunks=7)
    out = write_model_arrays(full, dl, tmp_path / "ds", input_size=6, cls=CLS, eos=EOS)
    assert load_hf(out)["input_ids"] == reference_input_ids(tokens, lengths, 6, CLS, EOS)
    with pytest.raises(AssertionError, match="tail"):  # the poison works
        write_model_arrays(full, dl, tmp_path / "ds2", input_size=7, cls=CLS, eos=EOS)


def test_fsspec_url(rng):
    fsspec = pytest.importorskip("fsspec")
    tokens, lengths = rankings(rng, 25, 5)
    dt, dl = as_dask(tokens, lengths, (10, 15))
    url = "memory://flow-export-test/ds"
    try:
        out = write_model_arrays(dt, dl, url, input_size=4, cls=CLS, eos=EOS)
        assert out == url
        fs = fsspec.filesystem("memory")
        assert sorted(
            p.rsplit("/", 1)[-1] for p in fs.ls("/flow-export-test/ds", detail=False)
        ) == [
            "data-00000-of-00002.arrow",
            "data-00001-of-00002.arrow",
            "dataset_info.json",
            "state.json",
        ]
        with fs.open("/flow-export-test/ds/data-00001-of-00002.arrow", "rb") as f:
            table = pa.ipc.open_stream(f).read_all()
        want = reference_input_ids(tokens, lengths, 4, CLS, EOS)
        assert table.column("input_ids").to_pylist() == want[10:]
    finally:
        fsspec.filesystem("memory").rm("/flow-export-test", recursive=True)


# ----------------------------------------------------------------------------------------------
# distributed
# ----------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", ["hf", "parquet"])
def test_distributed_export_equals_sync(tmp_path, rng, local_cluster_address, fmt):
    distributed = pytest.importorskip("distributed")
    n = 300
    tokens, lengths = rankings(rng, n, 20)
    keep = rng.random(n) < 0.9
    columns = {"cell_type": np.array([f"t{i % 7}" for i in range(n)]), "i": np.arange(n)}
    dt, dl = as_dask(tokens, lengths, split(n, [37, 50, 13]), rank_chunk=6)
    kwargs = {
        "input_size": 9,
        "cls": CLS,
        "eos": EOS,
        "keep": keep,
        "columns": columns,
        "format": fmt,
    }
    sync = write_model_arrays(dt, dl, tmp_path / "sync", **kwargs)
    with distributed.Client(local_cluster_address) as client:
        lazy = write_model_arrays(dt, dl, tmp_path / "dist", compute=False, **kwargs)
        assert client.compute(lazy).result() == os.path.abspath(tmp_path / "dist")
        with dask.config.set(scheduler=client):  # compute=True on the client as well
            again = write_model_arrays(dt, dl, tmp_path / "dist2", **kwargs)
    read = load_hf if fmt == "hf" else (lambda p: pq.read_table(p).to_pydict())
    want = read(sync)
    assert read(tmp_path / "dist") == want
    assert read(again) == want
    assert want["input_ids"] == [
        ids
        for ids, k in zip(reference_input_ids(tokens, lengths, 9, CLS, EOS), keep, strict=True)
        if k
    ]


# ----------------------------------------------------------------------------------------------
# errors at call time
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def small():
    tokens = np.array([[5, 6], [7, 0], [0, 0]], dtype=np.uint16)
    return as_dask(tokens, np.array([2, 1, 0], np.int32), (2, 1))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"input_size": 2, "cls": CLS, "eos": EOS}, ValueError, "at least 3"),
        ({"input_size": 0}, ValueError, "at least 1"),
        ({"input_size": 4, "cls": CLS}, ValueError, "both cls and eos"),
        ({"input_size": 4, "format": "csv"}, ValueError, "unknown export format 'csv'"),
        ({"input_size": 4, "keep": np.ones(2, bool)}, ValueError, "one value per cell"),
        ({"input_size": 4, "keep": np.ones(3, int)}, TypeError, "boolean"),
        ({"input_size": 4, "columns": {"length": np.arange(3)}}, ValueError, "reserved"),
        ({"input_size": 4, "columns": {"x": np.arange(4)}}, ValueError, "one value per cell"),
        ({"input_size": 4, "columns": {"t": np.zeros(3, "datetime64[s]")}}, TypeError, "str, int"),
        (
            {"input_size": 4, "columns": {"o": np.array([1, "a", None], dtype=object)}},
            TypeError,
            "str",
        ),
    ],
)
def test_bad_arguments_raise_before_computing(tmp_path, small, kwargs, error, match):
    dt, dl = small
    with no_compute(), pytest.raises(error, match=match):
        write_model_arrays(dt, dl, tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_mismatched_chunks_name_the_fix(tmp_path, small):
    dt, _ = small
    dl = da.from_array(np.array([2, 1, 0], np.int32), chunks=1)
    with pytest.raises(ChunkingError, match=r"lengths\.rechunk\(tokens\.chunks\[0\]\)"):
        write_model_arrays(dt, dl, tmp_path / "ds", input_size=4)
    with pytest.raises(ValueError, match="same cell chunks"):  # a ChunkingError is a ValueError
        write_model_arrays(dt, dl, tmp_path / "ds", input_size=4)
    # the fix named in the message works
    out = write_model_arrays(dt, dl.rechunk(dt.chunks[0]), tmp_path / "ds", input_size=4)
    assert load_hf(out)["input_ids"] == [[5, 6], [7], []]


def test_tokens_must_be_a_dask_array_of_integers(tmp_path, small):
    _, dl = small
    with pytest.raises(TypeError, match="dask array"):
        write_model_arrays(np.zeros((3, 2), np.uint16), dl, tmp_path / "ds", input_size=4)
    with pytest.raises(TypeError, match="integer"):
        write_model_arrays(da.zeros((3, 2), chunks=(2, 2)), dl, tmp_path / "ds", input_size=4)


# ----------------------------------------------------------------------------------------------
# the export stage: an opened encoding store and a preset
# ----------------------------------------------------------------------------------------------


N_STAGE = 60
STAGE_TYPES = np.array([f"t{i % 3}" for i in range(N_STAGE)])
STAGE_KEEP = np.arange(N_STAGE) % 4 != 1


def _encoding(tmp, special=None):
    """An encoding store of seeded counts (about 15 genes per cell, blocks of 16 cells), with
    ``filter_pass`` (every 4th cell from the second fails) and a carried ``cell_type``."""
    rng = np.random.default_rng(11)
    x = rng.poisson(1.0, (N_STAGE, 30)) * (rng.random((N_STAGE, 30)) < 0.5)
    obs = pd.DataFrame({"filter_pass": STAGE_KEEP.astype(np.int8), "cell_type": STAGE_TYPES})
    store = write_counts([MatrixSource(sp.csr_matrix(x), obs)], tmp / "c.zarr", block_size=16)
    median_set = medians_of([store], method="exact", compute=dask.compute)
    genes = store.var.index.to_numpy(dtype=str)
    vocab = (
        vocabulary_from_genes(genes) if special is None else vocabulary_from_genes(genes, special)
    )
    return write_encoding(plan_encoding(store, median_set, vocab), tmp / "e.zarr"), vocab


@pytest.fixture(scope="module")
def stage_encoding(tmp_path_factory):
    return _encoding(tmp_path_factory.mktemp("stage"))


@pytest.mark.parametrize(
    ("preset", "input_size", "fmt"),
    [("V2", 8, "hf"), ("V2", None, "parquet"), ("V1", 5, "hf"), (None, 7, "parquet")],
)
def test_stage_writes_the_preset_view_of_the_encoding(
    tmp_path, stage_encoding, preset, input_size, fmt
):
    enc, vocab = stage_encoding
    chosen = resolve_preset(preset, input_size)
    out = write_model_dataset(enc, tmp_path / "ds", preset=chosen, format=fmt)
    assert out == os.path.abspath(tmp_path / "ds")

    got = load_hf(out) if fmt == "hf" else pq.read_table(out).to_pydict()
    assert list(got) == ["input_ids", "length", "cell_id", *enc.obs_columns]
    assert got["cell_id"] == enc.cell_column("cell")[STAGE_KEEP].tolist()  # rows map to cells
    assert "cell_type" in enc.obs_columns
    special = chosen.name == "V2"
    cls, eos = (vocab.special[CLS_NAME], vocab.special[EOS_NAME]) if special else (None, None)
    tokens = np.asarray(enc.tokens.compute())
    want = reference_input_ids(tokens, enc.lengths, chosen.input_size, cls, eos)
    assert got["input_ids"] == [ids for ids, k in zip(want, STAGE_KEEP, strict=True) if k]
    assert got["length"] == [len(ids) for ids in got["input_ids"]]
    assert got["cell_type"] == STAGE_TYPES[STAGE_KEEP].tolist()
    for name in enc.obs_columns:
        assert got[name] == enc.cell_column(name)[STAGE_KEEP].tolist(), name
    if input_size is not None:
        assert max(enc.lengths) > chosen.max_genes  # the cut is exercised
    if fmt == "hf":
        assert len(shard_files(out)) == enc.tokens.numblocks[0] == 4


def test_stage_compute_false_is_lazy(tmp_path, stage_encoding):
    enc, _ = stage_encoding
    path = tmp_path / "ds"
    with no_compute():
        lazy = write_model_dataset(enc, path, preset=resolve_preset("V2", 8), compute=False)
    assert isinstance(lazy, Delayed)
    assert str(lazy.key).startswith("flow-export-finalize-")
    assert not path.exists()
    assert lazy.compute() == os.path.abspath(path)
    assert len(load_hf(path)["input_ids"]) == int(STAGE_KEEP.sum())


def test_stage_is_one_task_per_block(tmp_path, stage_encoding):
    """Each block's shard task reads its bands, lengths, filter and columns itself: the graph
    holds one task per block, plus preparing, finishing and two shared readers (a task per
    block and column would make a 100M-cell export's scheduler the bottleneck)."""
    enc, _ = stage_encoding
    lazy = write_model_dataset(enc, tmp_path / "ds", preset=resolve_preset("V1"), compute=False)
    keys = [str(k[0] if isinstance(k, tuple) else k) for k in dict(lazy.__dask_graph__())]
    n_blocks = enc.tokens.numblocks[0]
    assert n_blocks == 4  # several blocks
    assert enc.obs_columns  # and carried columns
    assert sum(k.startswith("flow-export-shard-") for k in keys) == n_blocks
    assert len(keys) == n_blocks + 4, sorted(keys)


def test_stage_refuses_v2_without_special_tokens(tmp_path):
    enc, vocab = _encoding(tmp_path, special=("<pad>",))
    assert CLS_NAME not in vocab.special
    with no_compute(), pytest.raises(VocabularyError) as err:
        write_model_dataset(enc, tmp_path / "ds", preset=resolve_preset("V2", None))
    assert str(err.value) == (
        "Preset V2 needs special tokens ['<cls>', '<eos>'], which the encoding's vocabulary lacks."
    )
    assert not (tmp_path / "ds").exists()
    # V1 needs none: the same encoding exports
    out = write_model_dataset(enc, tmp_path / "v1", preset=resolve_preset("V1", 4))
    assert len(load_hf(out)["input_ids"]) == int(STAGE_KEEP.sum())


def test_stage_exports_the_chosen_obs_columns_only(tmp_path, stage_encoding):
    enc, _ = stage_encoding
    v1 = resolve_preset("V1")
    out = write_model_dataset(enc, tmp_path / "ds", preset=v1, format="parquet", obs_columns=[])
    assert list(pq.read_table(out).to_pydict()) == ["input_ids", "length", "cell_id"]
    with pytest.raises(InputError, match=r"\['nope'\] are not in the encoding store"):
        write_model_dataset(enc, tmp_path / "x", preset=v1, obs_columns=["cell_type", "nope"])
    assert not (tmp_path / "x").exists()  # refused before anything is written
    assert "1 truncated" not in export_summary(enc, v1)
    summary = export_summary(enc, resolve_preset(None, 5))
    kept = enc.lengths[STAGE_KEEP]
    assert summary == (
        f"{int(STAGE_KEEP.sum()):,} rows (the cells passing filter_pass, with their cell_id); "
        f"{int((kept > 5).sum()):,} truncated to 5 genes"
    )


# ----------------------------------------------------------------------------------------------
# the export stage reads the flat rank bands directly: same files as the dense view gives
# ----------------------------------------------------------------------------------------------


N_DEEP, DEEP_GENES, DEEP_BLOCK = 150, 6000, 32
DEEP_KEEP = np.arange(N_DEEP) % 7 != 3


@pytest.fixture(scope="module")
def deep_encoding(tmp_path_factory):
    """An encoding store with cells deeper than 4,096 genes, cells of length 0 (they express
    only genes outside the vocabulary), failing cells and an uneven last block."""
    tmp = tmp_path_factory.mktemp("deep")
    rng = np.random.default_rng(5)
    n_genes = rng.integers(0, 1600, N_DEEP)
    n_genes[::9] = rng.integers(4100, 5900, n_genes[::9].size)  # deeper than 4,096
    rows = []
    for i, n in enumerate(n_genes):
        if i % 11 == 5:  # only genes 0..49, which are not in the vocabulary: length 0
            cols = rng.choice(50, size=int(rng.integers(1, 20)), replace=False)
        else:
            cols = rng.choice(DEEP_GENES, size=int(n), replace=False)
        rows.append(
            sp.csr_matrix(
                (rng.integers(1, 30, cols.size), (np.zeros_like(cols), cols)), shape=(1, DEEP_GENES)
            )
        )
    x = sp.vstack(rows).tocsr()
    obs = pd.DataFrame(
        {"filter_pass": DEEP_KEEP, "batch": np.array([f"b{i % 4}" for i in range(N_DEEP)])}
    )
    store = write_counts([MatrixSource(x, obs)], tmp / "c.zarr", block_size=DEEP_BLOCK)
    median_set = medians_of([store], method="exact", compute=dask.compute)
    genes = store.var.index.to_numpy(dtype=str)
    vocab = vocabulary_from_genes(genes[50:])
    enc = write_encoding(plan_encoding(store, median_set, vocab), tmp / "e.zarr")
    return enc, vocab


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.mark.parametrize("fmt", ["hf", "parquet"])
@pytest.mark.parametrize(
    ("preset", "input_size"),
    [("V1", None), ("V2", None), ("V2", 700), ("V1", 512), ("V1", 5000), ("V2", 8000)],
)
def test_flat_band_export_equals_the_dense_view_byte_for_byte(
    tmp_path, deep_encoding, preset, input_size, fmt
):
    enc, vocab = deep_encoding
    lengths = enc.lengths
    assert (lengths > 4096).sum() >= 10
    assert (lengths == 0).sum() >= 10
    assert (lengths[DEEP_KEEP] == 0).any()
    assert enc.tokens.numblocks[0] == 5
    chosen = resolve_preset(preset, input_size)
    out = write_model_dataset(enc, tmp_path / "flat", preset=chosen, format=fmt)
    # the same export through the dense (cell, rank) view, the way it was done before
    special = chosen.name == "V2"
    cls, eos = (vocab.special[CLS_NAME], vocab.special[EOS_NAME]) if special else (None, None)
    columns = {"cell_id": enc.cell_array("cell")} | {n: enc.cell_array(n) for n in enc.obs_columns}
    dense = write_model_arrays(
        enc.tokens,
        enc.cell_array("length"),
        tmp_path / "dense",
        input_size=chosen.input_size,
        cls=cls,
        eos=eos,
        keep=enc.cell_array("filter_pass").astype(bool),
        columns=columns,
        format=fmt,
    )
    flat_files, dense_files = _files(out), _files(dense)
    assert list(flat_files) == list(dense_files)
    for name in flat_files:  # state.json names the directory (the fingerprint): compare the rest
        if name != "state.json":
            assert flat_files[name] == dense_files[name], name
    got = load_hf(out) if fmt == "hf" else pq.read_table(out).to_pydict()
    want = reference_input_ids(
        np.asarray(enc.tokens.compute()), lengths, chosen.input_size, cls, eos
    )
    assert got["input_ids"] == [ids for ids, k in zip(want, DEEP_KEEP, strict=True) if k]
    assert got["cell_id"] == enc.cell_column("cell")[DEEP_KEEP].tolist()


def test_flat_band_export_same_directory_same_bytes(tmp_path, deep_encoding):
    """Into the same directory, the band export and the dense one write identical files,
    state.json (the fingerprint) included."""
    enc, vocab = deep_encoding
    chosen = resolve_preset("V2", None)
    out = write_model_dataset(enc, tmp_path / "ds", preset=chosen)
    first = _files(out)
    columns = {"cell_id": enc.cell_array("cell")} | {n: enc.cell_array(n) for n in enc.obs_columns}
    write_model_arrays(
        enc.tokens,
        enc.cell_array("length"),
        tmp_path / "ds",
        input_size=chosen.input_size,
        cls=vocab.special[CLS_NAME],
        eos=vocab.special[EOS_NAME],
        keep=enc.cell_array("filter_pass").astype(bool),
        columns=columns,
    )
    assert _files(out) == first


class _Reads(zarr.storage.WrapperStore):
    """Records the keys read."""

    def __init__(self, store, reads=None):
        super().__init__(store)
        self.reads = [] if reads is None else reads

    def _with_store(self, store):
        return type(self)(store, self.reads)

    async def get(self, key, prototype, byte_range=None):
        self.reads.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        self.reads.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


@pytest.mark.parametrize("input_size", [600, 2048, 4096])
def test_flat_band_export_reads_only_the_bands_below_the_input_size(
    tmp_path, deep_encoding, input_size
):
    enc, _ = deep_encoding
    reads = _Reads(zarr.storage.LocalStore(enc.url, read_only=True))
    group = zarr.open_group(store=reads, mode="r")
    traced = dataclasses.replace(enc, _opened=group)
    chosen = resolve_preset("V1", input_size)
    out = write_model_dataset(traced, tmp_path / "ds", preset=chosen, obs_columns=[])
    bands = {int(k.split("/")[1]) for k in reads.reads if k.startswith("bands/") and "/c/" in k}
    assert not any(k.startswith("bands/") and "/counts/" in k for k in reads.reads)
    lengths = np.minimum(enc.lengths[DEEP_KEEP], input_size)
    assert bands == set(range(-(-int(lengths.max()) // 512)))  # every band needed, no other
    assert len(load_hf(out)["input_ids"]) == DEEP_KEEP.sum()


def _banded(tokens, lengths, block_size, band_width):
    """Tokens laid out as the encoding store keeps them (numpy arrays for the band arrays)."""
    n_cells, width = tokens.shape
    layout = BandLayout.plan(n_cells, block_size, band_width, max(width, 1))
    arrays = [np.full(layout.flat_size, PAD, tokens.dtype) for _ in range(layout.n_bands)]
    starts = layout.band_start()
    for b in range(layout.n_blocks):
        rows = slice(b * block_size, (b + 1) * block_size)
        flat = tokens[rows][np.arange(width) < lengths[rows, None]]
        for k, part in enumerate(split_bands(flat, lengths[rows], band_width)):
            arrays[k][starts[b, k] : starts[b, k] + part.size] = part
    return BandReader(tuple(arrays), starts, layout)


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_cells=st.integers(1, 40),
    width=st.integers(0, 25),
    block_size=st.integers(1, 12),
    band_width=st.integers(1, 7),
    input_size=st.integers(3, 30),
    special=st.booleans(),
)
def test_model_input_bands_equals_the_dense_kernel(
    seed, n_cells, width, block_size, band_width, input_size, special
):
    rng = np.random.default_rng(seed)
    tokens, lengths = rankings(rng, n_cells, width)
    keep = rng.random(n_cells) < 0.7
    reader = _banded(tokens, lengths, block_size, band_width)
    model = ModelInput(input_size, *((CLS, EOS) if special else (None, None)))
    for b in range(reader.layout.n_blocks):
        rows = slice(b * block_size, (b + 1) * block_size)
        values, sizes, kept = model_input_bands(reader, b, lengths[rows], keep[rows], model=model)
        assert np.array_equal(kept, np.flatnonzero(keep[rows]))
        want_values, want_sizes = model_input_arrays(
            tokens[rows][kept], lengths[rows][kept], model=model
        )
        assert values.dtype == np.int32
        assert np.array_equal(values, want_values)
        assert np.array_equal(sizes, want_sizes)


def test_gather_pieces_in_order():
    flat = np.arange(20)
    assert gather(flat, np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    assert gather(flat, np.array([3, 5]), np.array([2, 4])).tolist() == [3, 4, 5, 6, 7, 8]
    assert gather(flat, np.array([7]), np.array([0])).tolist() == []
