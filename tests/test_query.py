"""Queries over the encoding store (flow.query), plots and the HTML report (flow.report), and
the ``flow dropped / drop-rates / coverage / report`` commands.

Every answer is compared with a slow numpy reference computed from the COUNTS and the MEDIANS
directly (never from the encoding store): per cell, the normalized values of its in-vocabulary
genes, a stable sort by (-value, token), and the genes past the cutoff.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import dask
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from dask.array.utils import same_keys
from zarr.storage import LocalStore, WrapperStore

import flow.query as q
from flow import report
from flow.cli import main
from flow.datasets import synthetic_counts
from flow.encode.store import (
    EncodingStore,
    blocks_of_chunk,
    open_encoding,
    plan_encoding,
    write_encoding,
)
from flow.errors import InputError
from flow.ingest._source import SourceInfo
from flow.medians import MedianSet
from flow.store import write_counts
from flow.vocab import vocabulary_from_genes

from helpers import no_compute

N_CELLS, N_GENES, MEAN_GENES, BLOCK = 300, 8000, 4500, 64
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# slow reference, from counts and medians only


@dataclass
class Reference:
    """Full rankings of every cell, computed from a dense count matrix and per-column medians."""

    tokens: list[np.ndarray]  # per cell, ranked tokens
    values: list[np.ndarray]  # per cell, float64 values in rank order
    keep: np.ndarray  # filter_pass
    barcodes: np.ndarray

    @classmethod
    def build(
        cls,
        x: Any,
        n_counts: np.ndarray,
        med_of_col: np.ndarray,
        tok_of_col: np.ndarray,
        keep: np.ndarray,
        barcodes: np.ndarray,
    ) -> Reference:
        x = sp.csr_matrix(x)
        tokens, values = [], []
        for i in range(x.shape[0]):
            row = x.getrow(i)
            cols, counts = row.indices, row.data.astype(np.float64)
            ok = (counts > 0) & (tok_of_col[cols] >= 0)
            cols, counts = cols[ok], counts[ok]
            v = ((counts / float(n_counts[i])) * 10000.0) / med_of_col[cols]
            t = tok_of_col[cols]
            order = np.lexsort((t, -v))  # value descending, then token ascending
            tokens.append(t[order].astype(np.int64))
            values.append(v[order])
        return cls(tokens, values, np.asarray(keep, bool), np.asarray(barcodes, dtype=object))

    @property
    def lengths(self) -> np.ndarray:
        return np.array([t.size for t in self.tokens])

    def dropped(self, i: int, cutoff: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[i][cutoff:], self.values[i][cutoff:]

    def drop_counts(
        self, cutoff: int, n_tokens: int, members: np.ndarray | None = None
    ) -> np.ndarray:
        out = np.zeros(n_tokens, np.int64)
        use = self.keep if members is None else self.keep & members
        for i in np.flatnonzero(use):
            np.add.at(out, self.tokens[i][cutoff:], 1)
        return out

    def expressing(self, n_tokens: int) -> np.ndarray:
        return self.drop_counts(0, n_tokens)

    def ranks_of(self, token: int) -> np.ndarray:
        """Rank of ``token`` in each passing cell expressing it."""
        ranks = [
            int(np.flatnonzero(self.tokens[i] == token)[0])
            for i in np.flatnonzero(self.keep)
            if np.any(self.tokens[i] == token)
        ]
        return np.array(ranks, dtype=np.int64)


def exact_medians(x: np.ndarray, n_counts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Nonzero median of count / n_counts x 10,000 per gene over passing cells (NaN if none)."""
    xs = sp.csc_matrix(x[keep])
    nc = n_counts[keep]
    out = np.full(x.shape[1], np.nan)
    for j in range(x.shape[1]):
        s, e = xs.indptr[j], xs.indptr[j + 1]
        if e > s:
            out[j] = np.median(xs.data[s:e] / nc[xs.indices[s:e]] * 10000.0)
    return out


# --------------------------------------------------------------------------------------------
# fixtures: a synthetic encoding with long cells, failing cells and a duplicated symbol


@dataclass
class _Relabelled:
    """A flow.ingest Source over another one, with replaced metadata."""

    base: Any
    info: SourceInfo

    def iter_blocks(self, n_cells: int) -> Any:
        return self.base.iter_blocks(n_cells)


@dataclass
class Case:
    enc: EncodingStore
    ref: Reference
    path: Path
    n_tokens: int


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Case:
    tmp = tmp_path_factory.mktemp("synth")
    source = synthetic_counts(N_CELLS, N_GENES, seed=7, mean_genes=MEAN_GENES)
    keep = np.arange(N_CELLS) % 9 != 4  # about 11% of cells fail filtering
    symbols = np.asarray(source.info.gene_symbols, dtype=object).copy()
    symbols[[5, 6]] = "DupSym"  # one symbol naming two genes
    obs = source.info.obs.copy()
    obs["filter_pass"] = keep
    info = dataclasses.replace(source.info, obs=obs, gene_symbols=symbols)
    store = write_counts([_Relabelled(source, info)], tmp / "counts.zarr", block_size=BLOCK)
    x = source.to_dense()
    n_counts = x.sum(axis=1).astype(np.float64)
    med = exact_medians(x, n_counts, keep)
    ids = np.asarray(source.info.gene_ids, dtype=str)
    in_vocab = ~np.isnan(med) & (
        np.arange(N_GENES) % 10 != 3
    )  # every 10th gene: not in the vocabulary
    vocab = vocabulary_from_genes(ids[in_vocab])
    medians = MedianSet(ids, med, np.count_nonzero(x[keep], axis=0), None, "exact", None)
    enc = write_encoding(plan_encoding(store, medians, vocab), tmp / "encoding.zarr")
    tok_of_col = vocab.token_of(ids)
    ref = Reference.build(
        x, n_counts, med, tok_of_col, keep, np.asarray(source.info.barcodes, dtype=object)
    )
    return Case(enc, ref, tmp / "encoding.zarr", vocab.n_tokens)


def _cutoffs(case: Case) -> list[int]:
    longest = int(case.ref.lengths.max())
    return [1, 700, 2048, 4096, longest - 1, longest, longest + 100]


# --------------------------------------------------------------------------------------------
# the synthetic store is what the tests need


def test_synthetic_fixture_has_long_and_failing_cells(synth: Case) -> None:
    lengths = synth.ref.lengths
    assert np.array_equal(synth.enc.lengths, lengths)  # the encoder agrees on lengths
    assert np.count_nonzero(lengths[synth.ref.keep] > 4096) >= 50
    assert np.count_nonzero(~synth.ref.keep & (lengths > 2048)) >= 10
    assert synth.enc.tokens.numblocks[0] >= 4


# --------------------------------------------------------------------------------------------
# dropped_genes


@pytest.mark.parametrize("which", ["longest", "median", "failing", "shortest"])
def test_dropped_genes_matches_reference(synth: Case, which: str) -> None:
    ref = synth.ref
    lengths = ref.lengths
    cell = {
        "longest": int(np.argmax(lengths)),
        "median": int(np.argsort(lengths)[N_CELLS // 2]),
        "failing": int(np.flatnonzero(~ref.keep)[0]),
        "shortest": int(np.argmin(lengths)),
    }[which]
    table = synth.enc.token_table()
    for cutoff in _cutoffs(synth):
        frame = q.dropped_genes(synth.enc, cell, cutoff)
        want_t, want_v = ref.dropped(cell, cutoff)
        assert list(frame.columns) == [
            "rank",
            "token",
            "gene_id",
            "symbol",
            "value",
            "log2_fold_change",
        ]
        assert np.array_equal(frame["token"].to_numpy(), want_t)
        assert np.array_equal(frame["rank"].to_numpy(), np.arange(cutoff, cutoff + want_t.size))
        assert np.array_equal(frame["value"].to_numpy(), want_v)  # exact float64, from counts
        assert np.array_equal(frame["log2_fold_change"].to_numpy(), np.log2(want_v))
        assert frame["gene_id"].tolist() == [str(g) for g in table["gene_id"][want_t]]
        assert frame.attrs == {
            "cell": ref.barcodes[cell],
            "index": cell,
            "length": int(lengths[cell]),
            "cutoff": cutoff,
            "filter_pass": bool(ref.keep[cell]),
        }


def test_dropped_genes_by_barcode_and_index_string(synth: Case) -> None:
    cell = int(np.argmax(synth.ref.lengths))
    by_index = q.dropped_genes(synth.enc, cell, 3000)
    pd.testing.assert_frame_equal(
        q.dropped_genes(synth.enc, synth.ref.barcodes[cell], 3000), by_index
    )
    pd.testing.assert_frame_equal(q.dropped_genes(synth.enc, str(cell), 3000), by_index)


def test_unknown_barcode_names_close_matches(synth: Case) -> None:
    wrong = synth.ref.barcodes[17].replace("-1", "-2")
    with pytest.raises(InputError, match=re.escape(synth.ref.barcodes[17])):
        q.dropped_genes(synth.enc, wrong)
    with pytest.raises(InputError, match="out of range"):
        q.dropped_genes(synth.enc, N_CELLS)
    with pytest.raises(InputError, match="cutoff must be at least 1"):
        q.dropped_genes(synth.enc, 0, 0)
    with pytest.raises(TypeError):
        q.dropped_genes(synth.enc, 0, True)


# --------------------------------------------------------------------------------------------
# gene_drop


def test_gene_drop_matches_reference(synth: Case) -> None:
    ref = synth.ref
    table = synth.enc.token_table()
    counts = ref.drop_counts(2048, synth.n_tokens)
    most = int(np.argmax(counts))
    expressing = ref.expressing(synth.n_tokens)
    rare = int(np.flatnonzero(expressing == expressing[expressing > 0].min())[0])
    for token in (most, rare):
        for cutoff in (1, 1000, 2048, 5000):
            ranks = ref.ranks_of(token)
            got = q.gene_drop(synth.enc, str(table["gene_id"][token]), cutoff, bin_width=500)
            assert got.token == token
            assert got.cells_expressing == ranks.size == int(table["cells"][token])
            assert got.cells_dropped == np.count_nonzero(ranks >= cutoff)
            assert got.rate == pytest.approx(np.count_nonzero(ranks >= cutoff) / ranks.size)
            want_q = np.quantile(ranks.astype(float), q.QUANTILES)
            assert list(got.quantiles.values()) == pytest.approx(want_q)
            hist = np.bincount(ranks // 500)
            assert got.histogram["cells"].tolist() == hist.tolist()
            assert got.histogram["rank_from"].tolist() == list(range(0, 500 * hist.size, 500))


def test_gene_lookup_by_symbol_any_case_and_versioned_id(synth: Case) -> None:
    table = synth.enc.token_table()
    token = int(np.flatnonzero(np.asarray(table["symbol"]) == "GENE42")[0])
    assert q.resolve_gene(synth.enc, "gene42") == token
    assert q.resolve_gene(synth.enc, f"{table['gene_id'][token]}.7") == token
    with pytest.raises(InputError, match=r"names 2 genes: ENSG\d+ \(token \d+\), ENSG\d+"):
        q.resolve_gene(synth.enc, "dupsym")
    with pytest.raises(InputError, match="Close matches: GENE42"):
        q.resolve_gene(synth.enc, "GENE42x")
    with pytest.raises(InputError, match="not in the vocabulary"):
        q.resolve_gene(synth.enc, "<pad>")  # special tokens are not genes


def test_gene_ranks_is_lazy_and_deterministic(synth: Case) -> None:
    with no_compute():
        a = q.gene_ranks(synth.enc, "GENE42")
        b = q.gene_ranks(synth.enc, "gene42")
    assert same_keys(a, b)
    assert a.shape == (N_CELLS,)
    assert a.dtype == np.int32
    assert a.chunks[0] == synth.enc.tokens.chunks[0]


# --------------------------------------------------------------------------------------------
# drop_rates


def test_drop_rates_match_reference_at_every_cutoff(synth: Case) -> None:
    ref = synth.ref
    expressing = ref.expressing(synth.n_tokens)
    for cutoff in _cutoffs(synth):
        frame = q.drop_rates(synth.enc, cutoff).to_frame()
        want = ref.drop_counts(cutoff, synth.n_tokens)
        tokens = frame["token"].to_numpy()
        assert np.array_equal(frame["cells_dropped"].to_numpy(), want[tokens]), cutoff
        assert np.array_equal(frame["cells_expressing"].to_numpy(), expressing[tokens])
        assert (
            want.sum() == frame["cells_dropped"].sum()
        )  # no dropped token is missing from the table
        with np.errstate(invalid="ignore", divide="ignore"):
            np.testing.assert_allclose(frame["rate"], want[tokens] / expressing[tokens])
        assert frame["cells_dropped"].is_monotonic_decreasing
        assert frame.attrs["cutoff"] == cutoff


def test_drop_rates_by_group_sum_to_total(synth: Case) -> None:
    ref = synth.ref
    rates = q.drop_rates(synth.enc, 2500, group_by="cell_type")
    counts = rates.compute()
    labels = synth.enc.cell_column("cell_type").astype(object)
    assert counts.shape == (len(rates.groups), synth.n_tokens)
    for g, label in enumerate(rates.groups):
        assert np.array_equal(counts[g], ref.drop_counts(2500, synth.n_tokens, labels == label))
    summary = rates.group_summary(counts, top=3)
    lengths = ref.lengths
    for row in summary.itertuples(index=False):
        members = ref.keep & (labels == row.group)
        assert row.cells == members.sum()
        assert row.truncated == np.count_nonzero(lengths[members] > 2500)
        assert row.median_length == np.median(lengths[members])
        assert row.top_dropped.count("(") == 3


def test_drop_rates_is_lazy_with_a_bounded_deterministic_graph(synth: Case) -> None:
    with no_compute():
        a = q.drop_rates(synth.enc, 1100)
        b = q.drop_rates(synth.enc, 1100)
    assert same_keys(a.dropped, b.dropped)
    tokens = synth.enc.tokens
    n_read = tokens.numblocks[0] * (tokens.numblocks[1] - 1100 // 512)
    assert len(a.dropped.__dask_graph__()) <= 5 * n_read + 10
    assert a.dropped.shape == (1, synth.n_tokens)
    assert a.dropped.numblocks == (1, 1)
    assert any(
        str(k[0] if isinstance(k, tuple) else k).startswith("flow-drop-rates-")
        for k in a.dropped.__dask_graph__()
    )


def test_write_drop_rates_by_suffix(synth: Case, tmp_path: Path) -> None:
    rates = q.drop_rates(synth.enc, 2048)
    written = q.write_drop_rates(rates, tmp_path / "r.csv")
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "r.csv", keep_default_na=False, na_values=[""]),
        written,
        check_dtype=False,
    )
    q.write_drop_rates(rates, tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), written)
    with pytest.raises(InputError, match="suffix"):
        q.write_drop_rates(rates, tmp_path / "r.xlsx")


def test_group_by_unknown_column_or_too_many_groups(synth: Case, monkeypatch: Any) -> None:
    with pytest.raises(InputError, match="carried columns are"):
        q.drop_rates(synth.enc, group_by="nope")
    monkeypatch.setattr(q, "MAX_GROUPS", 3)
    with pytest.raises(InputError, match="distinct values among passing cells"):
        q.drop_rates(synth.enc, group_by="cell_type")


# --------------------------------------------------------------------------------------------
# only the rank chunks past the cutoff are read


class CountingStore(WrapperStore[Any]):
    """Records every key read through get / get_partial_values."""

    def __init__(self, store: Any, reads: list[str] | None = None) -> None:
        super().__init__(store)
        self.reads: list[str] = [] if reads is None else reads

    def _with_store(self, store: Any) -> CountingStore:
        return type(self)(store, self.reads)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        self.reads.append(key)
        return await self._store.get(key, prototype, byte_range)

    async def get_partial_values(self, prototype: Any, key_ranges: Any) -> Any:
        key_ranges = list(key_ranges)
        self.reads.extend(k for k, _ in key_ranges)
        return await self._store.get_partial_values(prototype, key_ranges)


@dataclass(frozen=True)
class TracedEncoding(EncodingStore):
    """An encoding store read through a CountingStore."""

    store: Any = None

    def _group(self) -> zarr.Group:
        return zarr.open_group(store=self.store, mode="r")


def _chunks_read(reads: list[str], array: str, enc: EncodingStore) -> set[tuple[int, int]]:
    """The (cell block, rank chunk) chunks of the dense view whose band data was read."""
    found = (re.fullmatch(rf"bands/(\d+)/{array}/c/(\d+)", k) for k in reads)
    return {
        (block, int(m[1]))
        for m in found
        if m
        for block in blocks_of_chunk(enc, f"bands/{m[1]}/{array}", (int(m[2]),))
    }


def _read_any(reads: list[str], array: str) -> bool:
    return any(re.fullmatch(rf"bands/\d+/{array}/.*", k) for k in reads)


@pytest.mark.parametrize("cutoff", [1100, 2048, 4000])
def test_drop_rates_reads_only_rank_chunks_past_the_cutoff(synth: Case, cutoff: int) -> None:
    plain = open_encoding(synth.path)
    counting = CountingStore(LocalStore(str(synth.path), read_only=True))
    enc = TracedEncoding(plain.location, plain.attrs, None, counting)
    rates = q.drop_rates(enc, cutoff)
    before = list(counting.reads)
    counting.reads.clear()
    counts = rates.compute()
    chunks = _chunks_read(counting.reads, "tokens", enc)
    rank_chunk = enc.tokens.chunksize[1]
    first = cutoff // rank_chunk
    n_blocks, n_rank = enc.tokens.numblocks
    # every rank chunk past the cutoff that holds a ranking (empty ones store nothing)
    lengths = synth.ref.lengths
    longest = [lengths[i * BLOCK : (i + 1) * BLOCK].max() for i in range(n_blocks)]
    assert chunks == {
        (i, j) for i in range(n_blocks) for j in range(first, n_rank) if longest[i] > j * rank_chunk
    }
    assert all(j >= first for _, j in chunks)
    assert not _read_any(before + counting.reads, "counts")
    assert np.array_equal(counts[0], synth.ref.drop_counts(cutoff, synth.n_tokens))


def test_gene_ranks_never_read_values(synth: Case) -> None:
    plain = open_encoding(synth.path)
    counting = CountingStore(LocalStore(str(synth.path), read_only=True))
    enc = TracedEncoding(plain.location, plain.attrs, None, counting)
    q.gene_drop(enc, "GENE42", 2048)
    assert _chunks_read(counting.reads, "tokens", enc)
    assert not _read_any(counting.reads, "counts")


def test_one_cell_reads_one_cell_block(synth: Case) -> None:
    plain = open_encoding(synth.path)
    counting = CountingStore(LocalStore(str(synth.path), read_only=True))
    enc = TracedEncoding(plain.location, plain.attrs, None, counting)
    cell = 3 * BLOCK + 5
    length = int(synth.ref.lengths[cell])
    q.dropped_genes(enc, cell, 2048)
    want = {(3, j) for j in range(2048 // 512, (length - 1) // 512 + 1)}
    assert _chunks_read(counting.reads, "tokens", enc) == want
    assert _chunks_read(counting.reads, "counts", enc) == want


# --------------------------------------------------------------------------------------------
# coverage


def test_coverage_matches_reference(synth: Case) -> None:
    lengths = synth.ref.lengths[synth.ref.keep]
    frame = q.coverage(synth.enc)
    assert frame["input_size"].iloc[0] == 1
    assert frame["input_size"].iloc[-1] == max(4096, lengths.max())
    sizes = frame["input_size"].to_numpy()
    want = np.array([np.count_nonzero(lengths <= s) for s in sizes])
    assert np.array_equal(frame["cells_covered"].to_numpy(), want)
    np.testing.assert_allclose(frame["fraction_covered"], want / lengths.size)
    np.testing.assert_allclose(frame["attention_cost"], (sizes / 2048) ** 2)
    grid = q.coverage(synth.enc, [1, 1000, 2048, 4095, 10_000])
    assert grid["cells_covered"].tolist() == [
        np.count_nonzero(lengths <= s) for s in (1, 1000, 2048, 4095, 10_000)
    ]


def test_coverage_summary_text(synth: Case) -> None:
    lengths = synth.ref.lengths[synth.ref.keep]
    a, b = (100 * np.count_nonzero(lengths <= s) / lengths.size for s in (2048, 4096))
    want = f"2,048 covers {a:.1f}% of cells at cost 1.0; 4,096 covers {b:.1f}% at cost 4.0"
    assert q.coverage_summary(synth.enc) == want
    assert q.coverage_summary(synth.enc, (1024, 8192)).endswith("% at cost 16.0")
    assert "at cost 0.25" in q.coverage_summary(synth.enc, (1024,))


# --------------------------------------------------------------------------------------------
# plots and report


def _png_shape(data: bytes) -> tuple[int, ...]:
    import matplotlib.image

    assert data.startswith(PNG_MAGIC)
    return tuple(matplotlib.image.imread(io.BytesIO(data), format="png").shape)


class _Tables(HTMLParser):
    """Rows of the HTML tables of a page, by table id (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._current: list[list[str]] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._current = self.tables.setdefault(dict(attrs).get("id") or "", [])
        elif tag == "tr" and self._current is not None:
            self._current.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._current is not None:
            self._current[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _html_table(text: str, table_id: str) -> pd.DataFrame:
    parser = _Tables()
    parser.feed(text)
    head, *rows = parser.tables[table_id]
    return pd.DataFrame(rows, columns=head)


def test_plots_are_pngs_of_the_expected_size(synth: Case, tmp_path: Path) -> None:
    report.plot_coverage(synth.enc, tmp_path / "coverage.png")
    report.plot_detected_genes(synth.enc, tmp_path / "genes.png", cutoff=2048)
    report.plot_top_dropped(q.drop_rates(synth.enc, 2048).to_frame(), tmp_path / "top.png")
    w, h = (int(v * report.DPI) for v in report.FIGSIZE)
    bw, bh = (int(v * report.DPI) for v in report.BAR_FIGSIZE)
    assert _png_shape((tmp_path / "coverage.png").read_bytes()) == (h, w, 4)
    assert _png_shape((tmp_path / "genes.png").read_bytes()) == (h, w, 4)
    assert _png_shape((tmp_path / "top.png").read_bytes()) == (bh, bw, 4)


def test_top_dropped_plot_without_drops(synth: Case, tmp_path: Path) -> None:
    frame = q.drop_rates(synth.enc, 100_000).to_frame()
    assert frame["cells_dropped"].sum() == 0
    report.plot_top_dropped(frame, tmp_path / "none.png")
    assert (tmp_path / "none.png").read_bytes().startswith(PNG_MAGIC)


def test_report_is_self_contained_with_group_table(synth: Case, tmp_path: Path) -> None:
    out = report.write_report(
        synth.enc, tmp_path / "report.html", cutoff=2048, group_by="cell_type"
    )
    text = Path(out).read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3
    for img in images:
        assert base64.b64decode(img).startswith(PNG_MAGIC)
    assert "http://" not in text
    assert "https://" not in text
    assert q.coverage_summary(synth.enc) in text
    assert 'id="groups"' in text
    assert 'id="top-dropped"' in text
    assert 'id="coverage"' in text
    groups = _html_table(text, "groups")
    labels = synth.enc.cell_column("cell_type").astype(object)
    keep = synth.ref.keep
    assert sorted(groups["cell_type"]) == sorted(set(labels[keep]))
    for row in groups.itertuples(index=False):
        assert int(row.cells) == np.count_nonzero(keep & (labels == row.cell_type))
    top = _html_table(text, "top-dropped")
    want = q.drop_rates(synth.enc, 2048).to_frame().head(20)
    assert top["gene_id"].tolist() == want["gene_id"].tolist()


def test_report_without_groups(synth: Case, tmp_path: Path) -> None:
    text = Path(report.write_report(synth.enc, tmp_path / "r.html", cutoff=5000)).read_text()
    assert 'id="groups"' not in text
    assert "What input size 5,000 drops" in text


# --------------------------------------------------------------------------------------------
# command line


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


def test_cli_dropped_cell_table_csv_json_parquet(synth: Case, capsys: Any, tmp_path: Path) -> None:
    cell = int(np.argmax(synth.ref.lengths))
    barcode = synth.ref.barcodes[cell]
    want_t, _ = synth.ref.dropped(cell, 2048)
    assert main(["dropped", str(synth.path), "--cell", barcode]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        f"cell {barcode} (index {cell}): {synth.ref.lengths[cell]:,} genes ranked; "
        f"{want_t.size:,} past input size 2,048\n"
    )
    assert len(out.strip().splitlines()) == 2 + want_t.size
    assert (
        main(
            ["dropped", str(synth.path), "--cell", str(cell), "--cutoff", "3000", "--format", "csv"]
        )
        == 0
    )
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert np.array_equal(frame["token"], synth.ref.dropped(cell, 3000)[0])
    assert main(["dropped", str(synth.path), "--cell", barcode, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cell"] == barcode
    assert doc["filter_pass"] is True
    assert doc["cutoff"] == 2048
    assert [r["token"] for r in doc["dropped"]] == want_t.tolist()
    assert (
        main(["dropped", str(synth.path), "--cell", barcode, "-o", str(tmp_path / "c.parquet")])
        == 0
    )
    assert np.array_equal(pd.read_parquet(tmp_path / "c.parquet")["token"], want_t)


def test_cli_dropped_failing_cell_and_errors(synth: Case, capsys: Any) -> None:
    cell = int(np.flatnonzero(~synth.ref.keep & (synth.ref.lengths > 2048))[0])
    assert main(["dropped", str(synth.path), "--cell", str(cell)]) == 0
    assert "does NOT pass filtering" in capsys.readouterr().out
    assert main(["dropped", str(synth.path), "--cell", "CELL00000017-1"]) == 1
    err = capsys.readouterr().err
    assert "flow dropped: error: No cell with barcode" in err
    assert "Close matches" in err
    assert main(["dropped", str(synth.path), "--gene", "dupsym"]) == 1
    assert "Ask by Ensembl ID" in capsys.readouterr().err


def test_cli_dropped_gene(synth: Case, capsys: Any, client: Any) -> None:
    table = synth.enc.token_table()
    token = int(np.flatnonzero(np.asarray(table["symbol"]) == "GENE42")[0])
    ranks = synth.ref.ranks_of(token)
    assert main(["dropped", str(synth.path), "--gene", "Gene42", "--cutoff", "1500", "-q"]) == 0
    out = capsys.readouterr().out
    n = np.count_nonzero(ranks >= 1500)
    assert f"expressed in {ranks.size:,} passing cells; dropped at input size 1,500 in {n:,}" in out
    assert "rank histogram" in out
    assert main(["dropped", str(synth.path), "--gene", "GENE42", "--format", "json", "-q"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cells_dropped"] == np.count_nonzero(ranks >= 2048)
    assert doc["token"] == token
    assert sum(r["cells"] for r in doc["rank_histogram"]) == ranks.size


def test_cli_drop_rates(synth: Case, capsys: Any, tmp_path: Path, client: Any) -> None:
    want = synth.ref.drop_counts(2048, synth.n_tokens)
    out_csv = tmp_path / "rates.csv"
    assert main(["drop-rates", str(synth.path), "-o", str(out_csv), "-q"]) == 0
    assert f"-> {out_csv}" in capsys.readouterr().out
    frame = pd.read_csv(out_csv)
    assert np.array_equal(frame["cells_dropped"], want[frame["token"]])
    assert main(["drop-rates", str(synth.path), "--cutoff", "4000", "--top", "5", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "genes are dropped in at least one cell at input size 4,000; top 5:" in out[0]
    assert len(out) == 7


def test_cli_drop_rates_on_its_own_local_cluster(synth: Case, capsys: Any, tmp_path: Path) -> None:
    """Without a current client the command starts (and stops) a local cluster of processes."""
    out_parquet = tmp_path / "rates.parquet"
    argv = [
        "drop-rates",
        str(synth.path),
        "-o",
        str(out_parquet),
        "--cutoff",
        "3000",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--memory-limit",
        "1GiB",
        "-q",
    ]
    assert main(argv) == 0
    frame = pd.read_parquet(out_parquet)
    want = synth.ref.drop_counts(3000, synth.n_tokens)
    assert np.array_equal(frame["cells_dropped"], want[frame["token"]])


def test_cli_coverage(synth: Case, capsys: Any, tmp_path: Path) -> None:
    png, csv = tmp_path / "cov.png", tmp_path / "cov.csv"
    assert main(["coverage", str(synth.path), "--plot", str(png), "-o", str(csv)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == q.coverage_summary(synth.enc)
    assert _png_shape(png.read_bytes())[:2] == (450, 800)
    pd.testing.assert_frame_equal(pd.read_csv(csv), q.coverage(synth.enc))
    assert main(["coverage", str(synth.path), "--sizes", "1024,2048,8192"]) == 0
    assert capsys.readouterr().out.count("covers") == 3


def test_cli_report(synth: Case, capsys: Any, tmp_path: Path, client: Any) -> None:
    out = tmp_path / "report.html"
    argv = [
        "report",
        str(synth.path),
        "-o",
        str(out),
        "--cutoff",
        "3000",
        "--group-by",
        "cell_type",
        "-q",
    ]
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 3
    assert 'id="groups"' in text


# --------------------------------------------------------------------------------------------
# a real cluster of processes: kernels pickle, tasks open the store themselves


@pytest.mark.distributed
def test_queries_on_a_process_cluster(synth: Case, local_cluster_address: str) -> None:
    from distributed import Client

    with Client(local_cluster_address) as c:
        counts = q.drop_rates(synth.enc, 2048, group_by="cell_type").compute()
        ranks = c.compute(q.gene_ranks(synth.enc, "GENE42")).result()
    assert np.array_equal(counts.sum(axis=0), synth.ref.drop_counts(2048, synth.n_tokens))
    table = synth.enc.token_table()
    token = int(np.flatnonzero(np.asarray(table["symbol"]) == "GENE42")[0])
    got = np.asarray(ranks)[synth.ref.keep]
    assert np.array_equal(np.sort(got[got >= 0]), np.sort(synth.ref.ranks_of(token)))


# --------------------------------------------------------------------------------------------
# PBMC 1k (10x h5) with Geneformer's V1 dictionaries


@dataclass
class _TenxH5:
    """A minimal flow.ingest Source over a Cell Ranger 3 h5 (used if flow.ingest is missing)."""

    path: str
    info: SourceInfo

    @classmethod
    def open(cls, path: Path) -> _TenxH5:
        from flow._io import file_fingerprint

        with h5py.File(path, "r") as f:
            m = f["matrix"]
            n_genes, n_cells = (int(v) for v in m["shape"][:])
            info = SourceInfo(
                path=str(path),
                format="10x-h5",
                n_cells=n_cells,
                n_genes=n_genes,
                gene_ids=m["features/id"][:].astype(str).astype(object),
                gene_symbols=m["features/name"][:].astype(str).astype(object),
                barcodes=m["barcodes"][:].astype(str).astype(object),
                obs=pd.DataFrame(index=pd.RangeIndex(n_cells)),
                fingerprint=file_fingerprint(path),
            )
        return cls(str(path), info)

    def iter_blocks(self, n_cells: int) -> Any:
        with h5py.File(self.path, "r") as f:
            m = f["matrix"]
            indptr = m["indptr"][:]
            for c0 in range(0, self.info.n_cells, n_cells):
                c1 = min(c0 + n_cells, self.info.n_cells)
                s, e = indptr[c0], indptr[c1]
                yield sp.csr_matrix(
                    (m["data"][s:e], m["indices"][s:e], indptr[c0 : c1 + 1] - s),
                    shape=(c1 - c0, self.info.n_genes),
                )


def _read_h5(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray, np.ndarray]:
    """Counts (cells x genes), gene IDs, symbols and barcodes straight from the file."""
    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][:])
        x = sp.csc_matrix(
            (m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_cells)
        ).T.tocsr()
        return (
            x,
            m["features/id"][:].astype(str),
            m["features/name"][:].astype(str),
            m["barcodes"][:].astype(str),
        )


@pytest.fixture(scope="module")
def pbmc1k(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Case:
    from flow.medians import import_median_dictionary
    from flow.store import open_counts
    from flow.vocab import read_vocabulary

    tmp = tmp_path_factory.mktemp("pbmc1k")
    h5 = shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5"
    v1 = shared_data / "geneformer" / "v1_gc30M"
    try:
        from flow.pipeline import convert

        store = convert([h5], tmp / "counts.zarr", block_size=256)
    except ImportError:  # flow.ingest not there yet: a tiny reader of our own
        store = write_counts([_TenxH5.open(h5)], tmp / "counts.zarr", block_size=256)
    store = open_counts(tmp / "counts.zarr")
    medians = import_median_dictionary(v1 / "gene_median_dictionary_gc30M.pkl")
    vocab = read_vocabulary(v1 / "token_dictionary_gc30M.pkl")
    enc = write_encoding(plan_encoding(store, medians, vocab), tmp / "encoding.zarr")
    # the reference: the h5 file and the pickles, read here with plain h5py and pickle
    x, ids, _, barcodes = _read_h5(h5)
    with open(v1 / "token_dictionary_gc30M.pkl", "rb") as fh:
        token_dict = {str(k): int(v) for k, v in pickle.load(fh).items()}
    with open(v1 / "gene_median_dictionary_gc30M.pkl", "rb") as fh:
        median_dict = {str(k): float(v) for k, v in pickle.load(fh).items()}
    assert len(set(ids)) == ids.size  # no duplicate IDs to sum in this file
    tok_of_col = np.array([token_dict.get(g, -1) if g in median_dict else -1 for g in ids])
    med_of_col = np.array([median_dict.get(g, np.nan) for g in ids])
    n_counts = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    ref = Reference.build(x, n_counts, med_of_col, tok_of_col, np.ones(x.shape[0], bool), barcodes)
    return Case(enc, ref, tmp / "encoding.zarr", len(token_dict))


def test_pbmc1k_v1_truncation_matches_reference(pbmc1k: Case) -> None:
    ref, enc = pbmc1k.ref, pbmc1k.enc
    truncated = np.flatnonzero(ref.lengths > 2048)
    assert truncated.size == 20  # 20 of 996 cells have more than 2,048 V1 genes
    assert np.array_equal(enc.lengths, ref.lengths)
    assert np.array_equal(enc.cell_column("cell").astype(object), ref.barcodes)
    for cell in truncated:
        frame = q.dropped_genes(enc, ref.barcodes[cell], 2048)
        want_t, want_v = ref.dropped(cell, 2048)
        assert np.array_equal(frame["token"].to_numpy(), want_t)
        assert np.array_equal(frame["value"].to_numpy(), want_v)
    lengths = ref.lengths
    a, b = (100 * np.count_nonzero(lengths <= s) / lengths.size for s in (2048, 4096))
    assert (
        q.coverage_summary(enc)
        == f"2,048 covers {a:.1f}% of cells at cost 1.0; 4,096 covers {b:.1f}% at cost 4.0"
    )
    assert b == 100.0


@pytest.mark.parametrize("cutoff", [1, 512, 1000, 2048, 2500])
def test_pbmc1k_drop_rates_match_reference(pbmc1k: Case, cutoff: int) -> None:
    frame = q.drop_rates(pbmc1k.enc, cutoff).to_frame()
    want = pbmc1k.ref.drop_counts(cutoff, pbmc1k.n_tokens)
    assert np.array_equal(frame["cells_dropped"].to_numpy(), want[frame["token"].to_numpy()])
    assert frame["cells_dropped"].sum() == want.sum()
    expressing = pbmc1k.ref.expressing(pbmc1k.n_tokens)
    assert np.array_equal(
        frame["cells_expressing"].to_numpy(), expressing[frame["token"].to_numpy()]
    )


def test_pbmc1k_gene_queries(pbmc1k: Case) -> None:
    ref, enc = pbmc1k.ref, pbmc1k.enc
    table = enc.token_table()
    counts = ref.drop_counts(2048, pbmc1k.n_tokens)
    token = int(np.argmax(counts))
    symbol = str(table["symbol"][token])
    got = q.gene_drop(enc, symbol.lower(), 2048)
    ranks = ref.ranks_of(token)
    assert (got.token, got.cells_expressing, got.cells_dropped) == (
        token,
        ranks.size,
        counts[token],
    )
    symbols = np.asarray(table["symbol"]).astype(object)
    named, n = np.unique(symbols[symbols != ""], return_counts=True)
    if (n > 1).any():  # real symbols naming two Ensembl genes (e.g. in GRCh38)
        with pytest.raises(InputError, match="Ask by Ensembl ID"):
            q.resolve_gene(enc, str(named[n > 1][0]))


def test_pbmc1k_report(pbmc1k: Case, tmp_path: Path) -> None:
    with dask.config.set(scheduler="threads"):
        out = report.write_report(pbmc1k.enc, tmp_path / "r.html")
    text = Path(out).read_text()
    assert "20 passing cells (2.0%) have more than 2,048 ranked genes" in text
