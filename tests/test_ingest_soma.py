"""TileDB-SOMA experiments as input (flow/ingest/soma.py), on experiments written here with
``tiledbsoma.io.from_anndata``: a small synthetic one (ranges, options, errors) and PBMC 3k
(the count store equals the one converted from the same h5ad)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from flow import pipeline
from flow._location import Location
from flow.cli import main
from flow.errors import InputError
from flow.ingest import ReadOptions, detect_format, open_source
from flow.ingest.soma import tiledb_config
from flow.store import open_counts

from conftest import REPO
from helpers import array_bytes

try:
    import tiledbsoma
    import tiledbsoma.io
except ImportError:  # an optional dependency, in the test extra: CI must have it
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("tiledbsoma is not installed (pip install 'flow[soma]')", allow_module_level=True)

N_CELLS, N_GENES = 23, 11


def _counts(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(2.0, size=(N_CELLS, N_GENES)) * (rng.random((N_CELLS, N_GENES)) < 0.4)
    x[5] = 0  # a cell with no counts
    x[:, 4] = 0  # a gene never detected
    return x.astype(np.int32)


def _adata(x: np.ndarray) -> ad.AnnData:
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{i % 3}" for i in range(N_CELLS)]),
            "n_counts": x.sum(axis=1).astype(np.int64),
            "filter_pass": (np.arange(N_CELLS) % 7 != 0).astype(np.int64),
            "score": np.linspace(0, 1, N_CELLS),
            "donor": [f"donor{i % 2}" for i in range(N_CELLS)],  # plain text
        },
        index=[f"BC{i:03d}-1" for i in range(N_CELLS)],
    )
    var = pd.DataFrame(
        {
            "feature_id": [f"ENSG{1000 + g:011d}" for g in range(N_GENES)],
            "feature_name": pd.Categorical([f"GENE{g}" for g in range(N_GENES)]),
        },
        index=[f"GENE{g}" for g in range(N_GENES)],
    )
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=var)


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    return _counts()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, counts) -> Path:
    """A SOMA experiment as Census lays one out: X layers ``raw`` (the counts) and
    ``normalized`` (something else), ``feature_id``/``feature_name`` in var, ``obs_id``."""
    path = tmp_path_factory.mktemp("soma") / "experiment"
    adata = _adata(counts)
    adata.layers["normalized"] = sp.csr_matrix(counts * 0.5)
    tiledbsoma.io.from_anndata(os.fspath(path), adata, measurement_name="RNA", X_layer_name="raw")
    return path


def _dense(source) -> np.ndarray:
    return source.read_rows(0, source.info.n_cells).toarray()


# --------------------------------------------------------------------------- metadata


def test_detected_and_read_with_census_defaults(experiment, counts):
    assert detect_format(experiment) == "soma"
    src = open_source(experiment)
    info = src.info
    assert (info.format, info.n_cells, info.n_genes) == ("soma", N_CELLS, N_GENES)
    assert info.gene_ids.tolist() == [f"ENSG{1000 + g:011d}" for g in range(N_GENES)]
    assert info.gene_symbols is not None
    assert info.gene_symbols.tolist() == [f"GENE{g}" for g in range(N_GENES)]
    assert info.barcodes.tolist() == [f"BC{i:03d}-1" for i in range(N_CELLS)]
    assert list(info.obs.columns) == ["cell_type", "n_counts", "filter_pass", "score", "donor"]
    assert info.obs["donor"].astype(str).tolist() == [f"donor{i % 2}" for i in range(N_CELLS)]
    assert isinstance(info.obs["cell_type"].dtype, pd.CategoricalDtype)
    assert info.obs["cell_type"].astype(str).tolist() == [f"type{i % 3}" for i in range(N_CELLS)]
    np.testing.assert_array_equal(info.obs["n_counts"], counts.sum(axis=1))
    np.testing.assert_array_equal(info.obs["filter_pass"], np.arange(N_CELLS) % 7 != 0)
    assert "X layer 'raw'" in " ".join(info.notes)
    assert src.supports_ranges
    got = _dense(src)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, counts)  # raw, not the normalized layer


def test_options_pick_layer_gene_ids_and_columns(experiment, counts):
    src = open_source(
        experiment,
        ReadOptions(
            layer="normalized",
            gene_id_column="feature_name",
            obs_columns=["score"],
            measurement="RNA",
        ),
    )
    np.testing.assert_array_equal(_dense(src), counts * 0.5)
    assert src.info.gene_ids.tolist() == [f"GENE{g}" for g in range(N_GENES)]
    assert list(src.info.obs.columns) == ["score", "filter_pass", "n_counts"]  # always carried


def test_obs_filter_reads_the_cells_it_keeps(experiment, counts):
    src = open_source(experiment, ReadOptions(obs_filter="cell_type == 'type1'"))
    kept = np.arange(1, N_CELLS, 3)  # joinids 1, 4, 7, ...: not consecutive
    assert src.info.n_cells == len(kept)
    assert src.info.barcodes.tolist() == [f"BC{i:03d}-1" for i in kept]
    np.testing.assert_array_equal(src.info.obs["n_counts"], counts[kept].sum(axis=1))
    np.testing.assert_array_equal(_dense(src), counts[kept])
    assert open_source(experiment).info.fingerprint != src.info.fingerprint


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("obs_filter", [None, "score > 0.2 and cell_type != 'type2'"])
def test_read_rows_over_every_split_equals_a_whole_read(experiment, counts, obs_filter):
    src = open_source(experiment, ReadOptions(obs_filter=obs_filter))
    rows = np.arange(N_CELLS)
    if obs_filter is not None:
        score = np.linspace(0, 1, N_CELLS)
        rows = rows[(score > 0.2) & (rows % 3 != 2)]
    n = src.info.n_cells
    assert n == len(rows)
    whole = src.read_rows(0, n)
    assert isinstance(whole, sp.csr_matrix)
    assert whole.has_sorted_indices
    np.testing.assert_array_equal(whole.toarray(), counts[rows])
    for k in range(n + 1):
        head, tail = src.read_rows(0, k), src.read_rows(k, n)
        assert head.shape == (k, N_GENES)
        assert tail.shape == (n - k, N_GENES)
        assert (sp.vstack([head, tail]) != whole).nnz == 0
    for size in (1, 2, 5, n, n + 4):
        blocks = list(src.iter_blocks(size))
        assert [b.shape[0] for b in blocks] == [min(size, n - a) for a in range(0, n, size)]
        assert (sp.vstack(blocks) != whole).nnz == 0
    for start, stop in [(3, 4), (2, 9), (n - 1, n), (4, 4)]:
        np.testing.assert_array_equal(
            src.read_rows(start, stop).toarray(), counts[rows[start:stop]]
        )


def test_a_source_pickles_and_reads_ranges_in_another_process(experiment, counts):
    """Another process (a worker) reads ranges of a pickled source; importing flow there
    does not import tiledbsoma (an optional dependency), reading does."""
    src = open_source(experiment)
    copy = pickle.loads(pickle.dumps(src))
    np.testing.assert_array_equal(copy.read_rows(7, 19).toarray(), counts[7:19])
    code = (
        "import pickle, sys\n"
        "import flow, flow.cli, flow.ingest, flow.pipeline\n"
        "before = 'tiledbsoma' in sys.modules\n"
        "src = pickle.loads(sys.stdin.buffer.read())\n"
        "total = int(src.read_rows(2, 17).sum())\n"
        "print(before, 'tiledbsoma' in sys.modules, total)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=pickle.dumps(src),
        capture_output=True,
        check=True,
        cwd=REPO,
    )
    assert proc.stdout.decode().split() == ["False", "True", str(int(counts[2:17].sum()))]


def test_bad_ranges_are_refused(experiment):
    src = open_source(experiment)
    with pytest.raises(ValueError, match="not a range"):
        src.read_rows(3, N_CELLS + 1)
    with pytest.raises(ValueError, match="n_cells must be >= 1"):
        next(src.iter_blocks(0))


# --------------------------------------------------------------------------- errors


def test_missing_measurement_and_layer_are_named_with_what_exists(experiment):
    with pytest.raises(InputError, match=r"no measurement 'ATAC'\. Its measurements: 'RNA'"):
        open_source(experiment, ReadOptions(measurement="ATAC"))
    with pytest.raises(
        InputError, match=r"no X layer 'counts'\. Its X layers: 'normalized', 'raw'\. Pass layer="
    ):
        open_source(experiment, ReadOptions(layer="counts"))


def test_no_default_layer(tmp_path, counts):
    path = tmp_path / "exp"
    tiledbsoma.io.from_anndata(os.fspath(path), _adata(counts), "RNA", X_layer_name="logcounts")
    with pytest.raises(
        InputError, match=r"no X layer 'raw' or 'counts' or 'data'\. Its X layers: 'logcounts'"
    ):
        open_source(path)
    assert _dense(open_source(path, ReadOptions(layer="logcounts"))).sum() == counts.sum()


def test_no_gene_ids(tmp_path, counts):
    adata = _adata(counts)
    adata.var = adata.var[["feature_name"]]
    path = tmp_path / "exp"
    tiledbsoma.io.from_anndata(os.fspath(path), adata, "RNA", var_id_name="symbol")
    with pytest.raises(
        InputError,
        match=r"ms/RNA/var has no column 'feature_id' or .* with gene IDs\. Its columns: "
        r"'symbol', 'feature_name'\. Pass gene_id_column=",
    ):
        open_source(path)
    with pytest.raises(InputError, match=r"no column 'ensembl' with gene IDs"):
        open_source(path, ReadOptions(gene_id_column="ensembl"))


def test_obs_errors(experiment):
    with pytest.raises(InputError, match=r"obs filter 'tissue == 1' cannot be applied"):
        open_source(experiment, ReadOptions(obs_filter="tissue == 1"))
    with pytest.raises(InputError, match=r"the matrix is empty \(0 cells \(obs filter"):
        open_source(experiment, ReadOptions(obs_filter="cell_type == 'none'"))
    with pytest.raises(InputError, match=r"obs has no column 'tissue'. Available: 'cell_type'"):
        open_source(experiment, ReadOptions(obs_columns=["tissue"]))
    with pytest.raises(InputError, match=r"use_raw= applies to h5ad, anndata-zarr inputs"):
        open_source(experiment, ReadOptions(use_raw=True))


def test_not_an_experiment(experiment, tmp_path):
    with pytest.raises(InputError, match=r"cannot be opened as a TileDB-SOMA experiment"):
        open_source(experiment / "ms", ReadOptions(format="soma"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"cannot be opened as a TileDB-SOMA experiment"):
        open_source(tmp_path / "empty", ReadOptions(format="soma"))
    with pytest.raises(InputError, match=r"neither matrix\.mtx.*nor a SOMA experiment"):
        open_source(tmp_path / "empty")


def test_without_tiledbsoma_the_error_says_how_to_install(experiment, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import tiledbsoma -> ImportError
    with pytest.raises(
        InputError, match=r"needs the tiledbsoma package .*pip install 'flow\[soma\]'"
    ):
        open_source(experiment)


def test_storage_options_become_tiledb_configuration():
    assert tiledb_config(Location("/data/exp", {"anon": True})) == {}  # local: none
    config = tiledb_config(
        Location(
            "s3://bucket/exp",
            {
                "key": "AKIA",
                "secret": "s3cr3t",
                "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu"},
                "vfs.s3.max_parallel_ops": 4,
                "default_block_size": 1 << 20,  # fsspec's alone
            },
        )
    )
    assert config == {
        "vfs.s3.aws_access_key_id": "AKIA",
        "vfs.s3.aws_secret_access_key": "s3cr3t",
        "vfs.s3.region": "eu",
        "vfs.s3.endpoint_override": "127.0.0.1:9000",
        "vfs.s3.scheme": "http",
        "vfs.s3.use_virtual_addressing": "false",
        "vfs.s3.max_parallel_ops": "4",
    }
    anon = tiledb_config(Location("s3://cellxgene-census-public-us-west-2/x", {"anon": True}))
    assert anon == {"vfs.s3.no_sign_request": "true"}


# --------------------------------------------------------------------------- convert


def test_cli_convert_with_measurement_and_obs_filter(experiment, counts, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    argv = [experiment, "-o", out, "--measurement", "RNA", "--obs-filter", "filter_pass == 1"]
    assert main(["convert", *map(str, argv)]) == 0
    assert "soma" in capsys.readouterr().out
    kept = np.flatnonzero(np.arange(N_CELLS) % 7 != 0)
    back = ad.read_zarr(out)
    np.testing.assert_array_equal(back.X.toarray(), counts[kept])
    assert back.obs_names.tolist() == [f"BC{i:03d}-1" for i in kept]
    assert back.obs["cell_type"].astype(str).tolist() == [f"type{i % 3}" for i in kept]
    assert main(["convert", str(experiment), "-o", str(tmp_path / "x.zarr"), "--layer", "x"]) == 1
    err = capsys.readouterr().err
    assert "no X layer 'x'. Its X layers: 'normalized', 'raw'" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def pbmc_soma(shared_data, tmp_path_factory) -> tuple[Path, Path]:
    """PBMC 3k written as a SOMA experiment by tiledbsoma, and the h5ad it was written from."""
    h5ad = shared_data / "pbmc3k" / "pbmc3k_raw_counts.h5ad"
    adata = ad.read_h5ad(h5ad)
    # the index names repeat column names (ensembl_id), which from_anndata refuses
    adata.var.index.name = adata.obs.index.name = None
    path = tmp_path_factory.mktemp("pbmc") / "pbmc3k_soma"
    tiledbsoma.io.from_anndata(os.fspath(path), adata, measurement_name="RNA")
    return path, h5ad


def _same_store(got: Path, want: Path) -> None:
    """Equal stores, array by array, but for the source names (paths) of the cells."""
    a, b = array_bytes(os.fspath(got)), array_bytes(os.fspath(want))
    assert a.keys() == b.keys()
    assert {"X/data", "X/indices", "X/indptr", "var/_index", "obs/n_counts"} <= a.keys()
    assert [k for k in a if a[k] != b[k] and k != "obs/source/categories"] == []


@pytest.mark.data
def test_pbmc3k_soma_converts_to_the_store_of_its_h5ad(pbmc_soma, tmp_path, capsys):
    experiment, h5ad = pbmc_soma
    want = pipeline.convert([h5ad], tmp_path / "h5ad.zarr", block_size=1000)
    got = pipeline.convert([experiment], tmp_path / "soma.zarr", block_size=1000)
    _same_store(tmp_path / "soma.zarr", tmp_path / "h5ad.zarr")
    assert (got.n_blocks, want.n_blocks) == (3, 3)
    argv = ["convert", str(experiment), "-o", str(tmp_path / "cli.zarr"), "--block-size", "1000"]
    assert main(argv) == 0
    assert "(soma, 2,700 cells)" in capsys.readouterr().out
    _same_store(tmp_path / "cli.zarr", tmp_path / "h5ad.zarr")
    # and what the store holds is the h5ad's: counts, gene IDs, barcodes, carried columns
    source, back = ad.read_h5ad(h5ad), ad.read_zarr(tmp_path / "cli.zarr")
    assert (back.X != source.X).nnz == 0
    assert back.var_names.tolist() == source.var["ensembl_id"].tolist()
    assert back.obs_names.tolist() == source.obs_names.tolist()
    np.testing.assert_array_equal(back.obs["n_counts"], source.obs["n_counts"])
    store = open_counts(tmp_path / "cli.zarr")
    assert store.obs_columns == open_counts(tmp_path / "h5ad.zarr").obs_columns


def _h5_as_anndata(path: Path) -> ad.AnnData:
    """A Cell Ranger 3 HDF5 matrix read with h5py alone (genes x cells CSC = cells x genes
    CSR), gene IDs as var_names, symbols in ``gene_symbol``."""
    import h5py

    with h5py.File(path, "r") as fh:
        m = fh["matrix"]
        n_genes, n_cells = (int(s) for s in m["shape"][:])
        x = sp.csr_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), (n_cells, n_genes))
        ids = m["features/id"][:].astype(str)
        var = pd.DataFrame({"gene_symbol": m["features/name"][:].astype(str)}, index=ids)
        obs = pd.DataFrame(index=m["barcodes"][:].astype(str))
    return ad.AnnData(x, obs=obs, var=var)


@pytest.mark.data
def test_pbmc1k_soma_converts_to_the_store_of_its_h5(pbmc_inputs, tmp_path):
    h5 = pbmc_inputs["10x-h5"]
    experiment = tmp_path / "pbmc1k_soma"
    tiledbsoma.io.from_anndata(os.fspath(experiment), _h5_as_anndata(h5), "RNA")
    pipeline.convert([h5], tmp_path / "h5.zarr", block_size=300)
    store = pipeline.convert([experiment], tmp_path / "soma.zarr", block_size=300)
    assert (store.n_blocks, store.var.shape[0]) == (4, 33_538)
    _same_store(tmp_path / "soma.zarr", tmp_path / "h5.zarr")


# --------------------------------------------------------------------------- S3


def test_read_from_s3_with_fsspec_storage_options(experiment, counts, tmp_path):
    """An experiment at an s3:// URL (moto's S3 server on localhost) is detected through
    fsspec and read by TileDB with the same storage options translated; the store equals the
    one of the local experiment but for the source name."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import boto3
    import s3fs

    secret = "soma-secret-4f1d9b"  # distinctive: must never be shown
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            options = {
                "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
                "key": "testing",
                "secret": secret,
            }
            boto3.client("s3", endpoint_url=options["client_kwargs"]["endpoint_url"]).create_bucket(
                Bucket="soma-test"
            )
            s3fs.S3FileSystem(**options).put(os.fspath(experiment), "soma-test/exp", recursive=True)
            url = "s3://soma-test/exp"
            assert detect_format(url, storage_options=options) == "soma"
            src = open_source(
                url, ReadOptions(obs_filter="filter_pass == 1"), storage_options=options
            )
            kept = np.flatnonzero(np.arange(N_CELLS) % 7 != 0)
            np.testing.assert_array_equal(src.read_rows(2, 9).toarray(), counts[kept[2:9]])
            got = tmp_path / "s3.zarr"
            pipeline.convert([url], got, storage_options=options, block_size=5)
            pipeline.convert([experiment], tmp_path / "local.zarr", block_size=5)
            _same_store(got, tmp_path / "local.zarr")
            with pytest.raises(InputError, match="no X layer 'x'") as err:
                open_source(url, ReadOptions(layer="x"), storage_options=options)
            assert secret not in str(err.value)
        finally:
            server.stop()


@pytest.mark.distributed
def test_convert_on_a_cluster_equals_a_local_convert(experiment, tmp_path, local_cluster_address):
    """Worker processes read the experiment (sources pickled, X opened in each task)."""
    from distributed import Client

    with Client(local_cluster_address) as client:
        pipeline.convert([experiment], tmp_path / "cluster.zarr", client=client, block_size=4)
    pipeline.convert([experiment], tmp_path / "local.zarr", block_size=4)
    _same_store(tmp_path / "cluster.zarr", tmp_path / "local.zarr")
