"""Small inputs answer fast: where each command's work runs (:func:`flow.cluster.current_client`).

Work on fewer than ``$FLOW_CLUSTER_CELLS`` cells (default 50,000) runs on dask's threads in
the command's process; larger work starts the local cluster, which later stages reuse;
``--workers`` (or ``--scheduler``, ``--threads-per-worker``, ``--memory-limit``) asks for a
cluster whatever the size. The threshold is lowered through the variable to test the large
case on PBMC 3k (2,700 cells).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flow import _genes, cluster
from flow._genes import normalize_gene_ids
from flow.cli import main
from flow.encode.store import open_encoding
from flow.errors import InputError

STARTED = "Started a local Dask cluster"


def run_cli(capsys: Any, *argv: Any) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def worker_processes() -> set[int]:
    """This process's children that are a local cluster's nannies and workers (not
    multiprocessing's resource tracker, which stays for the life of the process)."""
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    }


@pytest.fixture(scope="module")
def pbmc3k_h5ad(shared_data: Path) -> Path:
    return shared_data / "pbmc3k" / "pbmc3k_raw_counts.h5ad"


@pytest.fixture(scope="module")
def pbmc3k_store(pbmc3k_h5ad: Path, tmp_path_factory: Any) -> str:
    out = tmp_path_factory.mktemp("small") / "counts.zarr"
    assert main(["convert", str(pbmc3k_h5ad), "-o", str(out), "-q"]) == 0
    return os.fspath(out)


@pytest.fixture(autouse=True)
def _default_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cluster.CLUSTER_CELLS_VARIABLE, raising=False)


# ----------------------------------------------------------------------------------------------
# the rule, with a stand-in for the local cluster
# ----------------------------------------------------------------------------------------------


class FakeClient:
    """What the stand-in cluster yields."""


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """:func:`flow.cluster.flow_client` replaced: records each start, yields a FakeClient."""
    calls: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def fake(**options: Any) -> Iterator[FakeClient]:
        calls.append(options)
        yield FakeClient()

    monkeypatch.setattr(cluster, "flow_client", fake)
    return calls


def test_small_work_runs_on_threads_large_work_starts_the_cluster_once(started):
    with cluster.lazy_client(quiet=True):
        assert cluster.current_client(cells=cluster.CLUSTER_CELLS - 1) is None
        with cluster.working_on(10):
            assert cluster.current_client() is None
        assert started == []  # nothing started for small work
        with cluster.working_on(cluster.CLUSTER_CELLS):
            big = cluster.current_client()
        assert isinstance(big, FakeClient)
        # started once: later stages, small ones too, reuse it
        assert cluster.current_client(cells=1) is big
        with cluster.working_on(5):
            assert cluster.current_client() is big
    assert len(started) == 1


def test_work_of_unknown_size_starts_the_cluster(started):
    with cluster.lazy_client(quiet=True):
        assert isinstance(cluster.current_client(), FakeClient)
        with cluster.working_on(10), cluster.working_on(None):  # the innermost wins
            assert isinstance(cluster.current_client(), FakeClient)
    assert len(started) == 1


@pytest.mark.parametrize(
    "options",
    [
        {"n_workers": 1},
        {"threads_per_worker": 1},
        {"memory_limit": "1GiB"},
        {"scheduler": "tcp://127.0.0.1:1"},
    ],
)
def test_options_that_ask_for_a_cluster_start_it_for_any_size(started, options):
    with cluster.lazy_client(**options), cluster.working_on(1):
        assert isinstance(cluster.current_client(), FakeClient)
    assert started == [options]


@pytest.mark.parametrize("options", [{}, {"memory_limit": "auto"}, {"memory_limit": None}])
def test_default_options_do_not_ask_for_a_cluster(started, options):
    with cluster.lazy_client(**options, quiet=True), cluster.working_on(1):
        assert cluster.current_client() is None
    assert started == []


def test_outside_a_lazy_client_nothing_starts(started):
    with cluster.working_on(10**9):
        assert cluster.current_client() is None
    assert started == []


def test_the_threshold_comes_from_the_environment(started, monkeypatch):
    assert cluster.cluster_cells() == cluster.CLUSTER_CELLS == 50_000
    monkeypatch.setenv(cluster.CLUSTER_CELLS_VARIABLE, "100")
    assert cluster.cluster_cells() == 100
    with cluster.lazy_client(quiet=True):
        assert cluster.current_client(cells=99) is None
        assert isinstance(cluster.current_client(cells=100), FakeClient)
    monkeypatch.setenv(cluster.CLUSTER_CELLS_VARIABLE, "0")  # always a cluster
    with cluster.lazy_client(quiet=True):
        assert isinstance(cluster.current_client(cells=0), FakeClient)
    monkeypatch.setenv(cluster.CLUSTER_CELLS_VARIABLE, "many")
    with pytest.raises(InputError, match="FLOW_CLUSTER_CELLS='many' is not a number of cells"):
        cluster.cluster_cells()


def test_a_bad_threshold_is_one_line_from_the_cli(capsys, pbmc3k_store, tmp_path, monkeypatch):
    monkeypatch.setenv(cluster.CLUSTER_CELLS_VARIABLE, "lots")
    status, _, err = run_cli(
        capsys, "tokenize", pbmc3k_store, "-o", tmp_path / "e.zarr", "--preset", "V1"
    )
    assert status == 1
    assert err.strip().splitlines() == [
        "flow tokenize: error: FLOW_CLUSTER_CELLS='lots' is not a number of cells: set it to a "
        "whole number (e.g. 50000; 0 for always a cluster) or unset it."
    ]


# IDs as they come: Ensembl-like with versions, symbols, dots, whitespace, lower case, non-ASCII
_ID_CHARS = "ENSGMUSDARensg0123456789.-_ \t\n\x1cabzßéİ\u0085\u2003"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet=_ID_CHARS, max_size=14),
            st.from_regex(
                r"\s?(ENS|ens)[A-Za-z]{0,3}[0-9]{0,6}(\.[0-9]{0,3}){0,2}[A-Z_]{0,3}\s?",
                fullmatch=True,
            ),
        ),
        max_size=20,
    ),
    st.booleans(),
)
def test_vectorised_gene_id_normalisation_equals_one_by_one(ids, as_array):
    """The vectorised :func:`normalize_gene_ids` gives Python's ``strip().upper()`` and the
    Ensembl version regex, ID by ID, for ASCII and other text, lists and arrays."""
    # (through a numpy array of str, as before: numpy drops trailing NULs)
    expected = np.array([_genes._normalize_one(g) for g in ids], dtype=np.str_).tolist()
    given = np.array(ids, dtype=np.str_) if as_array and ids else ids
    got = normalize_gene_ids(given)
    assert got.tolist() == expected
    assert got.dtype.kind == "U"


def test_normalisation_checks_strings_and_keeps_arrays_as_given():
    with pytest.raises(InputError, match="Gene identifier 1 is None"):
        normalize_gene_ids(["ENSG1", None])
    with pytest.raises(InputError, match="Gene identifier 0 is nan"):
        normalize_gene_ids(np.array([np.nan, "x"], dtype=object))
    versioned = np.array([f"ensg{i:011d}.{i % 7}" for i in range(1000)])
    np.testing.assert_array_equal(
        normalize_gene_ids(versioned), [f"ENSG{i:011d}" for i in range(1000)]
    )
    assert normalize_gene_ids([]).tolist() == []


def test_the_command_line_does_not_import_distributed():
    """``distributed`` (~0.4 s to import) is imported only once a cluster is in play."""
    code = (
        "import sys, flow.cli; print(sorted(m for m in sys.modules if m.startswith('distributed')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


# ----------------------------------------------------------------------------------------------
# real commands on PBMC 3k
# ----------------------------------------------------------------------------------------------


def test_tokenize_small_runs_no_cluster_and_shows_progress(capsys, pbmc3k_store, tmp_path):
    before = worker_processes()
    status, out, err = run_cli(
        capsys, "tokenize", pbmc3k_store, "-o", tmp_path / "e.zarr", "--preset", "V1"
    )
    assert status == 0, err
    assert STARTED not in err
    assert "dashboard" not in err
    assert worker_processes() == before  # no worker process started (nor left behind)
    assert cluster._default_client() is None
    # progress on threads: plain lines on a log file (stderr is not a terminal here)
    assert "tokenize: " in err
    assert "(100%)" in err
    assert "2,700 cells" in out
    assert open_encoding(tmp_path / "e.zarr").lengths.size == 2700


def test_drop_rates_and_export_small_run_no_cluster(capsys, pbmc3k_store, tmp_path):
    assert main(["tokenize", pbmc3k_store, "-o", str(tmp_path / "e.zarr"), "--preset", "V1"]) == 0
    capsys.readouterr()
    for argv in (
        ["drop-rates", tmp_path / "e.zarr", "--cutoff", "1000"],
        ["export", tmp_path / "e.zarr", "-o", tmp_path / "ds", "--preset", "V1"],
    ):
        status, _, err = run_cli(capsys, *argv)
        assert status == 0, err
        assert STARTED not in err


def _tokens(path: Path) -> np.ndarray:
    enc = open_encoding(path)
    return np.asarray(enc.tokens.compute(scheduler="sync"))


@pytest.mark.distributed
def test_run_above_the_threshold_starts_one_cluster_for_every_stage(
    capsys, pbmc3k_h5ad, tmp_path, monkeypatch
):
    """FLOW_CLUSTER_CELLS below PBMC 3k's 2,700 cells: convert starts the local cluster and
    medians, tokenize and export reuse it (one start); the results equal a run on threads."""
    status, _, err = run_cli(
        capsys,
        "run",
        pbmc3k_h5ad,
        "-o",
        tmp_path / "threads",
        "--own-dictionaries",
        "--preset",
        "V1",
    )
    assert status == 0, err
    assert STARTED not in err
    monkeypatch.setenv(cluster.CLUSTER_CELLS_VARIABLE, "1000")
    before = worker_processes()
    status, _, err = run_cli(
        capsys,
        "run",
        pbmc3k_h5ad,
        "-o",
        tmp_path / "cluster",
        "--own-dictionaries",
        "--preset",
        "V1",
    )
    assert status == 0, err
    assert err.count(STARTED) == 1, err
    assert worker_processes() <= before  # closed with the command: no worker left
    np.testing.assert_array_equal(
        _tokens(tmp_path / "cluster" / "encoding.zarr"),
        _tokens(tmp_path / "threads" / "encoding.zarr"),
    )


@pytest.mark.distributed
def test_explicit_workers_start_a_cluster_on_small_data(capsys, pbmc3k_store, tmp_path):
    status, _, err = run_cli(
        capsys,
        "tokenize",
        pbmc3k_store,
        "-o",
        tmp_path / "e.zarr",
        "--preset",
        "V1",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
    )
    assert status == 0, err
    assert err.count(STARTED) == 1
