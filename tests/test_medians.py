"""Median sets: exact mode against numpy, t-digest accuracy, determinism, merging, interchange."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import dask
import numpy as np
import pytest
import scipy.sparse as sp

from flow import medians as med
from flow._genes import GeneMapping
from flow._location import Location
from flow.datasets import write_synthetic
from flow.errors import VocabularyError

from helpers import no_compute


def reference_medians(store) -> np.ndarray:
    """numpy.median of each gene's nonzero (count / n_counts) * 10000, cells passing filter."""
    blocks = [store.counts.blocks[i, 0].compute(scheduler="sync") for i in range(store.n_blocks)]
    x = sp.vstack(blocks).tocsc()
    n_counts = store.obs["n_counts"].to_numpy(dtype=np.float64)
    out = np.full(x.shape[1], np.nan)
    for g in range(x.shape[1]):
        rows = x.indices[x.indptr[g] : x.indptr[g + 1]]
        vals = x.data[x.indptr[g] : x.indptr[g + 1]].astype(np.float64)
        keep = vals > 0
        if keep.any():
            out[g] = np.median((vals[keep] / n_counts[rows[keep]]) * 10000)
    return out


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory):
    """The same synthetic matrix written with three block sizes."""
    root = tmp_path_factory.mktemp("medians")
    return [
        write_synthetic(root / f"s{bs}.zarr", 1500, 400, seed=7, mean_genes=80, block_size=bs)
        for bs in (1500, 256, 97)
    ]


def test_exact_mode_equals_numpy_for_any_block_size(small_stores):
    ref = reference_medians(small_stores[0])
    assert np.isfinite(ref).sum() > 300
    for store in small_stores:
        got = med.medians_of([store], method="exact", compute=dask.compute)
        np.testing.assert_array_equal(got.medians, ref)  # bit for bit, NaN where never expressed
        assert got.method == "exact"


def test_exact_mode_on_real_data(shared_data, tmp_path):
    from flow.pipeline import convert

    for path in (
        shared_data / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19",
        shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5",
    ):
        store = convert([path], tmp_path / f"{path.name}.zarr", block_size=1000)
        got = med.medians_of([store], method="exact", compute=dask.compute)
        ref = reference_medians(store)
        np.testing.assert_array_equal(got.medians, ref)


def test_tdigest_accuracy_and_counts(small_stores):
    store = small_stores[1]
    ref = reference_medians(store)
    got = med.medians_of([store], compute=dask.compute)
    ok = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(got.medians), ok)
    rel = np.abs(got.medians[ok] - ref[ok]) / ref[ok]
    assert np.percentile(rel, 99) < 0.01
    nnz = np.diff(
        sp.vstack([store.counts.blocks[i, 0].compute() for i in range(store.n_blocks)])
        .tocsc()
        .indptr
    )
    np.testing.assert_array_equal(got.n_nonzero, nnz)


def test_graph_is_lazy_and_deterministic(small_stores):
    store = small_stores[2]
    with no_compute():
        ids, graph = med.compute_medians(store)
        _, again = med.compute_medians(store)
    assert graph.key == again.key
    assert ids.size == 400


def _bytes(d) -> bytes:
    return b"".join(
        np.ascontiguousarray(getattr(d, n)).tobytes()
        for n in ("offsets", "means", "weights", "mins", "maxs")
    )


@pytest.mark.distributed
def test_same_bytes_on_every_scheduler(small_stores, local_cluster_address):
    from distributed import Client

    store = small_stores[2]
    _, graph = med.compute_medians(store, split_every=3)
    (sync,) = dask.compute(graph, scheduler="sync")
    (threads,) = dask.compute(graph, scheduler="threads", num_workers=2)
    with Client(local_cluster_address) as client:
        dist = client.compute(graph).result()
    assert _bytes(sync) == _bytes(threads) == _bytes(dist)


def test_merging_halves_matches_whole(tmp_path):
    whole = write_synthetic(tmp_path / "w.zarr", 2400, 300, seed=3, mean_genes=80, block_size=300)
    from flow.datasets import synthetic_counts
    from flow.store import write_counts

    src = synthetic_counts(2400, 300, seed=3, mean_genes=80)

    class Half:
        def __init__(self, lo, hi):
            from dataclasses import replace

            self.lo, self.hi = lo, hi
            self.info = replace(
                src.info,
                n_cells=hi - lo,
                barcodes=src.info.barcodes[lo:hi],
                obs=src.info.obs.iloc[lo:hi].reset_index(drop=True),
            )

        def iter_blocks(self, n):
            x = sp.vstack(list(src.iter_blocks(2400)))[self.lo : self.hi]
            for i in range(0, x.shape[0], n):
                yield x[i : i + n]

    a = write_counts([Half(0, 1200)], tmp_path / "a.zarr", block_size=300)
    write_counts([Half(1200, 2400)], tmp_path / "b.zarr", block_size=300)
    ref = reference_medians(whole)
    ma = med.medians_of([a], compute=dask.compute)
    med.write_medians(ma, tmp_path / "ma.zarr")
    shutil.rmtree(tmp_path / "a.zarr")  # --update must not need the old data
    from flow.pipeline import medians as run_medians

    merged = run_medians([tmp_path / "b.zarr"], tmp_path / "ab.zarr", update=tmp_path / "ma.zarr")
    ok = np.isfinite(ref)
    rel = np.abs(merged.medians[ok] - ref[ok]) / ref[ok]
    assert np.percentile(rel, 99) < 0.01
    assert merged.n_nonzero.sum() == int(whole.attrs["nnz"])
    assert len(merged.stores) == 2
    reopened = med.open_medians(tmp_path / "ab.zarr")
    np.testing.assert_array_equal(reopened.medians, merged.medians)


def test_refuse_merging_exact_sets(small_stores):
    exact = med.medians_of([small_stores[0]], method="exact", compute=dask.compute)
    with pytest.raises(VocabularyError, match="only t-digest"):
        med.merge_median_sets([exact, exact])


def test_interchange_round_trip(tmp_path, small_stores):
    got = med.medians_of([small_stores[0]], compute=dask.compute)
    for suffix in ("pkl", "json", "tsv"):
        med.export_medians(got, tmp_path / f"m.{suffix}")
    with open(tmp_path / "m.pkl", "rb") as fh:
        table = pickle.load(fh)
    assert table == got.as_dict()
    assert json.loads((tmp_path / "m.json").read_text()) == pytest.approx(got.as_dict())
    imported = med.import_median_dictionary(tmp_path / "m.pkl")
    ok = np.isfinite(got.medians)
    np.testing.assert_array_equal(imported.gene_ids, got.gene_ids[ok])
    np.testing.assert_array_equal(imported.medians, got.medians[ok])


def test_import_geneformer_dictionary(shared_data):
    path = shared_data / "geneformer" / "v1_gc30M" / "gene_median_dictionary_gc30M.pkl"
    imported = med.import_median_dictionary(path)
    assert imported.gene_ids.size == 25_424
    with open(path, "rb") as fh:  # the official file, trusted here only to check the import
        raw = pickle.load(fh)
    table = dict(zip(imported.gene_ids.tolist(), imported.medians.tolist(), strict=True))
    assert all(table[k.upper()] == float(v) for k, v in raw.items())


def test_median_set_opens_as_xarray(tmp_path, small_stores):
    got = med.medians_of([small_stores[0]], compute=dask.compute)
    med.write_medians(got, tmp_path / "m.zarr")
    ds = med.open_medians_dataset(tmp_path / "m.zarr")
    assert ds.sizes["gene"] == 400
    assert ds.indexes["gene"].tolist() == got.gene_ids.tolist()
    np.testing.assert_array_equal(ds["median"].values, got.medians)
    assert ds.attrs["flow"]["method"] == "tdigest"


def _write_schema_1(medians: med.MedianSet, path) -> None:
    """A median set as flow wrote it before schema 2: IDs in ``gene_id``, not consolidated."""
    from flow._io import create_flow_group, mark_complete

    root = create_flow_group(Location.of(path), med.KIND, 1)
    med._create_1d(root, "gene_id", np.asarray(medians.gene_ids, dtype=str), "gene")
    med._create_1d(root, "median", medians.medians, "gene")
    med._create_1d(root, "n_nonzero", medians.n_nonzero, "gene")
    arrays = med._tdigest.to_arrays(medians.digests)
    med._create_1d(root, "digest_offset", arrays["offsets"], "gene_edge")
    for key in ("means", "weights", "mins", "maxs"):
        med._create_1d(root, f"digest_{key.rstrip('s')}", arrays[key], "centroid")
    mark_complete(
        root, method=medians.method, compression=medians.compression, stores=list(medians.stores)
    )


def test_median_set_is_xarray_native_on_real_data(shared_data, tmp_path):
    """PBMC 3k: xarray.open_zarr opens the set with no warning at all (consolidated metadata),
    the IDs are the ``gene`` coordinate (``sel`` by ID), also after a merge rewrote the set."""
    import xarray as xr

    from flow.pipeline import convert

    store = convert(
        [shared_data / "pbmc3k" / "filtered_gene_bc_matrices" / "hg19"], tmp_path / "3k.zarr"
    )
    got = med.medians_of([store], compute=dask.compute)
    med.write_medians(got, tmp_path / "m.zarr")
    merged = med.merge_median_sets([med.open_medians(tmp_path / "m.zarr"), got])
    med.write_medians(merged, tmp_path / "merged.zarr")
    cd3e = "ENSG00000198851"
    i = got.gene_ids.tolist().index(cd3e)
    for name, want in (("m.zarr", got), ("merged.zarr", merged)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = xr.open_zarr(tmp_path / name)
            assert ds.indexes["gene"].tolist() == want.gene_ids.tolist()
            assert float(ds["median"].sel(gene=cd3e)) == want.medians[i]
            assert int(ds["n_nonzero"].sel(gene=cd3e)) == want.n_nonzero[i] > 0
            np.testing.assert_array_equal(ds["median"].values, want.medians)
            assert set(ds.data_vars) == {
                "median",
                "n_nonzero",
                "digest_offset",
                "digest_mean",
                "digest_weight",
                "digest_min",
                "digest_max",
            }
            assert ds.attrs["flow"]["complete"] is True
    assert merged.n_nonzero[i] == 2 * got.n_nonzero[i]  # the same cells twice
    # the set flow.open_medians reads back is the one written
    back = med.open_medians(tmp_path / "m.zarr")
    assert back.gene_ids.tolist() == got.gene_ids.tolist()
    assert back.fingerprint == got.fingerprint


def test_median_sets_of_schema_1_still_open(tmp_path, small_stores):
    """Sets written before the ``gene`` coordinate open with open_medians (same values) and as
    datasets with the ``gene`` coordinate; rewriting one brings it to the current layout."""
    import xarray as xr

    got = med.medians_of([small_stores[0]], compute=dask.compute)
    _write_schema_1(got, tmp_path / "old.zarr")
    old = med.open_medians(tmp_path / "old.zarr")
    assert old.fingerprint == got.fingerprint
    np.testing.assert_array_equal(old.n_nonzero, got.n_nonzero)
    assert old.digests is not None
    np.testing.assert_array_equal(old.digests.means, got.digests.means)
    ds = med.open_medians_dataset(tmp_path / "old.zarr")
    assert "gene_id" not in ds.variables
    assert ds.indexes["gene"].tolist() == got.gene_ids.tolist()
    np.testing.assert_array_equal(ds["median"].values, got.medians)
    med.write_medians(old, tmp_path / "new.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = xr.open_zarr(tmp_path / "new.zarr")
    assert new.indexes["gene"].tolist() == got.gene_ids.tolist()
    assert new.attrs["flow"]["schema_version"] == med.SCHEMA_VERSION == 2


def test_describe_names_an_imported_dictionary(shared_data, tmp_path):
    """An imported set says which file it came from (not "0 cells from 1 store(s)")."""
    path = shared_data / "geneformer" / "v1_gc30M" / "gene_median_dictionary_gc30M.pkl"
    text = med.import_median_dictionary(path).describe("gf.zarr")
    assert text == (f"median set -> gf.zarr: 25,424 genes (25,424 expressed), imported from {path}")
    bundled = med.write_medians(med.bundled_medians("V1"), tmp_path / "gf.zarr")
    assert med.open_medians(tmp_path / "gf.zarr").describe() == bundled.describe()
    assert bundled.describe().endswith(
        "imported from Geneformer's V1 medians shipped with flow "
        "(converted from v1_gc30M/gene_median_dictionary_gc30M.pkl)"
    )


def test_open_without_digests(tmp_path, small_stores):
    """digests=False reads the same medians and leaves the digests out."""
    got = med.medians_of([small_stores[0]], compute=dask.compute)
    med.write_medians(got, tmp_path / "m.zarr")
    full = med.open_medians(tmp_path / "m.zarr")
    light = med.open_medians(tmp_path / "m.zarr", digests=False)
    assert full.digests is not None
    assert light.digests is None
    np.testing.assert_array_equal(light.medians, full.medians)
    np.testing.assert_array_equal(light.gene_ids, full.gene_ids)
    assert light.fingerprint == full.fingerprint == got.fingerprint


def test_write_returns_the_set_bound_to_its_store(tmp_path, small_stores):
    """write_medians hands back the same medians, bound to where they were written, so a
    caller goes on without reading the store back; open_medians binds the set it reads."""
    got = med.medians_of([small_stores[0]], compute=dask.compute)
    assert got.location is None
    assert got.url is None
    where = Location.of(tmp_path / "m.zarr")
    written = med.write_medians(got, where)
    assert written.location == where
    assert written.url == os.path.abspath(tmp_path / "m.zarr")
    assert written.digests is got.digests
    np.testing.assert_array_equal(written.medians, got.medians)
    reopened = med.open_medians(where)
    assert reopened.location == where
    assert reopened.fingerprint == written.fingerprint
    assert reopened.stores == written.stores
    assert reopened.describe() == written.describe() == got.describe()
    text = written.describe(tmp_path / "m.zarr")
    assert text.startswith(f"median set -> {tmp_path / 'm.zarr'}: 400 genes (")
    assert text.endswith("method tdigest, 1,500 cells from 1 store(s)")
    # a pickle given as a Location is imported, and is not bound to a store
    med.export_medians(got, tmp_path / "m.pkl")
    imported = med.open_medians(Location.of(tmp_path / "m.pkl"))
    assert imported.method == "imported"
    assert imported.location is None


def test_a_gene_mapping_sums_the_columns_it_joins(tmp_path):
    """Exact medians under a mapping equal numpy's on the summed columns, in first-seen order."""
    store = write_synthetic(tmp_path / "s.zarr", 600, 40, seed=2, mean_genes=15, block_size=128)
    ids = store.var.index.to_numpy(dtype=str)
    mapping = GeneMapping.from_dict({ids[5]: ids[30], ids[7]: ids[2], ids[39]: ids[0]})
    got = med.medians_of([store], method="exact", gene_mapping=mapping, compute=dask.compute)
    joined = {5: 30, 7: 2, 39: 0}
    target = [ids[joined.get(j, j)] for j in range(40)]  # each column's gene
    genes = list(dict.fromkeys(target))  # first-seen order: ids[30] is first seen at column 5
    assert got.gene_ids.tolist() == genes
    assert len(genes) == 37
    x = sp.vstack([store.counts.blocks[i, 0].compute() for i in range(store.n_blocks)]).toarray()
    summed = np.stack([x[:, [t == g for t in target]].sum(axis=1) for g in genes], axis=1)
    values = summed / store.obs["n_counts"].to_numpy(dtype=np.float64)[:, None] * 10000
    expected = [np.median(v[v > 0]) if (v > 0).any() else np.nan for v in values.T]
    np.testing.assert_array_equal(got.medians, expected)
    with no_compute():
        lazy_ids, _ = med.compute_medians(store, gene_mapping=mapping)
    np.testing.assert_array_equal(lazy_ids, got.gene_ids)


def test_cli_medians(tmp_path, small_stores, capsys):
    from flow.cli import main

    out = tmp_path / "m.zarr"
    code = main(
        [
            "medians",
            small_stores[0].url,
            "-o",
            str(out),
            "--method",
            "exact",
            "-q",
            "--workers",
            "1",
            "--threads-per-worker",
            "1",
            "--export",
            str(tmp_path / "m.tsv"),
        ]
    )
    assert code == 0
    assert "method exact" in capsys.readouterr().out
    np.testing.assert_array_equal(med.open_medians(out).medians, reference_medians(small_stores[0]))
    assert (tmp_path / "m.tsv").read_text().startswith("gene_id\tmedian")
