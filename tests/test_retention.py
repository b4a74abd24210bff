"""flow.retention: retention of every gene and gene set at every cutoff, and the tail.

Every figure is compared with a slow numpy reference (tests/reference.py) computed from the
COUNTS and the MEDIANS with a stable sort, never from the encoding store: on a synthetic store
with many cells past 4,096 genes (two block sizes and rank chunks) and on PBMC 1k with
Geneformer's V1 dictionaries; at several cutoffs, keep fractions, histogram budgets (which
change the number of passes) and with groups.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import h5py
import hypothesis.extra.numpy as npst
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import flow
import flow._retention_kernels as k
import flow.retention as r
from flow import report
from flow._retention_result import next_windows, start_selections
from flow.cli import main
from flow.datasets import synthetic_counts
from flow.encode.store import EncodingStore, plan_encoding, write_encoding
from flow.errors import InputError
from flow.medians import MedianSet
from flow.store import write_counts
from flow.vocab import vocabulary_from_genes

import reference
from helpers import no_compute

N_CELLS, N_GENES, MEAN_GENES = 300, 8000, 4500
CUTOFFS = (512, 1024, 2048, 4096)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# fixtures: the encoding, and the reference rankings from counts and medians


@dataclass
class Case:
    enc: EncodingStore
    rankings: list[tuple[np.ndarray, np.ndarray]]  # per cell, from the counts
    keep: np.ndarray
    labels: np.ndarray | None  # cell_type per cell
    path: Path
    _ranks: dict[Any, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)

    def members(self, group: str | None) -> np.ndarray:
        if group is None or group == r.ALL_CELLS:
            return self.keep
        assert self.labels is not None
        return self.keep & (self.labels == group)

    def ranks(self, group: str | None) -> dict[int, np.ndarray]:
        if group not in self._ranks:
            self._ranks[group] = reference.ranks_by_token(self.rankings, self.members(group))
        return self._ranks[group]

    def token(self, gene_id: str) -> int:
        if None not in self._ranks:
            self._ranks[None] = reference.ranks_by_token(self.rankings, self.keep)
        if "ids" not in self._ranks:
            ids = np.asarray(self.enc.token_table()["gene_id"]).astype(object)
            self._ranks["ids"] = {g: i for i, g in enumerate(ids.tolist())}  # type: ignore[dict-item]
        return int(self._ranks["ids"][gene_id])  # type: ignore[index]


@dataclass
class _Relabelled:
    """A flow.ingest Source over another one, with replaced metadata."""

    base: Any
    info: Any

    def iter_blocks(self, n_cells: int) -> Any:
        return self.base.iter_blocks(n_cells)


def _exact_medians(x: np.ndarray, n_counts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    xs = sp.csc_matrix(x[keep])
    nc = n_counts[keep]
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        s, e = xs.indptr[j], xs.indptr[j + 1]
        if e > s:
            out[j] = np.median(xs.data[s:e] / nc[xs.indices[s:e]] * 10000.0)
    return out


@pytest.fixture(scope="module")
def synth_source() -> dict[str, Any]:
    source = synthetic_counts(N_CELLS, N_GENES, seed=11, mean_genes=MEAN_GENES)
    keep = np.arange(N_CELLS) % 9 != 4  # about 11% of cells fail filtering
    symbols = np.asarray(source.info.gene_symbols, dtype=object).copy()
    symbols[[5, 6]] = "DupSym"  # one symbol naming two genes
    obs = source.info.obs.copy()
    obs["filter_pass"] = keep
    info = dataclasses.replace(source.info, obs=obs, gene_symbols=symbols)
    x = source.to_dense()
    n_counts = x.sum(axis=1).astype(np.float64)
    med = _exact_medians(x, n_counts, keep)
    ids = np.asarray(source.info.gene_ids, dtype=str)
    in_vocab = ~np.isnan(med) & (np.arange(N_GENES) % 10 != 3)  # every 10th: not in the vocabulary
    vocab = vocabulary_from_genes(ids[in_vocab])
    rankings = reference.rank_cells(x, n_counts, med, vocab.token_of(ids))
    labels = np.asarray(obs["cell_type"].astype(str))
    return {
        "source": _Relabelled(source, info),
        "medians": MedianSet(ids, med, np.count_nonzero(x[keep], axis=0), None, "exact", None),
        "vocab": vocab,
        "rankings": rankings,
        "keep": keep,
        "labels": labels,
    }


def _encode(src: dict[str, Any], tmp: Path, block: int, rank_chunk: int) -> Case:
    store = write_counts([src["source"]], tmp / "counts.zarr", block_size=block)
    plan = plan_encoding(store, src["medians"], src["vocab"], rank_chunk=rank_chunk)
    enc = write_encoding(plan, tmp / "encoding.zarr")
    return Case(enc, src["rankings"], src["keep"], src["labels"], tmp / "encoding.zarr")


@pytest.fixture(scope="module", params=[(64, 512), (100, 300)], ids=["b64r512", "b100r300"])
def synth(
    request: pytest.FixtureRequest,
    synth_source: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Case:
    block, rank_chunk = request.param
    return _encode(synth_source, tmp_path_factory.mktemp("synth"), block, rank_chunk)


@pytest.fixture(scope="module")
def small(synth_source: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Case:
    """One encoding of the synthetic data (block 64, rank chunk 512) for the other tests."""
    return _encode(synth_source, tmp_path_factory.mktemp("small"), 64, 512)


# --------------------------------------------------------------------------------------------
# comparison with the reference


def _missing(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def check_genes(case: Case, result: r.RetentionResult) -> None:
    spec = result.spec
    frame = result.genes_frame()
    fractions = [p.fraction for p in spec.keep]
    grouped = spec.group_by is not None
    assert list(frame.columns) == [
        *(["group"] if grouped else []),
        "gene_id",
        "symbol",
        "expressing_cells",
        *(f"dropped_at_{c}" for c in spec.cutoffs),
        *(p.column for p in spec.keep),
    ]
    assert len(frame) == len(spec.groups) * len(spec.shown)
    for row in frame.to_dict(orient="records"):
        group = row["group"] if grouped else None
        want = reference.retention_gene(
            case.ranks(group).get(case.token(row["gene_id"])), spec.cutoffs, fractions
        )
        for c in spec.cutoffs:
            assert row[f"dropped_at_{c}"] == want[f"dropped_at_{c}"], (row, c)
        assert row["expressing_cells"] == want["expressing_cells"], row
        for p, frac in zip(spec.keep, fractions, strict=True):
            got = row[p.column]
            assert (_missing(got) and want[str(frac)] is None) or got == want[str(frac)], (row, p)


def check_sets(case: Case, result: r.RetentionResult) -> None:
    spec = result.spec
    frame = result.sets_frame()
    grouped = spec.group_by is not None
    for row in frame.to_dict(orient="records"):
        tokens = spec.set_tokens[spec.set_names.index(row["gene_set"])]
        members = case.members(row["group"] if grouped else None)
        want = reference.retention_set(case.rankings, members, tokens, spec.cutoffs)
        assert {key: row[key] for key in want} == want, row["gene_set"]


def check_tail(case: Case, result: r.RetentionResult) -> None:
    frame = result.tail_frame()
    grouped = result.spec.group_by is not None
    assert list(frame.columns) == [
        *(["group"] if grouped else []),
        "cutoff",
        "part",
        "occurrences",
        "below_median_fraction",
        "log2_fold_change_p10",
        "log2_fold_change_p50",
        "log2_fold_change_p90",
    ]
    want_rows = len(result.spec.cutoffs) * 2 * len(result.spec.value_groups)
    assert len(frame) == want_rows
    for row in frame.to_dict(orient="records"):
        members = case.members(row["group"] if grouped else None)
        want = reference.retention_tail(case.rankings, members, row["cutoff"], row["part"])
        for key, value in want.items():
            assert (_missing(row[key]) and value is None) or row[key] == value, (row, key)


# --------------------------------------------------------------------------------------------
# the synthetic store: every figure equals the reference


def test_fixture_has_many_cells_past_4096(synth: Case) -> None:
    lengths = np.array([t.size for t, _ in synth.rankings])
    assert np.array_equal(synth.enc.lengths, lengths)
    assert np.count_nonzero(lengths[synth.keep] > 4096) >= 50
    assert synth.enc.tokens.numblocks[0] >= 3


def _in_vocabulary(genes: range) -> tuple[str, ...]:
    """Synthetic genes the vocabulary has (every 10th is left out; GENE5 and GENE6 are
    named DupSym)."""
    return tuple(f"GENE{g}" for g in genes if g % 10 != 3 and g not in (5, 6))


SETS = (
    r.GeneSet("first", _in_vocabulary(range(60))),
    r.GeneSet("rare", _in_vocabulary(range(7000, 7990, 7))),
    r.GeneSet("dup", ("dupsym", "GENE42")),
)
RUNS = {
    "defaults": {"cutoffs": CUTOFFS, "keep": r.DEFAULT_KEEP},
    "edges-grouped-small-budget": {
        "cutoffs": (1, 700, 4097, 10_000),
        "keep": ("1", "0.5", "0.25", 0.999),
        "group_by": "cell_type",
        "max_bins": 1 << 19,  # every gene x 7 groups: 10 rank bins, more passes
    },
    "genes-sets-grouped-tiny-budget": {
        "cutoffs": (2048,),
        "keep": ("0.9",),
        "group_by": "cell_type",
        "genes": ["GENE42", "GENE7777", "ENSG00000100014.3", "gene1"],
        "gene_sets": SETS,
        "max_bins": 64,
    },
}


@pytest.mark.parametrize("run", list(RUNS))
def test_every_figure_matches_reference(synth: Case, run: str) -> None:
    result = r.gene_retention(synth.enc, **RUNS[run]).compute()
    check_genes(synth, result)
    check_tail(synth, result)
    if result.spec.set_names:
        check_sets(synth, result)
    if run == "genes-sets-grouped-tiny-budget":
        assert result.passes > 3  # a budget of 64 bins: several refinement passes


def test_genes_table_order(small: Case) -> None:
    frame = r.gene_retention(small.enc, (2048,), keep="0.9", tail=False).compute().genes_frame()
    sizes = frame["input_size_for_0.9"].astype("Float64").fillna(-1).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # largest input needed first, genes never expressed last
    asked = ["GENE900", "GENE1", "GENE42"]
    frame = r.gene_retention(small.enc, (2048,), genes=asked, tail=False).compute().genes_frame()
    assert frame["symbol"].tolist() == asked


def test_dataset_and_curves(small: Case) -> None:
    result = r.gene_retention(
        small.enc, CUTOFFS, genes=["GENE1", "GENE42"], gene_sets=SETS[:2], group_by="cell_type"
    ).compute()
    ds = result.to_dataset()
    frame = result.genes_frame()
    assert ds["expressing_cells"].sum().item() == frame["expressing_cells"].sum()
    assert ds["dropped"].sel(cutoff=2048).sum().item() == frame["dropped_at_2048"].sum()
    curve = result.kept_curve()
    assert list(curve.columns) == ["input_size", "GENE1", "GENE42", "first", "rare"]
    ranks = small.ranks(None)[small.token(str(frame["gene_id"].iloc[0]))]
    for size, share in zip(curve["input_size"], curve["GENE1"], strict=True):
        assert share == np.count_nonzero(ranks < size) / ranks.size
    hist = result.fold_change_histogram(2048)
    tail = result.tail_frame()
    every = tail[(tail["group"] == r.ALL_CELLS) & (tail["cutoff"] == 2048)].set_index("part")
    assert hist["kept"].sum() == every.loc["kept", "occurrences"]
    assert hist["dropped"].sum() == every.loc["dropped", "occurrences"]
    below = hist.loc[hist["log2_fold_change"] < 0, "dropped"].sum()
    assert below / hist["dropped"].sum() == every.loc["dropped", "below_median_fraction"]


# --------------------------------------------------------------------------------------------
# lazy, deterministic, bounded


def test_building_computes_nothing_and_is_deterministic(small: Case) -> None:
    with no_compute():
        a = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS[:2], group_by="cell_type")
        b = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS[:2], group_by="cell_type")
    assert a.first_pass.key == b.first_pass.key
    assert str(a.first_pass.key[0]).startswith("flow-retention-pass1-")
    c = r.gene_retention(small.enc, (2048,))
    assert c.first_pass.key != a.first_pass.key


def _task_bound(enc: EncodingStore, *, values: bool) -> int:
    n_blocks, n_rank = enc.tokens.numblocks
    reads = n_blocks * n_rank * (2 if values else 1) + n_blocks * (2 if values else 1)
    return reads + 2 * n_blocks + 20  # + one task per block, the merge tree and shared inputs


@pytest.mark.parametrize("tail", [True, False])
def test_graph_size_is_bounded_by_blocks(small: Case, tail: bool) -> None:
    ret = r.gene_retention(small.enc, CUTOFFS, tail=tail, group_by="cell_type")
    graph = dict(ret.first_pass.__dask_graph__())
    assert len(graph) <= _task_bound(small.enc, values=tail)
    names = {key[0] for key in graph if isinstance(key, tuple)}
    assert small.enc.tokens.name in names
    assert (small.enc.counts.name in names) == tail  # counts are read only for the tail
    result = r.RetentionResult.from_first_pass(ret.spec, ret.tables, ret.first_pass.compute())
    genes, values = start_selections(result)
    windows = next_windows(result, genes, values, ret.max_bins)
    refine = dict(ret.refine_pass(windows, 2).__dask_graph__())
    assert len(refine) <= _task_bound(small.enc, values="values" in windows)


def test_state_is_bounded_by_genes_and_cutoffs_not_cells(small: Case) -> None:
    """A block task's state has one size, whatever the cells in the block."""
    max_bins = 1 << 14
    ret = r.gene_retention(small.enc, CUTOFFS, max_bins=max_bins, group_by="cell_type")
    t = ret.tables
    per_gene = t.n_groups * t.n_slots
    assert per_gene * t.n_rank_bins <= max_bins + per_gene * (len(CUTOFFS) + 1)
    tokens = np.asarray(small.enc.tokens[:64].compute())
    counts = np.asarray(small.enc.counts[:64].compute())
    lengths, n_counts = small.enc.lengths[:64], small.enc.cell_column("n_counts")[:64]
    sizes = set()
    for n in (1, 7, 64):
        state = k.first_pass_block(
            [tokens[:n]], [counts[:n]], lengths[:n], n_counts[:n], ret.codes[:n], t
        )
        sizes.add(tuple((key, v.size) for key, v in sorted(state.items())))
    assert len(sizes) == 1


# --------------------------------------------------------------------------------------------
# gene sets and bad input


def test_gene_sets_from_gmt_with_unknown_names(small: Case, tmp_path: Path) -> None:
    gmt = tmp_path / "sets.gmt"
    gmt.write_text(
        "SET_A\tfirst genes\tGENE1\tGENE2\tGENE4\tNOTAGENE\n"
        "\n"
        "SET_B\thttp://example.org\tgene100\tENSG00000100700.5\tGENE3\r\n"
    )
    with pytest.warns(r.RetentionWarning, match=r"NOTAGENE.*in SET_A; GENE3 \(close: GENE3\d"):
        result = r.gene_retention(small.enc, CUTOFFS, gene_sets=gmt, tail=False).compute()
    frame = result.sets_frame()
    assert frame["gene_set"].tolist() == ["SET_A", "SET_B"]
    assert frame["genes_in_vocabulary"].tolist() == [3, 1]  # GENE100 given twice
    check_sets(small, result)
    listing = tmp_path / "my_genes.txt"
    listing.write_text("# immune\nGENE1, GENE2\nGENE4\n")
    (only,) = r.read_gene_sets(listing)
    assert only == r.GeneSet("my_genes", ("GENE1", "GENE2", "GENE4"), "", str(listing))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "A\tdesc\tGENE1\nEMPTY\tno genes\n",
            r"sets\.gmt, line 2: gene set 'EMPTY' lists no genes",
        ),
        ("A\tdesc\tGENE1\nJUSTONEFIELD\n", r"sets\.gmt, line 2: not a GMT line"),
        ("A\tdesc\tGENE1\n\tdesc\tGENE2\n", r"sets\.gmt, line 2: not a GMT line"),
        ("A\td\tGENE1\nA\td\tGENE2\n", r"line 2: gene set 'A' is also on .*line 1"),
        ("\n\n", r"No gene set in"),
    ],
)
def test_malformed_gmt_names_file_and_line(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "sets.gmt"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        r.read_gene_sets(path)


def test_bad_arguments(small: Case, tmp_path: Path) -> None:
    enc = small.enc
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cutoffs": "0,2048"}, "at least 1"),
        ({"cutoffs": "-5"}, "at least 1"),
        ({"cutoffs": "2048,abc"}, "not an integer"),
        ({"cutoffs": "2048,2048"}, "given twice"),
        ({"cutoffs": ""}, "at least one cutoff"),
        ({"keep": "0"}, r"outside \(0, 1\]"),
        ({"keep": "1.5"}, r"outside \(0, 1\]"),
        ({"keep": "-0.1"}, r"outside \(0, 1\]"),
        ({"keep": "ninety"}, "not a number"),
        ({"keep": "0.9,9/10"}, "given twice"),
        ({"genes": ["GENE42x"]}, "Close matches: GENE42"),
        ({"genes": ["dupsym"]}, "Ask by Ensembl ID"),
        ({"genes": []}, "at least one gene"),
        ({"group_by": "nope"}, "carried columns are"),
        ({"gene_sets": tmp_path / "missing.gmt"}, "not found"),
        ({"gene_sets": [r.GeneSet("x", ("NOPE1", "NOPE2"))]}, "No gene of the gene sets"),
        ({"max_bins": 1}, "max_bins"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            r.gene_retention(enc, **kwargs)
    with pytest.raises(TypeError):
        r.gene_retention(enc, keep=[True])
    with pytest.raises(TypeError):
        r.gene_retention(enc, genes="GENE1")
    result = r.gene_retention(enc, (2048,), tail=False).compute()
    with pytest.raises(InputError, match="suffix"):
        r.write_retention(result, tmp_path / "genes.xlsx")
    with pytest.raises(InputError, match="needs gene sets"):
        r.write_retention(result, tmp_path / "genes.csv", sets=tmp_path / "sets.csv")
    with pytest.raises(InputError, match="tail"):
        r.write_retention(result, tmp_path / "genes.csv", tail=tmp_path / "tail.csv")
    assert not list(tmp_path.iterdir())  # nothing written


def test_write_retention_by_suffix(small: Case, tmp_path: Path) -> None:
    result = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS[:2]).compute()
    frames = r.write_retention(
        result,
        tmp_path / "genes.parquet",
        sets=tmp_path / "sets.csv",
        tail=tmp_path / "tail.tsv",
    )
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "genes.parquet"), frames["genes"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "sets.csv"), frames["sets"])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "tail.tsv", sep="\t"), frames["tail"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genes.parquet", "sets.csv", "tail.tsv"]


# --------------------------------------------------------------------------------------------
# kernels: property tests


@given(n=st.integers(0, 10**9), num=st.integers(1, 1000), extra=st.integers(0, 1000))
def test_kth_is_exact(n: int, num: int, extra: int) -> None:
    den = num + extra
    assert int(k.kth(n, num, den)) == math.ceil(Fraction(num, den) * n)


def _select_by_passes(
    keys: np.ndarray, pops: np.ndarray, n_pops: int, p: Fraction, edges: np.ndarray, max_bins: int
) -> np.ndarray:
    """Drive start_selection / narrow with histograms counted by plain loops (the reference)."""
    hist = np.zeros((n_pops, edges.size - 1), np.int64)
    for key, pop in zip(keys.tolist(), pops.tolist(), strict=True):
        hist[pop, np.searchsorted(edges, key, side="right") - 1] += 1
    want = k.kth(hist.sum(axis=1), p.numerator, p.denominator)
    sel = k.start_selection(hist, want, np.arange(n_pops), edges)
    for _ in range(80):
        if not sel.active.any():
            break
        w = sel.windows(max_bins, wanted=np.zeros(1, bool), bin_of=np.zeros(n_pops, np.int64))
        bins: dict[int, list[int]] = {}
        for key, pop in zip(keys.tolist(), pops.tolist(), strict=True):
            u = int(w.target[pop])
            if u >= 0 and w.lo[u] <= key < w.hi[u]:
                bins.setdefault(u * w.n_bins + (key - int(w.lo[u])) // int(w.step[u]), []).append(
                    key
                )
        order = sorted(bins)  # sparse rows: one per bin holding keys, in bin order
        state = {
            "idx:x": np.array(order, np.int64),
            "sum:x": np.array([len(bins[b]) for b in order]),
        }
        if not w.exact:
            state["min:x"] = np.array([min(bins[b]) for b in order], np.int64)
            state["max:x"] = np.array([max(bins[b]) for b in order], np.int64)
            state["minn:x"] = np.array([bins[b].count(min(bins[b])) for b in order], np.int64)
            state["maxn:x"] = np.array([bins[b].count(max(bins[b])) for b in order], np.int64)
        k.narrow(sel, w, state, "x")
    assert not sel.active.any()
    return sel.answer


@settings(deadline=None, max_examples=40)
@given(
    data=st.data(),
    n_pops=st.integers(1, 4),
    p=st.fractions(min_value=Fraction(1, 1000), max_value=1),
    max_bins=st.integers(2, 40),
    big=st.booleans(),
)
def test_selection_finds_the_kth_key(
    data: st.DataObject, n_pops: int, p: Fraction, max_bins: int, big: bool
) -> None:
    high = 2**62 if big else 300
    keys = data.draw(npst.arrays(np.int64, st.integers(0, 60), elements=st.integers(0, high)))
    pops = data.draw(npst.arrays(np.int64, keys.size, elements=st.integers(0, n_pops - 1)))
    inner = data.draw(st.lists(st.integers(1, high), max_size=5, unique=True))
    edges = np.array(sorted({0, *inner, high + 1}), dtype=np.int64)
    got = _select_by_passes(keys, pops, n_pops, p, edges, max_bins)
    for pop in range(n_pops):
        want = reference.kth_smallest(keys[pops == pop], p)
        assert got[pop] == (-1 if want is None else want)


@settings(deadline=None)
@given(
    lengths=npst.arrays(np.int64, st.integers(1, 12), elements=st.integers(0, 30)),
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=5),
    edges=st.lists(st.integers(1, 40), max_size=6, unique=True),
)
def test_ranked_segments_are_the_rankings(
    lengths: np.ndarray, widths: list[int], edges: list[int]
) -> None:
    """Segments cover each row's ranks 0..length-1 once, in order, within one bin each."""
    width = sum(widths)
    tokens = np.full((lengths.size, width), 999, np.int64)
    for i, n in enumerate(lengths):
        tokens[i, : min(n, width)] = 100 * i + np.arange(min(n, width))
    chunks = np.split(tokens, np.cumsum(widths)[:-1], axis=1)
    grid = np.unique(np.r_[0, edges, 10_000]).astype(np.int64)
    seen = []
    for seg in k.ranked_segments(chunks, None, lengths, grid):
        ranks = seg.ranks()
        assert (np.searchsorted(grid, ranks, side="right") - 1 == seg.bin).all()
        rows = seg.take(np.arange(lengths.size))
        seen += list(zip(rows.tolist(), ranks.tolist(), seg.tokens[seg.mask].tolist(), strict=True))
    want = [(i, j, 100 * i + j) for i, n in enumerate(lengths) for j in range(min(n, width))]
    assert sorted(seen) == want


@settings(deadline=None)
@given(values=npst.arrays(np.float64, st.integers(1, 50), elements=st.floats(1e-300, 1e300)))
def test_value_bins_and_edges_agree(values: np.ndarray) -> None:
    keys = values.view(np.int64)
    bins = k.value_bins(keys)
    edges = k.value_edges()
    assert ((edges[bins] <= keys) & (keys < edges[bins + 1])).all()
    assert np.array_equal(bins < k.ONE_VALUE_BIN, values < 1)
    order = np.argsort(values, kind="stable")
    assert (np.diff(keys[order]) >= 0).all()  # keys sort as the values do


@settings(deadline=None, max_examples=15)
@given(data=st.data())
def test_first_pass_state_is_the_same_for_any_split(small: Case, data: st.DataObject) -> None:
    """Any split of a block into row ranges and rank chunks merges to the same state."""
    ret = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS, group_by="cell_type")
    b = data.draw(st.integers(0, small.enc.tokens.numblocks[0] - 1))
    c0 = b * small.enc.tokens.chunks[0][0]
    rows = slice(c0, c0 + small.enc.tokens.chunks[0][b])
    tokens = np.asarray(small.enc.tokens[rows].compute())
    counts = np.asarray(small.enc.counts[rows].compute())
    lengths = small.enc.lengths[rows]
    n_counts = np.asarray(small.enc.cell_column("n_counts"))[rows]
    codes = ret.codes[rows]
    whole = k.first_pass_block([tokens], [counts], lengths, n_counts, codes, ret.tables)
    cut = data.draw(st.integers(0, tokens.shape[0]))
    cols = sorted(data.draw(st.lists(st.integers(1, tokens.shape[1] - 1), max_size=4, unique=True)))
    bounds = [0, *cols, tokens.shape[1]]
    parts = []
    for rs in (slice(0, cut), slice(cut, tokens.shape[0])):
        toks = [tokens[rs, a:z] for a, z in itertools.pairwise(bounds)]
        cnts = [counts[rs, a:z] for a, z in itertools.pairwise(bounds)]
        parts.append(
            k.first_pass_block(toks, cnts, lengths[rs], n_counts[rs], codes[rs], ret.tables)
        )
    merged = k.merge_states(*parts)
    assert merged.keys() == whole.keys()
    for key in whole:
        assert np.array_equal(merged[key], whole[key]), key


# --------------------------------------------------------------------------------------------
# plots, report and the command line


def _png_shape(path: Path) -> tuple[int, ...]:
    import matplotlib.image

    assert path.read_bytes().startswith(PNG_MAGIC)
    return tuple(matplotlib.image.imread(path, format="png").shape)


def test_plots(small: Case, tmp_path: Path) -> None:
    result = r.gene_retention(
        small.enc, CUTOFFS, genes=["GENE1", "GENE42"], gene_sets=SETS[:2]
    ).compute()
    report.plot_retention(result, tmp_path / "retention.png")
    report.plot_fold_change(result, tmp_path / "tail.png")
    size = (int(report.FIGSIZE[1] * report.DPI), int(report.FIGSIZE[0] * report.DPI), 4)
    assert _png_shape(tmp_path / "retention.png") == size
    assert _png_shape(tmp_path / "tail.png") == size
    everything = r.gene_retention(small.enc, (10_000,)).compute()  # nothing dropped
    report.plot_fold_change(everything, tmp_path / "none.png")
    report.plot_retention(everything, tmp_path / "all.png")
    assert list(everything.kept_curve().columns) == ["input_size", "all genes"]


def test_report_section(small: Case, tmp_path: Path) -> None:
    result = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS[:2]).compute()
    out = report.write_report(small.enc, tmp_path / "r.html", retention=result)
    text = Path(out).read_text()
    assert text.count("data:image/png;base64,") == 5
    assert 'id="tail"' in text
    assert 'id="sets"' in text
    plain = Path(report.write_report(small.enc, tmp_path / "p.html")).read_text()
    assert 'id="tail"' not in plain


@pytest.fixture(scope="module")
def client() -> Any:
    """An in-process distributed client: CLI commands that compute use it (no new cluster)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def test_cli_retention(small: Case, tmp_path: Path, capsys: Any, client: Any) -> None:
    gmt = tmp_path / "tfs.gmt"
    gmt.write_text("FIRST\tfirst genes\t" + "\t".join(SETS[0].genes) + "\n")
    argv = [
        "retention",
        str(small.path),
        "--cutoffs",
        "1024,2048,4096",
        "--keep",
        "0.50,0.9",
        "--gene-sets",
        str(gmt),
        "--group-by",
        "cell_type",
        "-o",
        str(tmp_path / "genes.csv"),
        "--sets-output",
        str(tmp_path / "sets.csv"),
        "--tail-output",
        str(tmp_path / "tail.parquet"),
        "--plot",
        str(tmp_path / "retention.png"),
        "--tail-plot",
        str(tmp_path / "tail.png"),
        "-q",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", r.RetentionWarning)  # GENE3, GENE13 ...: not in vocab
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "below the corpus median" in out
    genes = pd.read_csv(tmp_path / "genes.csv", keep_default_na=False, na_values=[""])
    assert list(genes.columns) == [
        "group",
        "gene_id",
        "symbol",
        "expressing_cells",
        "dropped_at_1024",
        "dropped_at_2048",
        "dropped_at_4096",
        "input_size_for_0.50",  # written as given
        "input_size_for_0.9",
    ]
    sets = pd.read_csv(tmp_path / "sets.csv")
    assert list(sets.columns) == [
        "group",
        "gene_set",
        "genes_in_vocabulary",
        "occurrences",
        "dropped_at_1024",
        "dropped_at_2048",
        "dropped_at_4096",
        "cells_losing_any_at_1024",
        "cells_losing_any_at_2048",
        "cells_losing_any_at_4096",
    ]
    tail = pd.read_parquet(tmp_path / "tail.parquet")
    assert r.ALL_CELLS in set(tail["group"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", r.RetentionWarning)
        result = r.gene_retention(
            small.enc, "1024,2048,4096", keep="0.50,0.9", gene_sets=gmt, group_by="cell_type"
        ).compute()
    want = result.genes_frame()
    sizes = ["input_size_for_0.50", "input_size_for_0.9"]
    want[sizes] = want[sizes].astype("float64")
    pd.testing.assert_frame_equal(genes, want, check_dtype=False)
    pd.testing.assert_frame_equal(tail, result.tail_frame())
    assert _png_shape(tmp_path / "retention.png")[:2] == (450, 800)


def test_cli_report_with_retention(small: Case, tmp_path: Path, client: Any) -> None:
    out = tmp_path / "report.html"
    argv = ["report", str(small.path), "-o", str(out), "--retention", "--group-by", "cell_type"]
    assert main([*argv, "-q"]) == 0
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 5
    assert 'id="tail"' in text


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--keep", "1.5"], "outside"),
        (["--keep", "0"], "outside"),
        (["--cutoffs", "0,2048"], "at least 1"),
        (["--genes", "GENE42x"], "Close matches"),
        (["--group-by", "nope"], "carried columns"),
        (["--gene-sets", "BAD"], "line 2"),
        (["--sets-output", "SETS"], "needs --gene-sets"),
        (["--plot", "plot.pdf"], "PNG"),
    ],
)
def test_cli_bad_input_writes_nothing(
    small: Case, tmp_path: Path, capsys: Any, extra: list[str], match: str
) -> None:
    bad = tmp_path / "bad.gmt"
    bad.write_text("A\tdesc\tGENE1\nB\tdesc\n")
    extra = [
        str(bad) if e == "BAD" else str(tmp_path / "sets.csv") if e == "SETS" else e for e in extra
    ]
    argv = ["retention", str(small.path), "-o", str(tmp_path / "genes.csv"), *extra, "-q"]
    assert main(argv) == 1
    assert re.search(match, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gmt"]


@pytest.mark.distributed
def test_retention_on_a_process_cluster(small: Case, local_cluster_address: str) -> None:
    from distributed import Client

    ret = r.gene_retention(small.enc, CUTOFFS, gene_sets=SETS[:2], group_by="cell_type")
    with Client(local_cluster_address):
        on_cluster = ret.compute()
    here = ret.compute(compute=lambda *g: tuple(x.compute(scheduler="sync") for x in g))
    pd.testing.assert_frame_equal(on_cluster.genes_frame(), here.genes_frame())
    pd.testing.assert_frame_equal(on_cluster.tail_frame(), here.tail_frame())
    pd.testing.assert_frame_equal(on_cluster.sets_frame(), here.sets_frame())


# --------------------------------------------------------------------------------------------
# PBMC 1k with Geneformer's V1 dictionaries

#: Transcription factors of immune lineages (see notebooks/02_what_the_cutoff_drops.ipynb)
IMMUNE_TFS = ("SPI1", "CEBPA", "CEBPB", "IRF8", "PAX5", "EBF1", "TCF7", "LEF1", "GATA3", "TBX21")


def _read_h5(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][:])
        x = sp.csc_matrix(
            (m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_cells)
        ).T.tocsr()
        return x, m["features/id"][:].astype(str), m["features/name"][:].astype(str)


@pytest.fixture(scope="module")
def pbmc1k(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    from flow.medians import import_median_dictionary
    from flow.pipeline import convert
    from flow.store import open_counts
    from flow.vocab import read_vocabulary

    tmp = tmp_path_factory.mktemp("pbmc1k")
    h5 = shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5"
    v1 = shared_data / "geneformer" / "v1_gc30M"
    convert([h5], tmp / "counts.zarr", block_size=256)
    store = open_counts(tmp / "counts.zarr")
    medians = import_median_dictionary(v1 / "gene_median_dictionary_gc30M.pkl")
    vocab = read_vocabulary(v1 / "token_dictionary_gc30M.pkl")
    enc = write_encoding(plan_encoding(store, medians, vocab), tmp / "encoding.zarr")
    x, ids, _ = _read_h5(h5)
    with open(v1 / "token_dictionary_gc30M.pkl", "rb") as fh:
        token_dict = {str(key): int(v) for key, v in pickle.load(fh).items()}
    with open(v1 / "gene_median_dictionary_gc30M.pkl", "rb") as fh:
        median_dict = {str(key): float(v) for key, v in pickle.load(fh).items()}
    tok = np.array([token_dict.get(g, -1) if g in median_dict else -1 for g in ids])
    med = np.array([median_dict.get(g, np.nan) for g in ids])
    n_counts = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    rankings = reference.rank_cells(x, n_counts, med, tok)
    return Case(enc, rankings, np.ones(x.shape[0], bool), None, tmp / "encoding.zarr")


def test_pbmc1k_every_figure_matches_reference(pbmc1k: Case) -> None:
    tfs = r.GeneSet("immune TFs", IMMUNE_TFS)
    result = r.gene_retention(
        pbmc1k.enc,
        (512, 1024, 2048, 2500),
        keep=("0.5", "0.9", "0.95", "1"),
        gene_sets=[tfs, r.GeneSet("ribosomal", ("RPL13", "RPS2", "RPL3", "RPS27A"))],
    ).compute()
    check_genes(pbmc1k, result)
    check_sets(pbmc1k, result)
    check_tail(pbmc1k, result)
    lengths = np.array([t.size for t, _ in pbmc1k.rankings])
    assert np.count_nonzero(lengths > 2048) == 20  # 20 of 996 cells are truncated at 2,048
    genes = result.genes_frame()
    assert genes["dropped_at_2048"].sum() == np.clip(lengths - 2048, 0, None).sum()
    tail = result.tail_frame().set_index(["cutoff", "part"])
    assert tail.loc[(2048, "dropped"), "below_median_fraction"] == 1.0  # the seed's claim


def test_public_names() -> None:
    assert flow.gene_retention is r.gene_retention
    assert flow.read_gene_sets is r.read_gene_sets


@settings(deadline=None)
@given(
    data=st.data(),
    exact=st.booleans(),
    cuts=st.lists(st.integers(0, 40), max_size=4),
)
def test_sparse_states_merge_to_the_state_of_all_entries(
    data: st.DataObject, exact: bool, cuts: list[int]
) -> None:
    bins = data.draw(npst.arrays(np.int64, 40, elements=st.integers(0, 12)))
    keys = data.draw(npst.arrays(np.int64, 40, elements=st.integers(0, 5)))
    step = np.ones(1, np.int64) if exact else np.full(1, 7, np.int64)
    w = k.Windows(
        np.zeros(1, np.int32), np.zeros(1, np.int64), np.full(1, 99), step, 13, np.ones(1, bool)
    )
    bounds = [0, *sorted(cuts), 40]
    parts = [
        k._sparse_state("x", w, [bins[a:z]], [keys[a:z]]) for a, z in itertools.pairwise(bounds)
    ]
    merged = k.merge_states(*parts)
    whole = k._sparse_state("x", w, [bins], [keys])
    assert merged.keys() == whole.keys()
    for key in whole:
        assert np.array_equal(merged[key], whole[key]), key
    for row, b in enumerate(whole["idx:x"].tolist()):
        found = keys[bins == b]
        assert whole["sum:x"][row] == found.size
        if not exact:
            assert whole["min:x"][row] == found.min()
            assert whole["minn:x"][row] == np.count_nonzero(found == found.min())
            assert whole["maxn:x"][row] == np.count_nonzero(found == found.max())


def test_cli_warns_in_one_line(small: Case, tmp_path: Path) -> None:
    """An unknown gene of a set is a one-line ``warning: ...`` on stderr, not Python's file:line form."""
    argv = [sys.executable, "-m", "flow.cli", "retention", str(small.path), "-q"]
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("SET\tdescription\tGENE1\tNOTAGENE\n")
    argv += ["--gene-sets", str(gmt), "-o", str(tmp_path / "genes.csv"), "--workers", "1"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "NOTAGENE" in line]
    assert len(warned) == 1
    assert warned[0].startswith("warning: ")
    assert "retention.py" not in done.stderr
