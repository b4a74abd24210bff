"""The orchestration: ``flow run`` chains opened artifacts, opening each store and dictionary once.

File opens are counted with a Python audit hook (``sys.addaudithook``, event ``open``): every
real ``open()`` of a file by flow, zarr's local store, h5py's Python file objects and the
pickle reader is seen, in this process. The scheduler is the synchronous one, so Dask tasks
run here too; tasks open the chunks they read, so the assertions are about what only the
orchestration reads: dictionary files, and the per-cell and per-gene tables (``obs``, ``var``)
that stages used to re-read from the store's path.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from flow import pipeline

_OPENS: collections.Counter[str] | None = None


def _count_open(event: str, args: tuple[object, ...]) -> None:
    if _OPENS is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENS[os.path.realpath(os.fsdecode(args[0]))] += 1


sys.addaudithook(_count_open)  # audit hooks cannot be removed: it counts only while armed


class counted_opens:
    """Count file opens (by real path) inside a ``with`` block."""

    def __enter__(self) -> collections.Counter[str]:
        global _OPENS
        _OPENS = collections.Counter()
        return _OPENS

    def __exit__(self, *exc: object) -> None:
        global _OPENS
        _OPENS = None


def _under(opens: collections.Counter[str], root: Path, part: str) -> dict[str, int]:
    """Opens of files under ``root`` whose path relative to it starts with ``part``."""
    base = os.path.realpath(root)
    out = {}
    for path, n in opens.items():
        rel = os.path.relpath(path, base)
        if not rel.startswith("..") and rel.startswith(part):
            out[rel] = n
    return out


@pytest.fixture
def v2(shared_data: Path) -> dict[str, Path]:
    d = shared_data / "geneformer" / "v2_gc104M"
    return {
        "medians": d / "gene_median_dictionary_gc104M.pkl",
        "vocabulary": d / "token_dictionary_gc104M.pkl",
        "gene_mapping": d / "ensembl_mapping_dict_gc104M.pkl",
    }


def test_run_with_dictionaries_opens_each_file_once(shared_data, v2, tmp_path):
    h5 = shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5"
    out = tmp_path / "out"
    with counted_opens() as opens:
        result = pipeline.run([h5], out, preset="V2", block_size=400, **v2)
    for name, path in v2.items():
        assert opens[os.path.realpath(path)] == 1, name
    counts = out / "counts.zarr"
    tables = {**_under(opens, counts, "obs/"), **_under(opens, counts, "var/")}
    chunks = {rel: n for rel, n in tables.items() if "/c/" in rel and not rel.endswith(".partial")}
    assert chunks, "the count store's obs/var chunks were never read"
    assert max(chunks.values()) == 1, {k: v for k, v in chunks.items() if v > 1}
    assert result.encoding.attrs["n_cells"] == 996
    assert result.paths["medians"] == str(v2["medians"])


def test_run_computing_medians_never_reads_them_back(shared_data, tmp_path):
    h5 = shared_data / "pbmc1k_v2" / "pbmc_1k_v2_filtered_feature_bc_matrix.h5"
    out = tmp_path / "out"
    with counted_opens() as opens:
        result = pipeline.run([h5], out, block_size=500)
    written = _under(opens, out / "medians.zarr", "")
    data_reads = {r: n for r, n in written.items() if "/c/" in r and not r.endswith(".partial")}
    # zarr writes chunks through temporary files: no chunk of the median set is opened by name
    assert data_reads == {}
    # the medians tokenize used are the ones computed (same object, same values)
    expressed = ~np.isnan(result.medians.medians)
    assert expressed.sum() > 10_000
    reopened = pipeline.load_medians(out / "medians.zarr")
    np.testing.assert_array_equal(reopened.medians, result.medians.medians)


def test_a_bad_preset_stops_run_before_any_input_is_read(tmp_path):
    """The preset is resolved once, first: neither a preset nor an input size is refused
    before the (missing) input is looked at."""
    with pytest.raises(ValueError, match="preset"):
        pipeline.run(["does-not-matter"], tmp_path / "o", preset=None, input_size=None)
