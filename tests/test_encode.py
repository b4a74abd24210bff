"""The encoding stage end to end: rank wiring (flow.encode.rank), the encoding store
(flow.encode.store) and the tokenize/export pipeline functions, on small count stores.

Exactness of the kernel itself is tested in ``test_rank_kernel.py``; here every store is checked
against the plain-Python reference (``tests/reference.py``) cell by cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from dask.array.utils import same_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow import pipeline
from flow._genes import GeneMapping
from flow._location import Location
from flow.datasets import synthetic_counts, write_synthetic
from flow.encode import store as encode_store
from flow.encode.rank import rank_cells, ranked_blocks
from flow.encode.store import encoding_graph, open_encoding, plan_encoding, write_encoding
from flow.errors import (
    IncompleteStoreError,
    InputError,
    OutputExistsError,
    SchemaError,
    VocabularyError,
)
from flow.ingest._source import SourceInfo
from flow.medians import MedianSet, medians_of
from flow.store import open_counts, write_counts
from flow.vocab import Vocabulary

from helpers import no_compute
from reference import reference_rank_cell
from strategies import small_matrices

datasets = pytest.importorskip("datasets")

SPECIAL = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
PAD, CLS, EOS = 0, 2, 3
CELL_ARRAYS = ("tokens", "counts", "length", "token_cells")  # independent of the block grid
ARRAYS = (*CELL_ARRAYS, "block_done", "block_token_cells")

SMALL = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def vocab_and_medians(
    gene_ids: np.ndarray, seed: int, *, fraction: float = 0.8, levels: int = 3
) -> tuple[Vocabulary, MedianSet]:
    """A vocabulary of about ``fraction`` of the genes, tokens shuffled (so token order is not
    column order), and medians from ``levels`` values (so equal values, i.e. ties, are common)."""
    rng = np.random.default_rng(seed)
    n = gene_ids.size
    chosen = np.sort(rng.choice(n, size=max(1, int(np.ceil(fraction * n))), replace=False))
    vocab = Vocabulary(gene_ids[chosen], rng.permutation(chosen.size) + 4, SPECIAL)
    medians = rng.choice(np.linspace(0.5, 2.5, levels), size=n)
    median_set = MedianSet(
        gene_ids.astype(object), medians, np.full(n, -1), None, "imported", None, ()
    )
    return vocab, median_set


def encode(store, vocab, median_set, path, **kwargs):
    """Plan and write an encoding store (the tokenize stage, on the current scheduler)."""
    return write_encoding(plan_encoding(store, median_set, vocab, **kwargs), path)


def reference_rankings(counts, n_counts, gene_ids, vocab, median_set) -> list[np.ndarray]:
    """Per cell, the reference ranking of its detected vocabulary genes (one column per gene)."""
    tokens = vocab.token_of(gene_ids)
    med = dict(zip(median_set.gene_ids.tolist(), median_set.medians.tolist(), strict=True))
    in_vocab = tokens >= 0
    meds = np.array([med[g] for g in gene_ids[in_vocab]])
    return [
        reference_rank_cell(row[in_vocab], float(n), meds, tokens[in_vocab])
        for row, n in zip(counts, n_counts, strict=True)
    ]


def read_arrays(path) -> dict[str, np.ndarray]:
    """The arrays of a finished store; ``tokens`` and ``counts`` as the dense (cell, rank) view
    readers see (the banded layout on disk depends on the block grid)."""
    root = zarr.open_group(os.fspath(path), mode="r")
    enc = open_encoding(path)
    dense = {"tokens": enc.tokens, "counts": enc.counts}
    return {
        name: np.asarray(dense[name].compute() if name in dense else root[name][:])
        for name in ARRAYS
    }


def assert_same_bytes(a: dict[str, np.ndarray], b: dict[str, np.ndarray], names=ARRAYS) -> None:
    for name in names:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


class ArraySource:
    """An in-memory :class:`flow.ingest.Source`: any counts, gene IDs and cell metadata."""

    def __init__(self, counts: np.ndarray, gene_ids, obs: pd.DataFrame | None = None) -> None:
        self.counts = sp.csr_matrix(np.asarray(counts, dtype=np.int32))
        n_cells, n_genes = self.counts.shape
        self.info = SourceInfo(
            path="memory",
            format="h5ad",
            n_cells=n_cells,
            n_genes=n_genes,
            gene_ids=np.asarray(gene_ids, dtype=object),
            gene_symbols=None,
            barcodes=np.array([f"c{i}" for i in range(n_cells)], dtype=object),
            obs=obs if obs is not None else pd.DataFrame(index=range(n_cells)),
            fingerprint=f"memory-{hash(self.counts.data.tobytes())}",
        )

    def iter_blocks(self, n_cells: int) -> Iterator[sp.csr_matrix]:
        for start in range(0, self.counts.shape[0], n_cells):
            yield self.counts[start : start + n_cells]


# ----------------------------------------------------------------------------------------------
# properties on synthetic stores
# ----------------------------------------------------------------------------------------------


@SMALL
@given(case=small_matrices())
def test_any_block_size_gives_identical_stores(case):
    """Block sizes 7, 64, the whole matrix and a drawn one: byte-identical arrays, each equal to
    the reference, rankings permutations of the detected vocabulary genes, values non-increasing."""
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        sizes = sorted({7, 64, case["n_cells"], case["odd_block"]})
        for bs in sizes:
            store = write_synthetic(
                f"{tmp}/counts-{bs}.zarr",
                case["n_cells"],
                case["n_genes"],
                seed=case["seed"],
                mean_genes=case["mean_genes"],
                block_size=bs,
            )
            assert store.block_size == bs
            vocab, median_set = vocab_and_medians(
                store.var.index.to_numpy(dtype=str),
                case["seed"],
                fraction=case["fraction"],
                levels=case["levels"],
            )
            enc = encode(store, vocab, median_set, f"{tmp}/enc-{bs}.zarr")
            assert enc.tokens.chunks[0] == store.counts.chunks[0]  # writers own whole blocks
            results.append(read_arrays(f"{tmp}/enc-{bs}.zarr"))
            results[-1]["values"] = enc.values.compute()  # derived from counts, float64
        for other in results[1:]:
            assert_same_bytes(results[0], other, CELL_ARRAYS)

        # against the reference, and the invariants spelled out
        got = results[0]
        counts = synthetic_counts(
            case["n_cells"], case["n_genes"], seed=case["seed"], mean_genes=case["mean_genes"]
        ).to_dense()
        gene_ids = store.var.index.to_numpy(dtype=str)
        n_counts = counts.sum(axis=1)
        expected = reference_rankings(counts, n_counts, gene_ids, vocab, median_set)
        tokens_of_genes = vocab.token_of(gene_ids)
        for i, ref in enumerate(expected):
            n = int(got["length"][i])
            ranked = got["tokens"][i, :n]
            np.testing.assert_array_equal(ranked, ref)
            detected = tokens_of_genes[(counts[i] > 0) & (tokens_of_genes >= 0)]
            assert sorted(ranked.tolist()) == sorted(detected.tolist())  # a permutation
            assert (got["tokens"][i, n:] == PAD).all()
            values = got["values"][i]
            assert (np.diff(values[:n]) <= 0).all()
            assert (values[:n] > 0).all()
            assert (values[n:] == 0).all()
            assert (got["counts"][i, :n] > 0).all()
            assert (got["counts"][i, n:] == 0).all()
        assert got["block_done"].all()
        expressed = np.zeros(vocab.n_tokens, np.int64)
        for ref in expected:
            expressed[ref] += 1
        np.testing.assert_array_equal(got["token_cells"], expressed)


@SMALL
@given(
    n_cells=st.integers(1, 40),
    mean_genes=st.integers(1, 14),
    input_size=st.integers(3, 12),
    seed=st.integers(0, 2**16),
)
def test_v2_export_wraps_the_first_genes_in_cls_and_eos(n_cells, mean_genes, input_size, seed):
    """V2 semantics at a small input size: <cls>, the first min(n, input_size - 2) genes, <eos>."""
    with tempfile.TemporaryDirectory() as tmp:
        store = write_synthetic(f"{tmp}/c.zarr", n_cells, 30, seed=seed, mean_genes=mean_genes)
        vocab, median_set = vocab_and_medians(store.var.index.to_numpy(dtype=str), seed)
        enc = encode(store, vocab, median_set, f"{tmp}/e.zarr")
        pipeline.export(f"{tmp}/e.zarr", f"{tmp}/ds", preset="V2", input_size=input_size)
        ds = datasets.load_from_disk(f"{tmp}/ds")
        tokens = np.asarray(enc.tokens.compute())
        assert len(ds) == n_cells
        for i, (ids, length) in enumerate(zip(ds["input_ids"], ds["length"], strict=True)):
            n = min(int(enc.lengths[i]), input_size - 2)
            assert ids[0] == CLS
            assert ids[-1] == EOS
            assert ids[1:-1] == tokens[i, :n].tolist()
            assert length == n + 2
        # V1 semantics at the same size: the first min(n, input_size) genes, no special tokens
        pipeline.export(f"{tmp}/e.zarr", f"{tmp}/v1", preset=None, input_size=input_size)
        v1 = datasets.load_from_disk(f"{tmp}/v1")
        for i, ids in enumerate(v1["input_ids"]):
            assert ids == tokens[i, : min(int(enc.lengths[i]), input_size)].tolist()


# ----------------------------------------------------------------------------------------------
# cell semantics: filter_pass, cells without vocabulary genes, carried columns, gene IDs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def handmade(tmp_path):
    """A count store with everything awkward: IDs with versions and lower case, an exact
    duplicate ID, genes outside the vocabulary, a cell with only such genes, an empty cell,
    cells failing filter_pass, and carried columns of three types."""
    gene_ids = [
        "ENSG00000000001",
        "ensg00000000002.7",  # lower case + version: ENSG00000000002
        "ENSG00000000003",
        "ENSG00000000003",  # exact duplicate: summed
        "ENSG00000000004.1",
        "ENSG00000000005",
        "ENSG99999999998",  # not in the vocabulary
        "ENSG99999999999",  # not in the vocabulary
    ]
    counts = np.array(
        [
            [3, 1, 1, 1, 0, 2, 5, 0],
            [0, 0, 0, 0, 0, 0, 4, 4],  # only non-vocabulary genes: kept, length 0
            [1, 1, 1, 0, 1, 1, 0, 0],  # fails filter_pass
            [0, 0, 0, 0, 0, 0, 0, 0],  # no counts at all: kept, length 0
            [7, 0, 2, 2, 1, 0, 0, 9],
            [1, 2, 0, 3, 4, 1, 1, 1],  # fails filter_pass
        ]
    )
    obs = pd.DataFrame(
        {
            "filter_pass": [1, 1, 0, 1, 1, 0],
            "donor": ["a", "b", "c", "d", "e", "f"],
            "score": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5],
            "batch": np.array([1, 1, 2, 2, 3, 3], dtype=np.int64),
        }
    )
    store = write_counts([ArraySource(counts, gene_ids, obs)], tmp_path / "c.zarr", block_size=4)
    vocab = Vocabulary(
        [
            "ENSG00000000005",
            "ENSG00000000001",
            "ENSG00000000004",
            "ENSG00000000003",
            "ENSG00000000002",
        ],
        [4, 5, 6, 7, 8],
        SPECIAL,
    )
    medians = {"ENSG00000000001": 2.0, "ENSG00000000002": 0.5, "ENSG00000000003": 1.0,
               "ENSG00000000004": 0.25, "ENSG00000000005": 1.0}  # fmt: skip
    median_set = MedianSet(
        np.array(list(medians), dtype=object), np.array(list(medians.values())),
        np.full(5, -1), None, "imported", None, (),
    )  # fmt: skip
    # what the reference sees: duplicate summed, IDs normalised, unknown genes gone
    collapsed = np.stack(
        [counts[:, 0], counts[:, 1], counts[:, 2] + counts[:, 3], counts[:, 4], counts[:, 5]], 1
    )
    ids = [
        "ENSG00000000001",
        "ENSG00000000002",
        "ENSG00000000003",
        "ENSG00000000004",
        "ENSG00000000005",
    ]
    expected = [
        reference_rank_cell(row, float(n), [medians[g] for g in ids], vocab.token_of(ids))
        for row, n in zip(collapsed, counts.sum(axis=1), strict=True)
    ]
    return {
        "store": store, "vocab": vocab, "median_set": median_set, "expected": expected,
        "obs": obs, "path": tmp_path,
    }  # fmt: skip


def test_gene_ids_normalised_and_duplicates_summed(handmade):
    enc = encode(
        handmade["store"], handmade["vocab"], handmade["median_set"], handmade["path"] / "e.zarr"
    )
    tokens = np.asarray(enc.tokens.compute())
    for i, ref in enumerate(handmade["expected"]):
        np.testing.assert_array_equal(tokens[i, : enc.lengths[i]], ref)
    assert enc.attrs["n_genes_kept"] == 5
    assert enc.attrs["n_duplicates_summed"] == 1
    np.testing.assert_array_equal(enc.lengths, [4, 0, 5, 0, 3, 5])


def test_filter_pass_empty_cells_and_carried_columns(handmade):
    path = handmade["path"]
    enc = encode(handmade["store"], handmade["vocab"], handmade["median_set"], path / "e.zarr")
    keep = handmade["obs"]["filter_pass"].to_numpy().astype(bool)
    # token_cells counts passing cells only
    expressed = np.zeros(handmade["vocab"].n_tokens, np.int64)
    for ref, k in zip(handmade["expected"], keep, strict=True):
        if k:
            expressed[ref] += 1
    np.testing.assert_array_equal(enc.token_table()["cells"], expressed)
    # empty cells are kept, with length 0, and counted in the summary
    assert "2 passing cells with no vocabulary gene (kept with length 0)" in enc.describe()
    assert "(4 passing filter)" in enc.describe()
    # export: failing cells excluded, carried columns present and aligned
    for preset, head, tail in (("V1", [], []), ("V2", [CLS], [EOS])):
        pipeline.export(path / "e.zarr", path / preset, preset=preset)
        ds = datasets.load_from_disk(os.fspath(path / preset))
        assert len(ds) == int(keep.sum())
        for name in ("donor", "score", "batch"):
            assert name in ds.column_names
            assert ds[name] == handmade["obs"][name][keep].tolist()
        for ids, ref in zip(
            ds["input_ids"], np.array(handmade["expected"], dtype=object)[keep], strict=True
        ):
            assert ids == [*head, *ref.tolist(), *tail]
        assert [len(x) for x in ds["input_ids"]][1] == len(head) + len(tail)  # the empty cell


@pytest.mark.parametrize(
    ("column", "kept"),
    [
        ([1, 0, 1, 1], [True, False, True, True]),
        ([True, False, False, True], [True, False, False, True]),
        ([1.0, np.nan, 0.0, 2.0], [True, False, False, False]),  # upstream keeps == 1 only
        (["True", "False", "1", "0"], [True, False, True, False]),  # not astype(bool)
        (["yes", "no", "TRUE", ""], [True, False, True, False]),
    ],
)
def test_filter_pass_values(tmp_path, column, kept):
    """Tokenize and medians read filter_pass the same way."""
    counts = np.arange(1, 25).reshape(4, 6) ** 2 % 11
    source = ArraySource(counts, [f"ENSG{i:011d}" for i in range(6)],
                         pd.DataFrame({"filter_pass": column}))  # fmt: skip
    store = write_counts([source], tmp_path / "c.zarr")
    vocab, median_set = vocab_and_medians(store.var.index.to_numpy(dtype=str), 0, fraction=1.0)
    np.testing.assert_array_equal(plan_encoding(store, median_set, vocab).keep, kept)
    values = counts[kept] / counts[kept].sum(axis=1, keepdims=True) * 10_000
    expected = [np.median(v[v > 0]) if (v > 0).any() else np.nan for v in values.T]
    got = medians_of([store], method="exact", compute=dask.compute).medians
    np.testing.assert_array_equal(got, expected)


def test_filter_pass_of_unknown_text_is_an_error(tmp_path):
    source = ArraySource(np.ones((2, 6), np.int32), [f"ENSG{i:011d}" for i in range(6)],
                         pd.DataFrame({"filter_pass": ["pass", "fail"]}))  # fmt: skip
    store = write_counts([source], tmp_path / "c.zarr")
    vocab, median_set = vocab_and_medians(store.var.index.to_numpy(dtype=str), 0, fraction=1.0)
    with pytest.raises(InputError, match=r"filter_pass.*\['fail', 'pass'\]"):
        plan_encoding(store, median_set, vocab)


def test_too_few_vocabulary_genes_is_an_error(tmp_path):
    """Symbols instead of Ensembl IDs: a VocabularyError that says what to do."""
    source = ArraySource(
        np.eye(6, dtype=np.int32) + 1, ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "PPBP"]
    )
    store = write_counts([source], tmp_path / "c.zarr")
    vocab, median_set = vocab_and_medians(
        np.array([f"ENSG{i:011d}" for i in range(6)]), 0, fraction=1.0
    )
    with pytest.raises(VocabularyError, match="gene symbols"):
        plan_encoding(store, median_set, vocab)


def test_a_gene_mapping_collapses_columns_as_the_medians_do(tmp_path):
    """Columns the mapping sends to one gene are summed by medians and tokenize alike: the
    median set keeps first-seen gene order, the encoding equals the reference on the summed
    columns, and the plan records the mapping's content fingerprint."""
    gene_ids = ["TP53", "ENSG00000000002.1", "p53alias", "ENSG00000000003", "ENSG00000000009"]
    raw = {"tp53": "ENSG00000000001.4", "P53ALIAS": "ENSG00000000001",
           "ENSG00000000003": "ENSG00000000002"}  # fmt: skip
    mapping = GeneMapping.from_dict(raw)
    rng = np.random.default_rng(11)
    counts = rng.integers(0, 6, (12, 5)) * (rng.random((12, 5)) < 0.7)
    counts[0] = 0
    store = write_counts([ArraySource(counts, gene_ids)], tmp_path / "c.zarr", block_size=5)
    summed = np.stack([counts[:, 0] + counts[:, 2], counts[:, 1] + counts[:, 3], counts[:, 4]], 1)
    n_counts = counts.sum(axis=1)

    median_set = medians_of([store], method="exact", gene_mapping=mapping, compute=dask.compute)
    assert median_set.gene_ids.tolist() == ["ENSG00000000001", "ENSG00000000002", "ENSG00000000009"]
    values = summed[n_counts > 0] / n_counts[n_counts > 0, None] * 10_000
    expected = [np.median(v[v > 0]) if (v > 0).any() else np.nan for v in values.T]
    np.testing.assert_array_equal(median_set.medians, expected)

    vocab = Vocabulary(
        ["ENSG00000000001", "ENSG00000000002", "ENSG00000000005"], [7, 4, 5], SPECIAL
    )
    plan = plan_encoding(store, median_set, vocab, gene_mapping=mapping)
    plain = {"TP53": "ENSG00000000001", "P53ALIAS": "ENSG00000000001",
             "ENSG00000000003": "ENSG00000000002"}  # fmt: skip
    digest = hashlib.sha256(json.dumps(sorted(plain.items())).encode()).hexdigest()
    assert plan.params["gene_mapping"] == digest  # the fingerprint the stores always recorded
    enc = write_encoding(plan, tmp_path / "e.zarr")
    assert (enc.attrs["n_genes_matched"], enc.attrs["n_duplicates_summed"]) == (4, 2)
    tokens = np.asarray(enc.tokens.compute())
    for i in range(counts.shape[0]):
        ref = reference_rank_cell(summed[i, :2], float(n_counts[i]), median_set.medians[:2], [7, 4])
        np.testing.assert_array_equal(tokens[i, : enc.lengths[i]], ref)
    with pytest.raises(TypeError, match="GeneMapping"):
        plan_encoding(store, median_set, vocab, gene_mapping=raw)  # type: ignore[arg-type]


def test_write_encoding_returns_the_store_opened_once(synthetic_store, tmp_path, monkeypatch):
    """The store write_encoding returns is bound to where it wrote (a Location), has the
    attributes a fresh open reads, and reads every array through one opened group."""
    vocab, median_set = vocab_and_medians(synthetic_store.var.index.to_numpy(dtype=str), 8)
    where = Location.of(tmp_path / "e.zarr")
    enc = write_encoding(plan_encoding(synthetic_store, median_set, vocab), where)
    assert enc.location == where
    assert enc.url == os.path.abspath(tmp_path / "e.zarr")
    again = open_encoding(tmp_path / "e.zarr")
    assert enc.attrs == again.attrs
    assert enc.describe() == again.describe()
    assert enc.describe().startswith(f"encoding store {enc.url}: 300 cells")

    opened = []
    real = encode_store.open_flow_group

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(encode_store, "open_flow_group", counting)
    for store in (enc, open_encoding(where)):
        opened.clear()
        store.tokens, store.counts, store.lengths, store.token_table(), store.obs_columns
        store.cell_array("n_counts"), store.cell_column("filter_pass"), store.describe()
        assert len(opened) <= 1
    np.testing.assert_array_equal(enc.tokens.compute(), again.tokens.compute())


# ----------------------------------------------------------------------------------------------
# the graph: lazy, deterministic, bounded
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "counts.zarr"
    return write_synthetic(path, 300, 40, seed=3, mean_genes=12, block_size=25)


def _ranked(store, vocab, median_set):
    plan = plan_encoding(store, median_set, vocab)
    return plan, rank_cells(
        store.counts, plan.n_counts, plan.gene_map, plan.medians, width=plan.width, pad=PAD
    )


def test_graph_is_lazy_and_deterministic(synthetic_store, tmp_path):
    vocab, median_set = vocab_and_medians(synthetic_store.var.index.to_numpy(dtype=str), 1)
    with no_compute():
        plan, a = _ranked(synthetic_store, vocab, median_set)
        _, b = _ranked(synthetic_store, vocab, median_set)
        graph = encoding_graph(
            plan, os.fspath(tmp_path / "e.zarr"), range(synthetic_store.n_blocks)
        )
    for x, y in ((a.tokens, b.tokens), (a.counts, b.counts), (a.lengths, b.lengths)):
        assert same_keys(x, y)
        assert x.name.startswith("flow-rank-")
    assert graph.key.startswith("flow-tokenize-")
    # declared chunks, dtype and meta hold for every block
    tokens, counts, lengths = dask.compute(a.tokens, a.counts, a.lengths)
    assert tokens.dtype == vocab.token_dtype
    assert counts.dtype == plan.count_dtype == synthetic_store.counts.dtype
    assert lengths.dtype == np.int32
    assert tokens.shape == (300, plan.width) == counts.shape


@pytest.mark.parametrize("block_size", [10, 40])
def test_graph_size_grows_with_blocks_only(tmp_path, block_size):
    """A constant number of tasks per cell block (read, n_counts, rank, take; tokenize: one):
    none per gene or per cell; the shared inputs (gene map, medians, block offsets) enter
    once."""
    store = write_synthetic(
        tmp_path / "c.zarr", 200, 30, seed=1, mean_genes=8, block_size=block_size
    )
    vocab, median_set = vocab_and_medians(store.var.index.to_numpy(dtype=str), 2)
    plan, ranked = _ranked(store, vocab, median_set)
    n = store.n_blocks
    graph = encoding_graph(plan, os.fspath(tmp_path / "e.zarr"), range(n))
    for collection in (ranked.tokens, ranked.counts, ranked.lengths):
        assert len(collection.__dask_graph__()) <= 6 * n + 3
    # tokenize itself: one task per block (read, rank, write), the reader, the context, the end
    keys = [k[0] if isinstance(k, tuple) else k for k in dict(graph.__dask_graph__())]
    assert len(keys) == n + 3, sorted(map(str, keys))
    assert sum(str(k).startswith("flow-tokenize-write-") for k in keys) == n


# ----------------------------------------------------------------------------------------------
# resume
# ----------------------------------------------------------------------------------------------


def test_resume_recomputes_only_unfinished_blocks(synthetic_store, tmp_path):
    vocab, median_set = vocab_and_medians(synthetic_store.var.index.to_numpy(dtype=str), 5)
    path = tmp_path / "e.zarr"
    encode(synthetic_store, vocab, median_set, path)
    original = read_arrays(path)
    pristine = tmp_path / "pristine.zarr"
    shutil.copytree(path, pristine)

    # a "killed" run: some blocks not done, their rows zeroed, the store not complete
    lost = [1, 4, 11]
    root = zarr.open_group(os.fspath(path), mode="r+")
    bs = synthetic_store.block_size
    layout = open_encoding(path).layout
    for b in lost:
        root["block_done"][b] = False
        for k in range(layout.n_bands):  # the block's regions of every band, gone
            start = int(root["band_start"][b, k])
            root[f"bands/{k}/tokens"][start : start + layout.region] = PAD
            root[f"bands/{k}/counts"][start : start + layout.region] = 0
        root["length"][b * bs : (b + 1) * bs] = 0
        root["block_token_cells"][b, :] = 0
    meta = dict(root.attrs["flow"])
    meta["complete"] = False
    root.attrs["flow"] = meta
    with pytest.raises(IncompleteStoreError, match="rerun"):
        open_encoding(path)

    written: list[int] = []

    def recording_compute(graph):
        keys = [k for k in graph.__dask_graph__() if isinstance(k, tuple) and "write" in k[0]]
        written.extend(sorted(k[1] for k in keys))
        return dask.compute(graph)

    said: list[str] = []
    write_encoding(
        plan_encoding(synthetic_store, median_set, vocab),
        path,
        compute=recording_compute,
        say=said.append,
    )
    assert written == lost
    n_blocks = synthetic_store.n_blocks
    assert said == [
        f"resuming {path}: {n_blocks - len(lost):,} of {n_blocks:,} blocks already written, "
        f"{len(lost)} to go"
    ]
    assert_same_bytes(read_arrays(path), original)
    for name in ("bands", "length"):  # the chunk files themselves, byte for byte
        _assert_tree_equal(path / name, pristine / name)
    assert open_encoding(path).attrs["complete"]


def test_resume_refuses_a_store_of_other_cells(tmp_path):
    """Same counts, another filter_pass: an unfinished store of the old cells is not resumed
    (the counts fingerprint does not cover obs; the plan's does)."""
    counts = np.arange(1, 25, dtype=np.int32).reshape(4, 6) % 5
    genes = [f"ENSG{i:011d}" for i in range(6)]
    old = write_counts([ArraySource(counts, genes, pd.DataFrame({"filter_pass": [1, 1, 1, 1]}))],
                       tmp_path / "old.zarr", block_size=2)  # fmt: skip
    new = write_counts([ArraySource(counts, genes, pd.DataFrame({"filter_pass": [1, 0, 1, 0]}))],
                       tmp_path / "new.zarr", block_size=2)  # fmt: skip
    assert old.fingerprint == new.fingerprint
    vocab, median_set = vocab_and_medians(np.array(genes), 0, fraction=1.0)
    path = tmp_path / "e.zarr"
    encode(old, vocab, median_set, path)
    root = zarr.open_group(os.fspath(path), mode="r+")
    root["block_done"][1] = False
    meta = dict(root.attrs["flow"])
    meta["complete"] = False
    root.attrs["flow"] = meta
    with pytest.raises(OutputExistsError, match=r"other inputs or parameters.*--overwrite"):
        encode(new, vocab, median_set, path)
    enc = write_encoding(plan_encoding(new, median_set, vocab), path, overwrite=True)
    np.testing.assert_array_equal(enc.cell_column("filter_pass"), [True, False, True, False])
    assert enc.token_table()["cells"].sum() == (counts[[0, 2]] > 0).sum()


def _assert_tree_equal(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_rerun_of_a_finished_store_gives_the_same_bytes(synthetic_store, tmp_path):
    vocab, median_set = vocab_and_medians(synthetic_store.var.index.to_numpy(dtype=str), 6)
    encode(synthetic_store, vocab, median_set, tmp_path / "a.zarr")
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "a.zarr").rglob("*") if p.is_file()}
    said: list[str] = []

    def no_compute(*graphs):
        msg = "a finished store was computed again"
        raise AssertionError(msg)

    plan = plan_encoding(synthetic_store, median_set, vocab)
    write_encoding(plan, tmp_path / "a.zarr", compute=no_compute, say=said.append)
    assert said == [
        f"{tmp_path / 'a.zarr'} is already complete for these inputs and parameters: nothing to do"
    ]
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten
    encode(open_counts(synthetic_store.url), vocab, median_set, tmp_path / "b.zarr")
    assert_same_bytes(read_arrays(tmp_path / "a.zarr"), read_arrays(tmp_path / "b.zarr"))


def test_other_medians_do_not_replace_a_finished_store_without_overwrite(synthetic_store, tmp_path):
    """A finished store is never silently replaced by a run with other parameters."""
    genes = synthetic_store.var.index.to_numpy(dtype=str)
    vocab, median_set = vocab_and_medians(genes, 6)
    _, other_medians = vocab_and_medians(genes, 7)
    path = tmp_path / "e.zarr"
    encode(synthetic_store, vocab, median_set, path)
    before = read_arrays(path)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        encode(synthetic_store, vocab, other_medians, path)
    assert_same_bytes(read_arrays(path), before)  # untouched
    plan = plan_encoding(synthetic_store, other_medians, vocab)
    write_encoding(plan, path, overwrite=True)
    encode(synthetic_store, vocab, other_medians, tmp_path / "fresh.zarr")
    assert_same_bytes(read_arrays(path), read_arrays(tmp_path / "fresh.zarr"))
    (tmp_path / "not-a-store").mkdir()
    (tmp_path / "not-a-store" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not an encoding store"):
        encode(synthetic_store, vocab, median_set, tmp_path / "not-a-store")
    assert (tmp_path / "not-a-store" / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------------------------
# the banded (ragged) layout: storage follows the rankings, not the deepest cell
# ----------------------------------------------------------------------------------------------

RANK_CHUNK = 64  # small bands, so that a small corpus spans many


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """120 cells of about 20 genes, and 4 "doublets" of about 700 (35x the others), in blocks
    of 16; bands of 64 ranks."""
    rng = np.random.default_rng(11)
    n_cells, n_genes = 124, 900
    counts = np.zeros((n_cells, n_genes), dtype=np.int32)
    deep_cells = np.array([3, 40, 41, 117])
    for i in range(n_cells):
        size = 700 if i in deep_cells else int(rng.integers(0, 40))
        cols = rng.choice(n_genes, size=size, replace=False)
        counts[i, cols] = rng.integers(1, 9, size=size)
    genes = np.array([f"ENSG{i:011d}" for i in range(n_genes)])
    tmp = tmp_path_factory.mktemp("deep")
    store = write_counts([ArraySource(counts, genes)], tmp / "c.zarr", block_size=16)
    vocab, median_set = vocab_and_medians(genes, 4, fraction=0.9)
    path = tmp / "e.zarr"
    enc = write_encoding(plan_encoding(store, median_set, vocab, rank_chunk=RANK_CHUNK), path)
    n_counts = counts.sum(axis=1)
    want = reference_rankings(counts, n_counts, genes, vocab, median_set)
    return {"store": store, "vocab": vocab, "medians": median_set, "path": path, "enc": enc,
            "want": want, "deep_cells": deep_cells}  # fmt: skip


def test_banded_store_reads_as_the_reference_rankings(deep):
    enc, want = deep["enc"], deep["want"]
    tokens, counts = enc.tokens.compute(), enc.counts.compute()
    assert enc.tokens.chunks == enc.counts.chunks == enc.values.chunks
    assert enc.tokens.chunks[0] == tuple([16] * 7 + [12])
    assert set(enc.tokens.chunks[1][:-1]) == {RANK_CHUNK}
    assert tokens.shape[1] >= max(w.size for w in want)
    for i, ranking in enumerate(want):
        n = ranking.size
        assert enc.lengths[i] == n
        np.testing.assert_array_equal(tokens[i, :n], ranking)
        assert (tokens[i, n:] == PAD).all()
        assert (counts[i, :n] > 0).all()
        assert (counts[i, n:] == 0).all()
    values = enc.values.compute()
    for i, ranking in enumerate(want):
        assert (np.diff(values[i, : ranking.size]) <= 0).all()  # value descending


def test_banded_store_writes_only_the_chunks_its_rankings_fill(deep):
    """Every band holds exactly the cells' ranks in it: a block writes the chunks of its
    region up to its last entry and nothing past it, so bytes follow the rankings."""
    enc, path = deep["enc"], deep["path"]
    layout = enc.layout
    lengths = np.array([w.size for w in deep["want"]])
    starts = np.asarray(zarr.open_array(path / "band_start", mode="r")[...])
    assert layout.n_bands == -(-enc.tokens.shape[1] // RANK_CHUNK)
    total_entries = 0
    for k in range(layout.n_bands):
        want_files = set()
        for b in range(layout.n_blocks):
            rows = lengths[b * 16 : (b + 1) * 16]
            size = int(np.clip(rows - RANK_CHUNK * k, 0, RANK_CHUNK).sum())
            total_entries += size
            first = starts[b, k] // layout.flat_chunk
            want_files |= {str(c) for c in range(first, first + -(-size // layout.flat_chunk))}
        for name in ("tokens", "counts"):
            folder = path / "bands" / str(k) / name / "c"
            got = {p.name for p in folder.iterdir()} if folder.exists() else set()
            assert got == want_files, (k, name)
    assert total_entries == lengths.sum()
    # the deep bands hold the doublets only: one block region each, never a row per cell
    deepest = (int(lengths.max()) - 1) // RANK_CHUNK  # (the width is an upper bound)
    assert deepest >= 8
    blocks_there = {int(c) // 16 for c in deep["deep_cells"] if lengths[c] > RANK_CHUNK * deepest}
    files = {p.name for p in (path / "bands" / str(deepest) / "tokens" / "c").iterdir()}
    assert {layout.blocks_of_flat_chunk(int(f))[0] for f in files} == blocks_there


def test_ranked_blocks_hold_no_padding(deep):
    """A tokenize task's result is the block's rankings, not block x deepest-cell."""
    plan = plan_encoding(deep["store"], deep["medians"], deep["vocab"], rank_chunk=RANK_CHUNK)
    blocks = (
        ranked_blocks(plan.store.counts, plan.n_counts, plan.gene_map, plan.medians)
        .to_delayed()
        .ravel()
    )
    lengths = np.array([w.size for w in deep["want"]])
    for b, part in enumerate(blocks):
        tokens, counts, lens = part.compute()
        np.testing.assert_array_equal(lens, lengths[b * 16 : (b + 1) * 16])
        assert tokens.shape == counts.shape == (int(lens.sum()),)
        np.testing.assert_array_equal(tokens, np.concatenate(deep["want"][b * 16 : (b + 1) * 16]))


def test_an_old_schema_store_is_refused_with_how_to_fix(tmp_path):
    path = tmp_path / "old.zarr"
    group = zarr.open_group(os.fspath(path), mode="w", zarr_format=3)
    group.attrs["flow"] = {"kind": "encoding", "schema_version": 1, "complete": True}
    group.create_array("tokens", shape=(2, 3), dtype=np.uint16, chunks=(2, 3))  # the old layout
    with pytest.raises(SchemaError, match=r"schema 1.*re-run `flow tokenize`") as err:
        open_encoding(path)
    assert "\n" not in str(err.value)
    with pytest.raises(SchemaError, match="re-run `flow tokenize`"):
        encode_store.invalidate_blocks(path, [0])


def test_dataset_has_cells_rankings_and_obs_but_no_bookkeeping(handmade):
    enc = encode(
        handmade["store"], handmade["vocab"], handmade["median_set"], handmade["path"] / "e.zarr"
    )
    ds = enc.dataset()
    assert list(ds["cell"].values) == list(enc.cell_column("cell"))
    for name in ("tokens", "counts", "values"):
        assert ds[name].dims == ("cell", "rank")
        assert ds[name].chunks is not None  # lazy
        np.testing.assert_array_equal(ds[name].values, getattr(enc, name).compute())
    np.testing.assert_array_equal(ds["length"].values, enc.lengths)
    for name in ("n_counts", "filter_pass", *enc.obs_columns):
        assert ds[name].dims == ("cell",)
        np.testing.assert_array_equal(ds[name].values, enc.cell_column(name))
    assert ds["token_gene_id"].dims == ("token",)
    names = set(ds.variables)
    assert not names & {"block_done", "block_token_cells", "band_start", "bands"}
    assert not [n for n in names if n.startswith("bands")]


def test_blocks_of_chunk(deep):
    enc = deep["enc"]
    layout = enc.layout
    f = encode_store.blocks_of_chunk
    per_region = layout.region // layout.flat_chunk
    for b in range(layout.n_blocks):
        for k in range(layout.n_bands):
            for c in range(b * per_region, (b + 1) * per_region):
                assert f(enc, f"bands/{k}/tokens", (c,)) == [b]
                assert f(enc, f"bands/{k}/counts", (c,)) == [b]
        assert f(enc, "length", (b,)) == [b]
        assert f(enc, "cell", (b,)) == [b]
        assert f(enc, "block_done", (b,)) == [b]
        assert f(enc, "block_token_cells", (b, 0)) == [b]
    assert f(enc, "token_median", (0,)) == []
    assert f(enc, "band_start", (0, 0)) == []


def test_invalidated_blocks_are_recomputed_alone_and_identically(deep, tmp_path):
    path = tmp_path / "e.zarr"
    shutil.copytree(deep["path"], path)
    original = read_arrays(path)
    enc = open_encoding(path)
    # damage one chunk of a deep band and one of band 0: find their blocks, invalidate them
    deepest = (int(enc.lengths.max()) - 1) // RANK_CHUNK
    damaged = [
        f"bands/{deepest}/tokens/c/" + sorted(p.name for p in (path / f"bands/{deepest}/tokens/c").iterdir())[-1],
        "bands/0/counts/c/0",
    ]  # fmt: skip
    blocks: set[int] = set()
    for key in damaged:
        (path / key).write_bytes(b"damaged")
        array, chunk = key.split("/c/")
        blocks |= set(encode_store.blocks_of_chunk(enc, array, (int(chunk),)))
    assert len(blocks) == 2
    encode_store.invalidate_blocks(enc, sorted(blocks))
    with pytest.raises(IncompleteStoreError):
        open_encoding(path)
    written: list[int] = []

    def recording_compute(graph):
        keys = [k for k in graph.__dask_graph__() if isinstance(k, tuple) and "write" in k[0]]
        written.extend(sorted(k[1] for k in keys))
        return dask.compute(graph)

    plan = plan_encoding(deep["store"], deep["medians"], deep["vocab"], rank_chunk=RANK_CHUNK)
    write_encoding(plan, path, compute=recording_compute)
    assert written == sorted(blocks)
    assert_same_bytes(read_arrays(path), original)
    _assert_tree_equal(path / "bands", deep["path"] / "bands")
    with pytest.raises(InputError, match="not 99"):
        encode_store.invalidate_blocks(path, [99])
