"""flow.ingest on fsspec URLs: every format read from ``memory://`` and ``file://`` gives the
same count store, byte for byte, as the local file; storage options reach the filesystem and
never appear in messages.

The real PBMC inputs and small files derived from them are uploaded to fsspec's in-memory
filesystem (``fs.put``), and to ``flowtest://``: the same in-memory filesystem, but one that
demands a token (as object stores demand credentials) and counts the bytes it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import shutil
import socket
import threading
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import anndata as ad
import fsspec
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from test_ingest import N_SUBSET, quiet_anndata_writes, reference_h5ad, write_loom, write_mtx_dir

from flow import InputError, open_counts, pipeline, write_counts
from flow._io import file_fingerprint
from flow.ingest import ReadOptions, detect_format, open_source
from flow.ingest._fs import redact

TOKEN = "flowtest-token-3f9b2c1d"  # distinctive, so that a leak into any message is found
SECRET = "wrong-secret-8e41a7"


# --------------------------------------------------------------------------- a keyed filesystem


class _CountingFile(io.BytesIO):
    """A private read-only copy of a stored file that counts the bytes read from it."""

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        KeyedMemoryFileSystem.bytes_read += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        n = super().readinto(buffer)
        KeyedMemoryFileSystem.bytes_read += n
        return n


class KeyedMemoryFileSystem(MemoryFileSystem):
    """``flowtest://``: an in-memory filesystem that refuses a wrong token and unknown options."""

    protocol = "flowtest"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    bytes_read: ClassVar[int] = 0  # through open files
    bytes_cat: ClassVar[int] = 0  # through cat_file (range reads)

    def __init__(self, *, token: str | None = None, asynchronous: bool = False) -> None:
        # (zarr asks every filesystem for asynchronous=True, then wraps sync ones)
        if token != TOKEN:
            msg = f"token {token!r} refused by the server"  # as careless backends do
            raise PermissionError(msg)
        super().__init__()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith("flowtest://"):
            path = path[len("flowtest://") :]
        return super()._strip_protocol(path)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if mode != "rb":
            return super()._open(path, mode, **kwargs)
        path = self._strip_protocol(path)
        if path not in self.store:
            raise FileNotFoundError(path)
        return _CountingFile(self.store[path].getvalue())

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kw: Any):
        data = super().cat_file(path, start, end, **kw)
        KeyedMemoryFileSystem.bytes_cat += len(data)
        return data


fsspec.register_implementation("flowtest", KeyedMemoryFileSystem, clobber=True)
KEYED = {"token": TOKEN}


# --------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def local_inputs(pbmc_inputs, tmp_path_factory) -> dict[str, Path]:
    """Every format (and the layouts with their own code paths), as local files."""
    root = tmp_path_factory.mktemp("remote-inputs")
    x, ids, barcodes = reference_h5ad(pbmc_inputs["h5ad"])
    x, barcodes = x[:N_SUBSET], barcodes[:N_SUBSET]
    n_counts = np.asarray(x.sum(axis=1)).ravel().astype(np.int64)
    obs = pd.DataFrame(
        {"n_counts": n_counts, "cell_type": pd.Categorical(["T", "B"] * (N_SUBSET // 2))},
        index=pd.Index(list(barcodes)),
    )
    var = pd.DataFrame(index=pd.Index(list(ids)))
    out = {kind: Path(pbmc_inputs[kind]) for kind in ("h5ad", "10x-h5", "10x-mtx")}
    out["10x-mtx-file"] = out["10x-mtx"] / "matrix.mtx.gz"
    out["h5ad-csc"] = root / "csc.h5ad"
    ad.AnnData(X=sp.csc_matrix(x), obs=obs, var=var).write_h5ad(out["h5ad-csc"])
    out["h5ad-named-h5"] = root / "anndata.h5"  # told apart from 10x h5 by its contents
    ad.AnnData(X=x, obs=obs, var=var).write_h5ad(out["h5ad-named-h5"])
    out["loom"] = write_loom(root / "pbmc.loom", x, ids, barcodes, n_counts=n_counts)
    with quiet_anndata_writes():
        out["zarr3"] = root / "pbmc3.zarr"
        with ad.settings.override(zarr_write_format=3):
            ad.AnnData(X=x, obs=obs, var=var).write_zarr(out["zarr3"])
        out["zarr2-csc"] = root / "pbmc2.zarr"
        with ad.settings.override(zarr_write_format=2):
            ad.AnnData(X=sp.csc_matrix(x), obs=obs, var=var).write_zarr(out["zarr2-csc"])
    out["mtx-unsorted"] = write_mtx_dir(root / "unsorted", x, ids, barcodes, order="gene", gz=False)
    return out


def _upload(fs: fsspec.AbstractFileSystem, local: Path, remote: str) -> None:
    if local.is_dir():
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            fs.pipe_file(f"{remote}/{path.relative_to(local).as_posix()}", path.read_bytes())
    else:
        fs.pipe_file(remote, local.read_bytes())


@pytest.fixture(scope="module")
def urls(local_inputs) -> Iterator[dict[tuple[str, str], str]]:
    """(scheme, kind) -> URL of the input: on ``memory://``, ``flowtest://`` and ``file://``."""
    prefix = f"flow-remote-{uuid.uuid4().hex[:8]}"
    memory, keyed = fsspec.filesystem("memory"), fsspec.filesystem("flowtest", **KEYED)
    out: dict[tuple[str, str], str] = {}
    for kind, path in local_inputs.items():
        if kind == "10x-mtx-file":  # the matrix file inside the uploaded directory
            for scheme in ("memory", "flowtest"):
                out[scheme, kind] = out[scheme, "10x-mtx"] + "/matrix.mtx.gz"
        else:
            for scheme, fs in (("memory", memory), ("flowtest", keyed)):
                _upload(fs, path, f"/{prefix}/{path.name}")
                out[scheme, kind] = f"{scheme}://{prefix}/{path.name}"
        out["file", kind] = path.resolve().as_uri()
    yield out
    memory.rm(f"/{prefix}", recursive=True)
    keyed.rm(f"/{prefix}", recursive=True)


# --------------------------------------------------------------------------- comparing stores


def store_files(store: Path) -> dict[str, str]:
    """SHA-256 of every stored file of X, obs and var (what the counts and cells are), but
    the ``obs/source`` category, which is the input's path or URL."""
    out = {}
    for path in sorted(p for p in store.rglob("*") if p.is_file()):
        rel = path.relative_to(store).as_posix()
        if rel.split("/")[0] in ("X", "obs", "var") and not rel.startswith(
            "obs/source/categories/c"
        ):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def flow_attrs(store: Path) -> dict[str, Any]:
    return dict(zarr.open_group(store, mode="r").attrs["flow"])


def assert_same_store(
    got: Path, want: Path, *, url: str, want_path: str, same_fingerprint: bool = True
) -> None:
    files = store_files(got)
    assert {"X/data/c/0", "X/indices/c/0", "X/indptr/c/0", "var/_index/c/0"} <= set(files)
    assert files == store_files(want)
    a, b = flow_attrs(got), flow_attrs(want)
    (sa,), (sb,) = a.pop("sources"), b.pop("sources")
    assert a == b  # content hash, nnz, shape, block offsets, ...
    assert (sa["path"], sb["path"]) == (url, want_path)
    assert (sa["format"], sa["n_cells"]) == (sb["format"], sb["n_cells"])
    assert (sa["fingerprint"] == sb["fingerprint"]) is same_fingerprint
    sources = open_counts(got).obs["source"]
    assert sources.cat.categories.tolist() == [url]


FORMAT = {
    "h5ad": "h5ad",
    "10x-h5": "10x-h5",
    "10x-mtx": "10x-mtx",
    "10x-mtx-file": "10x-mtx",
    "h5ad-csc": "h5ad",
    "h5ad-named-h5": "h5ad",
    "loom": "loom",
    "zarr3": "anndata-zarr",
    "zarr2-csc": "anndata-zarr",
    "mtx-unsorted": "10x-mtx",
}
BLOCK = 512


@pytest.fixture(scope="module")
def local_stores(local_inputs, tmp_path_factory) -> dict[str, Path]:
    """Each input converted from its local path (the reference)."""
    root = tmp_path_factory.mktemp("remote-local-stores")
    out = {}
    for kind, path in local_inputs.items():
        out[kind] = root / f"{kind}.zarr"
        write_counts([open_source(path)], out[kind], block_size=BLOCK)
    return out


# --------------------------------------------------------------------------- every format


@pytest.mark.data
@pytest.mark.parametrize("scheme", ["memory", "file"])
@pytest.mark.parametrize("kind", list(FORMAT))
def test_url_input_same_store_as_local(kind, scheme, urls, local_inputs, local_stores, tmp_path):
    url = urls[scheme, kind]
    assert detect_format(url) == FORMAT[kind]
    src = open_source(url, storage_options={})
    local = open_source(local_inputs[kind])
    assert (src.info.path, src.info.format) == (url, FORMAT[kind])
    assert src.info.fingerprint == local.info.fingerprint  # same bytes, same fingerprint
    write_counts([src], tmp_path / "x.zarr", block_size=BLOCK)
    assert_same_store(
        tmp_path / "x.zarr", local_stores[kind], url=url, want_path=str(local_inputs[kind])
    )
    (want,) = flow_attrs(local_stores[kind])["sources"]
    extra = [n for n in src.info.notes if n not in want["notes"]]
    if FORMAT[kind] == "10x-mtx":  # the one format read whole (streamed, twice): said so
        assert len(extra) == 1
        assert "streamed from its URL twice" in extra[0]
    else:
        assert extra == []
    assert all(n in src.info.notes for n in want["notes"])  # e.g. "transposed through ..."


@pytest.mark.data
def test_file_fingerprint_of_urls(local_inputs, urls):
    """A URL's fingerprint is the local file's (directories too); local stays as it was."""
    for kind in ("h5ad", "10x-mtx", "loom"):
        want = file_fingerprint(local_inputs[kind])
        for scheme in ("memory", "file", "flowtest"):
            options = KEYED if scheme == "flowtest" else None
            assert file_fingerprint(urls[scheme, kind], storage_options=options) == want
    path = local_inputs["h5ad"]  # > 2 MiB: both ends hashed
    h = hashlib.sha256()
    data = path.read_bytes()
    h.update(str(len(data)).encode())
    h.update(data[: 1 << 20])
    if len(data) > 1 << 20:
        h.update(data[max(len(data) - (1 << 20), 1 << 20) :][: 1 << 20])
    assert file_fingerprint(path) == h.hexdigest()


# --------------------------------------------------------------------------- storage options


@pytest.mark.data
@pytest.mark.parametrize("kind", ["h5ad", "10x-h5", "10x-mtx", "loom", "zarr3"])
def test_storage_options_reach_the_reader(kind, urls, local_inputs, local_stores, tmp_path):
    url = urls["flowtest", kind]
    src = open_source(url, storage_options=KEYED)
    write_counts([src], tmp_path / "x.zarr", block_size=BLOCK)
    assert_same_store(
        tmp_path / "x.zarr", local_stores[kind], url=url, want_path=str(local_inputs[kind])
    )
    for options in (None, {"token": SECRET}):
        with pytest.raises(InputError, match="access denied") as info:
            open_source(url, storage_options=options)
        text = "".join(traceback.format_exception(info.value))
        assert url in str(info.value)
        assert SECRET not in text
        assert TOKEN not in text
    with pytest.raises(InputError, match=r"unexpected keyword argument 'bogus'") as info:
        open_source(url, storage_options={**KEYED, "bogus": SECRET})
    assert url in str(info.value)
    assert SECRET not in "".join(traceback.format_exception(info.value))


@pytest.mark.data
def test_pipeline_convert_passes_storage_options(urls, local_inputs, local_stores, tmp_path):
    """pipeline.convert gives its storage_options to the inputs as well as to the output;
    local inputs ignore them."""
    url = urls["flowtest", "h5ad"]
    out = f"flowtest://out-{uuid.uuid4().hex[:8]}/x.zarr"
    keyed = fsspec.filesystem("flowtest", **KEYED)
    remote = out.removeprefix("flowtest:/")
    try:
        pipeline.convert([url], out, block_size=BLOCK, storage_options=KEYED)
        keyed.get(remote, str(tmp_path / "x.zarr"), recursive=True)
    finally:
        if keyed.exists(remote):
            keyed.rm(remote.rsplit("/", 1)[0], recursive=True)
    assert_same_store(
        tmp_path / "x.zarr", local_stores["h5ad"], url=url, want_path=str(local_inputs["h5ad"])
    )
    local = pipeline.convert(
        [local_inputs["h5ad"]], tmp_path / "y.zarr", block_size=BLOCK, storage_options=KEYED
    )
    assert local.attrs["sources"][0]["path"] == str(local_inputs["h5ad"])
    assert store_files(tmp_path / "y.zarr") == store_files(local_stores["h5ad"])


@pytest.mark.data
def test_remote_hdf5_is_read_in_ranges(urls, local_inputs):
    """Opening a remote h5ad reads its metadata and two MiB to fingerprint it, none of the
    counts; one block reads little more than that block's compressed chunks."""
    path = local_inputs["h5ad"]
    with h5py.File(path, "r") as f:
        counts_bytes = sum(f[f"X/{k}"].id.get_storage_size() for k in ("data", "indices"))
        indptr = f["X/indptr"][:]
    size = path.stat().st_size
    KeyedMemoryFileSystem.bytes_read = KeyedMemoryFileSystem.bytes_cat = 0
    src = open_source(urls["flowtest", "h5ad"], storage_options=KEYED)
    opened = KeyedMemoryFileSystem.bytes_read
    assert KeyedMemoryFileSystem.bytes_cat == 2 << 20  # the first and last MiB
    assert opened < size - counts_bytes, (opened, size, counts_bytes)  # (var's 33k strings)
    next(iter(src.iter_blocks(100)))
    one_block = KeyedMemoryFileSystem.bytes_read - opened
    share = counts_bytes * int(indptr[100]) / int(indptr[-1])  # the block's part of the counts
    assert one_block < 2 * share + (256 << 10), (one_block, share)


@pytest.mark.data
@pytest.mark.parametrize("kind", ["h5ad", "h5ad-named-h5", "10x-h5", "loom"])
def test_remote_hdf5_is_opened_once_for_its_metadata(kind, urls, local_inputs, monkeypatch):
    """A remote HDF5 input (an ``.h5`` told apart by its contents included) is opened once
    by open_source, and once more by the first pass over its counts."""
    opened: list[object] = []

    class CountingFile(h5py.File):
        def __init__(self, name: Any, *args: Any, **kwargs: Any) -> None:
            opened.append(name)
            super().__init__(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", CountingFile)
    src = open_source(urls["flowtest", kind], storage_options=KEYED)
    assert len(opened) == 1
    assert src.info.format == FORMAT[kind]
    blocks = src.iter_blocks(100)
    first = next(blocks)
    assert len(opened) == 2
    blocks.close()
    local = next(iter(open_source(local_inputs[kind]).iter_blocks(100)))
    assert (first != local).nnz == 0  # the same first block as read from the local file


@pytest.fixture(scope="module")
def http_root(local_inputs, tmp_path_factory) -> Iterator[str]:
    """The inputs served over HTTP (range requests, directory listings) by aiohttp."""
    web = pytest.importorskip("aiohttp.web")
    folder = tmp_path_factory.mktemp("www")
    for kind in ("h5ad", "10x-h5", "10x-mtx", "loom", "zarr3"):  # (aiohttp lists no symlinks)
        path = local_inputs[kind]
        (shutil.copytree if path.is_dir() else shutil.copyfile)(path, folder / kind)
    port = _closed_port()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_static("/", folder, show_index=True)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.mark.data
@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("h5ad", "h5ad"),
        ("10x-h5", "10x-h5"),
        ("10x-mtx", "10x-mtx"),
        ("10x-mtx-file", "10x-mtx/matrix.mtx.gz"),
        ("loom", "loom"),
        ("zarr3", "zarr3"),
    ],
)
def test_http_urls(kind, name, http_root, local_inputs, local_stores, tmp_path):
    """https:// works the same way (here plain HTTP on localhost, served with ranges)."""
    url = f"{http_root}/{name}"
    # served without extensions but the matrix file's: the others need format=
    src = open_source(url) if "." in name else open_source(url, ReadOptions(format=FORMAT[kind]))
    write_counts([src], tmp_path / "x.zarr", block_size=BLOCK)
    assert_same_store(
        tmp_path / "x.zarr",
        local_stores[kind],
        url=url,
        want_path=str(local_inputs[kind]),
        same_fingerprint=kind != "zarr3",  # HTTP listings have no sizes
    )


# --------------------------------------------------------------------------- errors


def test_missing_url(tmp_path):
    base = f"memory://flow-missing-{uuid.uuid4().hex[:8]}"
    for url in (f"{base}/x.h5ad", f"{base}/mtx", (tmp_path / "nope.h5ad").as_uri()):
        with pytest.raises(InputError, match=r"not found") as info:
            open_source(url)
        assert str(info.value).startswith(f"{url}: ")
        with pytest.raises(InputError, match=r"not found"):
            open_source(url, ReadOptions(format="h5ad"))
    with pytest.raises(InputError, match=r"no such file or directory"):  # local: as before
        open_source(tmp_path / "nope.h5ad")


def test_damaged_remote_inputs(tmp_path):
    fs = fsspec.filesystem("memory")
    base = f"flow-damaged-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(f"/{base}/garbage.h5ad", b"not an hdf5 file at all" * 100)
        with pytest.raises(InputError, match=r"garbage\.h5ad: cannot be opened as HDF5"):
            open_source(f"memory://{base}/garbage.h5ad")
        x = sp.csr_matrix(np.arange(1, 61).reshape(20, 3) % 7)
        folder = write_mtx_dir(
            tmp_path / "mtx", x, ["G1", "G2", "G3"], [f"c{i}" for i in range(20)], gz=True
        )
        data = (folder / "matrix.mtx.gz").read_bytes()
        (folder / "matrix.mtx.gz").write_bytes(data[: len(data) // 2])
        _upload(fs, folder, f"/{base}/mtx")
        with pytest.raises(InputError, match=r"matrix\.mtx\.gz.*truncated"):
            list(open_source(f"memory://{base}/mtx").iter_blocks(5))
        fs.pipe_file(f"/{base}/empty/readme.txt", b"")
        with pytest.raises(InputError, match=r"neither matrix\.mtx"):
            open_source(f"memory://{base}/empty")
    finally:
        fs.rm(f"/{base}", recursive=True)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("problem", ["bogus option", "unreachable endpoint"])
def test_s3_errors_do_not_show_credentials(problem):
    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    options: dict[str, Any] = {
        "key": "AKIAFLOWTEST",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": endpoint},
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2},
    }
    if problem == "bogus option":
        options["bogus_option"] = SECRET
    url = "s3://flow-bucket/pbmc.h5ad"
    with pytest.raises(InputError) as info:
        open_source(url, storage_options=options)
    message = str(info.value)
    assert message.startswith(f"{url}: ")
    assert "bogus_option" in message if problem == "bogus option" else "connect" in message
    text = "".join(traceback.format_exception(info.value))
    for value in (SECRET, "AKIAFLOWTEST", endpoint):
        assert value not in text


def test_redact():
    options = {"key": "abc", "secret": SECRET, "client_kwargs": {"endpoint_url": "http://h:1"}}
    text = f"bad key abc with {SECRET} at http://h:1/b/x for s3://b/abc.h5ad"
    got = redact(text, options, keep="s3://b/abc.h5ad")
    assert got == "bad key *** with *** at ***/b/x for s3://b/abc.h5ad"
    assert redact("reading the path", {"addressing_style": "path"}) == "reading the path"
    assert redact(text, None) == text
