"""Tests for flow.ingest: every input format into a count store, exactly, out of core.

Reference reads are written plainly here (scipy.io.mmread, h5py) and never use flow.ingest.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import itertools
import os
import pickle
import shutil
import tracemalloc
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from flow import FlowWarning, IncompleteStoreError, InputError, open_counts, write_counts
from flow._bench_e2e import write_h5ad
from flow.datasets import synthetic_counts
from flow.errors import StoreNotFoundError
from flow.ingest import FORMATS, ReadOptions, detect_format, open_source, register_reader
from flow.ingest import _registry as ingest_registry
from flow.ingest._transpose import bucket_transpose, rebatch

from strategies import count_matrices

N_SUBSET = 400  # cells of PBMC 3k used for the derived formats (keeps the tests fast)


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def quiet_anndata_writes():
    """anndata 0.12 + zarr 3.1 announce future defaults when writing Zarr (third party)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Writing zarr v2 data will no longer", UserWarning)
        warnings.filterwarnings("ignore", "zarr v3 autosharding will be", UserWarning)
        warnings.filterwarnings(
            "ignore", "Consolidated metadata is currently not part", UserWarning
        )
        yield


def canonical(x: sp.spmatrix) -> sp.csr_matrix:
    """CSR with sorted indices and no explicit zeros (what the store holds)."""
    x = sp.csr_matrix(x, copy=True)
    x.sum_duplicates()
    x.eliminate_zeros()
    return x


def assert_same_csr(got: sp.spmatrix, want: sp.spmatrix) -> None:
    got, want = canonical(got), canonical(want)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)


def read_store(path: Path) -> ad.AnnData:
    return ad.read_zarr(path)


def convert(path: Path | str, out: Path, **options) -> ad.AnnData:
    block_size = options.pop("block_size", 1000)
    allow = options.pop("allow_non_integer", False)
    write_counts(
        [open_source(path, ReadOptions(**options))],
        out,
        block_size=block_size,
        allow_non_integer=allow,
    )
    return read_store(out)


def decode(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def reference_h5ad(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """PBMC 3k h5ad read plainly with h5py: (X, var ensembl_id, obs barcode)."""
    with h5py.File(path, "r") as f:
        shape = tuple(f["X"].attrs["shape"])
        x = sp.csr_matrix((f["X/data"][:], f["X/indices"][:], f["X/indptr"][:]), shape=shape)
        return x, decode(f["var/ensembl_id"][:]), decode(f["obs/barcode"][:])


def reference_mtx(folder: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    x = scipy.io.mmread(folder / "matrix.mtx.gz").T.tocsr()
    with gzip.open(folder / "genes.tsv.gz", "rt") as fh:
        ids = np.array([line.split("\t")[0] for line in fh], dtype=object)
    with gzip.open(folder / "barcodes.tsv.gz", "rt") as fh:
        barcodes = np.array([line.strip() for line in fh], dtype=object)
    return x, ids, barcodes


def reference_10x_h5(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        n_genes, n_cells = f["matrix/shape"][:]
        x = sp.csr_matrix(
            (f["matrix/data"][:], f["matrix/indices"][:], f["matrix/indptr"][:]),
            shape=(n_cells, n_genes),
        )
        return x, decode(f["matrix/features/id"][:]), decode(f["matrix/barcodes"][:])


def write_mtx_dir(
    folder: Path,
    x: sp.spmatrix,
    ids,
    barcodes,
    *,
    symbols=None,
    types=None,
    order: str = "cell",
    gz: bool = True,
    field: str = "integer",
    rng: np.random.Generator | None = None,
) -> Path:
    """Write a 10x MEX directory by hand; ``order`` is "cell", "gene" or "random"."""
    folder.mkdir(parents=True, exist_ok=True)
    coo = sp.coo_matrix(x)  # cells x genes
    cells, genes, vals = coo.row, coo.col, coo.data
    if order == "cell":
        idx = np.lexsort((genes, cells))
    elif order == "gene":
        idx = np.lexsort((cells, genes))
    else:
        assert rng is not None
        idx = rng.permutation(len(vals))
    lines = [
        f"%%MatrixMarket matrix coordinate {field} general",
        "%",
        f"{x.shape[1]} {x.shape[0]} {len(vals)}",
    ]
    fmt = (lambda v: repr(float(v))) if field == "real" else (lambda v: str(int(v)))
    lines += [f"{genes[i] + 1} {cells[i] + 1} {fmt(vals[i])}" for i in idx]
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"matrix.mtx{suffix}", "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    symbols = ids if symbols is None else symbols
    name = "features.tsv" if types is not None else "genes.tsv"
    rows = [
        "\t".join(map(str, r))
        for r in zip(ids, symbols, *([types] if types is not None else []), strict=True)
    ]
    with opener(folder / f"{name}{suffix}", "wt") as fh:
        fh.write("\n".join(rows) + "\n")
    with opener(folder / f"barcodes.tsv{suffix}", "wt") as fh:
        fh.write("\n".join(barcodes) + "\n")
    return folder


def write_loom(
    path: Path,
    x: sp.spmatrix,
    ids,
    barcodes=None,
    *,
    symbols=None,
    n_counts=None,
    filter_pass=None,
    dtype=np.float32,
) -> Path:
    """A Geneformer-style loom written with h5py: genes in rows, chunked (64, 64)."""
    dense = np.asarray(sp.csr_matrix(x).toarray().T, dtype=dtype)  # genes x cells
    with h5py.File(path, "w") as f:
        f.create_dataset(
            "matrix", data=dense, chunks=(min(64, dense.shape[0]), min(64, dense.shape[1]))
        )
        rows, cols = f.create_group("row_attrs"), f.create_group("col_attrs")
        f.create_group("layers")
        rows["ensembl_id"] = np.array(ids, dtype="S")
        if symbols is not None:
            rows["Gene"] = np.array(symbols, dtype="S")
        if barcodes is not None:
            cols["CellID"] = np.array(barcodes, dtype="S")
        if n_counts is not None:
            cols["n_counts"] = n_counts
        if filter_pass is not None:
            cols["filter_pass"] = filter_pass
    return path


def write_csr_h5ad(path: Path, x: sp.spmatrix, ids, barcodes, **obs) -> Path:
    """A minimal modern h5ad, written with anndata."""
    frame = pd.DataFrame(obs, index=pd.Index(list(barcodes)))
    adata = ad.AnnData(X=x, obs=frame, var=pd.DataFrame(index=pd.Index(list(ids))))
    adata.write_h5ad(path)
    return path


def file_state(path: Path) -> tuple[int, str]:
    return os.stat(path).st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pbmc(pbmc_inputs) -> dict:
    """The first N_SUBSET cells of PBMC 3k, read plainly with h5py."""
    x, ids, barcodes = reference_h5ad(pbmc_inputs["h5ad"])
    with h5py.File(pbmc_inputs["h5ad"], "r") as f:
        codes = f["var/gene_symbol/codes"][:]
        symbols = decode(f["var/gene_symbol/categories"][:])[codes]
    x = x[:N_SUBSET]
    n_counts = np.asarray(x.sum(axis=1)).ravel().astype(np.int64)
    return {
        "x": x,
        "ids": ids,
        "symbols": symbols,
        "barcodes": barcodes[:N_SUBSET],
        "n_counts": n_counts,
    }


@pytest.fixture(scope="module")
def derived(pbmc, tmp_path_factory) -> dict[str, Path]:
    """The PBMC subset written in every other layout flow reads."""
    root = tmp_path_factory.mktemp("derived")
    x, ids, barcodes = pbmc["x"], pbmc["ids"], pbmc["barcodes"]
    filter_pass = (np.arange(N_SUBSET) % 3 != 0).astype(np.int64)
    obs = pd.DataFrame(
        {
            "n_counts": pbmc["n_counts"],
            "filter_pass": filter_pass,
            "cell_type": pd.Categorical(["T", "B"] * (N_SUBSET // 2)),
        },
        index=pd.Index(list(barcodes)),
    )
    var = pd.DataFrame({"gene_symbol": pbmc["symbols"]}, index=pd.Index(list(ids)))
    out: dict[str, Path] = {}
    base = ad.AnnData(X=x, obs=obs, var=var)
    out["csr"] = root / "csr.h5ad"
    base.write_h5ad(out["csr"])
    out["csc"] = root / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(x), obs=obs, var=var).write_h5ad(out["csc"])
    out["dense"] = root / "dense.h5ad"
    ad.AnnData(X=x.toarray(), obs=obs, var=var).write_h5ad(out["dense"])
    out["layer"] = root / "layer.h5ad"
    lognorm = sp.csr_matrix(x, dtype=np.float32)
    lognorm.data = np.log1p(lognorm.data)
    ad.AnnData(X=lognorm, obs=obs, var=var, layers={"counts": x}).write_h5ad(out["layer"])
    out["raw"] = root / "raw.h5ad"
    raw = ad.AnnData(X=x, obs=obs, var=var)
    hvg = ad.AnnData(X=lognorm[:, :1000], obs=obs, var=var.iloc[:1000])
    hvg.raw = raw
    hvg.write_h5ad(out["raw"])
    out["loom"] = write_loom(
        root / "pbmc.loom",
        x,
        ids,
        barcodes,
        symbols=pbmc["symbols"],
        n_counts=pbmc["n_counts"],
        filter_pass=filter_pass,
    )
    with quiet_anndata_writes():
        out["zarr3"] = root / "pbmc3.zarr"
        with ad.settings.override(zarr_write_format=3):
            base.write_zarr(out["zarr3"])
        out["zarr2"] = root / "pbmc2.zarr"
        with ad.settings.override(zarr_write_format=2):
            ad.AnnData(X=sp.csc_matrix(x), obs=obs, var=var).write_zarr(out["zarr2"])
    out["mtx-unsorted"] = write_mtx_dir(
        root / "mtx-unsorted", x, ids, barcodes, symbols=pbmc["symbols"], order="gene", gz=False
    )
    return out


# --------------------------------------------------------------------------- real data, exactly


@pytest.mark.data
def test_pbmc3k_mtx_exact(pbmc_inputs, tmp_path):
    folder = pbmc_inputs["10x-mtx"]
    x, ids, barcodes = reference_mtx(folder)
    src = open_source(folder)
    assert src.info.format == "10x-mtx"
    assert src.info.notes == []  # Cell Ranger writes entries sorted by cell: streamed
    got = convert(folder, tmp_path / "x.zarr")
    assert_same_csr(got.X, x)
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), ids)
    np.testing.assert_array_equal(got.obs_names.to_numpy(dtype=object), barcodes)


@pytest.mark.data
def test_pbmc3k_h5ad_exact(pbmc_inputs, tmp_path):
    x, ids, barcodes = reference_h5ad(pbmc_inputs["h5ad"])
    got = convert(pbmc_inputs["h5ad"], tmp_path / "x.zarr")
    assert_same_csr(got.X, x)
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), ids)
    np.testing.assert_array_equal(got.obs_names.to_numpy(dtype=object), barcodes)
    with h5py.File(pbmc_inputs["h5ad"], "r") as f:
        np.testing.assert_array_equal(got.obs["input_n_counts"].to_numpy(), f["obs/n_counts"][:])
        np.testing.assert_array_equal(got.obs["n_counts"].to_numpy(), f["obs/n_counts"][:])
    assert got.var["gene_symbol"].iloc[:3].tolist() == ["MIR1302-10", "FAM138A", "OR4F5"]


@pytest.mark.data
def test_pbmc1k_10x_h5_exact(pbmc_inputs, tmp_path):
    x, ids, barcodes = reference_10x_h5(pbmc_inputs["10x-h5"])
    got = convert(pbmc_inputs["10x-h5"], tmp_path / "x.zarr", block_size=256)
    assert_same_csr(got.X, x)
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), ids)
    np.testing.assert_array_equal(got.obs_names.to_numpy(dtype=object), barcodes)
    store = open_counts(tmp_path / "x.zarr")
    assert store.attrs["sources"][0]["format"] == "10x-h5"
    assert store.n_blocks == 4


@pytest.mark.data
def test_formats_detected(pbmc_inputs, derived):
    assert detect_format(pbmc_inputs["10x-mtx"]) == "10x-mtx"
    assert detect_format(pbmc_inputs["10x-mtx"] / "matrix.mtx.gz") == "10x-mtx"
    assert detect_format(pbmc_inputs["h5ad"]) == "h5ad"
    assert detect_format(pbmc_inputs["10x-h5"]) == "10x-h5"
    assert detect_format(derived["loom"]) == "loom"
    assert detect_format(derived["zarr3"]) == "anndata-zarr"
    assert detect_format(derived["zarr2"]) == "anndata-zarr"
    assert set(FORMATS) == {"h5ad", "10x-h5", "10x-mtx", "loom", "anndata-zarr", "soma"}
    named_h5 = derived["csr"].parent / "anndata.h5"  # an h5ad named .h5: told by its contents
    shutil.copy(derived["csr"], named_h5)
    assert detect_format(named_h5) == "h5ad"


@pytest.mark.data
@pytest.mark.parametrize(
    ("kind", "options", "note"),
    [
        ("csr", {}, None),
        ("csc", {}, "transposed through temporary files"),
        ("dense", {}, None),
        ("layer", {"layer": "counts"}, None),
        ("loom", {}, None),
        ("zarr3", {}, None),
        ("zarr2", {}, "transposed through temporary files"),  # written CSC
        ("mtx-unsorted", {}, "not sorted by cell"),
    ],
)
def test_derived_formats_same_matrix(pbmc, derived, tmp_path, kind, options, note):
    src = open_source(derived[kind], ReadOptions(**options))
    write_counts([src], tmp_path / "x.zarr", block_size=128)
    got = read_store(tmp_path / "x.zarr")
    assert_same_csr(got.X, pbmc["x"])
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), pbmc["ids"])
    np.testing.assert_array_equal(got.obs_names.to_numpy(dtype=object), pbmc["barcodes"])
    np.testing.assert_array_equal(got.var["gene_symbol"].to_numpy(dtype=object), pbmc["symbols"])
    notes = " ".join(src.info.notes)
    assert (note in notes) if note else notes == ""
    if kind != "mtx-unsorted":  # cell metadata carried from AnnData obs / loom col_attrs
        np.testing.assert_array_equal(
            got.obs["filter_pass"].to_numpy(), np.arange(N_SUBSET) % 3 != 0
        )
        np.testing.assert_array_equal(got.obs["input_n_counts"].to_numpy(), pbmc["n_counts"])


@pytest.mark.data
def test_raw_h5ad(pbmc, derived, tmp_path):
    got = convert(derived["raw"], tmp_path / "x.zarr", use_raw=True)
    assert_same_csr(got.X, pbmc["x"])
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), pbmc["ids"])
    # without use_raw, X is the log-normalized 1,000-gene matrix: non-integer, refused
    with pytest.raises(InputError, match=r"raw\.h5ad.*non-integer"):
        convert(derived["raw"], tmp_path / "y.zarr")


@pytest.mark.data
def test_obs_columns_selection(derived):
    every = open_source(derived["csr"]).info.obs
    assert list(every.columns) == ["n_counts", "filter_pass", "cell_type"]
    assert every["cell_type"].tolist()[:2] == ["T", "B"]
    chosen = open_source(derived["csr"], ReadOptions(obs_columns=["cell_type"])).info.obs
    assert list(chosen.columns) == ["cell_type", "filter_pass", "n_counts"]
    loom = open_source(derived["loom"], ReadOptions(obs_columns=[])).info.obs
    assert sorted(loom.columns) == ["filter_pass", "n_counts"]
    with pytest.raises(InputError, match=r"csr\.h5ad.*no column 'donor'.*'cell_type'"):
        open_source(derived["csr"], ReadOptions(obs_columns=["donor"]))


@pytest.mark.data
def test_loom_input_is_not_modified(derived, tmp_path):
    loom = derived["loom"]
    before = file_state(loom)
    src = open_source(loom)
    write_counts([src], tmp_path / "x.zarr", block_size=100)
    list(src.iter_blocks(50))
    assert file_state(loom) == before


@pytest.mark.data
def test_gene_id_column(derived, tmp_path):
    path = tmp_path / "ids.h5ad"
    shutil.copy(derived["csr"], path)
    with h5py.File(path, "a") as f:  # a var column with other IDs
        ids = decode(f["var/_index"][:])
        f["var"].create_dataset(
            "other_id", data=np.array([f"X{i}" for i in range(len(ids))], dtype=h5py.string_dtype())
        )
        f["var/other_id"].attrs.update(
            {"encoding-type": "string-array", "encoding-version": "0.2.0"}
        )
        f["var"].attrs["column-order"] = np.array(
            [*f["var"].attrs["column-order"], "other_id"], dtype=object
        )
    assert open_source(path).info.gene_ids[0] == ids[0]
    assert open_source(path, ReadOptions(gene_id_column="other_id")).info.gene_ids[0] == "X0"
    with pytest.raises(InputError, match=r"ids\.h5ad.*no column 'nope'.*gene_id_column"):
        open_source(path, ReadOptions(gene_id_column="nope"))


# --------------------------------------------------------------------------- 10x HDF5 variants


def _copy_10x_as_v2(src: Path, dst: Path, genomes: tuple[str, ...] = ("GRCh38",)) -> None:
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for genome in genomes:
            grp = g.create_group(genome)
            for name in ("data", "indices", "indptr", "shape", "barcodes"):
                grp[name] = f[f"matrix/{name}"][:]
            grp["genes"] = f["matrix/features/id"][:]
            grp["gene_names"] = f["matrix/features/name"][:]


@pytest.mark.data
def test_10x_h5_v2_layout(pbmc_inputs, tmp_path):
    x, ids, _ = reference_10x_h5(pbmc_inputs["10x-h5"])
    v2 = tmp_path / "v2.h5"
    _copy_10x_as_v2(pbmc_inputs["10x-h5"], v2)
    got = convert(v2, tmp_path / "x.zarr")
    assert_same_csr(got.X, x)
    np.testing.assert_array_equal(got.var_names.to_numpy(dtype=object), ids)
    two = tmp_path / "two.h5"
    _copy_10x_as_v2(pbmc_inputs["10x-h5"], two, genomes=("GRCh38", "mm10"))
    with pytest.raises(InputError, match=r"two\.h5.*several genomes \(GRCh38, mm10\).*genome="):
        open_source(two)
    assert open_source(two, ReadOptions(genome="mm10")).info.n_cells == x.shape[0]
    with pytest.raises(InputError, match="no genome 'hg19'"):
        open_source(two, ReadOptions(genome="hg19"))


@pytest.mark.data
def test_10x_h5_keeps_gene_expression(pbmc_inputs, tmp_path):
    """A v3 file with antibody features: only Gene Expression columns are kept, with a note."""
    x, ids, barcodes = reference_10x_h5(pbmc_inputs["10x-h5"])
    n_ab = 5
    rng = np.random.default_rng(0)
    ab = sp.random(x.shape[0], n_ab, density=0.9, format="csr", random_state=rng, dtype=np.float64)
    ab.data = np.ceil(ab.data * 100)
    both = sp.hstack([x, ab.astype(x.dtype)], format="csr")  # cells x (genes + antibodies)
    path = tmp_path / "ab.h5"
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = both.data, both.indices, both.indptr
        m["shape"] = np.array([both.shape[1], both.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array(barcodes, dtype="S")
        feat = m.create_group("features")
        feat["id"] = np.array([*ids, *(f"AB{i}" for i in range(n_ab))], dtype="S")
        feat["name"] = np.array([*ids, *(f"CD{i}" for i in range(n_ab))], dtype="S")
        feat["feature_type"] = np.array(
            ["Gene Expression"] * len(ids) + ["Antibody Capture"] * n_ab, dtype="S"
        )
        feat["genome"] = np.array(["GRCh38"] * (len(ids) + n_ab), dtype="S")
    src = open_source(path)
    assert src.info.n_genes == len(ids)
    assert "Antibody Capture x5" in " ".join(src.info.notes)
    got = convert(path, tmp_path / "x.zarr", block_size=300)
    assert_same_csr(got.X, x)
    assert open_source(path, ReadOptions(genome="GRCh38")).info.n_genes == len(ids)
    with pytest.raises(InputError, match=r"ab\.h5: has no genome 'mm10'; its genomes: GRCh38"):
        open_source(path, ReadOptions(genome="mm10"))


# --------------------------------------------------------------------------- several inputs


@pytest.mark.data
def test_several_inputs_concatenated(pbmc, pbmc_inputs, derived, tmp_path):
    x1k, ids1k, bc1k = reference_10x_h5(pbmc_inputs["10x-h5"])
    sources = [open_source(derived["csr"]), open_source(pbmc_inputs["10x-h5"])]
    write_counts(sources, tmp_path / "x.zarr", block_size=300)
    got = read_store(tmp_path / "x.zarr")
    assert got.n_obs == N_SUBSET + x1k.shape[0]
    assert (
        got.obs["source"].tolist()
        == [str(derived["csr"])] * N_SUBSET + [str(pbmc_inputs["10x-h5"])] * x1k.shape[0]
    )
    # genes are united: PBMC 3k's (hg19) first, then PBMC 1k's (GRCh38) that are new
    col = pd.Index(got.var_names).get_indexer(ids1k)
    assert (col >= 0).all()
    assert_same_csr(got.X[:N_SUBSET, : len(pbmc["ids"])], pbmc["x"])
    assert_same_csr(got.X[N_SUBSET:][:, col], x1k)
    assert got.obs_names[N_SUBSET:].tolist() == bc1k.tolist()


@pytest.mark.data
def test_duplicate_barcodes_made_unique(pbmc, derived, tmp_path):
    sources = [open_source(derived["csr"]), open_source(derived["loom"])]
    with pytest.warns(FlowWarning, match="duplicate cell barcodes"):
        write_counts(sources, tmp_path / "x.zarr", block_size=256)
    got = read_store(tmp_path / "x.zarr")
    assert got.obs_names.is_unique
    assert got.obs_names[:N_SUBSET].tolist() == pbmc["barcodes"].tolist()
    assert got.obs["source"].cat.categories.tolist() == [str(derived["csr"]), str(derived["loom"])]
    assert_same_csr(got.X, sp.vstack([pbmc["x"], pbmc["x"]]))


def test_labels_stay_categorical_across_inputs(tmp_path):
    """Categorical cell labels are carried as categoricals (one byte per cell while
    converting, categorical again for AnnData), united over the inputs; an input without the
    column fills in ""; a missing label stays missing; distinct IDs stay plain text."""
    x = sp.csr_matrix(np.arange(1, 9).reshape(4, 2))
    paths = [
        write_csr_h5ad(
            tmp_path / "a.h5ad",
            x,
            ["G1", "G2"],
            ["a1", "a2", "a3", "a4"],
            cell_type=pd.Categorical(["T", "B", None, "T"]),
            cell_id=["id1", "id2", "id3", "id4"],
        ),
        write_csr_h5ad(
            tmp_path / "b.h5ad",
            x,
            ["G1", "G2"],
            ["b1", "b2", "b3", "b4"],
            cell_type=pd.Categorical(["NK", "B", "B", "NK"]),
            cell_id=["id5", "id6", "id7", "id8"],
        ),
        write_csr_h5ad(tmp_path / "c.h5ad", x, ["G1", "G2"], ["c1", "c2", "c3", "c4"]),
    ]
    sources = [open_source(p) for p in paths]
    assert isinstance(sources[0].info.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert sources[0].info.obs["cell_id"].dtype == object  # distinct values: not a category
    store = write_counts(sources, tmp_path / "x.zarr", block_size=3)

    obs = read_store(tmp_path / "x.zarr").obs
    assert obs["cell_type"].cat.categories.tolist() == ["B", "T", "NK", ""]
    expected = ["T", "B", None, "T", "NK", "B", "B", "NK", "", "", "", ""]
    assert obs["cell_type"].isna().tolist() == [v is None for v in expected]
    assert (
        obs["cell_type"].astype(object).where(obs["cell_type"].notna(), None).tolist() == expected
    )
    assert obs["cell_id"].tolist() == [f"id{i}" for i in range(1, 9)] + [""] * 4
    # flow's own column reader gives text, missing as pandas prints it
    got = store.obs_column("cell_type").tolist()
    assert got == ["nan" if v is None else v for v in expected]


@settings(max_examples=25, deadline=None)
@given(
    labels=st.lists(st.sampled_from(["T", "B", "NK", "", None, "ü"]), min_size=1, max_size=40),
    step=st.integers(1, 7),
    backend=st.sampled_from(["hdf5", "zarr"]),
)
def test_text_cell_columns_read_in_slices_match_a_whole_read(
    tmp_path_factory, labels, step, backend
):
    """Barcodes and plain-text obs columns are read a slice at a time (compact barcodes,
    labels as categoricals); the result equals reading the element whole."""
    from flow.ingest import _columns as reader

    n = len(labels)
    if backend == "hdf5":  # HDF5 text has no missing value
        labels = ["" if v is None else v for v in labels]
    obs = pd.DataFrame(
        {
            "label": np.array(labels, dtype=object),  # plain text: not a categorical
            "cell_id": np.array([f"id{i}" for i in range(n)], dtype=object),
        },
        index=pd.Index([f"cell-{i}-ü" for i in range(n)]),
    )
    path = tmp_path_factory.mktemp("obs") / ("obs.h5" if backend == "hdf5" else "obs.zarr")
    with contextlib.ExitStack() as stack:
        if backend == "hdf5":
            root: Any = stack.enter_context(h5py.File(path, "w"))
        else:
            root = zarr.open_group(path, mode="w")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zarr: the string dtype has no v3 spec yet
            ad.io.write_elem(root, "obs", obs)
        elems = root["obs"]
        assert elems["label"].attrs["encoding-type"] == "string-array"
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(reader, "_ID_SLICE", step)
            barcodes = reader.read_ids(elems["_index"])
            got = {name: reader.read_cell_column(elems[name]) for name in ("label", "cell_id")}
        want = {name: reader.carried_column(ad.io.read_elem(elems[name])) for name in got}
    assert barcodes.dtype == np.dtypes.StringDType()
    assert barcodes.tolist() == obs.index.tolist()
    for name in got:
        assert type(got[name]) is type(want[name])
        if isinstance(want[name], pd.Categorical):
            assert got[name].categories.tolist() == want[name].categories.tolist()
            np.testing.assert_array_equal(got[name].codes, want[name].codes)
        else:
            assert got[name].tolist() == want[name].tolist()
    assert isinstance(got["cell_id"], np.ndarray)  # distinct values stay text


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_anndata_zarr_text_columns_are_carried(tmp_path, zarr_format):
    """AnnData Zarr stores text as plain string arrays that anndata reads back as numpy
    StringDType: such a column (distinct IDs) is carried, not dropped."""
    n = 6
    obs = pd.DataFrame(
        {"cell_id": [f"id{i}" for i in range(n)], "label": ["T", "B"] * (n // 2)},
        index=pd.Index([f"c{i}" for i in range(n)]),
    )
    adata = ad.AnnData(X=sp.csr_matrix(np.ones((n, 2), np.int32)), obs=obs)
    adata.var_names = ["G1", "G2"]
    path = tmp_path / "x.zarr"
    with quiet_anndata_writes(), ad.settings.override(zarr_write_format=zarr_format):
        adata.write_zarr(path)
    assert (
        zarr.open_group(path, mode="r")["obs"]["cell_id"].attrs["encoding-type"] == "string-array"
    )
    src = open_source(path)
    assert src.info.notes == []
    assert src.info.barcodes.tolist() == obs.index.tolist()
    assert src.info.obs["cell_id"].tolist() == obs["cell_id"].tolist()
    assert src.info.obs["label"].tolist() == obs["label"].tolist()
    store = write_counts([src], tmp_path / "counts.zarr")
    assert store.obs_column("cell_id").tolist() == obs["cell_id"].tolist()


# --------------------------------------------------------------------------- property tests


def _write_input(folder: Path, x: np.ndarray, kind: str, rng: np.random.Generator) -> Path:
    n_cells, n_genes = x.shape
    ids = [f"ENSG{j:011d}" for j in range(n_genes)]
    barcodes = [f"CELL{i}-1" for i in range(n_cells)]
    if kind.startswith("mtx"):
        return write_mtx_dir(
            folder / "mtx",
            sp.csr_matrix(x),
            ids,
            barcodes,
            types=["Gene Expression"] * n_genes,
            order="cell" if kind == "mtx-sorted" else "random",
            gz=bool(rng.integers(2)),
            rng=rng,
        )
    if kind == "loom":
        return write_loom(folder / "x.loom", x, ids, barcodes, dtype=np.int32)
    matrix = {"h5ad-csr": sp.csr_matrix, "h5ad-csc": sp.csc_matrix, "h5ad-dense": np.asarray}[kind](
        x
    )
    return write_csr_h5ad(folder / "x.h5ad", matrix, ids, barcodes, batch=np.arange(n_cells) % 3)


@pytest.mark.parametrize(
    "kind", ["h5ad-csr", "h5ad-csc", "h5ad-dense", "mtx-sorted", "mtx-unsorted", "loom"]
)
@settings(deadline=None)
@given(
    data=count_matrices(),
    block_size=st.integers(1, 45),
    read_size=st.one_of(st.none(), st.integers(1, 60)),
)
def test_any_block_and_read_size_same_store(tmp_path_factory, kind, data, block_size, read_size):
    x, seed = data
    folder = tmp_path_factory.mktemp("prop")
    path = _write_input(folder, x, kind, np.random.default_rng(seed))
    src = open_source(path, ReadOptions(read_size=read_size))
    store = write_counts([src], folder / "s.zarr", block_size=block_size)
    want = sp.csr_matrix(x)
    group = zarr.open_group(folder / "s.zarr", mode="r")
    dtype = np.uint32 if x.max(initial=0) > np.iinfo(np.uint16).max else np.uint16
    assert group["X/data"][:].tobytes() == want.data.astype(dtype).tobytes()
    assert group["X/indices"][:].tobytes() == want.indices.astype(np.int32).tobytes()
    assert group["X/indptr"][:].tobytes() == want.indptr.astype(np.int64).tobytes()
    assert store.obs.index.tolist() == [f"CELL{i}-1" for i in range(x.shape[0])]
    np.testing.assert_array_equal(store.obs["n_counts"].to_numpy(), x.sum(axis=1))
    if kind.startswith("h5ad"):
        np.testing.assert_array_equal(store.obs["batch"].to_numpy(), np.arange(x.shape[0]) % 3)
    blocks = list(src.iter_blocks(block_size))  # a second pass gives the same blocks
    assert [b.shape[0] for b in blocks] == [
        min(block_size, x.shape[0] - s) for s in range(0, x.shape[0], block_size)
    ]
    assert_same_csr(sp.vstack(blocks), want)
    shutil.rmtree(folder)


@settings(deadline=None)
@given(
    rows=st.lists(st.integers(1, 9), min_size=0, max_size=12),
    n_cells=st.integers(1, 20),
)
def test_rebatch_any_pieces(rows, n_cells):
    total = sum(rows)
    x = sp.csr_matrix(np.arange(total * 3).reshape(total, 3))
    starts = np.cumsum([0, *rows])
    pieces = [x[a:b] for a, b in itertools.pairwise(starts)]
    blocks = list(rebatch(pieces, n_cells))
    assert all(b.shape[0] == n_cells for b in blocks[:-1])
    if total:
        assert_same_csr(sp.vstack(blocks), x)
    else:
        assert blocks == []


def test_bucket_transpose_keeps_values_and_order(tmp_path):
    rows = np.array([3, 0, 3, 1, 0])
    cols = np.array([1, 2, 1, 0, 0])
    vals = np.array([-1.5, np.nan, 2.0, 0.0, 7.0])  # not validated, not summed, not dropped
    blocks = list(
        bucket_transpose(
            [(rows[:2], cols[:2], vals[:2]), (rows[2:], cols[2:], vals[2:])],
            n_rows=5,
            n_cols=3,
            block_rows=2,
            value_dtype=np.dtype(np.float64),
            path="x",
            temp_dir=tmp_path,
        )
    )
    assert [b.shape for b in blocks] == [(2, 3), (2, 3), (1, 3)]
    np.testing.assert_array_equal(blocks[0].indptr, [0, 2, 3])
    np.testing.assert_array_equal(blocks[0].data, [np.nan, 7.0, 0.0])
    np.testing.assert_array_equal(blocks[1].data, [-1.5, 2.0])  # duplicates kept, in input order
    assert blocks[2].nnz == 0
    assert list(tmp_path.iterdir()) == []  # temporary files removed


# --------------------------------------------------------------------------- bad input


def _assert_unfinished(path: Path) -> None:
    """After a failed write, nothing is there or it is refused as incomplete."""
    if path.exists():
        with pytest.raises(IncompleteStoreError):
            open_counts(path)
    else:
        with pytest.raises(StoreNotFoundError):
            open_counts(path)


def _h5ad_with_values(path: Path, values: np.ndarray) -> Path:
    x = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]]))
    x.data[: len(values)] = values
    return write_csr_h5ad(path, x, ["ENSG1", "ENSG2", "ENSG3"], ["a", "b", "c"])


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([-1.0], "negative"),
        ([np.nan], "NaN or infinite"),
        ([1.0, 0.5], "non-integer"),
        ([np.inf], "NaN or infinite"),
    ],
)
def test_bad_counts_refused(tmp_path, values, kind):
    path = _h5ad_with_values(tmp_path / "bad.h5ad", np.array(values))
    out = tmp_path / "x.zarr"
    with pytest.raises(InputError, match=rf"bad\.h5ad: {kind}"):
        write_counts([open_source(path)], out, block_size=1)
    _assert_unfinished(out)


def test_bad_counts_from_mtx_and_loom(tmp_path):
    x = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, -2.0]]))
    folder = write_mtx_dir(tmp_path / "neg", x, ["G1", "G2"], ["a", "b"], field="real")
    with pytest.raises(InputError, match=r"neg.*negative count -2\.0 at cell 1"):
        write_counts([open_source(folder)], tmp_path / "x.zarr")
    x = sp.csr_matrix(np.array([[1.0, np.nan], [0.0, 2.0]]))
    loom = write_loom(tmp_path / "nan.loom", x, ["G1", "G2"], ["a", "b"])
    with pytest.raises(InputError, match=r"nan\.loom: NaN"):
        write_counts([open_source(loom)], tmp_path / "y.zarr")


def test_non_integer_admitted_on_request(tmp_path):
    path = _h5ad_with_values(tmp_path / "float.h5ad", np.array([1.0, 0.5]))
    store = write_counts([open_source(path)], tmp_path / "x.zarr", allow_non_integer=True)
    assert store.counts.dtype == np.float32
    got = read_store(tmp_path / "x.zarr")
    assert got.X.dtype == np.float32
    np.testing.assert_array_equal(got.X.toarray()[0], [1.0, 0.0, 0.5])


def test_unknown_format(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("a,b\n")
    with pytest.raises(InputError, match=r"counts\.csv.*Supported formats.*10x-mtx"):
        open_source(path)
    with pytest.raises(InputError, match=r"format='csv' is not a format flow reads.*h5ad, 10x-h5"):
        open_source(path, ReadOptions(format="csv"))
    with pytest.raises(InputError, match="no such file"):
        open_source(tmp_path / "missing.h5ad")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=r"neither matrix\.mtx"):
        open_source(tmp_path / "folder")


def test_options_that_do_not_apply(tmp_path):
    path = _h5ad_with_values(tmp_path / "x.h5ad", np.array([1.0]))
    with pytest.raises(InputError, match=r"genome= applies to 10x-h5.*h5ad"):
        open_source(path, ReadOptions(genome="GRCh38"))
    folder = write_mtx_dir(tmp_path / "m", sp.csr_matrix(np.eye(2)), ["G1", "G2"], ["a", "b"])
    with pytest.raises(InputError, match="layer= applies to"):
        open_source(folder, ReadOptions(layer="spliced"))


def test_layer_and_raw_errors(tmp_path):
    path = _h5ad_with_values(tmp_path / "x.h5ad", np.array([1.0]))
    with pytest.raises(InputError, match=r"x\.h5ad: has no layer 'counts'.*none"):
        open_source(path, ReadOptions(layer="counts"))
    with pytest.raises(InputError, match=r"x\.h5ad: has no raw\.X"):
        open_source(path, ReadOptions(use_raw=True))
    with pytest.raises(InputError, match="not both"):
        open_source(path, ReadOptions(use_raw=True, layer="counts"))


def test_corrupt_and_truncated_hdf5(tmp_path):
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"not an hdf5 file at all" * 100)
    with pytest.raises(InputError, match=r"garbage\.h5ad: cannot be opened as HDF5"):
        open_source(garbage)
    x = sp.random(3000, 200, density=0.2, format="csr", random_state=1)
    x.data = np.ceil(x.data * 50)
    whole = write_csr_h5ad(
        tmp_path / "whole.h5ad", x, [f"G{i}" for i in range(200)], [f"c{i}" for i in range(3000)]
    )
    for fraction in (0.2, 0.6, 0.95):
        cut = tmp_path / f"cut{int(fraction * 100)}.h5ad"
        data = whole.read_bytes()
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(InputError, match=rf"cut{int(fraction * 100)}\.h5ad"):
            write_counts([open_source(cut)], tmp_path / "x.zarr", block_size=500)


def test_truncated_mtx(tmp_path):
    x = sp.random(300, 50, density=0.3, format="csr", random_state=2)
    x.data = np.ceil(x.data * 9)
    ids, barcodes = [f"G{i}" for i in range(50)], [f"c{i}" for i in range(300)]
    plain = write_mtx_dir(tmp_path / "plain", x, ids, barcodes, gz=False)
    lines = (plain / "matrix.mtx").read_text().splitlines()
    (plain / "matrix.mtx").write_text(
        "\n".join(lines[: len(lines) // 2]) + "\n"
    )  # whole lines lost
    with pytest.raises(
        InputError, match=r"matrix\.mtx: has \d+ entries but its header says \d+.*truncated"
    ):
        write_counts([open_source(plain)], tmp_path / "x.zarr")
    _assert_unfinished(tmp_path / "x.zarr")
    gz = write_mtx_dir(tmp_path / "gz", x, ids, barcodes, gz=True)
    data = (gz / "matrix.mtx.gz").read_bytes()
    (gz / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz.*truncated"):
        write_counts([open_source(gz)], tmp_path / "y.zarr")
    unsorted = write_mtx_dir(tmp_path / "unsorted", x, ids, barcodes, gz=False, order="gene")
    lines = (unsorted / "matrix.mtx").read_text().splitlines()
    (unsorted / "matrix.mtx").write_text("\n".join(lines[:-10]) + "\n")
    with pytest.raises(InputError, match="header says"):
        write_counts([open_source(unsorted)], tmp_path / "z.zarr")


def test_malformed_mtx(tmp_path):
    x = sp.csr_matrix(np.array([[1, 0], [0, 2]]))
    folder = write_mtx_dir(tmp_path / "m", x, ["G1", "G2"], ["a", "b"], gz=False)
    text = (folder / "matrix.mtx").read_text()
    assert text.endswith("\n2 2 2\n")  # the last entry; the size line is "2 2 2" too

    def last_entry(line: str) -> str:
        return text[: -len("2 2 2\n")] + line

    (folder / "matrix.mtx").write_text(last_entry("2 2 2.5\n"))
    with pytest.raises(InputError, match=r"matrix\.mtx: malformed entries"):
        write_counts([open_source(folder)], tmp_path / "x.zarr")
    (folder / "matrix.mtx").write_text(last_entry("3 2 2\n"))
    with pytest.raises(InputError, match="has gene index 3, but the header says 2 genes"):
        write_counts([open_source(folder)], tmp_path / "x.zarr")
    (folder / "matrix.mtx").write_text(last_entry("2  2\t2\n"))  # odd whitespace: still parsed
    write_counts([open_source(folder)], tmp_path / "x.zarr")
    assert_same_csr(read_store(tmp_path / "x.zarr").X, x)
    (folder / "matrix.mtx").write_text(
        text.replace("coordinate integer general", "coordinate integer symmetric")
    )
    with pytest.raises(InputError, match="symmetric"):
        open_source(folder)


def test_corrupt_zarr_chunk(tmp_path):
    x = sp.random(2000, 300, density=0.3, format="csr", random_state=0)
    x.data = np.ceil(x.data * 10)
    obs, var = (
        pd.DataFrame(index=[f"c{i}" for i in range(2000)]),
        pd.DataFrame(index=[f"G{i}" for i in range(300)]),
    )
    path = tmp_path / "bad.zarr"
    with quiet_anndata_writes(), ad.settings.override(zarr_write_format=3):
        ad.AnnData(X=x, obs=obs, var=var).write_zarr(path)
    chunk = sorted(
        p for p in (path / "X" / "data").rglob("*") if p.is_file() and p.name != "zarr.json"
    )[0]
    with open(chunk, "r+b") as fh:
        fh.seek(10)
        fh.write(b"garbage!" * 4)
    with pytest.raises(InputError, match=r"bad\.zarr: reading the counts failed.*corrupt"):
        write_counts([open_source(path)], tmp_path / "x.zarr")
    _assert_unfinished(tmp_path / "x.zarr")


def test_mtx_file_path_prefix_and_feature_types(tmp_path):
    """GEO-style prefixed files, the matrix file given directly, antibody features dropped."""
    x = sp.csr_matrix(np.array([[1, 0, 5], [0, 2, 0], [3, 0, 7]]))
    folder = write_mtx_dir(
        tmp_path / "geo",
        x,
        ["G1", "G2", "AB1"],
        ["a", "b", "c"],
        symbols=["A", "B", "CD3"],
        types=["Gene Expression", "Gene Expression", "Antibody Capture"],
    )
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):
        (folder / name).rename(folder / f"GSM1_{name}")
    src = open_source(folder / "GSM1_matrix.mtx.gz")
    assert src.info.format == "10x-mtx"
    assert src.info.gene_ids.tolist() == ["G1", "G2"]
    assert src.info.gene_symbols.tolist() == ["A", "B"]
    assert "Antibody Capture x1" in src.info.notes[0]
    write_counts([src], tmp_path / "x.zarr")
    assert_same_csr(read_store(tmp_path / "x.zarr").X, x[:, :2])


def test_missing_gene_ids(tmp_path):
    x = sp.csr_matrix(np.eye(3, dtype=np.int64))
    folder = write_mtx_dir(tmp_path / "m", x, ["G1", "G2", "G3"], ["a", "b", "c"])
    (folder / "genes.tsv.gz").unlink()
    with pytest.raises(InputError, match=r"no features\.tsv/genes\.tsv beside it"):
        open_source(folder)
    loom = write_loom(tmp_path / "noid.loom", x, ["G1", "G2", "G3"], ["a", "b", "c"])
    with h5py.File(loom, "a") as f:
        del f["row_attrs/ensembl_id"]
    with pytest.raises(
        InputError, match=r"noid\.loom: has no row attribute ensembl_id or Accession"
    ):
        open_source(loom)
    h5ad = write_csr_h5ad(tmp_path / "blank.h5ad", x, ["G1", "", "G3"], ["a", "b", "c"])
    with pytest.raises(
        InputError, match=r"blank\.h5ad: 1 of 3 gene IDs.*missing \(first at position 1\)"
    ):
        open_source(h5ad)
    noindex = write_csr_h5ad(tmp_path / "noindex.h5ad", x, ["G1", "G2", "G3"], ["a", "b", "c"])
    with h5py.File(noindex, "a") as f:
        del f["var/_index"]
    with pytest.raises(InputError, match=r"noindex\.h5ad: reading the metadata failed"):
        open_source(noindex)
    h5 = tmp_path / "noid.h5"
    with h5py.File(h5, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = x.data, x.indices, x.indptr
        m["shape"], m["barcodes"] = [3, 3], np.array(["a", "b", "c"], dtype="S")
        m.create_group("features")["name"] = np.array(["A", "B", "C"], dtype="S")
    with pytest.raises(InputError, match=r"noid\.h5: has no gene IDs \(matrix/features/id\)"):
        open_source(h5)


def test_barcodes_not_matching(tmp_path):
    x = sp.csr_matrix(np.eye(3, dtype=np.int64))
    folder = write_mtx_dir(tmp_path / "m", x, ["G1", "G2", "G3"], ["a", "b", "c"], gz=False)
    (folder / "barcodes.tsv").write_text("a\nb\n")
    with pytest.raises(InputError, match=r"barcodes\.tsv: 2 barcodes for a matrix with 3"):
        open_source(folder)
    loom = write_loom(tmp_path / "bc.loom", x, ["G1", "G2", "G3"], ["a", "b", "c"])
    with h5py.File(loom, "a") as f:
        del f["col_attrs/CellID"]
        f["col_attrs/CellID"] = np.array([b"a", b"b"])
    with pytest.raises(InputError, match=r"bc\.loom: 2 barcodes in column attribute 'CellID'"):
        open_source(loom)


def test_empty_matrix(tmp_path):
    empty = write_csr_h5ad(
        tmp_path / "empty.h5ad", sp.csr_matrix((0, 3), dtype=np.int64), ["G1", "G2", "G3"], []
    )
    with pytest.raises(InputError, match=r"empty\.h5ad: the matrix X is empty \(0 cells"):
        open_source(empty)
    folder = write_mtx_dir(
        tmp_path / "m", sp.csr_matrix((0, 2), dtype=np.int64), ["G1", "G2"], [], gz=False
    )
    (folder / "barcodes.tsv").write_text("")
    with pytest.raises(InputError, match="the matrix is empty"):
        open_source(folder)


def test_loom_without_barcodes_and_layers(tmp_path):
    x = sp.csr_matrix(np.array([[1, 0], [0, 2], [3, 3]]))
    loom = write_loom(tmp_path / "nobc.loom", x, ["G1", "G2"])
    with h5py.File(loom, "a") as f:
        f["layers/spliced"] = np.asarray(x.toarray().T * 2, dtype=np.float32)
    src = open_source(loom)
    assert src.info.barcodes.tolist() == ["cell-0", "cell-1", "cell-2"]
    assert "cell-0..cell-2" in src.info.notes[0]
    got = convert(loom, tmp_path / "x.zarr", layer="spliced")
    assert_same_csr(got.X, x * 2)
    with pytest.raises(InputError, match=r"no layer 'unspliced'.*'spliced'"):
        open_source(loom, ReadOptions(layer="unspliced"))


# --------------------------------------------------------------------------- memory


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_does_not_grow_with_cells(tmp_path):
    """Reading and converting 3x more cells must not need more memory (block_size 2048).

    About 5-10 s on 2 cores (20M and 60M nonzeros), so not marked slow.

    Both sizes have more nonzeros than one shard of the store (16M values), which the writer
    buffers before writing, so its share of the peak is the same constant in both.
    """
    peaks, block_bytes = {}, 0
    for n_cells in (20_000, 60_000):
        path = tmp_path / f"big{n_cells}.h5ad"
        write_h5ad(os.fspath(path), n_cells, 4000, seed=3, mean_genes=1000, block=2048)
        src = open_source(path)
        with h5py.File(path, "r") as f:
            block_bytes = int(f["X/indptr"][2048]) * (4 + 4)  # data + indices of one block
            assert int(f["X/indptr"][-1]) > 16_777_216

        def read_all(src=src):
            for _ in src.iter_blocks(2048):
                pass

        peaks[("read", n_cells)] = _peak(read_all)
        out = tmp_path / f"big{n_cells}.zarr"
        peaks[("convert", n_cells)] = _peak(
            lambda src=src, out=out: write_counts([src], out, block_size=2048)
        )
        shutil.rmtree(out)
    print({k: f"{v / 1e6:.1f} MB" for k, v in peaks.items()}, f"block {block_bytes / 1e6:.1f} MB")
    for stage in ("read", "convert"):
        assert peaks[(stage, 60_000)] < 1.5 * peaks[(stage, 20_000)], peaks
    assert peaks[("read", 60_000)] < 2 * block_bytes + 4e6  # the block held by the loop + the next


# --------------------------------------------------------------------------- options, registry


def test_read_options_are_checked_once():
    opts = ReadOptions(obs_columns="cell_type", temp_dir=Path("/tmp"), read_size=np.int64(5))
    assert opts.obs_columns == ("cell_type",)  # one name on its own: a 1-tuple, as before
    assert ReadOptions(obs_columns=["a", "b"]).obs_columns == ("a", "b")
    assert (opts.temp_dir, opts.read_size) == ("/tmp", 5)
    assert type(opts.read_size) is int
    assert ReadOptions().given() == ()
    assert ReadOptions(obs_columns=[], use_raw=True, read_size=3).given() == (
        "use_raw",
        "obs_columns",
    )
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert hash(opts) == hash(ReadOptions(obs_columns=("cell_type",), temp_dir="/tmp", read_size=5))
    with pytest.raises(ValueError, match="read_size must be a positive number; got 0"):
        ReadOptions(read_size=0)
    with pytest.raises(TypeError, match="read_size"):
        ReadOptions(read_size=2.5)
    with pytest.raises(TypeError, match="read_size"):
        ReadOptions(read_size=True)
    with pytest.raises(TypeError, match="use_raw must be True or False"):
        ReadOptions(use_raw="yes")
    with pytest.raises(TypeError, match="obs_columns must be column names"):
        ReadOptions(obs_columns=["a", 1])
    with pytest.raises(TypeError, match="layer must be a string"):
        ReadOptions(layer=1)
    with pytest.raises(TypeError, match="temp_dir"):
        ReadOptions(temp_dir=3)
    with pytest.raises(TypeError):
        ReadOptions("h5ad")  # keyword-only


def test_registered_reader_is_used_and_its_options_checked(tmp_path, monkeypatch):
    """A reader registered for a new format is found by format=; options it does not
    declare are refused, naming the formats they apply to."""
    monkeypatch.setattr(ingest_registry, "READERS", dict(ingest_registry.READERS))
    monkeypatch.setattr(ingest_registry, "_ACCEPTS", dict(ingest_registry._ACCEPTS))
    monkeypatch.setattr(ingest_registry, "_DESCRIPTIONS", dict(ingest_registry._DESCRIPTIONS))
    seen = []

    def read_ones(location, options):
        seen.append((location.path, options))
        return synthetic_counts(3, 2, seed=1)

    register_reader("ones", read_ones, accepts=["genome"], description="ones (.ones)")
    path = tmp_path / "x.ones"
    path.write_text("")
    src = open_source(path, ReadOptions(format="ones", genome="g1"))
    assert src.info.n_cells == 3
    assert seen == [(str(path), ReadOptions(format="ones", genome="g1"))]
    with pytest.raises(InputError, match=r"x\.ones: layer= applies to h5ad, loom, anndata-zarr"):
        open_source(path, ReadOptions(format="ones", layer="counts"))
    with pytest.raises(InputError, match=r"genome= applies to 10x-h5, ones inputs"):
        open_source(
            _h5ad_with_values(tmp_path / "y.h5ad", np.array([1.0])), ReadOptions(genome="g")
        )
    with pytest.raises(InputError, match=r"Supported formats: .*ones \(\.ones\).* ones\."):
        open_source(path)  # not detected: format= names it
    with pytest.raises(ValueError, match="accepts names no format option: bogus"):
        register_reader("twos", read_ones, accepts=["bogus"])
    assert FORMATS == ("h5ad", "10x-h5", "10x-mtx", "loom", "anndata-zarr", "soma")


# --------------------------------------------------------------------------- one open


def _write_10x_h5(path: Path, x: sp.spmatrix, ids, barcodes) -> Path:
    """A minimal Cell Ranger 3 HDF5 matrix (genes x cells CSC = cells x genes CSR)."""
    x = sp.csr_matrix(x)
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"], m["indices"], m["indptr"] = x.data, x.indices, x.indptr
        m["shape"] = np.array([x.shape[1], x.shape[0]], dtype=np.int32)
        m["barcodes"] = np.array(barcodes, dtype="S")
        feat = m.create_group("features")
        feat["id"] = np.array(ids, dtype="S")
        feat["name"] = np.array(ids, dtype="S")
        feat["feature_type"] = np.array(["Gene Expression"] * len(ids), dtype="S")
    return path


@pytest.fixture
def count_h5_opens(monkeypatch) -> list[str]:
    """Every ``h5py.File`` opened from now on (h5py.File replaced by a counting subclass)."""
    opened: list[str] = []

    class CountingFile(h5py.File):
        def __init__(self, name, *args, **kwargs):
            opened.append(str(getattr(name, "path", name)))
            super().__init__(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", CountingFile)
    return opened


@pytest.mark.parametrize("kind", ["h5ad", "h5ad named .h5", "10x-h5", "loom"])
def test_hdf5_inputs_are_opened_once_until_the_first_block(tmp_path, kind, count_h5_opens):
    """open_source reads all the metadata of an HDF5 input in one open (an ``.h5`` whose
    contents tell its format included); the first pass over the counts opens it once more."""
    rng = np.random.default_rng(3)
    x = sp.random(30, 7, density=0.4, format="csr", random_state=rng)
    x.data = np.ceil(x.data * 20)
    ids, barcodes = [f"ENSG{j}" for j in range(7)], [f"c{i}" for i in range(30)]
    if kind.startswith("h5ad"):
        name = "x.h5ad" if kind == "h5ad" else "x.h5"
        path = write_csr_h5ad(tmp_path / name, x, ids, barcodes)
    elif kind == "10x-h5":
        path = _write_10x_h5(tmp_path / "x.h5", x, ids, barcodes)
    else:
        path = write_loom(tmp_path / "x.loom", x, ids, barcodes)
    count_h5_opens.clear()
    src = open_source(path)
    assert count_h5_opens == [str(path)]
    blocks = src.iter_blocks(8)
    first = next(blocks)
    assert count_h5_opens == [str(path)] * 2
    assert_same_csr(first, x[:8])
    assert_same_csr(sp.vstack([first, *blocks]), x)
    assert len(count_h5_opens) == 2  # one pass, one open
    assert src.info.format == ("h5ad" if kind.startswith("h5ad") else kind)


# --------------------------------------------------------------------------- row ranges


RANGE_KINDS = ["h5ad-csr", "h5ad-dense", "zarr", "loom", "10x-h5", "synthetic"]


def _ranged_source(folder: Path, x: np.ndarray, kind: str, read_size: int | None):
    n_cells, n_genes = x.shape
    ids, barcodes = [f"ENSG{j:011d}" for j in range(n_genes)], [f"c{i}" for i in range(n_cells)]
    options = ReadOptions(read_size=read_size)
    if kind == "zarr":
        adata = ad.AnnData(
            X=sp.csr_matrix(x),
            obs=pd.DataFrame(index=pd.Index(barcodes)),
            var=pd.DataFrame(index=pd.Index(ids)),
        )
        with quiet_anndata_writes():
            adata.write_zarr(folder / "x.zarr")
        return open_source(folder / "x.zarr", options)
    if kind == "10x-h5":
        return open_source(_write_10x_h5(folder / "x.h5", x, ids, barcodes), options)
    return open_source(_write_input(folder, x, kind, np.random.default_rng(0)), options)


@pytest.mark.parametrize("kind", RANGE_KINDS)
@settings(deadline=None, max_examples=30)
@given(
    data=count_matrices(),
    cuts=st.lists(st.integers(0, 40)),
    read_size=st.sampled_from([None, 1, 7]),
)
def test_read_rows_over_any_split_equals_the_blocks(tmp_path_factory, kind, data, cuts, read_size):
    """Concatenating ``read_rows`` over any split of the cells gives what ``iter_blocks``
    gives, values and dtype, for every format that reads ranges directly."""
    x, _ = data
    folder = tmp_path_factory.mktemp("ranges")
    src = (
        synthetic_counts(len(x) * 40, 9, seed=len(cuts), mean_genes=4)
        if kind == "synthetic"
        else _ranged_source(folder, x, kind, read_size)
    )
    n = src.info.n_cells
    assert src.supports_ranges
    bounds = sorted({0, n, *(min(c * (n // 40 + 1), n) for c in cuts)})
    parts = [src.read_rows(a, b) for a, b in itertools.pairwise(bounds)]
    assert [p.shape for p in parts] == [
        (b - a, src.info.n_genes) for a, b in itertools.pairwise(bounds)
    ]
    blocks = list(src.iter_blocks(max(1, n // 3)))
    want = sp.vstack(blocks, format="csr")
    got = sp.vstack(parts, format="csr")
    assert got.dtype == want.dtype
    assert_same_csr(got, want)
    if kind != "synthetic":
        assert_same_csr(want, sp.csr_matrix(x))
    assert src.read_rows(n, n).shape == (0, src.info.n_genes)
    for bad in ((-1, 2), (2, 1), (0, n + 1)):
        with pytest.raises(ValueError, match="not a range of the"):
            src.read_rows(*bad)
    shutil.rmtree(folder)


@pytest.mark.parametrize("kind", ["h5ad-csc", "mtx-sorted"])
def test_no_row_ranges_where_the_format_has_none(tmp_path, kind):
    x = np.arange(12).reshape(4, 3) % 5
    src = open_source(_write_input(tmp_path, x, kind, np.random.default_rng(0)))
    assert not src.supports_ranges
    with pytest.raises(NotImplementedError, match=r"iter_blocks|cell ranges"):
        src.read_rows(0, 2)
    assert_same_csr(sp.vstack(list(src.iter_blocks(3))), sp.csr_matrix(x))


@pytest.mark.parametrize("kind", ["h5ad-csr", "h5ad-csc", "mtx-unsorted", "loom", "10x-h5", "zarr"])
def test_sources_pickle_and_read_after(tmp_path, kind):
    """A source holds its location, options and metadata, no open handle: it pickles (as a
    task sent to a worker would), and the copy reads the same blocks."""
    x = (np.arange(60).reshape(12, 5) * 7) % 4
    if kind in ("10x-h5", "zarr"):
        src = _ranged_source(tmp_path, x, kind, None)
    else:
        src = open_source(_write_input(tmp_path, x, kind, np.random.default_rng(1)))
    copy = pickle.loads(pickle.dumps(src))
    assert copy.info.path == src.info.path
    np.testing.assert_array_equal(copy.info.barcodes, src.info.barcodes)
    assert_same_csr(sp.vstack(list(copy.iter_blocks(5))), sp.csr_matrix(x))
