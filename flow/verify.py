"""Check a whole flow store, every chunk of every array, and repair an encoding store.

:func:`verify` reads a count store, median set or encoding store end to end: its structure (the
arrays and attributes its kind needs, its schema version, whether its writer finished) and
every stored chunk of every array, decoded in parallel (a Dask graph of one task per group of
chunks, so it runs on a ``distributed`` cluster as well as locally). Each chunk carries a
crc32c checksum (:mod:`flow._checksum`), so a flipped byte anywhere is found and named.

:func:`repair_encoding` marks the cell blocks of an encoding store whose chunks are damaged as
not written; the same ``flow tokenize`` command then recomputes those blocks only and gives the
bytes of an undamaged store. A damaged count store or median set is rewritten by the command
that made it.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zarr
from dask.base import compute as dask_compute
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from zarr.codecs import Crc32cCodec, ShardingCodec

from . import medians as _medians
from . import store as _counts
from ._checksum import repair_hint
from ._location import Location, LocationLike
from .cluster import QUIET, Reporter
from .encode import store as _encoding
from .errors import DamagedChunkError, InputError, SchemaError, StoreNotFoundError

__all__ = ["Damage", "VerifyReport", "repair_encoding", "verify"]

#: Decoded bytes one task reads (its chunks are read one at a time): a few dozen tasks for a
#: store of some GB, each small enough for any worker.
TASK_BYTES = 256 << 20
#: Stores below this many decoded bytes are checked in this process (threads): no cluster.
LOCAL_BYTES = 512 << 20

_SCHEMA = {
    _counts.KIND: _counts.SCHEMA_VERSION,
    _medians.KIND: _medians.SCHEMA_VERSION,
    _encoding.KIND: _encoding.SCHEMA_VERSION,
}
#: The arrays each kind needs ("a|b": either, older layouts included).
_REQUIRED = {
    _counts.KIND: ("X/data", "X/indices", "X/indptr", "obs/_index", "obs/n_counts", "var/_index"),
    _medians.KIND: ("gene|gene_id", "median", "n_nonzero", "digest_offset", "digest_mean"),
    _encoding.KIND: ("length", "cell", "n_counts", "filter_pass", "block_done", "token_gene_id"),
}


@dataclass(frozen=True)
class Damage:
    """One damaged chunk: its array, chunk key (``c/0/3``), grid coordinates and what failed."""

    array: str
    chunk: str
    coords: tuple[int, ...]
    reason: str

    def __str__(self) -> str:
        return f"{self.array} chunk {self.chunk}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found in one store.

    ``problems`` are structural (missing arrays or attributes, wrong schema, shapes that do
    not fit); ``damaged`` the chunks that fail their checksum or do not decode;
    ``unchecked`` the arrays written without checksums (stores from before flow had them:
    they are decoded, but a changed byte that still decodes goes unnoticed).
    """

    url: str
    kind: str | None
    complete: bool
    n_arrays: int
    n_chunks: int
    problems: tuple[str, ...] = ()
    damaged: tuple[Damage, ...] = ()
    unchecked: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        """A finished store, structure as expected, every chunk intact."""
        return self.complete and not self.problems and not self.damaged

    def summary(self) -> str:
        """Human-readable lines: the verdict, then each problem and damaged chunk."""
        what = f"{self.kind} store" if self.kind else "store"
        head = (
            f"{what} {self.url}: {self.n_arrays:,} arrays, {self.n_chunks:,} chunks read; "
            f"{len(self.damaged):,} damaged"
        )
        lines = [head + (", unfinished" if not self.complete else "")]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  damaged: {d}" for d in self.damaged]
        if self.unchecked:
            lines.append(
                f"  note: {len(self.unchecked):,} arrays have no checksums (written before flow "
                f"had them): {', '.join(self.unchecked[:5])}{' ...' if len(self.unchecked) > 5 else ''}"
            )
        if not self.complete:
            lines.append("  its writer did not finish: rerun the command that writes it")
        if self.damaged:
            fix = repair_hint(self.kind, self.url, listing=False)
            lines.append(f"  repair: {fix or 'rewrite the store with the command that made it'}")
        if self.ok:
            lines.append("  ok")
        return "\n".join(lines)


# --------------------------------------------------------------------------- structure


def _open(location: Location) -> zarr.Group:
    if not location.exists():
        msg = f"No flow store at {location.url!r}."
        raise StoreNotFoundError(msg)
    try:
        return location.open_group(mode="r")
    except (FileNotFoundError, ValueError, KeyError) as err:
        msg = f"{location.url!r} is not a Zarr v3 group, so not a flow store: {err}"
        raise SchemaError(msg) from err


def _arrays(group: zarr.Group, location: Location) -> tuple[dict[str, zarr.Array[Any]], list[str]]:
    """Every array of the store by path (nested groups included), in path order; or, when a
    metadata document does not parse (its bytes changed), none and which documents are damaged."""
    try:
        found = dict(group.members(max_depth=None))
    except ValueError:  # json.JSONDecodeError, or zarr refusing what the bytes now say
        return {}, _damaged_metadata(location)
    return {p: a for p, a in sorted(found.items()) if isinstance(a, zarr.Array)}, []


def _damaged_metadata(location: Location) -> list[str]:
    """The store's ``zarr.json`` documents that are not valid JSON, as problems."""
    fs, root = location.fs()
    problems = []
    for path in sorted(p for p in fs.find(root) if p.endswith("zarr.json")):
        try:
            json.loads(fs.cat_file(path))
        except ValueError:
            name = path[len(root.rstrip("/")) + 1 :]
            problems.append(
                f"metadata {name} is damaged (not valid JSON): its arrays were not read"
            )
    return problems or ["the metadata of an array or group does not read"]


def _structure(meta: Mapping[str, Any], arrays: Mapping[str, zarr.Array[Any]]) -> list[str]:
    """What is missing or does not fit for the store's kind."""
    kind = meta.get("kind")
    if kind not in _SCHEMA:
        return [f"not a flow store (attrs['flow']['kind'] is {kind!r})"]
    problems = []
    version = meta.get("schema_version")
    if not isinstance(version, int) or not 1 <= version <= _SCHEMA[kind]:
        problems.append(f"schema version {version!r}: this flow reads 1 to {_SCHEMA[kind]}")
    problems += [
        f"array {name.replace('|', ' or ')} is missing"
        for name in _REQUIRED[kind]
        if not any(n in arrays for n in name.split("|"))
    ]
    if kind == _counts.KIND and meta.get("complete") and not problems:
        problems += _count_shapes(meta, arrays)
    if (
        kind == _encoding.KIND
        and "tokens" not in arrays
        and not any(p.startswith("bands/") for p in arrays)
    ):
        problems.append("no ranking arrays (tokens or bands/*)")
    return problems


def _count_shapes(meta: Mapping[str, Any], arrays: Mapping[str, zarr.Array[Any]]) -> list[str]:
    try:
        n_cells, nnz = int(meta["n_cells"]), int(meta["nnz"])
    except (KeyError, TypeError, ValueError):
        return ["attrs['flow'] lacks n_cells or nnz"]
    expected = {"X/indptr": n_cells + 1, "X/data": nnz, "X/indices": nnz, "obs/_index": n_cells}
    return [
        f"array {name} holds {arrays[name].shape[0]:,} values, not {size:,}"
        for name, size in expected.items()
        if arrays[name].shape[0] != size
    ]


def _has_checksum(arr: zarr.Array[Any]) -> bool:
    codecs: Sequence[Any] = arr.metadata.codecs  # type: ignore[union-attr]
    for codec in codecs:
        if isinstance(codec, ShardingCodec):
            codecs = [*codecs, *codec.codecs]
    return any(isinstance(c, Crc32cCodec) for c in codecs)


# --------------------------------------------------------------------------- chunks


def _units(arr: zarr.Array[Any]) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The unit a reader decodes whole (a shard if sharded, else a chunk) and all its coords."""
    unit = tuple(arr.shards or arr.chunks)
    grid = [math.ceil(n / u) for n, u in zip(arr.shape, unit, strict=True)]
    return unit, list(itertools.product(*(range(g) for g in grid)))


def _check_chunks(
    location: Location, path: str, unit: tuple[int, ...], coords: Sequence[tuple[int, ...]]
) -> list[Damage]:
    """Read each chunk (or shard) of ``path`` at ``coords``; the ones that fail (one task)."""
    arr: Any = location.open_group(mode="r")[path]
    found = []
    for c in coords:
        where = tuple(slice(i * u, (i + 1) * u) for i, u in zip(c, unit, strict=True))
        key = arr.metadata.encode_chunk_key(c)
        try:
            arr[where]
        except DamagedChunkError as err:
            found.append(Damage(path, err.chunk or key, c, "fails its checksum"))
        except Exception as err:  # a chunk that does not decode is damaged too
            reason = f"does not decode ({type(err).__name__}: {str(err)[:120]})"
            found.append(Damage(path, key, c, reason))
    return found


def _graph(location: Location, arrays: Mapping[str, zarr.Array[Any]]) -> tuple[Delayed, int, int]:
    """One task per group of chunks of each array; returns it, the chunks and decoded bytes."""
    tok = tokenize(location.url, sorted(arrays))
    tasks: list[Delayed] = []
    n_chunks = n_bytes = 0
    for path, arr in arrays.items():
        unit, coords = _units(arr)
        unit_bytes = max(1, math.prod(unit) * max(1, arr.dtype.itemsize))
        per_task = max(1, TASK_BYTES // unit_bytes)
        n_chunks += len(coords)
        n_bytes += len(coords) * unit_bytes
        name = f"flow-verify-{tok}-{path.replace('/', '.')}"
        tasks.extend(
            delayed(_check_chunks, pure=True)(
                location, path, unit, coords[i : i + per_task], dask_key_name=(name, j)
            )
            for j, i in enumerate(range(0, len(coords), per_task))
        )
    return (
        delayed(_flatten, pure=True)(tasks, dask_key_name=f"flow-verify-{tok}"),
        n_chunks,
        n_bytes,
    )


def _flatten(parts: Sequence[Sequence[Damage]]) -> list[Damage]:
    return [d for part in parts for d in part]


def verify(
    where: LocationLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
) -> VerifyReport:
    """Check a flow store whole: structure, completeness and every chunk (a compute boundary).

    Every stored chunk (or shard) of every array is read and decoded, in parallel on the
    current Dask client (or, for stores under ``LOCAL_BYTES`` decoded, on threads here).
    Nothing is written.

    Parameters
    ----------
    where
        A count store, median set or encoding store (path, URL or Location).
    storage_options
        fsspec options of a URL; used only when ``where`` is not a Location.
    reporter
        Progress and messages (default: silent).

    Returns
    -------
    VerifyReport
        ``report.ok`` is true for a finished, intact store.

    Raises
    ------
    StoreNotFoundError, SchemaError
        Nothing at ``where``, or not a Zarr v3 group.
    """
    location = Location.of(where, storage_options)
    group = _open(location)
    meta = group.attrs.get("flow")
    meta = dict(meta) if isinstance(meta, dict) else {}
    arrays, unreadable = _arrays(group, location)
    problems = unreadable or _structure(meta, arrays)
    graph, n_chunks, n_bytes = _graph(location, arrays)
    if n_bytes <= LOCAL_BYTES:
        (damaged,) = dask_compute(graph, scheduler="threads")
    else:
        (damaged,) = reporter.compute(graph, label=f"verifying {location.url}")
    kind = meta.get("kind")
    return VerifyReport(
        url=location.url,
        kind=str(kind) if kind else None,
        complete=bool(meta.get("complete", False)),
        n_arrays=len(arrays),
        n_chunks=n_chunks,
        problems=tuple(problems),
        damaged=tuple(damaged),
        unchecked=tuple(p for p, a in arrays.items() if not _has_checksum(a)),
    )


# --------------------------------------------------------------------------- repair


#: Arrays of an encoding store that a block's rewrite writes again (whole chunks). The cell
#: and token tables are written once, when the store is laid out.
_PER_BLOCK = ("bands/", "tokens", "counts", "length", "block_done", "block_token_cells")


def _blocks(enc: Any, damaged: Sequence[Damage]) -> tuple[list[int], list[Damage]]:
    """The cell blocks to recompute for the damaged chunks, and the chunks no block rewrites."""
    blocks: set[int] = set()
    stuck = []
    for d in damaged:
        found = (
            _encoding.blocks_of_chunk(enc, d.array, d.coords)
            if d.array.startswith(_PER_BLOCK)
            else []
        )
        if found:
            blocks.update(found)
        elif d.array != "token_cells":  # summed again whenever the store is finished
            stuck.append(d)
    return sorted(blocks), stuck


def repair_encoding(
    where: LocationLike,
    *,
    storage_options: Mapping[str, Any] | None = None,
    report: VerifyReport | None = None,
    reporter: Reporter = QUIET,
) -> list[int]:
    """Mark the blocks of an encoding store whose chunks are damaged as not written.

    The store is left unfinished (readers refuse it); the same ``flow tokenize`` command then
    recomputes those blocks only, rewriting their chunks whole, and finishes the store with the
    bytes of an undamaged run. ``report`` is a :func:`verify` report of the store (verified
    here when not given). Returns the blocks marked.

    Raises
    ------
    InputError
        Not an encoding store, or a damaged chunk that no block rewrites (the cell or token
        table): then only a full rewrite (``flow tokenize ... --overwrite``) repairs it.
    """
    location = Location.of(where, storage_options)
    report = report or verify(location, reporter=reporter)
    if report.kind != _encoding.KIND:
        msg = (
            f"{location.url} is a {report.kind or 'non-flow'} store: only an encoding store is "
            "repaired block by block; rewrite this one with the command that made it."
        )
        raise InputError(msg)
    group = location.open_group(mode="r")
    enc = _encoding.EncodingStore(location, dict(group.attrs["flow"]), group)  # type: ignore[arg-type]
    blocks, stuck = _blocks(enc, report.damaged)
    if stuck:
        names = ", ".join(f"{d.array} {d.chunk}" for d in stuck[:3])
        msg = (
            f"{location.url}: damaged {names} is written once for the whole store, not per block: "
            "rerun the `flow tokenize` command that made it with --overwrite."
        )
        raise InputError(msg)
    if blocks or report.damaged:
        _encoding.invalidate_blocks(location, blocks)
    return blocks
