"""Parity with upstream Geneformer's ``TranscriptomeTokenizer`` on real PBMC data.

Upstream cannot be installed here, so :func:`upstream_tokenize` below re-expresses its
algorithm step by step (the V2-era tokenizer, the one with ``collapse_gene_ids``,
``sum_ensembl_ids``, ``special_token`` and ``model_version``; read from its source, not copied):

1. ``sum_ensembl_ids`` (h5ad branch). With ``collapse_gene_ids`` the mapping dictionary is
   first filtered to the entries whose value is in the token dictionary; each gene's
   ``ensembl_id`` is upper-cased and looked up in it (a gene it lacks gets no ID). If the mapped
   genes hit as many distinct IDs as there are distinct mapped keys, the columns stay as they
   are; otherwise genes without an ID are dropped, genes whose ID occurs once keep their
   columns in order, and each ID that occurs several times becomes one column holding the sum
   of its genes' counts, appended after all the others (in order of first occurrence).
   Without ``collapse_gene_ids`` the IDs are used as given (repeats among vocabulary genes are
   an error upstream).
2. ``tokenize_anndata``: the columns whose ID is a key of the token dictionary are kept, each
   with its token and its median from the median dictionary. All cells are tokenized (these
   files have no ``filter_pass``). The values are ``X / n_counts * 10_000 / medians`` computed
   on the scipy sparse ``X``, i.e. with scipy's sparse arithmetic, which multiplies by
   reciprocals; the ``.loom`` path divides a dense array instead. Both are emulated (see
   ``ARITHMETIC``); they differ in the last bit of many values.
3. ``rank_genes``: per cell, the stored (nonzero) values in column order are ordered by
   ``np.argsort(-values)``: numpy's default, *unstable* sort, so upstream's order among equal
   values is an accident of the sort.
4. ``create_dataset``: V1 keeps the first 2,048 tokens; V2 (``special_token``) keeps the first
   4,094 and puts ``<cls>`` before and ``<eos>`` after them.

Upstream's V1 (``model_version="V1"``) also collapses with ``ensembl_mapping_dict_gc30M``; that
dictionary maps every V1 vocabulary gene to itself and nothing else (checked below), so it
changes nothing. flow is run on V1 without a mapping (as a V1 user would) and on V2 with
``ensembl_mapping_dict_gc104M`` as ``--gene-mapping``.

Deliberate differences of flow from upstream (see DESIGN.md section 3); none shows on these
files except the first:

- **Tie order**: genes with exactly equal values are ordered by token ID ascending (upstream:
  whatever its unstable sort gives). Cells whose input differs from upstream's only by such
  permutations, or among values that differ only by floating-point rounding (relative 1e-12:
  the sparse path's reciprocals change last bits), are counted and printed, not failed.
- **Duplicates summed**: counts of genes that map to the same vocabulary ID are summed, and so
  are exact duplicate IDs (upstream sums the former only with ``collapse_gene_ids`` and stops
  with an error on the latter).
- **Version suffixes stripped** (``ENSG00000123.4`` -> ``ENSG00000123``) before matching;
  upstream matches the string as it is (these files have no versions).
- **Upper-casing** of every ID, also without a mapping; upstream upper-cases only to look IDs up
  in the mapping (these files are upper case already).
- **Cells with no vocabulary gene** are kept with length 0 (input ``[]`` for V1, ``[<cls>,
  <eos>]`` for V2) and counted; upstream drops them with a warning (these files have none:
  asserted, so the cells line up one to one).
- IDs a mapping does not know keep their own ID (upstream drops them); with Geneformer's
  dictionaries this is the same, because every vocabulary gene maps to itself.
- **n_counts** is computed by flow as each cell's total over all genes of the file (the file's
  own ``n_counts``, if any, is carried as ``input_n_counts``; ``--n-counts-column`` picks
  another); upstream requires the user to supply it. Here both are that total (asserted).
- Besides ``input_ids`` and ``length``, the export carries every cell column of the input
  (upstream: only those named in ``custom_attr_name_dict``).

flow is also compared with the independent reference of ``tests/reference.py`` (value
``((count / n_counts) * 10_000) / median`` in double precision, stable sort by (-value,
token)): that must match exactly, every cell, full rankings and their float64 values.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp

from flow import pipeline
from flow._pickle import load_dict
from flow.encode.store import open_encoding

from reference import reference_rank_cell

datasets = pytest.importorskip("datasets")

TARGET_SUM = 10_000
RTOL = 1e-12  # "equal up to floating-point rounding"

DICTS = {
    "V1": {
        "folder": "v1_gc30M",
        "token": "token_dictionary_gc30M.pkl",
        "median": "gene_median_dictionary_gc30M.pkl",
        "mapping": "ensembl_mapping_dict_gc30M.pkl",
        "input_size": 2048,
        "special": False,
    },
    "V2": {
        "folder": "v2_gc104M",
        "token": "token_dictionary_gc104M.pkl",
        "median": "gene_median_dictionary_gc104M.pkl",
        "mapping": "ensembl_mapping_dict_gc104M.pkl",
        "input_size": 4096,
        "special": True,
    },
}


# ----------------------------------------------------------------------------------------------
# inputs, read without flow (as a Geneformer user would hand them to upstream)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Matrix:
    """Cells x genes raw counts (scipy CSR), the genes' Ensembl IDs and each cell's total."""

    counts: sp.csr_matrix
    ensembl_ids: list[str]
    n_counts: np.ndarray


def read_pbmc3k(path: Path) -> Matrix:
    import anndata as ad

    adata = ad.read_h5ad(path)
    counts = sp.csr_matrix(adata.X)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    n_counts = adata.obs["n_counts"].to_numpy()
    np.testing.assert_array_equal(n_counts, totals)  # the file's n_counts: all genes' total
    return Matrix(counts, adata.var["ensembl_id"].astype(str).tolist(), n_counts)


def read_pbmc1k(path: Path) -> Matrix:
    import h5py

    with h5py.File(path, "r") as f:
        m = f["matrix"]
        n_genes, n_cells = (int(v) for v in m["shape"][:])
        genes_by_cells = sp.csc_matrix(
            (m["data"][:], m["indices"][:], m["indptr"][:]), shape=(n_genes, n_cells)
        )
        ids = [x.decode() for x in m["features"]["id"][:]]
    counts = sp.csr_matrix(genes_by_cells.T)
    counts.sort_indices()
    n_counts = np.asarray(counts.sum(axis=1)).ravel()  # total over all genes of the file
    return Matrix(counts, ids, n_counts)


# ----------------------------------------------------------------------------------------------
# upstream, emulated (see the module docstring for the steps)
# ----------------------------------------------------------------------------------------------


def upstream_collapse(
    m: Matrix, token_dict: Mapping[str, int], mapping: Mapping[str, str] | None
) -> tuple[sp.csr_matrix, list[str | None]]:
    """Step 1: the gene ID of every column after mapping, duplicates summed (columns move)."""
    ids = m.ensembl_ids
    if mapping is None:  # collapse_gene_ids=False: IDs as given; repeats must not occur
        in_vocab = [g for g in ids if g in token_dict]
        assert len(in_vocab) == len(set(in_vocab)), "upstream: 'data Ensembl IDs non-unique'"
        return m.counts, list(ids)
    usable = {k: v for k, v in mapping.items() if v in token_dict}
    mapped = [usable.get(g.upper()) for g in ids]
    keys_hit = {g for g in ids if g in usable}  # (upstream tests membership without .upper())
    if len(keys_hit) == len({usable[g] for g in keys_hit}):
        return m.counts, mapped  # nothing to collapse: columns unchanged, unmapped ones unused
    keep = [j for j, g in enumerate(mapped) if g is not None]
    counts = m.counts[:, keep]
    names = [mapped[j] for j in keep]
    times = Counter(names)
    repeated = [g for g, n in times.items() if n > 1]  # in order of first occurrence
    single = [j for j, g in enumerate(names) if times[g] == 1]
    # one 0/1 column per repeated ID: counts @ pick sums that ID's genes (integers: exact)
    slot = {g: k for k, g in enumerate(repeated)}
    rows = [j for j, g in enumerate(names) if g in slot]
    pick = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.int64), (rows, [slot[names[j]] for j in rows])),
        shape=(len(names), len(repeated)),
    )
    collapsed = sp.hstack([counts[:, single], counts.astype(np.int64) @ pick], format="csr")
    return collapsed, [names[j] for j in single] + repeated


def _sparse_values(x: sp.csr_matrix, n_counts: np.ndarray, medians: np.ndarray) -> sp.csr_matrix:
    """Upstream's h5ad arithmetic: scipy sparse / dense (scipy multiplies by reciprocals)."""
    return sp.csr_matrix(x / n_counts[:, None] * TARGET_SUM / medians)


def _dense_values(x: sp.csr_matrix, n_counts: np.ndarray, medians: np.ndarray) -> sp.csr_matrix:
    """Upstream's loom arithmetic: dense ``X / n_counts * 10_000 / medians``, element-wise left
    to right. Zeros stay zeros, so computing it on the stored entries only gives the same."""
    x = sp.csr_matrix(x, dtype=np.float64, copy=True)
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = x.data / n_counts[rows] * TARGET_SUM / medians[x.indices]
    return x


ARITHMETIC: dict[str, Callable[..., sp.csr_matrix]] = {
    "h5ad": _sparse_values,
    "loom": _dense_values,
}


@dataclass(frozen=True)
class Upstream:
    """Upstream's output for one file: per cell the full ranking and the value at each rank,
    plus the kept columns (counts, token, median) for the reference."""

    tokens: list[np.ndarray]
    values: list[np.ndarray]
    counts: sp.csr_matrix
    column_tokens: np.ndarray
    column_medians: np.ndarray


def upstream_tokenize(
    m: Matrix,
    token_dict: Mapping[str, int],
    median_dict: Mapping[str, float],
    mapping: Mapping[str, str] | None,
    *,
    arithmetic: str,
) -> Upstream:
    """Steps 1-3: upstream's full rankings (before truncation) of every cell."""
    counts, ids = upstream_collapse(m, token_dict, mapping)
    loc = [j for j, g in enumerate(ids) if g is not None and g in token_dict]
    tokens = np.array([token_dict[ids[j]] for j in loc], dtype=np.int64)
    medians = np.array([median_dict[ids[j]] for j in loc], dtype=np.float64)
    kept = sp.csr_matrix(counts[:, loc])
    values = ARITHMETIC[arithmetic](kept, m.n_counts, medians)
    ranked_tokens, ranked_values = [], []
    for i in range(values.shape[0]):
        start, end = values.indptr[i], values.indptr[i + 1]
        row_values = values.data[start:end]  # the stored values, in column order
        row_tokens = tokens[values.indices[start:end]]
        nonzero = np.nonzero(row_values)[0]
        order = np.argsort(-row_values[nonzero])  # upstream's unstable sort
        ranked_tokens.append(row_tokens[nonzero][order])
        ranked_values.append(row_values[nonzero][order])
    return Upstream(ranked_tokens, ranked_values, kept, tokens, medians)


def upstream_input_ids(ranking: np.ndarray, preset: str, token_dict: Mapping[str, int]) -> list:
    """Step 4: the model input of one cell."""
    size = DICTS[preset]["input_size"]
    if DICTS[preset]["special"]:
        return [token_dict["<cls>"], *ranking[: size - 2].tolist(), token_dict["<eos>"]]
    return ranking[:size].tolist()


# ----------------------------------------------------------------------------------------------
# fixtures: the dictionaries, the inputs, flow's outputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dict_paths(shared_data: Path) -> dict[str, dict[str, str]]:
    root = shared_data / "geneformer"
    return {
        preset: {
            kind: os.fspath(root / d["folder"] / d[kind]) for kind in ("token", "median", "mapping")
        }
        for preset, d in DICTS.items()
    }


@pytest.fixture(scope="module")
def dicts(dict_paths) -> dict[str, dict[str, dict]]:
    """Geneformer's dictionaries, read with flow's restricted unpickler (no code runs)."""
    return {
        preset: {kind: load_dict(path) for kind, path in paths.items()}
        for preset, paths in dict_paths.items()
    }


INPUTS = {
    "pbmc3k-h5ad": ("pbmc3k/pbmc3k_raw_counts.h5ad", read_pbmc3k, "pbmc3k/pbmc3k_raw_counts.h5ad"),
    "pbmc3k-mtx": (
        "pbmc3k/filtered_gene_bc_matrices/hg19",
        read_pbmc3k,
        "pbmc3k/pbmc3k_raw_counts.h5ad",  # the same matrix (checked: same count store content)
    ),
    "pbmc1k-h5": (
        "pbmc1k_v2/pbmc_1k_v2_filtered_feature_bc_matrix.h5",
        read_pbmc1k,
        "pbmc1k_v2/pbmc_1k_v2_filtered_feature_bc_matrix.h5",
    ),
}


class Cache(dict):
    """Module-wide memo: ``cache.get_or(key, make)``."""

    def get_or(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self:
            self[key] = make()
        return self[key]


@pytest.fixture(scope="module")
def cache() -> Cache:
    return Cache()


def upstream_result(
    cache: Cache, shared_data: Path, dicts, name: str, preset: str, arithmetic: str
):
    _, reader, upstream_file = INPUTS[name]
    matrix = cache.get_or(("matrix", upstream_file), lambda: reader(shared_data / upstream_file))
    d = dicts[preset]
    return cache.get_or(
        ("upstream", upstream_file, preset, arithmetic),
        lambda: upstream_tokenize(
            matrix, d["token"], d["median"], d["mapping"], arithmetic=arithmetic
        ),
    )


def run_flow(tmp: Path, name: str, preset: str, source: Path, paths: dict[str, str]) -> dict:
    """flow on one input: ``pipeline.run`` for the h5ad and h5 inputs, the stages one by one
    (convert, tokenize, export) for the MTX directory."""
    mapping = paths["mapping"] if preset == "V2" else None
    out = tmp / f"{name}-{preset}"
    if name == "pbmc3k-mtx":
        counts = os.fspath(out / "counts.zarr")
        pipeline.convert([source], counts)
        pipeline.tokenize(
            counts,
            out / "encoding.zarr",
            medians=paths["median"],
            vocabulary=paths["token"],
            gene_mapping=mapping,
        )
        pipeline.export(out / "encoding.zarr", out / "dataset", preset=preset)
        result = {"counts": counts, "encoding": os.fspath(out / "encoding.zarr")}
        result["dataset"] = os.fspath(out / "dataset")
    else:
        result = pipeline.run(
            [source],
            out,
            medians=paths["median"],
            vocabulary=paths["token"],
            gene_mapping=mapping,
            preset=preset,
        ).paths
    enc = open_encoding(result["encoding"])
    ds = datasets.load_from_disk(result["dataset"])
    return {
        "paths": result,
        "input_ids": [np.asarray(x, dtype=np.int64) for x in ds["input_ids"]],
        "length": np.asarray(ds["length"]),
        "columns": ds.column_names,
        "tokens": np.asarray(enc.tokens.compute()),
        "values": np.asarray(enc.values.compute()),
        "lengths": enc.lengths,
        "n_counts": enc.cell_column("n_counts"),
        "attrs": enc.attrs,
    }


def flow_result(cache, tmp_path_factory, shared_data, dict_paths, name, preset):
    source = shared_data / INPUTS[name][0]
    return cache.get_or(
        ("flow", name, preset),
        lambda: run_flow(
            tmp_path_factory.mktemp("parity"), name, preset, source, dict_paths[preset]
        ),
    )


# ----------------------------------------------------------------------------------------------
# comparison
# ----------------------------------------------------------------------------------------------


class TokenValues:
    """Value of a token in one cell (NaN for genes the cell does not express), reusing one array."""

    def __init__(self, n_tokens: int) -> None:
        self.table = np.full(n_tokens, np.nan)

    def load(self, tokens: np.ndarray, values: np.ndarray) -> None:
        self.table[tokens] = values

    def clear(self, tokens: np.ndarray) -> None:
        self.table[tokens] = np.nan

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        return self.table[tokens]


def differs_only_within_ties(ours: np.ndarray, theirs: np.ndarray, value: TokenValues) -> bool:
    """False if equal; True if the sequences differ only among equal values (relative 1e-12);
    raises AssertionError otherwise."""
    if np.array_equal(ours, theirs):
        return False
    assert ours.size == theirs.size, f"lengths differ: {ours.size} vs {theirs.size}"
    assert np.unique(ours).size == ours.size, "a token repeats"
    at = np.flatnonzero(ours != theirs)
    ours_v, theirs_v = value(ours[at]), value(theirs[at])
    assert not np.isnan(ours_v).any(), f"tokens {ours[at][np.isnan(ours_v)][:5]} not expressed"
    bad = ~np.isclose(ours_v, theirs_v, rtol=RTOL, atol=0)
    assert not bad.any(), (
        f"at ranks {at[bad][:5].tolist()} flow has tokens {ours[at][bad][:5].tolist()} "
        f"(values {ours_v[bad][:5].tolist()}), upstream {theirs[at][bad][:5].tolist()} "
        f"(values {theirs_v[bad][:5].tolist()})"
    )
    return True


CASES = [(name, preset) for name in INPUTS for preset in DICTS]


@pytest.mark.data
@pytest.mark.parametrize("arithmetic", list(ARITHMETIC))
@pytest.mark.parametrize(("name", "preset"), CASES)
def test_input_ids_equal_upstream_up_to_ties(
    cache, tmp_path_factory, shared_data, dicts, dict_paths, name, preset, arithmetic
):
    up = upstream_result(cache, shared_data, dicts, name, preset, arithmetic)
    got = flow_result(cache, tmp_path_factory, shared_data, dict_paths, name, preset)
    token_dict = dicts[preset]["token"]
    n_cells = len(up.tokens)
    assert all(t.size for t in up.tokens), "a cell without vocabulary genes: upstream drops it"
    assert len(got["input_ids"]) == n_cells

    value = TokenValues(max(token_dict.values()) + 1)
    differ_input = differ_full = with_ties = truncated = 0
    max_genes = DICTS[preset]["input_size"] - 2 * DICTS[preset]["special"]
    for i in range(n_cells):
        value.load(up.tokens[i], up.values[i])
        v = up.values[i]
        with_ties += bool(np.isclose(v[1:], v[:-1], rtol=RTOL, atol=0).any())
        truncated += v.size > max_genes
        n = int(got["lengths"][i])
        full = got["tokens"][i, :n].astype(np.int64)
        assert set(full.tolist()) == set(up.tokens[i].tolist()), f"cell {i}: other genes"
        differ_full += differs_only_within_ties(full, up.tokens[i], value)
        expected = np.asarray(upstream_input_ids(up.tokens[i], preset, token_dict))
        ids = got["input_ids"][i]
        if DICTS[preset]["special"]:
            assert ids[0] == token_dict["<cls>"]
            assert ids[-1] == token_dict["<eos>"]
            assert ids.size == expected.size
            ids, expected = ids[1:-1], expected[1:-1]
        differ_input += differs_only_within_ties(ids, expected, value)
        value.clear(up.tokens[i])
    np.testing.assert_array_equal(got["length"], [len(x) for x in got["input_ids"]])
    print(
        f"\nparity {name} {preset} ({arithmetic} arithmetic): {n_cells} cells "
        f"({truncated} truncated, {with_ties} with tied values); input_ids differ from upstream "
        f"in {differ_input} cells, full rankings in {differ_full} (all only within ties)"
    )


@pytest.mark.data
@pytest.mark.parametrize(("name", "preset"), CASES)
def test_equals_reference_exactly(
    cache, tmp_path_factory, shared_data, dicts, dict_paths, name, preset
):
    """Full rankings and their float64 values equal the plain-Python reference, every cell."""
    up = upstream_result(cache, shared_data, dicts, name, preset, "loom")
    got = flow_result(cache, tmp_path_factory, shared_data, dict_paths, name, preset)
    matrix = cache[("matrix", INPUTS[name][2])]
    np.testing.assert_array_equal(got["n_counts"], matrix.n_counts)  # all genes of the file
    x = up.counts
    for i in range(x.shape[0]):
        start, end = x.indptr[i], x.indptr[i + 1]
        cols = x.indices[start:end]
        expected = reference_rank_cell(
            x.data[start:end],
            float(matrix.n_counts[i]),
            up.column_medians[cols],
            up.column_tokens[cols],
        )
        n = int(got["lengths"][i])
        assert n == expected.size
        np.testing.assert_array_equal(got["tokens"][i, :n], expected, err_msg=f"cell {i}")
        # values derived from the stored counts: bit-identical float64 (the loom arithmetic is flow's)
        np.testing.assert_array_equal(got["values"][i, :n], np.sort(up.values[i])[::-1])


@pytest.mark.data
def test_v1_mapping_is_the_identity_on_the_vocabulary(dicts):
    """Why flow runs V1 without a mapping: upstream's V1 default mapping changes nothing."""
    d = dicts["V1"]
    genes = {k for k in d["token"] if not k.startswith("<")}
    assert set(d["mapping"]) == genes
    assert all(d["mapping"][g] == g for g in genes)


@pytest.mark.data
def test_mtx_and_h5ad_are_the_same_matrix(cache, tmp_path_factory, shared_data, dict_paths):
    """The MTX route is compared with upstream on the h5ad's matrix: they hold the same counts."""
    from flow.store import open_counts

    a = flow_result(cache, tmp_path_factory, shared_data, dict_paths, "pbmc3k-mtx", "V1")
    b = flow_result(cache, tmp_path_factory, shared_data, dict_paths, "pbmc3k-h5ad", "V1")
    assert (
        open_counts(a["paths"]["counts"]).fingerprint
        == open_counts(b["paths"]["counts"]).fingerprint
    )


def test_comparison_tolerates_ties_only():
    """The comparison used above: permutations among (nearly) equal values pass, others fail."""
    value = TokenValues(10)
    value.load(np.array([4, 5, 6, 7]), np.array([3.0, 2.0, 2.0 * (1 + 1e-15), 1.0]))
    upstream = np.array([4, 6, 5, 7])
    assert not differs_only_within_ties(upstream.copy(), upstream, value)
    assert differs_only_within_ties(np.array([4, 5, 6, 7]), upstream, value)
    with pytest.raises(AssertionError, match="at ranks"):
        differs_only_within_ties(np.array([5, 4, 6, 7]), np.array([4, 5, 6, 7]), value)
    with pytest.raises(AssertionError, match="not expressed"):
        differs_only_within_ties(np.array([4, 8, 6, 7]), np.array([4, 5, 6, 7]), value)
    with pytest.raises(AssertionError, match="lengths differ"):
        differs_only_within_ties(np.array([4, 5]), np.array([4, 5, 6]), value)


@pytest.mark.data
@pytest.mark.parametrize(("name", "preset"), [("pbmc1k-h5", "V2"), ("pbmc3k-h5ad", "V1")])
def test_flow_run_with_a_preset_alone_equals_the_pickles(
    cache, tmp_path_factory, shared_data, dict_paths, name, preset, capsys
):
    """``flow run INPUT -o OUT --preset V2``, no dictionary path given: the bundled Geneformer
    dictionaries give exactly the tokens and model input of the run with the pickles (which
    the tests above compare with upstream)."""
    from flow.cli import main

    expected = flow_result(cache, tmp_path_factory, shared_data, dict_paths, name, preset)
    out = tmp_path_factory.mktemp("bundled") / "out"
    args = ["run", os.fspath(shared_data / INPUTS[name][0]), "-o", os.fspath(out)]
    assert main([*args, "--preset", preset.lower(), "--workers", "1", "-q"]) == 0
    assert f"dataset: {out / 'dataset'}" in capsys.readouterr().out
    enc = open_encoding(out / "encoding.zarr")
    np.testing.assert_array_equal(enc.lengths, expected["lengths"])
    np.testing.assert_array_equal(np.asarray(enc.tokens.compute()), expected["tokens"])
    ds = datasets.load_from_disk(os.fspath(out / "dataset"))
    got_ids = [np.asarray(x, dtype=np.int64) for x in ds["input_ids"]]
    assert len(got_ids) == len(expected["input_ids"])
    assert all(np.array_equal(a, b) for a, b in zip(got_ids, expected["input_ids"], strict=True))
    assert not (out / "medians.zarr").exists()  # the preset's medians, not the data's
