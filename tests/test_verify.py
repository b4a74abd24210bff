"""Damaged chunks: every array carries a crc32c checksum per chunk; a flipped byte is named on
read (store, array, chunk, how to repair); ``flow verify`` lists exactly the damaged chunks;
``flow verify --repair`` plus the same tokenize recomputes only the damaged blocks of an
encoding store, byte-identical to an undamaged one; stores without checksums still read."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from flow import pipeline
from flow.cli import main
from flow.datasets import write_synthetic
from flow.encode.store import open_encoding
from flow.errors import DamagedChunkError, IncompleteStoreError, InputError
from flow.medians import open_medians
from flow.store import open_counts
from flow.verify import repair_encoding, verify

from helpers import array_bytes, flow_meta, stored_files

N_CELLS, BLOCK = 3_000, 500


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A count store (6 blocks of 500 cells), its median set, and its encoding store."""
    tmp = tmp_path_factory.mktemp("verify")
    paths = {n: tmp / f"{n}.zarr" for n in ("counts", "medians", "encoding")}
    write_synthetic(paths["counts"], N_CELLS, 400, seed=3, block_size=BLOCK, mean_genes=120)
    pipeline.medians([paths["counts"]], paths["medians"])
    pipeline.tokenize(paths["counts"], paths["encoding"], medians=paths["medians"])
    return paths


def copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def flip_byte(chunk: Path, offset: int | None = None) -> None:
    """Change one bit of one byte of a stored chunk (or shard), in place."""
    data = bytearray(chunk.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0x10
    chunk.write_bytes(bytes(data))


def chunk_file(store: Path, array: str, key: str) -> Path:
    path = store / array / key
    assert path.is_file(), f"{path} is not a stored chunk"
    return path


def _read_counts_block(store: Path) -> Any:
    return open_counts(store).counts.blocks[0].compute()


#: (store, array, chunk key, a read through flow that touches that chunk)
CASES: list[tuple[str, str, str, Callable[[Path], Any]]] = [
    ("counts", "X/data", "c/0", _read_counts_block),
    ("counts", "X/indices", "c/0", _read_counts_block),
    ("counts", "X/indptr", "c/0", _read_counts_block),
    ("counts", "obs/n_counts", "c/0", lambda s: open_counts(s).obs_column("n_counts")),
    ("counts", "obs/_index", "c/0", lambda s: open_counts(s).obs_column("_index")),
    ("counts", "var/_index", "c/0", lambda s: open_counts(s).var),
    ("medians", "median", "c/0", lambda s: open_medians(s).medians),
    ("medians", "digest_mean", "c/0", lambda s: open_medians(s).medians),
    ("encoding", "bands/0/tokens", "c/0", lambda s: open_encoding(s).tokens.compute()),
    ("encoding", "bands/0/counts", "c/0", lambda s: open_encoding(s).values.compute()),
    ("encoding", "length", "c/2", lambda s: open_encoding(s).lengths),
    ("encoding", "cell", "c/1", lambda s: open_encoding(s).cell_column("cell")),
]


@pytest.mark.parametrize(
    ("kind", "array", "key", "read"), CASES, ids=[f"{k}:{a}" for k, a, _, _ in CASES]
)
def test_flipped_byte_is_named_on_read_and_listed_by_verify(
    stores: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    array: str,
    key: str,
    read: Callable[[Path], Any],
) -> None:
    store = copy(stores[kind], tmp_path)
    read(store)  # intact: reads
    flip_byte(chunk_file(store, array, key))

    with pytest.raises(DamagedChunkError) as info:
        read(store)
    message = str(info.value)
    assert "\n" not in message
    assert f"in {store}: array {array} chunk {key}" in message
    assert f"`flow verify {store}`" in message
    assert (info.value.store, info.value.array) == (str(store), array)
    assert info.value.chunk.startswith(key)
    if kind == "encoding":
        assert f"`flow verify --repair {store}`" in message

    report = verify(store)
    assert not report.ok
    assert [(d.array, d.chunk.split(" ")[0]) for d in report.damaged] == [(array, key)]
    assert report.problems == ()
    assert report.complete

    assert main(["verify", "-q", str(store)]) == 1
    out = capsys.readouterr().out
    assert f"damaged: {array} chunk {key}" in out
    assert out.count("damaged: ") == 1


def test_the_cli_says_one_line_for_a_damaged_input(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    medians = copy(stores["medians"], tmp_path)
    flip_byte(chunk_file(medians, "median", "c/0"))
    argv = ["tokenize", str(stores["counts"]), "-o", str(tmp_path / "e.zarr"), "-q"]
    assert main([*argv, "--medians", str(medians)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("flow tokenize: error: damaged chunk in ")
    assert "array median chunk c/0" in err
    assert "`flow medians` command" in err
    assert not (tmp_path / "e.zarr").exists()


def test_clean_stores_verify(stores: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for store in stores.values():
        report = verify(store)
        assert report.ok, report.summary()
        assert report.damaged == ()
        assert report.unchecked == ()
        assert report.n_chunks >= report.n_arrays > 0
    assert main(["verify", "-q", *map(str, stores.values())]) == 0
    out = capsys.readouterr().out
    assert out.count("  ok") == 3
    for kind in ("counts", "medians", "encoding"):
        assert f"{kind} store" in out


def test_every_array_carries_checksums(stores: dict[str, Path]) -> None:
    for store in stores.values():
        for path, node in zarr.open_group(store, mode="r").members(max_depth=None):
            if isinstance(node, zarr.Array):
                codecs = list(node.compressors)
                assert isinstance(codecs[-1], Crc32cCodec), (store.name, path)


def test_verify_reports_structure(stores: dict[str, Path], tmp_path: Path) -> None:
    store = copy(stores["counts"], tmp_path)
    shutil.rmtree(store / "X" / "indptr")
    group = zarr.open_group(store, mode="r+")
    meta = dict(group.attrs["flow"])  # type: ignore[arg-type]
    meta["complete"] = False
    group.attrs["flow"] = meta
    report = verify(store)
    assert not report.ok
    assert not report.complete
    assert report.problems == ("array X/indptr is missing",)
    assert main(["verify", "-q", str(store)]) == 1


def test_damaged_metadata_is_named(
    stores: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A changed byte in an array's zarr.json: verify names the document, a read is one line."""
    store = copy(stores["encoding"], tmp_path)
    document = store / "length" / "zarr.json"
    text = document.read_text()
    document.write_text(text.replace('"shape"', '"shape" :'))  # no longer JSON
    report = verify(store)
    assert not report.ok
    assert report.problems == (
        "metadata length/zarr.json is damaged (not valid JSON): its arrays were not read",
    )
    assert main(["verify", "-q", str(store)]) == 1
    capsys.readouterr()
    assert main(["dropped", str(store), "--cell", "0", "--cutoff", "10", "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("flow dropped: error: a store's metadata (zarr.json) is damaged")


def test_repair_recomputes_only_damaged_blocks(stores: dict[str, Path], tmp_path: Path) -> None:
    encoding = copy(stores["encoding"], tmp_path)
    n_blocks = -(-N_CELLS // BLOCK)
    damaged = {
        ("bands/0/tokens", "c/0"),  # block 0
        ("bands/0/counts", "c/0"),  # block 0 again
        ("length", "c/4"),  # block 4
        ("block_token_cells", "c/2/0"),  # block 2
        ("token_cells", "c/0"),  # summed again at the end: no block
    }
    for array, key in damaged:
        flip_byte(chunk_file(encoding, array, key))
    assert {(d.array, d.chunk) for d in verify(encoding).damaged} == damaged

    assert main(["verify", "--repair", "-q", str(encoding)]) == 1
    with pytest.raises(IncompleteStoreError):
        open_encoding(encoding)  # marked unfinished until tokenize finishes it

    enc = pipeline.tokenize(stores["counts"], encoding, medians=stores["medians"])
    assert enc.attrs["blocks_written_last_run"] == 3  # blocks 0, 2 and 4 of 6
    assert n_blocks == 6
    assert verify(encoding).ok
    assert stored_files(str(encoding)) == stored_files(str(stores["encoding"]))
    assert flow_meta(str(encoding), drop=("counts_url", "blocks_written_last_run")) == flow_meta(
        str(stores["encoding"]), drop=("counts_url", "blocks_written_last_run")
    )


def test_repair_refuses_what_blocks_do_not_rewrite(stores: dict[str, Path], tmp_path: Path) -> None:
    encoding = copy(stores["encoding"], tmp_path)
    flip_byte(chunk_file(encoding, "cell", "c/1"))
    with pytest.raises(InputError, match="--overwrite"):
        repair_encoding(encoding)
    assert open_encoding(encoding).attrs["complete"]  # left as it was

    counts = copy(stores["counts"], tmp_path)
    flip_byte(chunk_file(counts, "X/indptr", "c/0"))
    with pytest.raises(InputError, match="command that made it"):
        repair_encoding(counts)


def strip_checksums(store: Path) -> int:
    """Rewrite every array of ``store`` as flow wrote it before checksums (same chunks, same
    compressors, no crc32c); returns how many arrays were rewritten."""
    group = zarr.open_group(store, mode="r+")
    arrays = [(p, a) for p, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]
    for path, arr in arrays:
        values = arr[...]
        new = zarr.create_array(
            group.store,
            name=path,
            shape=arr.shape,
            dtype=arr.dtype,
            chunks=arr.chunks,
            shards=arr.shards,
            compressors=[c for c in arr.compressors if not isinstance(c, Crc32cCodec)],
            fill_value=arr.fill_value,
            dimension_names=arr.metadata.dimension_names,  # type: ignore[union-attr]
            attributes=dict(arr.attrs),
            overwrite=True,
        )
        if values.size:
            new[...] = values
    return len(arrays)


def test_stores_without_checksums_still_read(stores: dict[str, Path], tmp_path: Path) -> None:
    counts = copy(stores["counts"], tmp_path)
    n_arrays = strip_checksums(counts)
    assert array_bytes(str(counts)) == array_bytes(str(stores["counts"]))
    report = verify(counts)
    assert report.ok
    assert len(report.unchecked) == n_arrays > 0
    assert "have no checksums" in report.summary()

    encoding = tmp_path / "encoding.zarr"
    enc = pipeline.tokenize(counts, encoding, medians=stores["medians"])
    reference = open_encoding(stores["encoding"])
    np.testing.assert_array_equal(enc.tokens.compute(), reference.tokens.compute())
    np.testing.assert_array_equal(enc.counts.compute(), reference.counts.compute())


@pytest.mark.distributed
def test_verify_on_a_distributed_cluster(
    stores: dict[str, Path],
    tmp_path: Path,
    local_cluster_address: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import Client

    from flow import verify as verify_module

    monkeypatch.setattr(verify_module, "LOCAL_BYTES", 0)  # on the cluster, however small
    encoding = copy(stores["encoding"], tmp_path)
    flip_byte(chunk_file(encoding, "bands/0/tokens", "c/0"))
    with Client(local_cluster_address, set_as_default=True) as client:
        report = verify(encoding)
        assert [(d.array, d.chunk) for d in report.damaged] == [("bands/0/tokens", "c/0")]
        with pytest.raises(DamagedChunkError, match="array bands/0/tokens chunk c/0"):
            client.compute(open_encoding(encoding).tokens).result()
