"""Fuzzed inputs: small valid inputs of every format, corrupted, then converted.

Each case builds a valid input (h5ad with CSR, CSC or dense ``X``, 10x HDF5, 10x MTX folder,
loom, AnnData Zarr) from a drawn count matrix, corrupts it one way (a truncation, flipped
bytes, a wrong shape, an ``indptr`` that goes down, a gene index out of range, a count past
2^32, a NaN count, cells with zero totals) and converts it in this process under a deadline.
Every case must end either in a :class:`~flow.errors.FlowError` whose message names the input,
or in a store that holds the right counts: the corrupted input's own counts where the
corruption is harmless (zero totals, big counts), a valid count store where it cannot be told
(a flipped byte inside a count). Never another exception, never a hang.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_ingest import quiet_anndata_writes, write_loom, write_mtx_dir

from flow import open_counts, write_counts
from flow.errors import FlowError
from flow.ingest import open_source

pytestmark = pytest.mark.slow

NAME = "fuzzinput"  # every input's name starts so: a message names the input if it holds this
EXAMPLES = int(os.environ.get("FLOW_FUZZ_EXAMPLES", "4"))  # per (format, corruption); more: deeper
DEADLINE = 120  # seconds per case (a few cells: seconds even on a loaded machine); more is a hang
BIG = 2**32 + 7  # a count past 2^32 (exact in float64)

FORMATS = ("h5ad-csr", "h5ad-csc", "h5ad-dense", "10x-h5", "10x-mtx", "loom", "anndata-zarr")
SPARSE = ("h5ad-csr", "h5ad-csc", "10x-h5", "anndata-zarr")
KINDS = (
    "truncate",
    "flip-bytes",
    "wrong-shape",
    "indptr-not-monotonic",
    "index-out-of-range",
    "count-past-2^32",
    "nan-count",
    "zero-totals",
)
#: What a case may end in: an error naming the input ("error"), the corrupted input's counts
#: ("same"), either ("error-or-same"), or an error or any valid store ("error-or-valid").
EXPECT = {
    "truncate": "error-or-valid",
    "flip-bytes": "error-or-valid",
    "wrong-shape": "error",
    "indptr-not-monotonic": "error",
    "index-out-of-range": "error",
    "count-past-2^32": "error-or-same",
    "nan-count": "error",
    "zero-totals": "same",
}
CASES = [
    (fmt, kind)
    for fmt in FORMATS
    for kind in KINDS
    if not (kind == "indptr-not-monotonic" and fmt not in SPARSE)
    and not (kind == "index-out-of-range" and fmt not in (*SPARSE, "10x-mtx"))
]
#: Outcomes of the fuzz cases run in this process: printed at the end (see ``_print_tally``).
TALLY: dict[str, int] = {}


# --------------------------------------------------------------------------- inputs


@st.composite
def matrices(draw: st.DrawFn) -> np.ndarray:
    """A small dense count matrix (cells x genes) with at least two cells and one count."""
    n_cells, n_genes = draw(st.integers(2, 14)), draw(st.integers(2, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.integers(1, 500, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.5)
    x[0, 0] = max(x[0, 0], 1)
    return x.astype(np.float64)


def gene_ids(n: int) -> list[str]:
    return [f"ENSG{i:011d}" for i in range(n)]


def barcodes(n: int) -> list[str]:
    return [f"cell{i:03d}-1" for i in range(n)]


def write_input(fmt: str, x: np.ndarray, folder: Path) -> Path:
    """``x`` (cells x genes, float64 holding integers) written as ``fmt``; the input's path."""
    n_cells, n_genes = x.shape
    obs = pd.DataFrame(index=pd.Index(barcodes(n_cells)))
    var = pd.DataFrame(index=pd.Index(gene_ids(n_genes)))
    if fmt.startswith("h5ad"):
        kind = fmt.removeprefix("h5ad-")
        mat = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[kind](x)
        path = folder / f"{NAME}.h5ad"
        ad.AnnData(X=mat.astype(np.float32), obs=obs, var=var).write_h5ad(path)
        return path
    if fmt == "anndata-zarr":
        path = folder / f"{NAME}.zarr"
        with quiet_anndata_writes(), ad.settings.override(zarr_write_format=3):
            ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var).write_zarr(path)
        return path
    if fmt == "10x-h5":
        path = folder / f"{NAME}.h5"
        csr = sp.csr_matrix(x.astype(np.int32))
        with h5py.File(path, "w") as f:
            m = f.create_group("matrix")
            m["data"], m["indices"], m["indptr"] = csr.data, csr.indices, csr.indptr
            m["shape"] = np.array([n_genes, n_cells], dtype=np.int32)
            m["barcodes"] = np.array(barcodes(n_cells), dtype="S")
            feat = m.create_group("features")
            feat["id"] = np.array(gene_ids(n_genes), dtype="S")
            feat["name"] = np.array(gene_ids(n_genes), dtype="S")
            feat["feature_type"] = np.array(["Gene Expression"] * n_genes, dtype="S")
            feat["genome"] = np.array(["GRCh38"] * n_genes, dtype="S")
        return path
    if fmt == "10x-mtx":
        ids = gene_ids(n_genes)
        return write_mtx_dir(folder / f"{NAME}_mtx", x, ids, barcodes(n_cells), gz=False)
    assert fmt == "loom"
    return write_loom(folder / f"{NAME}.loom", x, gene_ids(n_genes), barcodes(n_cells))


# --------------------------------------------------------------------------- corruptions


def files_of(path: Path) -> list[Path]:
    """The files an input consists of (sorted, so that a drawn index picks the same one)."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def truncate(path: Path, data: st.DataObject) -> None:
    files = files_of(path)
    target = files[data.draw(st.integers(0, len(files) - 1))]
    size = target.stat().st_size
    keep = data.draw(st.integers(0, max(size - 1, 0)))
    with open(target, "r+b") as fh:
        fh.truncate(keep)


def flip_bytes(path: Path, data: st.DataObject) -> None:
    files = files_of(path)
    target = files[data.draw(st.integers(0, len(files) - 1))]
    raw = bytearray(target.read_bytes())
    if not raw:
        return
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    target.write_bytes(bytes(raw))


@contextlib.contextmanager
def matrix_group(fmt: str, path: Path) -> Iterator[Any]:
    """The group holding ``data``/``indices``/``indptr`` (or ``X`` dense), opened for writing."""
    if fmt == "anndata-zarr":
        yield zarr.open_group(path, mode="r+")
        return
    with h5py.File(path, "r+") as f:
        yield f


def replace(group: Any, name: str, values: np.ndarray) -> None:
    """Replace array ``name`` of an HDF5 or Zarr group (dtype and shape may change)."""
    parent, _, leaf = name.rpartition("/")
    g = group[parent] if parent else group
    attrs = dict(g[leaf].attrs)
    del g[leaf]
    if isinstance(g, zarr.Group):
        arr = g.create_array(leaf, shape=values.shape, dtype=values.dtype)
        arr[...] = values
    else:
        arr = g.create_dataset(leaf, data=values)
    arr.attrs.update(attrs)


def sparse_names(fmt: str) -> tuple[str, str, str]:
    prefix = "matrix/" if fmt == "10x-h5" else "X/"
    return prefix + "data", prefix + "indices", prefix + "indptr"


def corrupt_values(fmt: str, path: Path, x: np.ndarray, kind: str, data: st.DataObject) -> None:
    """Put a NaN or a count past 2^32 into the stored counts (and into ``x``, the expectation)."""
    value = np.nan if kind == "nan-count" else float(BIG)
    if fmt == "10x-mtx":
        mtx = path / "matrix.mtx"
        lines = mtx.read_text().splitlines()
        row = data.draw(st.integers(3, len(lines) - 1))
        gene, cell, _ = lines[row].split()
        lines[row] = f"{gene} {cell} {'nan' if kind == 'nan-count' else BIG}"
        mtx.write_text("\n".join(lines) + "\n")
        x[int(cell) - 1, int(gene) - 1] = value
        return
    if fmt == "loom":
        with h5py.File(path, "r+") as f:
            m = f["matrix"][...].astype(np.float64)
            gene, cell = (
                data.draw(st.integers(0, m.shape[0] - 1)),
                data.draw(st.integers(0, m.shape[1] - 1)),
            )
            m[gene, cell] = value
            replace(f, "matrix", m)
        x[cell, gene] = value
        return
    with matrix_group(fmt, path) as g:
        if fmt == "h5ad-dense":
            m = g["X"][...].astype(np.float64)
            cell, gene = (
                data.draw(st.integers(0, m.shape[0] - 1)),
                data.draw(st.integers(0, m.shape[1] - 1)),
            )
            m[cell, gene] = value
            replace(g, "X", m)
            x[cell, gene] = value
            return
        dname, iname, pname = sparse_names(fmt)
        values = g[dname][...].astype(np.float64)
        k = data.draw(st.integers(0, len(values) - 1))
        values[k] = value
        replace(g, dname, values)
        indptr, indices = g[pname][...], g[iname][...]
    major = int(np.searchsorted(indptr, k, side="right") - 1)
    if fmt == "h5ad-csc":
        x[indices[k], major] = value
    else:
        x[major, indices[k]] = value


def corrupt_structure(fmt: str, path: Path, x: np.ndarray, kind: str, data: st.DataObject) -> None:
    """A wrong shape, an indptr that goes down, or an index out of range."""
    n_cells, n_genes = x.shape
    if fmt == "10x-mtx":
        if kind == "wrong-shape":  # one gene fewer listed than the header says
            genes = path / "genes.tsv"
            genes.write_text("\n".join(genes.read_text().splitlines()[:-1]) + "\n")
        else:
            mtx = path / "matrix.mtx"
            lines = mtx.read_text().splitlines()
            row = data.draw(st.integers(3, len(lines) - 1))
            _, cell, value = lines[row].split()
            lines[row] = f"{n_genes + data.draw(st.integers(1, 5))} {cell} {value}"
            mtx.write_text("\n".join(lines) + "\n")
        return
    if fmt == "loom":  # one gene ID fewer than the matrix has rows
        with h5py.File(path, "r+") as f:
            replace(f, "row_attrs/ensembl_id", f["row_attrs/ensembl_id"][:-1])
        return
    with matrix_group(fmt, path) as g:
        if fmt == "h5ad-dense":  # a matrix with a gene more than var lists
            replace(g, "X", np.ones((n_cells, n_genes + 1), dtype=np.float32))
            return
        dname, iname, pname = sparse_names(fmt)
        if kind == "wrong-shape":
            if data.draw(st.booleans()):  # indptr one entry short
                replace(g, pname, g[pname][...][:-1])
            else:  # data and indices of different lengths
                replace(g, dname, np.concatenate([g[dname][...], g[dname][...][:1]]))
        elif kind == "indptr-not-monotonic":
            indptr = g[pname][...].astype(np.int64)
            k = data.draw(st.integers(1, len(indptr) - 2))
            indptr[k] = indptr[k + 1] + data.draw(st.integers(1, 3))
            replace(g, pname, indptr.astype(g[pname].dtype))
        else:
            indices = g[iname][...].astype(np.int64)
            minor = n_cells if fmt == "h5ad-csc" else n_genes
            indices[data.draw(st.integers(0, len(indices) - 1))] = minor + data.draw(
                st.integers(0, 1000)
            )
            replace(g, iname, indices.astype(g[iname].dtype))


def zero_totals(x: np.ndarray, data: st.DataObject) -> np.ndarray:
    """``x`` with some cells' counts all zero (the first, the last or any)."""
    rows = data.draw(st.sets(st.integers(0, x.shape[0] - 1), min_size=1))
    x = x.copy()
    x[sorted(rows)] = 0
    return x


# --------------------------------------------------------------------------- running a case


class Hang(BaseException):
    """A conversion ran past its deadline (a BaseException: no ``except Exception`` eats it)."""


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        msg = f"no result after {seconds} s"
        raise Hang(msg)

    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def convert(path: Path, out: Path) -> FlowError | None:
    """Convert ``path`` to ``out`` in this process: the FlowError it ended in, or None."""
    try:
        with deadline(DEADLINE):
            write_counts([open_source(path)], out, block_size=4)
    except FlowError as err:
        return err
    except Hang:
        pytest.fail(f"{path.name}: the conversion hung (over {DEADLINE} s)")
    except Exception:
        pytest.fail(f"{path.name}: not a FlowError:\n{traceback.format_exc()}")
    return None


def stored_counts(out: Path) -> sp.csr_matrix:
    """The counts of a finished store, checked to be a valid CSR matrix of counts."""
    open_counts(out)  # refuses an unfinished store
    x = sp.csr_matrix(ad.read_zarr(out).X)
    assert np.all(np.diff(x.indptr) >= 0)
    assert x.indices.size == 0 or (x.indices.min() >= 0 and x.indices.max() < x.shape[1])
    assert np.all(np.isfinite(x.data))
    assert np.all(x.data > 0)
    assert np.array_equal(x.data, np.round(x.data))
    return x


def check_case(fmt: str, kind: str, x: np.ndarray, data: st.DataObject) -> str:
    """Build, corrupt, convert, check; the outcome (``error`` or ``store``)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        expect = x.copy()
        if kind == "zero-totals":
            expect = zero_totals(expect, data)
        path = write_input(fmt, expect, folder)
        apply: dict[str, Callable[[], None]] = {
            "truncate": lambda: truncate(path, data),
            "flip-bytes": lambda: flip_bytes(path, data),
            "count-past-2^32": lambda: corrupt_values(fmt, path, expect, kind, data),
            "nan-count": lambda: corrupt_values(fmt, path, expect, kind, data),
        }
        for structural in ("wrong-shape", "indptr-not-monotonic", "index-out-of-range"):
            apply[structural] = lambda: corrupt_structure(fmt, path, expect, kind, data)
        apply.get(kind, lambda: None)()
        err = convert(path, folder / "out.zarr")
        want = EXPECT[kind]
        if err is not None:
            assert want != "same", f"{fmt}/{kind}: refused a harmless input: {err}"
            assert NAME in str(err), f"{fmt}/{kind}: the message does not name the input: {err}"
            assert "\n" not in str(err).strip(), f"{fmt}/{kind}: not one line: {err}"
            return "error"
        assert want != "error", f"{fmt}/{kind}: the corrupt input was converted"
        got = stored_counts(folder / "out.zarr")
        if want != "error-or-valid":
            ref = sp.csr_matrix(expect)
            ref.eliminate_zeros()
            assert got.shape == ref.shape
            assert np.array_equal(got.indptr, ref.indptr)
            assert np.array_equal(got.indices, ref.indices)
            assert np.array_equal(got.data, ref.data)
        return "store"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("fmt", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure is reported as drawn
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(x=matrices(), data=st.data())
def test_corrupt_input_ends_in_flow_error_or_correct_store(
    fmt: str, kind: str, x: np.ndarray, data: st.DataObject
) -> None:
    outcome = check_case(fmt, kind, x, data)
    TALLY[f"{kind}:{outcome}"] = TALLY.get(f"{kind}:{outcome}", 0) + 1
    TALLY["cases"] = TALLY.get("cases", 0) + 1


@pytest.fixture(scope="module", autouse=True)
def _print_tally() -> Iterator[None]:
    """Print the outcomes of the cases this process ran (with ``-s``), by corruption; under
    ``pytest -n`` each worker prints its own share."""
    yield
    if TALLY:
        print(f"\nfuzzed cases: {dict(sorted(TALLY.items()))}")


def test_uncorrupted_inputs_convert_exactly(tmp_path: Path) -> None:
    """The control: every builder's uncorrupted input converts to its exact counts (so an
    error in the fuzz cases comes from the corruption, not from the builder)."""
    x = np.array([[1, 0, 3], [0, 0, 0], [7, 8, 0], [0, 2, 500]], dtype=np.float64)
    for fmt in FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        path = write_input(fmt, x, folder)
        assert convert(path, folder / "out.zarr") is None
        got = stored_counts(folder / "out.zarr")
        assert np.array_equal(got.toarray(), x)


def test_gzip_mtx_truncated_names_the_file(tmp_path: Path) -> None:
    """A gzipped MTX cut short (a download stopped half-way) is an error naming the file."""
    x = np.arange(24, dtype=np.float64).reshape(6, 4)
    folder = write_mtx_dir(tmp_path / f"{NAME}_gz", x, gene_ids(4), barcodes(6), gz=True)
    raw = (folder / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(raw[: len(raw) // 2])
    assert gzip.decompress(raw)  # the whole file was fine
    err = convert(folder, tmp_path / "out.zarr")
    assert err is not None
    assert NAME in str(err)
