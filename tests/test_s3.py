"""The pipeline on object storage: a real S3 protocol server (moto's server mode) on localhost.

Count stores, median sets, encoding stores and exported datasets are read and written at
``s3://`` URLs, from Python (``storage_options=``) and from the command line
(``--storage-option``, credentials from the environment), with the same bytes as a local run
of the same local input file. An input file read from S3 gives the same count store but for
the column that records where each cell came from.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from flow import pipeline
from flow.cli._common import storage_options as parse_storage_options
from flow.encode.store import open_encoding
from flow.store import open_counts

from conftest import S3, SECRET  # the s3 fixture (moto's server) is in conftest
from helpers import array_bytes, flow_meta, stored_files, write_synthetic_h5ad

FLOW = os.fspath(Path(sys.executable).parent / "flow")


# --------------------------------------------------------------------------- helpers


def assert_same(got: str, want: str, storage_options: Mapping[str, Any]) -> None:
    """An S3 store (or exported dataset) holds the local one's bytes."""
    files = stored_files(got, storage_options)
    assert files, f"nothing at {got}"
    assert files == stored_files(want)
    if not want.endswith("dataset"):
        assert array_bytes(got, storage_options) == array_bytes(want)
        assert flow_meta(got, storage_options) == flow_meta(want)


def write_h5ad(path: Path, n_cells: int, n_genes: int, *, seed: int) -> Path:
    """A synthetic h5ad input (raw counts, a cell type and a filter_pass column)."""
    return write_synthetic_h5ad(path, n_cells, n_genes, seed=seed, mean_genes=120, fail_every=7)


STAGES = ("counts.zarr", "medians.zarr", "encoding.zarr", "dataset")


def run_python(h5ad: Path, out: str, storage_options: Mapping[str, Any] | None) -> dict[str, str]:
    """convert, medians, tokenize and export through flow's Python API."""
    paths = {name: posixpath.join(out, name) for name in STAGES}
    so = storage_options
    pipeline.convert([h5ad], paths["counts.zarr"], block_size=400, storage_options=so)
    pipeline.medians([paths["counts.zarr"]], paths["medians.zarr"], storage_options=so)
    pipeline.tokenize(
        paths["counts.zarr"],
        paths["encoding.zarr"],
        medians=paths["medians.zarr"],
        storage_options=so,
    )
    pipeline.export(paths["encoding.zarr"], paths["dataset"], storage_options=so)
    return paths


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The input file, and the whole pipeline run locally on it."""
    tmp = tmp_path_factory.mktemp("s3-local")
    h5ad = write_h5ad(tmp / "cells.h5ad", 2_000, 400, seed=11)
    return h5ad, run_python(h5ad, os.fspath(tmp / "out"), None)


# --------------------------------------------------------------------------- tests


def test_storage_option_parsing() -> None:
    """``--storage-option`` values: endpoint_url into client_kwargs, dotted keys nest, booleans
    and numbers are typed, credentials stay strings."""

    def parse(*items: str) -> dict[str, Any]:
        return parse_storage_options(argparse.Namespace(storage_option=list(items)))

    assert parse("endpoint_url=http://127.0.0.1:9000", "anon=false", "key=0123") == {
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "anon": False,
        "key": "0123",
    }
    assert parse(
        "client_kwargs.region_name=eu-west-1", "config_kwargs.s3.addressing_style=path"
    ) == {
        "client_kwargs": {"region_name": "eu-west-1"},
        "config_kwargs": {"s3": {"addressing_style": "path"}},
    }
    assert parse("default_block_size=1048576", "requester_pays=True") == {
        "default_block_size": 1048576,
        "requester_pays": True,
    }
    from flow.errors import InputError

    with pytest.raises(InputError, match="KEY=VALUE") as info:
        parse(SECRET)
    assert SECRET not in str(info.value)


@pytest.mark.distributed
def test_python_api_on_s3_equals_local(s3: S3, local: tuple[Path, dict[str, str]]) -> None:
    """All four stages through the Python API with s3:// URLs and storage_options, on a
    local cluster of one worker process (the options travel with the tasks)."""
    from flow.cluster import flow_client

    h5ad, want = local
    with flow_client(n_workers=1, threads_per_worker=1, memory_limit="1GiB", quiet=True):
        got = run_python(h5ad, s3.url("python"), s3.options)
    for name in STAGES:
        assert_same(got[name], want[name], s3.options)
    store = open_counts(got["counts.zarr"], storage_options=s3.options)
    enc = open_encoding(got["encoding.zarr"], storage_options=s3.options)
    assert store.url == s3.url("python", "counts.zarr")
    for obj in (store, enc):  # the objects do not show credentials
        assert SECRET not in repr(obj)
    ds = enc.dataset()
    assert ds["tokens"].dims == ("cell", "rank")


@pytest.mark.distributed
@pytest.mark.slow
def test_cli_on_s3_equals_local(s3: S3, local: tuple[Path, dict[str, str]]) -> None:
    """All four stages through the command line, credentials from the environment (tokenize
    and export on a local cluster's worker process); the secret appears in no output."""
    h5ad, want = local
    url = {name: s3.url("cli", name) for name in STAGES}
    opts = ["--storage-option", f"endpoint_url={s3.endpoint}"]
    cluster = ["--workers", "1", "--threads-per-worker", "1", "--memory-limit", "1GiB"]
    medians = [url["medians.zarr"], *cluster]
    commands = [
        ["convert", h5ad, "-o", url["counts.zarr"], "--block-size", "400"],
        ["info", url["counts.zarr"]],
        ["medians", url["counts.zarr"], "-o", url["medians.zarr"]],
        ["tokenize", url["counts.zarr"], "-o", url["encoding.zarr"], "--medians", *medians],
        ["export", url["encoding.zarr"], "-o", url["dataset"], *cluster],
    ]
    outputs = []
    for args in commands:
        proc = subprocess.run(
            [FLOW, *map(str, args), *opts],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, f"flow {args[0]}:\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout + proc.stderr)
    assert f"count store {url['counts.zarr']}" in outputs[1]
    assert "dashboard: http://" in outputs[3]  # without -q: the local cluster's dashboard
    for text in outputs:
        assert SECRET not in text
    for name in STAGES:
        assert_same(url[name], want[name], s3.options)


def test_cli_convert_reads_input_from_s3(s3: S3, local: tuple[Path, dict[str, str]]) -> None:
    """``flow convert s3://.../cells.h5ad``: the same counts as from the local file; only the
    recorded source differs (it is the URL)."""
    import fsspec

    h5ad, want = local
    source, out = s3.url("inputs", "cells.h5ad"), s3.url("from-s3", "counts.zarr")
    fsspec.filesystem("s3", **s3.options).put_file(os.fspath(h5ad), source)
    endpoint = ["--storage-option", f"endpoint_url={s3.endpoint}"]
    proc = subprocess.run(
        [FLOW, "convert", source, "-o", out, "--block-size", "400", "-q", *endpoint],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert f"{source} (h5ad, 2,000 cells)" in proc.stdout

    def without_source(files: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in files.items() if not k.startswith("obs/source/categories")}

    got_files = stored_files(out, s3.options)
    assert without_source(got_files) == without_source(stored_files(want["counts.zarr"]))
    assert got_files.keys() == stored_files(want["counts.zarr"]).keys()
    got, ref = flow_meta(out, s3.options), flow_meta(want["counts.zarr"])
    assert [s["path"] for s in got.pop("sources")] == [source]
    assert [s["path"] for s in ref.pop("sources")] == [os.fspath(h5ad)]
    assert got == ref  # content fingerprint, block grid, shape, dtype
    assert open_counts(out, storage_options=s3.options).obs["source"].tolist() == [source] * 2_000
