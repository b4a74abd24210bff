"""Chunk checksums: the codecs that add them, and a one-line error naming a damaged chunk.

Every array flow writes ends its codecs with Zarr v3's ``crc32c`` (:func:`checked`), so a
flipped byte anywhere is detected when its chunk is read. zarr reports that as a bare
``ValueError`` ("Stored and computed checksum do not match") that names neither the store nor
the chunk. :class:`CheckedCodecPipeline` is zarr's own codec pipeline with one addition: when a
batch of chunk reads fails its checksum, it finds the chunk that failed and raises
:class:`~flow.errors.DamagedChunkError`, naming the store, the array, the chunk key and how to
repair it. Importing this module makes it zarr's pipeline (unless another one was configured);
the pipeline is pickled with every zarr array, so workers that read a chunk import it too. Old
stores without checksums still read: nothing changes for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.registry import register_pipeline
from zarr.storage import FsspecStore, LocalStore, StorePath

from .errors import DamagedChunkError

if TYPE_CHECKING:
    from zarr.abc.codec import BytesBytesCodec
    from zarr.abc.store import ByteGetter
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import NDBuffer
    from zarr.core.indexing import SelectorTuple

__all__ = [
    "CHECKSUM",
    "DEFAULT_CODECS",
    "CheckedCodecPipeline",
    "checked",
    "is_checksum_error",
    "repair_hint",
]

#: The checksum every chunk of flow carries (4 bytes a chunk), after the compressor.
CHECKSUM = Crc32cCodec()


_DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"
_MISMATCH = "Stored and computed checksum do not match"

_REPAIR = {
    "counts": "rewrite it with the `flow convert` command that made it",
    "medians": "rewrite it with the `flow medians` command that made it",
    "encoding": "`flow verify --repair {url}` then the same `flow tokenize` command recompute "
    "only the damaged blocks",
}

_BatchInfo = tuple["ByteGetter", "ArraySpec", "SelectorTuple", "SelectorTuple", bool]


def checked(codecs: Iterable[BytesBytesCodec]) -> tuple[BytesBytesCodec, ...]:
    """``codecs`` (compressors) followed by the chunk checksum (once)."""
    codecs = tuple(c for c in codecs if not isinstance(c, Crc32cCodec))
    return (*codecs, CHECKSUM)


#: zarr's default compressor (zstd level 0), checksummed: for arrays without a tuned codec.
DEFAULT_CODECS = checked((ZstdCodec(level=0),))


def is_checksum_error(err: BaseException) -> bool:
    """Whether ``err`` is zarr's checksum mismatch (or flow's :class:`DamagedChunkError`)."""
    return isinstance(err, DamagedChunkError) or (
        isinstance(err, ValueError) and _MISMATCH in str(err)
    )


def repair_hint(kind: str | None, url: str, *, listing: bool = True) -> str:
    """How to repair a damaged store of ``kind``: `flow verify` (unless not ``listing``), and
    the kind's fix."""
    fix = _REPAIR.get(kind or "", "")
    how = [f"`flow verify {url}` lists every damaged chunk"] if listing else []
    return "; ".join([*how, *([fix.format(url=url)] if fix else [])])


class _InnerChunkError(ValueError):
    """A damaged chunk inside a shard (its coordinates in the shard), on its way out."""

    def __init__(self, message: str, coords: tuple[int, ...]) -> None:
        super().__init__(message, coords)
        self.coords = coords


def _store_url(store: Any) -> str:
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, FsspecStore):
        protocol = store.fs.protocol
        protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        return f"{protocol}://{store.path}"
    return str(store)


def _split_key(path: str) -> tuple[str, str]:
    """``"X/data/c/3"`` -> ``("X/data", "c/3")`` (default chunk key encoding)."""
    if path.startswith("c/"):
        return "", path
    array, sep, key = path.rpartition("/c/")
    if sep:
        return array, "c/" + key
    array, _, key = path.rpartition("/")
    return array, key


async def _store_kind(store: Any) -> str | None:
    """The flow kind recorded at the store's root (None when there is none)."""
    try:
        raw = await store.get("zarr.json", prototype=default_buffer_prototype())
        meta = json.loads(raw.to_bytes()) if raw is not None else {}
        flow = meta.get("attributes", {}).get("flow", {})
        return str(flow["kind"]) if isinstance(flow, dict) and "kind" in flow else None
    except Exception:  # only a hint: a store we cannot read has no kind
        return None


async def _damaged(getter: StorePath, err: BaseException) -> DamagedChunkError:
    url = _store_url(getter.store)
    array, key = _split_key(getter.path)
    if isinstance(err, _InnerChunkError):
        key += f" (inner chunk {','.join(map(str, err.coords))} of the shard)"
    hint = repair_hint(await _store_kind(getter.store), url)
    msg = (
        f"damaged chunk in {url}: array {array or '/'} chunk {key} fails its checksum "
        f"(its bytes changed after writing); {hint}."
    )
    return DamagedChunkError(msg, url, array, key)


class CheckedCodecPipeline(BatchedCodecPipeline):
    """zarr's batched codec pipeline; a chunk failing its checksum raises a
    :class:`~flow.errors.DamagedChunkError` naming the store, array and chunk."""

    async def read_batch(
        self,
        batch_info: Iterable[_BatchInfo],
        out: NDBuffer,
        drop_axes: tuple[int, ...] = (),
    ) -> None:
        batch = list(batch_info)
        try:
            await super().read_batch(batch, out, drop_axes)
        except DamagedChunkError:
            raise
        except ValueError as err:
            if not is_checksum_error(err):
                raise
            if len(batch) == 1:
                raise await _located(batch[0][0], err) from err
            for item in batch:  # which one? read each alone
                try:
                    await super().read_batch([item], out, drop_axes)
                except ValueError as one:
                    if is_checksum_error(one):
                        raise await _located(item[0], one) from err
                    raise
            raise


async def _located(getter: Any, err: BaseException) -> ValueError:
    """The error to raise for a damaged chunk read through ``getter``: flow's named error at a
    store path; inside a shard, a private error carrying the chunk's place in the shard."""
    if isinstance(getter, StorePath):
        return await _damaged(getter, err)
    coords = getattr(getter, "chunk_coords", None)
    if coords is not None and not isinstance(err, _InnerChunkError):
        return _InnerChunkError(str(err), tuple(int(c) for c in coords))
    return err if isinstance(err, ValueError) else ValueError(str(err))


def _install() -> None:
    register_pipeline(CheckedCodecPipeline)
    if zarr.config.get("codec_pipeline.path") == _DEFAULT_PIPELINE:  # leave a user's choice
        zarr.config.set({"codec_pipeline.path": "flow._checksum.CheckedCodecPipeline"})


_install()
