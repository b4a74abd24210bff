"""flow.vocab and flow._genes: gene-ID normalisation, gene mappings and the column collapse,
vocabularies, presets, gene maps."""

from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from flow._genes import collapse_gene_ids
from flow.errors import InputError, VocabularyError
from flow.vocab import (
    DEFAULT_PRESET,
    PRESETS,
    GeneMap,
    GeneMapping,
    Preset,
    Vocabulary,
    build_gene_map,
    normalize_gene_ids,
    read_gene_mapping,
    read_vocabulary,
    resolve_preset,
    vocabulary_from_genes,
)

SPECIAL = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}


def small_vocab(n: int = 10, *, special: dict[str, int] | None = None) -> Vocabulary:
    """Genes ENSG00000000001..n with tokens 4.. in a shuffled gene order."""
    genes = np.array([f"ENSG{i:011d}" for i in range(1, n + 1)])
    tokens = np.arange(4, 4 + n)
    order = np.random.default_rng(n).permutation(n)
    return Vocabulary(genes[order], tokens[order], dict(SPECIAL if special is None else special))


# ------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ENSG00000139618.15", "ENSG00000139618"),
        ("  ensg00000139618.2\t", "ENSG00000139618"),
        ("ENSMUSG00000064370.1", "ENSMUSG00000064370"),
        ("ENSG00000139618", "ENSG00000139618"),
        ("tp53", "TP53"),
        ("RP11-34P13.3", "RP11-34P13.3"),  # not Ensembl: the dot stays
        ("AC000061.1", "AC000061.1"),
        ("ENSG00000002586.20_PAR_Y", "ENSG00000002586.20_PAR_Y"),  # not a plain version
        ("ENSG00000139618.", "ENSG00000139618."),
        ("ENSG00000139618.1.2", "ENSG00000139618.1.2"),
        ("ENS.3", "ENS.3"),
    ],
)
def test_normalize_gene_ids(raw: str, expected: str) -> None:
    assert normalize_gene_ids([raw]).tolist() == [expected]


@given(st.lists(st.text(max_size=25), max_size=30))
def test_normalize_is_idempotent_and_keeps_length(ids: list[str]) -> None:
    once = normalize_gene_ids(ids)
    assert once.shape == (len(ids),)
    assert normalize_gene_ids(once.tolist()).tolist() == once.tolist()


@given(st.integers(0, 10**11), st.integers(0, 999), st.sampled_from(["G", "T", "MUSG"]))
def test_normalize_strips_any_version(number: int, version: int, kind: str) -> None:
    base = f"ENS{kind}{number:011d}"
    assert normalize_gene_ids([f"{base}.{version}", base.lower()]).tolist() == [base, base]


def test_normalize_rejects_missing_ids() -> None:
    with pytest.raises(InputError, match="Gene identifier 1"):
        normalize_gene_ids(["ENSG1", None])  # type: ignore[list-item]
    assert normalize_gene_ids([]).shape == (0,)


# ------------------------------------------------------------------------------ Vocabulary


def test_vocabulary_basics() -> None:
    v = small_vocab(10)
    assert v.n_genes == 10
    assert v.n_tokens == 14
    assert v.pad_token == 0
    assert v.token_dtype == np.uint8
    got = v.token_of(["ENSG00000000003.7", "ensg00000000010", "ENSG99", "TP53"])
    assert got.tolist() == [6, 13, -1, -1]
    assert got.dtype == np.int64
    idx = v.index_of(["ENSG00000000003"])
    assert v.gene_ids[idx[0]] == "ENSG00000000003"
    assert v.special_token("<cls>") == 2
    assert list(v.as_dict().items())[:5] == [
        ("<pad>", 0),
        ("<mask>", 1),
        ("<cls>", 2),
        ("<eos>", 3),
        ("ENSG00000000001", 4),
    ]
    with pytest.raises(ValueError, match="read-only"):
        v.gene_ids[0] = "X"
    with pytest.raises(AttributeError):
        v.pad_token = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("max_token", "dtype"),
    [(255, np.uint8), (256, np.uint16), (65535, np.uint16), (65536, np.uint32)],
)
def test_token_dtype_is_smallest_unsigned(max_token: int, dtype: type) -> None:
    v = Vocabulary(np.array(["A", "B"]), np.array([1, max_token]), {"<pad>": 0})
    assert v.n_tokens == max_token + 1
    assert v.token_dtype == np.dtype(dtype)


def test_fingerprint_is_content_not_order() -> None:
    a = small_vocab(10)
    order = np.argsort(a.gene_ids)
    b = Vocabulary(a.gene_ids[order], a.token_ids[order], dict(a.special))
    assert a.fingerprint == b.fingerprint
    assert a == b
    assert hash(a) == hash(b)
    tokens = a.token_ids.copy()
    tokens[[0, 1]] = tokens[[1, 0]]
    c = Vocabulary(a.gene_ids, tokens, dict(a.special))
    assert c.fingerprint != a.fingerprint
    d = Vocabulary(a.gene_ids, a.token_ids, {"<pad>": 0, "<mask>": 1})
    assert d != a
    assert len(a.fingerprint) == 64


@pytest.mark.parametrize(
    ("genes", "tokens", "special", "match"),
    [
        (["A", "A"], [4, 5], SPECIAL, "gene ID must occur once"),
        (["A", "B"], [4, 4], SPECIAL, "token ID must occur once"),
        (["A", "B"], [3, 4], SPECIAL, "no gene uses"),
        (["A", "B"], [4, 5], {"<mask>": 1}, "no '<pad>' token"),
        (["A", "B"], [-1, 5], SPECIAL, ">= 0"),
        (["A"], [4, 5], SPECIAL, "equal length"),
    ],
)
def test_vocabulary_validation(
    genes: list[str], tokens: list[int], special: dict, match: str
) -> None:
    with pytest.raises(VocabularyError, match=match):
        Vocabulary(np.array(genes), np.array(tokens), special)


def test_vocabulary_explicit_pad_token() -> None:
    v = Vocabulary(np.array(["A"]), np.array([1]), {}, pad_token=0)
    assert v.pad_token == 0
    with pytest.raises(VocabularyError, match="pad_token"):
        Vocabulary(np.array(["A"]), np.array([1]), {}, pad_token=1)


def test_objects_pickle_for_workers() -> None:
    """Vocabulary, GeneMap and Preset travel to Dask workers by pickle."""
    vocab = small_vocab(10)
    gm = build_gene_map(["ENSG00000000002", "ENSG00000000001", "ENSG00000000002"], vocab)
    mapping = GeneMapping.from_dict({"tp53": "ENSG00000000001.2"})
    for obj in (vocab, gm, PRESETS["V2"], mapping):
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)
    m2 = pickle.loads(pickle.dumps(mapping))
    assert m2 == mapping == {"TP53": "ENSG00000000001"}
    assert m2.fingerprint == mapping.fingerprint
    assert m2.source == mapping.source
    v2 = pickle.loads(pickle.dumps(vocab))
    assert v2 == vocab
    assert v2.token_of(["ENSG00000000002"]).tolist() == [5]
    gm2 = pickle.loads(pickle.dumps(gm))
    x = sp.csr_matrix(np.array([[1, 2, 3]]))
    assert (gm2.apply(x) != gm.apply(x)).nnz == 0


def test_vocabulary_normalises_its_ids() -> None:
    v = Vocabulary(np.array([" ensg1.2", "ENSG2"]), np.array([4, 5]), {"<pad>": 0})
    assert v.gene_ids.tolist() == ["ENSG1", "ENSG2"]
    with pytest.raises(VocabularyError, match="occur once"):
        Vocabulary(np.array(["ENSG1.1", "ENSG1.2"]), np.array([4, 5]), {"<pad>": 0})


def test_vocabulary_from_genes() -> None:
    v = vocabulary_from_genes(["ENSG3", "ensg1.4", "ENSG2", "ENSG1"])
    assert v.as_dict() == {
        "<pad>": 0,
        "<mask>": 1,
        "<cls>": 2,
        "<eos>": 3,
        "ENSG1": 4,
        "ENSG2": 5,
        "ENSG3": 6,
    }
    w = vocabulary_from_genes(["B", "A"], special=("<pad>",))
    assert w.as_dict() == {"<pad>": 0, "A": 1, "B": 2}
    with pytest.raises(VocabularyError, match="no '<pad>' token"):
        vocabulary_from_genes(["A"], special=("<mask>",))
    with pytest.raises(VocabularyError, match="distinct"):
        vocabulary_from_genes(["A"], special=("<pad>", "<pad>"))


# ------------------------------------------------------------------------------ reading files


def _table() -> dict[str, int]:
    return {"<pad>": 0, "<mask>": 1, "ENSG00000000005": 3, "ENSG00000000003": 2}


def test_read_vocabulary_formats_agree(tmp_path: Path) -> None:
    table = _table()
    pkl = tmp_path / "token_dictionary.pkl"
    pkl.write_bytes(
        pickle.dumps({k: (np.int16(v) if k.startswith("ENS") else v) for k, v in table.items()})
    )
    js = tmp_path / "v.json"
    js.write_text(json.dumps(table))
    tsv = tmp_path / "v.tsv"
    tsv.write_text("gene_id\ttoken\n# comment\n" + "".join(f"{k}\t{v}\n" for k, v in table.items()))
    gz = tmp_path / "v.tsv.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("".join(f"{k}\t{v}\n" for k, v in table.items()))
    vocabs = [read_vocabulary(p) for p in (pkl, js, tsv, gz)]
    assert all(v == vocabs[0] for v in vocabs)
    assert vocabs[0].as_dict() == dict(sorted(table.items(), key=lambda kv: kv[1]))
    assert vocabs[0].special == {"<pad>": 0, "<mask>": 1}


def test_read_vocabulary_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps({"<pad>": 0, "ENSG1.1": 1, "ensg1.2": 2}))
    with pytest.raises(VocabularyError, match=r"dup\.json.*occur once"):
        read_vocabulary(dup)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"<pad>": 0, "ENSG1": "x"}))
    with pytest.raises(VocabularyError, match="expected an integer"):
        read_vocabulary(bad)
    with pytest.raises(InputError, match=r"\.pkl.*\.json.*\.tsv"):
        read_vocabulary(tmp_path / "v.csv")
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"<pad>": 0, "x": complex(1, 1)}))
    with pytest.raises(InputError, match="references the global"):
        read_vocabulary(evil)


def test_read_gene_mapping(tmp_path: Path) -> None:
    pkl = tmp_path / "ensembl_mapping_dict.pkl"
    pkl.write_bytes(
        pickle.dumps({"tp53": "ENSG00000141510.3", "ENSG00000141510": "ENSG00000141510"})
    )
    assert read_gene_mapping(pkl) == {
        "TP53": "ENSG00000141510",
        "ENSG00000141510": "ENSG00000141510",
    }
    read = read_gene_mapping(pkl)
    assert isinstance(read, GeneMapping)
    assert str(pkl) in read.source
    tsv = tmp_path / "m.tsv"
    tsv.write_text("BRCA2\tENSG00000139618.15\n\nbrca1\tENSG00000012048\n")
    assert read_gene_mapping(tsv) == {"BRCA2": "ENSG00000139618", "BRCA1": "ENSG00000012048"}
    clash = tmp_path / "clash.tsv"
    clash.write_text("tp53\tENSG1\nTP53\tENSG2\n")
    with pytest.raises(VocabularyError, match="maps to both"):
        read_gene_mapping(clash)
    short = tmp_path / "short.tsv"
    short.write_text("TP53\n")
    with pytest.raises(InputError, match="line 1"):
        read_gene_mapping(short)


def test_gene_mapping_is_normalised_once_and_read_only(tmp_path: Path) -> None:
    js = tmp_path / "m.json"
    js.write_text(json.dumps({"tp53": "ENSG00000141510.3", " brca2 ": "ensg00000139618"}))
    mapping = read_gene_mapping(js)
    assert dict(mapping) == {"TP53": "ENSG00000141510", "BRCA2": "ENSG00000139618"}
    assert GeneMapping.from_dict({"TP53": "ENSG00000141510", "brca2": "ENSG00000139618.9"}) == (
        mapping
    )
    # the content fingerprint the encoding store has always recorded for a mapping
    plain = {"TP53": "ENSG00000141510", "BRCA2": "ENSG00000139618"}
    expected = hashlib.sha256(json.dumps(sorted(plain.items())).encode()).hexdigest()
    assert mapping.fingerprint == expected
    with pytest.raises(TypeError):
        mapping.table["X"] = "Y"  # type: ignore[index]
    with pytest.raises(InputError, match="must be gene ID strings"):
        GeneMapping.from_dict({"TP53": 3})
    assert len(mapping) == 2
    assert "TP53" in mapping
    assert mapping.apply(np.array(["TP53", "MYC"])).tolist() == ["ENSG00000141510", "MYC"]


@given(
    st.lists(
        st.sampled_from(["ENSG1", "ensg1.2", "ENSG2", " ENSG3", "TP53", "ENSG2.7"]), max_size=20
    ),
    st.booleans(),
)
def test_collapse_is_pandas_factorize_of_the_mapped_ids(ids: list[str], mapped: bool) -> None:
    """The one collapse: normalise, map, then distinct genes in first-seen order (as
    pandas.factorize orders them) and each column's index among them."""
    mapping = GeneMapping.from_dict({"TP53": "ENSG3", "ENSG1": "ENSG2"}) if mapped else None
    genes = collapse_gene_ids(ids, mapping)
    reference = [_reference_id(g) for g in ids]
    if mapping is not None:
        reference = [mapping.get(g, g) for g in reference]
    codes, uniques = pd.factorize(pd.Index(reference, dtype=object))
    assert genes.ids.tolist() == list(uniques)
    assert genes.index.tolist() == codes.tolist()
    assert genes.column_ids.tolist() == reference
    assert genes.n_columns == len(ids)
    assert genes.has_duplicates == (len(set(reference)) < len(ids))


def _reference_id(raw: str) -> str:
    g = raw.strip().upper()
    return g.rsplit(".", 1)[0] if g.startswith("ENS") and g.rsplit(".", 1)[-1].isdigit() else g


# ------------------------------------------------------------------------------ presets


def test_presets() -> None:
    assert PRESETS["V1"].input_size == 2048
    assert PRESETS["V1"].max_genes == 2048
    assert PRESETS["V2"].input_size == 4096
    assert PRESETS["V2"].max_genes == 4094
    assert PRESETS["V2"].prepend == ("<cls>",)
    assert PRESETS["V2"].append == ("<eos>",)
    assert resolve_preset("v1") is PRESETS["V1"]
    assert DEFAULT_PRESET == "V1"
    assert resolve_preset() is PRESETS[DEFAULT_PRESET]
    assert resolve_preset(PRESETS["V2"]) is PRESETS["V2"]
    assert resolve_preset("V2", 2048).max_genes == 2046
    assert resolve_preset("V2", 4096) is PRESETS["V2"]
    custom = resolve_preset(None, 1000)
    assert (custom.name, custom.max_genes, custom.prepend) == ("custom", 1000, ())
    with pytest.raises(InputError, match="Unknown preset"):
        resolve_preset("V3")
    with pytest.raises(InputError, match="neither"):
        resolve_preset(None)
    with pytest.raises(InputError, match="room"):
        resolve_preset("V2", 2)
    with pytest.raises(InputError, match="integer"):
        Preset("x", 2.5)  # type: ignore[arg-type]


def test_special_token_lookup_names_the_missing_token() -> None:
    """A V2 preset needs <cls>/<eos>; a V1 vocabulary has neither (the model input itself is
    cut by flow.export.model_input_block, tested against upstream in test_export.py)."""
    v1_like = small_vocab(10, special={"<pad>": 0, "<mask>": 1})
    assert [v1_like.special_token(s) for s in PRESETS["V1"].prepend] == []
    with pytest.raises(VocabularyError, match="<cls>"):
        [v1_like.special_token(s) for s in PRESETS["V2"].prepend]
    assert small_vocab(10).special_token("<eos>") == 3


# ------------------------------------------------------------------------------ gene maps


def _dense_collapse(
    block: np.ndarray, ids: list[str], vocab: Vocabulary, mapping: dict | None
) -> dict:
    """Reference: {token: summed column} by a plain loop."""
    out: dict[int, np.ndarray] = {}
    for j, raw in enumerate(ids):
        g = raw.strip().upper()
        if g.startswith("ENS") and "." in g and g.rsplit(".", 1)[1].isdigit():
            g = g.rsplit(".", 1)[0]
        if mapping is not None:
            g = mapping.get(g, g)
        hits = [int(t) for gg, t in zip(vocab.gene_ids, vocab.token_ids, strict=True) if gg == g]
        if hits:
            out[hits[0]] = out.get(hits[0], 0) + block[:, j]
    return out


def test_gene_map_sums_duplicates() -> None:
    vocab = small_vocab(10)
    ids = [
        "ENSG00000000003.1",  # token 6
        "TP53",  # unmatched
        "ensg00000000003.2",  # token 6 again: exact duplicate after normalisation
        "ENSG00000000001",  # token 4
        "BRCA2",  # mapped to token 13
        "ENSG00000000010",  # token 13
    ]
    mapping = GeneMapping.from_dict({"BRCA2": "ENSG00000000010"})
    gm = build_gene_map(ids, vocab, mapping, min_genes=1)
    assert isinstance(gm, GeneMap)
    assert gm.kept_tokens.tolist() == [4, 6, 13]
    assert gm.kept_tokens.dtype == vocab.token_dtype
    assert gm.kept_gene_ids.tolist() == ["ENSG00000000001", "ENSG00000000003", "ENSG00000000010"]
    assert gm.column.tolist() == [1, -1, 1, 0, 2, 2]
    assert gm.vocab_index[1] == -1
    assert vocab.gene_ids[gm.vocab_index[0]] == "ENSG00000000003"
    assert (gm.n_store_genes, gm.n_matched, gm.n_kept, gm.n_duplicates_summed) == (6, 5, 3, 2)
    assert gm.collapse.shape == (6, 3)
    assert gm.vocab_fingerprint == vocab.fingerprint
    block = np.arange(1, 13).reshape(2, 6)
    collapsed = (sp.csr_matrix(block) @ gm.collapse).toarray()
    assert collapsed.tolist() == [[4, 1 + 3, 5 + 6], [10, 7 + 9, 11 + 12]]
    assert collapsed.dtype == block.dtype
    assert (gm.apply(sp.csr_matrix(block)).toarray() == collapsed).all()
    assert not gm.keeps_order
    ordered = build_gene_map(["ENSG00000000001", "X", "ENSG00000000002"], vocab, min_genes=1)
    assert ordered.keeps_order
    x = sp.csr_matrix(np.array([[1, 2, 3]]))
    assert ordered.apply(x).toarray().tolist() == [[1, 3]]
    # without the mapping BRCA2 is unmatched
    gm2 = build_gene_map(ids, vocab, min_genes=1)
    assert (gm2.n_matched, gm2.n_duplicates_summed) == (4, 1)


@given(
    st.lists(
        st.tuples(st.integers(0, 14), st.sampled_from(["", ".1", ".22"]), st.booleans()),
        min_size=1,
        max_size=25,
    ),
    st.integers(0, 2**31),
)
def test_gene_map_apply_equals_reference(genes: list[tuple[int, str, bool]], seed: int) -> None:
    vocab = small_vocab(10)
    ids = [(f"ensg{g:011d}" if low else f"ENSG{g:011d}") + ver for g, ver, low in genes]
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 4, (5, len(ids))) * (rng.random((5, len(ids))) < 0.6)
    try:
        gm = build_gene_map(ids, vocab, min_fraction=0.0, min_genes=0)
    except VocabularyError:
        assert not any(1 <= g <= 10 for g, _, _ in genes)
        return
    ref = _dense_collapse(block, ids, vocab, None)
    assert gm.kept_tokens.tolist() == sorted(ref)
    expected = np.column_stack([ref[t] for t in sorted(ref)])
    assert np.array_equal((sp.csr_array(block) @ gm.collapse).toarray(), expected)
    applied = gm.apply(sp.csr_matrix(block))
    assert np.array_equal(applied.toarray(), expected)
    assert applied.dtype == block.dtype
    assert applied.shape == (5, gm.n_kept)
    # canonical: sorted indices, no duplicate entries
    ptr, ind = applied.indptr, applied.indices
    for i in range(5):
        assert bool(np.all(np.diff(ind[ptr[i] : ptr[i + 1]]) > 0))
    assert np.array_equal(gm.apply(block).toarray(), expected)  # dense input too
    # sort=False: the same matrix, each row's columns in any order but none twice
    loose = gm.apply(sp.csr_array(block), sort=False)
    assert np.array_equal(loose.toarray(), expected)
    for i in range(5):
        row = loose.indices[loose.indptr[i] : loose.indptr[i + 1]]
        assert np.unique(row).size == row.size
    assert gm.n_matched == sum(1 <= g <= 10 for g, _, _ in genes)
    assert gm.n_duplicates_summed == gm.n_matched - len(ref)


def test_gene_map_threshold_rule() -> None:
    vocab = small_vocab(10)
    genes = [f"ENSG{i:011d}" for i in range(1, 11)]
    # 50% match: passes
    build_gene_map([*genes[:5], "X1", "X2", "X3", "X4", "X5"], vocab)
    # just below 50% and below 1,000 genes: fails
    with pytest.raises(VocabularyError, match=r"Only 4 of 9"):
        build_gene_map([*genes[:4], "X1", "X2", "X3", "X4", "X5"], vocab)
    # the absolute rule: at least min_genes matches pass whatever the fraction
    build_gene_map(genes[:4] + ["X"] * 100, vocab, min_genes=4)
    with pytest.raises(VocabularyError):
        build_gene_map(genes[:4] + ["X"] * 100, vocab, min_genes=5)
    # no match at all always fails
    with pytest.raises(VocabularyError, match="Only 0 of 2"):
        build_gene_map(["X", "Y"], vocab, min_fraction=0.0, min_genes=0)
    with pytest.raises(VocabularyError):
        build_gene_map([], vocab)


def test_gene_map_error_message_explains() -> None:
    vocab = small_vocab(10)
    with pytest.raises(VocabularyError) as info:
        build_gene_map(["TP53", "BRCA2", "MYC", "ENSG00000000001"], vocab)
    msg = str(info.value)
    assert "Only 1 of 4" in msg
    assert "'TP53', 'BRCA2', 'MYC'" in msg
    assert str(vocab.gene_ids[:3].tolist())[1:-1] in msg
    assert "Ensembl" in msg
    assert "ensembl_mapping_dict" in msg
    with pytest.raises(VocabularyError, match="species") as info:
        build_gene_map(["ENSMUSG00000064370", "ENSMUSG00000064371"], vocab)
    assert "ENSMUSG" in str(info.value)


def test_gene_map_apply_checks_width() -> None:
    gm = build_gene_map(["ENSG00000000001"], small_vocab(10))
    with pytest.raises(InputError, match="gene map was built for 1"):
        gm.apply(sp.csr_matrix(np.ones((1, 2))))


# ------------------------------------------------------------------------------ real dictionaries


@pytest.fixture(scope="module")
def geneformer(shared_data: Path) -> Path:
    path = shared_data / "geneformer"
    if not (path / "v1_gc30M").is_dir() or not (path / "v2_gc104M").is_dir():
        pytest.fail(f"{path} lacks v1_gc30M/ or v2_gc104M/ (see shared/data/README.md)")
    return path


@pytest.fixture(scope="module")
def pbmc3k_genes(shared_data: Path) -> tuple[list[str], list[str]]:
    path = shared_data / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19" / "genes.tsv.gz"
    with gzip.open(path, "rt") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    return [r[0] for r in rows], [r[1] for r in rows]


@pytest.mark.data
def test_real_token_dictionaries(geneformer: Path) -> None:
    v1 = read_vocabulary(geneformer / "v1_gc30M" / "token_dictionary_gc30M.pkl")
    v2 = read_vocabulary(geneformer / "v2_gc104M" / "token_dictionary_gc104M.pkl")
    assert v1.n_genes + len(v1.special) == 25_426
    assert v1.special == {"<pad>": 0, "<mask>": 1}
    assert v1.token_ids.min() == 2
    assert v1.n_tokens == 25_426
    assert v2.n_genes + len(v2.special) == 20_275
    assert v2.special == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert v2.n_tokens == 20_275
    assert v1.token_dtype == np.uint16
    assert v2.token_dtype == np.uint16
    assert v1.fingerprint != v2.fingerprint
    assert v1 == read_vocabulary(geneformer / "v1_gc30M" / "token_dictionary_gc30M.pkl")


@pytest.mark.data
def test_real_mapping_dictionary(geneformer: Path) -> None:
    m2 = read_gene_mapping(geneformer / "v2_gc104M" / "ensembl_mapping_dict_gc104M.pkl")
    assert len(m2) == 173_697
    assert m2["ENSG00000283692"] == "ENSG00000283692"
    assert all(v.startswith("ENSG") for v in m2.values())


@pytest.mark.data
def test_real_pbmc3k_gene_map(geneformer: Path, pbmc3k_genes: tuple[list[str], list[str]]) -> None:
    ids, symbols = pbmc3k_genes
    assert len(ids) == 32_738
    for name, expected in [
        ("v1_gc30M/token_dictionary_gc30M.pkl", 20_331),
        ("v2_gc104M/token_dictionary_gc104M.pkl", 18_974),
    ]:
        vocab = read_vocabulary(geneformer / name)
        gm = build_gene_map(ids, vocab)
        assert gm.n_matched == expected
        assert gm.n_kept == expected
        assert gm.n_duplicates_summed == 0
        assert bool(np.all(np.diff(gm.kept_tokens.astype(np.int64)) > 0))
        with pytest.raises(VocabularyError) as info:
            build_gene_map(symbols, vocab)
        msg = str(info.value)
        assert "Only 0 of 32,738" in msg
        assert "MIR1302-10" in msg
        assert "ENSG00000000003" in msg
        assert "ensembl_mapping_dict" in msg
        assert "symbols" in msg


@pytest.mark.data
def test_real_symbols_with_mapping(
    geneformer: Path, pbmc3k_genes: tuple[list[str], list[str]]
) -> None:
    vocab = read_vocabulary(geneformer / "v2_gc104M" / "token_dictionary_gc104M.pkl")
    mapping = read_gene_mapping(geneformer / "v2_gc104M" / "ensembl_mapping_dict_gc104M.pkl")
    _, symbols = pbmc3k_genes
    gm = build_gene_map(symbols, vocab, mapping)
    assert gm.n_matched > 18_000
    assert gm.n_duplicates_summed > 0  # several symbols map to one gene: summed
    assert gm.n_matched - gm.n_kept == gm.n_duplicates_summed
