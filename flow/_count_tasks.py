"""The tasks of a parallel count-store write: read and count, then write whole shards.

Private to :mod:`flow.store`. The inputs are cut into *pieces*: one per input file that can
only be read as one stream (10x MTX, CSC h5ad, readers without ranges), and one per range of
:data:`PIECE_CELLS` cells (whole blocks) of a file whose reader reads any range of cells
(``Source.supports_ranges``). Two phases, each one task per unit of work:

1. :func:`count_piece` reads a piece, validates its counts, maps its genes to the store's,
   spills its nonzeros (values and gene indices, in order) to a scratch area inside the
   output (:data:`SCRATCH`, LZ4: cheaper than reading and validating the input again) and
   returns per-cell nonzeros and totals plus, per input block, what decides the dtype;
2. :func:`write_span` reads, from the scratch of the pieces it overlaps, the values of a
   run of whole ``X/data``/``X/indices`` shards (their offsets are known once phase 1 has
   counted every earlier cell) and writes those shards, returning one digest per shard.

When every source records where each cell's entries start (:func:`piece_offsets`: the
``indptr`` of CSR h5ad, 10x HDF5 and AnnData Zarr, read before any count), every value's
place is known before phase 1 and there is one pass instead: :func:`count_direct` reads,
validates and counts a piece, writes the shards that lie wholly inside it and returns the
values of the shards at its edges (in memory: on a cluster they move between workers as task
results); :func:`write_edge` writes each edge shard from them. The one pass assumes uint16
(:data:`DIRECT_DTYPE`) and the ``indptr``'s counts; a piece that needs more (a count above
65,535, a non-integer count) or holds fewer values (explicit zeros, repeated entries) sends
the whole store to the two phases.

Each shard is written by one task, whole, once, so the bytes do not depend on the path, the
number of workers or the split (DESIGN section 8: misaligned parallel writes corrupt
silently). The scratch area is removed before the store is marked complete.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from dask.base import compute as dask_compute
from dask.delayed import delayed
from zarr.codecs import BloscCodec, BloscShuffle

from ._io import checked, content_hasher
from .cluster import as_completed  # distributed's, imported only where futures exist
from .errors import InputError

if TYPE_CHECKING:
    from distributed import Client

    from ._location import Location
    from .ingest._source import Source

__all__ = [
    "DIRECT_DTYPE",
    "PIECE_CELLS",
    "SCRATCH",
    "DirectCounts",
    "Edge",
    "Piece",
    "PieceCounts",
    "Place",
    "Reader",
    "Runner",
    "Segment",
    "count_direct",
    "count_piece",
    "edge_part",
    "edge_shards",
    "final_dtype",
    "piece_offsets",
    "plan_pieces",
    "validate",
    "write_edge",
    "write_span",
]

#: Cells per piece of a file read by ranges (rounded up to whole blocks).
PIECE_CELLS = 8192
#: The group, inside the output store, where phase 1 spills each piece's nonzeros.
SCRATCH = "_scratch"
_SCRATCH_CODECS = checked((BloscCodec(cname="lz4", clevel=1, shuffle=BloscShuffle.shuffle),))
_SCRATCH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Reader:
    """What a task needs to read one source: the source, its column map and the options."""

    source: Source
    col_map: np.ndarray | None  # None: the source's genes are the store's, in order
    n_genes: int
    allow_non_integer: bool
    block_size: int

    def __post_init__(self) -> None:
        # int32 gene indices (what the store holds), and no gather at all for the common
        # case of a source whose genes are the store's, in order (measured: ~15% of convert)
        col_map = np.asarray(self.col_map, dtype=np.int32)
        identity = col_map.size == self.n_genes and bool(
            (col_map == np.arange(self.n_genes, dtype=np.int32)).all()
        )
        object.__setattr__(self, "col_map", None if identity else col_map)

    @property
    def path(self) -> str:
        """The input as the user gave it."""
        return self.source.info.path

    def blocks(self, start: int, stop: int, *, ranged: bool) -> Iterator[sp.csr_matrix]:
        """The validated blocks of cells ``start:stop``, genes mapped to the store's, repeated
        entries summed and zeros dropped; blocks start at multiples of ``block_size`` of the
        file (the serial writer's input blocks), the first and last cut to the range."""
        if ranged:
            bs = self.block_size
            a = start
            while a < stop:
                b = min(stop, (a // bs + 1) * bs)
                raw = sp.csr_matrix(self.source.read_rows(a, b))
                if raw.shape[0] != b - a:
                    self._truncated(f"cells {a}:{b}", raw.shape[0])
                yield self._mapped(raw, a)
                a = b
            return
        seen = 0
        stream = self.source.iter_blocks(self.block_size)
        try:
            for raw_block in stream:
                raw = sp.csr_matrix(raw_block)
                n, first = raw.shape[0], seen
                seen += n
                if seen <= start or first >= stop:
                    continue
                block = self._mapped(raw, first)
                yield block[max(0, start - first) : min(n, stop - first)]
                if seen >= stop and stop < self.source.info.n_cells:
                    return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if seen != self.source.info.n_cells:
            self._truncated("the file", seen)

    def _mapped(self, raw: sp.csr_matrix, row0: int) -> sp.csr_matrix:
        validate(raw, self.path, row0, self.allow_non_integer)
        indices = raw.indices if self.col_map is None else self.col_map[raw.indices]
        block = sp.csr_matrix(
            (raw.data, indices, raw.indptr), shape=(raw.shape[0], self.n_genes), copy=False
        )
        block.sum_duplicates()  # sorts indices; sums repeated columns of one cell
        if not block.data.all():
            block.eliminate_zeros()
        return block

    def _truncated(self, what: str, got: int) -> None:
        msg = (
            f"{self.path}: expected {self.source.info.n_cells} cells from its header, read {got} "
            f"({what}). The file is truncated or corrupt."
        )
        raise InputError(msg)


@dataclass(frozen=True)
class Piece:
    """Cells ``start:stop`` of source ``source`` (global rows from ``row0``), read as one
    range (``ranged``) or as a stream from the file's first cell."""

    source: int
    start: int
    stop: int
    row0: int
    ranged: bool

    @property
    def n_cells(self) -> int:
        """Cells in the piece."""
        return self.stop - self.start


def plan_pieces(sources: Sequence[Source], block_size: int) -> list[Piece]:
    """The pieces of the sources, in cell order (see the module docstring)."""
    step = block_size * max(1, -(-PIECE_CELLS // block_size))
    pieces: list[Piece] = []
    row0 = 0
    for i, src in enumerate(sources):
        n = src.info.n_cells
        if getattr(src, "supports_ranges", False):
            pieces.extend(
                Piece(i, a, min(n, a + step), row0 + a, ranged=True) for a in range(0, n, step)
            )
        else:
            pieces.append(Piece(i, 0, n, row0, ranged=False))
        row0 += n
    return pieces


@dataclass(frozen=True)
class PieceCounts:
    """What phase 1 learns about a piece: per cell, nonzeros and total count; per input block,
    whether it holds non-integer counts and its largest count (what decides the dtype)."""

    nnz: np.ndarray  # int64 per cell
    totals: np.ndarray  # float64 per cell
    blocks: tuple[tuple[bool, float], ...]

    @property
    def summary(self) -> tuple[int, tuple[tuple[bool, float], ...]]:
        """The piece's nonzeros and block flags (what the driver needs before the cells)."""
        return int(self.nnz.sum()), self.blocks


def _read_piece(reader: Reader, piece: Piece) -> tuple[PieceCounts, np.ndarray, np.ndarray]:
    """A piece's per-cell counts and its nonzeros (values as read, int32 gene indices)."""
    nnz, totals, flags, data, indices = [], [], [], [], []
    for block in reader.blocks(piece.start, piece.stop, ranged=piece.ranged):
        nnz.append(np.diff(block.indptr).astype(np.int64))
        totals.append(np.asarray(block.sum(axis=1), dtype=np.float64).ravel())
        flags.append(_dtype_flags(block.data))
        data.append(block.data)
        indices.append(block.indices.astype(np.int32, copy=False))
    counts = PieceCounts(
        nnz=np.concatenate(nnz) if nnz else np.zeros(0, np.int64),
        totals=np.concatenate(totals) if totals else np.zeros(0, np.float64),
        blocks=tuple(flags),
    )
    values = np.concatenate(data) if data else np.zeros(0, np.int32)
    return counts, values, np.concatenate(indices) if indices else np.zeros(0, np.int32)


def count_piece(reader: Reader, piece: Piece, location: Location, i: int) -> PieceCounts:
    """Phase 1 of piece ``i``: read, validate, count, and spill its nonzeros to the scratch
    group of the output at ``location`` (a task)."""
    counts, data, indices = _read_piece(reader, piece)
    scratch: Any = location.open_group(mode="r+")[SCRATCH]
    for name, values in ((f"d{i}", data), (f"i{i}", indices)):
        arr = scratch.create_array(
            name,
            shape=values.shape,
            dtype=values.dtype,
            chunks=(max(1, min(values.size, _SCRATCH_CHUNK)),),
            compressors=_SCRATCH_CODECS,
            overwrite=True,
        )
        if values.size:
            arr[:] = values
    return counts


def _dtype_flags(data: np.ndarray) -> tuple[bool, float]:
    if data.size == 0:
        return False, 0.0
    non_integer = data.dtype.kind == "f" and bool((np.floor(data) != data).any())
    return non_integer, float(data.max())


def final_dtype(blocks: Sequence[tuple[bool, float]]) -> np.dtype[Any]:
    """The store's counts dtype: uint16 widened, block by block in cell order, as a serial
    writer would (non-integer: float32; above uint16: uint32; above uint32: float64; a float
    dtype is final)."""
    dtype: np.dtype[Any] = np.dtype(np.uint16)
    for non_integer, top in blocks:
        if dtype.kind == "f":
            break
        if non_integer:
            dtype = np.dtype(np.float32)
        elif top > np.iinfo(dtype).max:
            big = top > np.iinfo(np.uint32).max
            dtype = np.dtype(np.float64) if big else np.dtype(np.uint32)
    return dtype


#: Values ``lo:hi`` of piece ``i``'s spilled nonzeros: ``(i, lo, hi)``.
Segment = tuple[int, int, int]


def write_span(
    location: Location, segments: Sequence[Segment], *, start: int, stop: int, shard: int
) -> list[str]:
    """Phase 2: write ``X/data`` and ``X/indices`` values ``start:stop`` (whole shards) from
    the segments of the pieces' spilled nonzeros (a task).

    Returns the SHA-256 of each shard written (its data bytes, then its indices bytes).
    """
    root: Any = location.open_group(mode="r+")
    dtype, scratch = root["X/data"].dtype, root[SCRATCH]
    data_parts: list[np.ndarray] = []
    index_parts: list[np.ndarray] = []
    held, pos = 0, start
    digests: list[str] = []
    for i, lo, hi in segments:
        data_parts.append(np.asarray(scratch[f"d{i}"][lo:hi]).astype(dtype))
        index_parts.append(np.asarray(scratch[f"i{i}"][lo:hi]))
        held += hi - lo
        while held >= shard or (pos + held == stop and held):
            n = min(shard, held)
            data, data_parts = _take(data_parts, n)
            indices, index_parts = _take(index_parts, n)
            digests.append(_write_shard(root, pos, data, indices))
            pos += n
            held -= n
    if pos != stop:
        msg = f"values {start}:{stop} of the counts: only {pos - start} were found in {SCRATCH}"
        raise InputError(msg)
    return digests


def _take(parts: list[np.ndarray], n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first ``n`` values of the concatenated parts, and the rest as parts."""
    whole = np.concatenate(parts) if len(parts) > 1 else parts[0]
    rest = whole[n:]
    return whole[:n], ([rest] if rest.size else [])


# ---------------------------------------------------------------- one pass (offsets known)

#: The dtype a one-pass write assumes: what ordinary counts need. A piece that needs more
#: (a count above 65,535, a non-integer count) sends the whole store to the two phases.
DIRECT_DTYPE = np.dtype(np.uint16)


def piece_offsets(sources: Sequence[Source], pieces: Sequence[Piece]) -> np.ndarray | None:
    """Where each piece's values start in ``X/data`` (and, last, all values), known from the
    sources' ``row_offsets`` (CSR ``indptr``) before any count is read; None when a source
    does not record them (dense, CSC, streamed, filtered features)."""
    sizes = np.zeros(len(pieces), dtype=np.int64)
    for i, src in enumerate(sources):
        mine = [j for j, p in enumerate(pieces) if p.source == i]
        row_offsets = getattr(src, "row_offsets", None)
        ends = None if row_offsets is None else row_offsets(_piece_rows(pieces, mine))
        if ends is None:
            return None
        sizes[mine] = np.diff(np.asarray(ends, dtype=np.int64))
    return np.concatenate([[0], np.cumsum(sizes)])


def _piece_rows(pieces: Sequence[Piece], mine: Sequence[int]) -> list[int]:
    """The first row of each of a source's pieces, then the last one's stop."""
    return [pieces[j].start for j in mine] + [pieces[mine[-1]].stop] if mine else [0]


@dataclass(frozen=True)
class Place:
    """Where a piece's values land: values ``offset:offset + nnz`` of ``X/data``, which holds
    ``total`` values in shards of ``shard``."""

    offset: int
    nnz: int
    total: int
    shard: int

    def shards(self) -> range:
        """The shards the piece's values fall in."""
        if self.nnz == 0:
            return range(0)
        return range(self.offset // self.shard, (self.offset + self.nnz - 1) // self.shard + 1)

    def bounds(self, k: int) -> tuple[int, int]:
        """Values ``a:b`` of shard ``k``."""
        return k * self.shard, min((k + 1) * self.shard, self.total)

    def holds(self, k: int) -> bool:
        """Whether shard ``k`` lies wholly inside the piece (the piece's task writes it)."""
        a, b = self.bounds(k)
        return self.offset <= a and b <= self.offset + self.nnz


def edge_shards(offsets: np.ndarray, shard: int) -> list[tuple[int, list[int]]]:
    """The shards no piece holds whole, each with the pieces whose values it takes."""
    total = int(offsets[-1])
    found: dict[int, list[int]] = {}
    for i in range(len(offsets) - 1):
        place = Place(int(offsets[i]), int(offsets[i + 1] - offsets[i]), total, shard)
        for k in place.shards():
            if not place.holds(k):
                found.setdefault(k, []).append(i)
    return sorted(found.items())


Edge = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class DirectCounts:
    """What a one-pass count task returns: the piece's counts; whether its values are the
    ones planned (``fits``: as many as its ``indptr`` says, all fitting :data:`DIRECT_DTYPE`);
    the digests of the shards it wrote; the values of the shards at its edges (data in
    :data:`DIRECT_DTYPE`, gene indices), by shard."""

    counts: PieceCounts
    fits: bool
    digests: dict[int, str]
    edges: dict[int, Edge]

    @property
    def summary(self) -> tuple[bool, dict[int, str]]:
        """Whether it fits, and its shards' digests (what the driver needs before the cells)."""
        return self.fits, self.digests


def count_direct(reader: Reader, piece: Piece, location: Location, place: Place) -> DirectCounts:
    """One pass over a piece whose values' offsets are known: read, validate, count, write the
    shards that lie wholly inside it, and keep the values of the shards at its edges (a task).

    Nothing is written when the piece does not fit (see :class:`DirectCounts`)."""
    counts, data, indices = _read_piece(reader, piece)
    fits = data.size == place.nnz and final_dtype(counts.blocks) == DIRECT_DTYPE
    if not fits:
        return DirectCounts(counts, fits=False, digests={}, edges={})
    values = data.astype(DIRECT_DTYPE)
    del data
    root: Any = location.open_group(mode="r+")
    digests: dict[int, str] = {}
    edges: dict[int, Edge] = {}
    for k in place.shards():
        a, b = place.bounds(k)
        lo, hi = (
            max(a, place.offset) - place.offset,
            min(b, place.offset + place.nnz) - place.offset,
        )
        if place.holds(k):
            digests[k] = _write_shard(root, a, values[lo:hi], indices[lo:hi])
        else:  # copies: the piece's arrays are not kept alive by its edges
            edges[k] = (values[lo:hi].copy(), indices[lo:hi].copy())
    return DirectCounts(counts, fits=True, digests=digests, edges=edges)


def edge_part(result: DirectCounts, k: int) -> Edge | None:
    """A piece's values of edge shard ``k`` (None when the piece did not fit)."""
    return result.edges.get(k) if result.fits else None


def write_edge(
    location: Location, k: int, place: Place, parts: Sequence[Edge | None]
) -> str | None:
    """Write edge shard ``k`` from its pieces' values, in order, and return its digest (a
    task); None (nothing written) when a piece did not fit."""
    if any(part is None for part in parts):
        return None
    data = np.concatenate([p[0] for p in parts if p is not None])
    indices = np.concatenate([p[1] for p in parts if p is not None])
    a, b = place.bounds(k)
    if data.size != b - a:
        msg = f"shard {k} of the counts: {data.size} values for {b - a} places"
        raise InputError(msg)
    return _write_shard(location.open_group(mode="r+"), a, data, indices)


def _write_shard(root: Any, start: int, data: np.ndarray, indices: np.ndarray) -> str:
    """Write one shard's values at ``start`` of ``X/data``/``X/indices``; its SHA-256."""
    root["X/data"][start : start + data.size] = data
    root["X/indices"][start : start + data.size] = indices
    h = content_hasher()
    h.update(data.tobytes())
    h.update(indices.tobytes())
    return h.hexdigest()


def validate(block: sp.csr_matrix, info_path: str, row0: int, allow_non_integer: bool) -> None:
    """Refuse negative, NaN/inf and (unless allowed) non-integer counts, naming the file,
    the cell (``row0`` + its row in the block, 0-based in the file) and the gene column."""
    data = block.data
    bad: np.ndarray | None = None
    kind = "negative"
    if data.dtype.kind == "i":
        bad = data < 0
    elif data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad, kind = ~finite, "NaN or infinite"
        elif (data < 0).any():
            bad = data < 0
        elif not allow_non_integer and (np.floor(data) != data).any():
            bad, kind = np.floor(data) != data, "non-integer"
    if bad is None or not bad.any():
        return
    k = int(np.flatnonzero(bad)[0])
    row = int(np.searchsorted(block.indptr, k, side="right") - 1)
    hint = (
        "; pass --allow-non-integer (allow_non_integer=True) to admit normalized or "
        "ambient-corrected values"
        if kind == "non-integer"
        else ""
    )
    msg = (
        f"{info_path}: {kind} count {data[k].item()!r} at cell {row0 + row} (0-based, in this "
        f"file), gene column {int(block.indices[k])}. Counts must be raw non-negative integers"
        f"{hint}."
    )
    raise InputError(msg)


class Runner:
    """Where the tasks run: on a ``distributed`` cluster (futures; results stay on the workers
    until fetched one at a time), or, without a client, on dask's threaded scheduler (results
    held here: a plain library call on one machine).

    ``progress(done, total)`` is told the cells counted, then (from 0 again) the cells
    written.
    """

    def __init__(self, client: Client | None, progress: Any) -> None:
        self.client, self.progress = client, progress
        self.token = uuid.uuid4().hex[:12]

    def share(self, readers: list[Reader]) -> list[Any]:
        """The readers as the tasks receive them (scattered once on a cluster, to every worker:
        a reader held by one worker would draw all its tasks there, and from a task on a
        worker, as with ``--scheduler``, scatter places data on that worker)."""
        if self.client is None:
            return readers
        return list(self.client.scatter(readers, hash=False, broadcast=True))

    def count(
        self, readers: list[Any], pieces: Sequence[Piece], location: Location, n_cells: int
    ) -> list[Any]:
        """Phase 1: one :func:`count_piece` task per piece; returns a handle per piece once
        every piece is counted (see :meth:`summaries`, :meth:`fetch`)."""
        if self.client is None:
            calls = [
                delayed(count_piece, pure=False)(readers[p.source], p, location, i)
                for i, p in enumerate(pieces)
            ]
            done = list(dask_compute(*calls, scheduler="threads"))
            self._report(n_cells, n_cells)
            return done
        futures = [
            self.client.submit(
                count_piece,
                readers[p.source],
                p,
                location,
                i,
                key=f"flow-convert-count-{self.token}-{i}",
            )
            for i, p in enumerate(pieces)
        ]
        self._summaries = [
            self.client.submit(_summary_of, f, key=f"flow-convert-nnz-{self.token}-{i}", pure=False)
            for i, f in enumerate(futures)
        ]
        cells = {f.key: p.n_cells for f, p in zip(self._summaries, pieces, strict=True)}
        done_cells = 0
        for f in as_completed(self._summaries):
            f.result()  # raises the task's error here
            done_cells += cells[f.key]
            self._report(done_cells, n_cells)
        return futures

    def direct(
        self,
        readers: list[Any],
        pieces: Sequence[Piece],
        location: Location,
        offsets: np.ndarray,
        shard: int,
    ) -> tuple[list[Any], list[tuple[bool, dict[int, str]]], list[str | None]]:
        """One pass: a :func:`count_direct` task per piece, then a :func:`write_edge` task per
        edge shard (:func:`edge_shards`, in order) fed by the pieces' edge values (held in
        memory, on the workers of a cluster). Returns, once all ran, a handle per piece (see
        :meth:`fetch`), each piece's :attr:`DirectCounts.summary` and each edge's digest."""
        total = int(offsets[-1])
        places = [Place(int(a), int(b - a), total, shard) for a, b in itertools.pairwise(offsets)]
        edges = edge_shards(offsets, shard)
        n_cells = sum(p.n_cells for p in pieces)
        if self.client is None:
            calls = [
                delayed(count_direct, pure=False)(readers[p.source], p, location, places[i])
                for i, p in enumerate(pieces)
            ]
            writes = [
                delayed(write_edge, pure=False)(
                    location, k, places[js[0]], [delayed(edge_part)(calls[j], k) for j in js]
                )
                for k, js in edges
            ]
            wanted = (
                [delayed(_counts_of)(c) for c in calls],
                [delayed(_direct_summary)(c) for c in calls],
            )
            got = dask_compute(*wanted[0], *wanted[1], *writes, scheduler="threads")
            self._report(n_cells, n_cells)
            n = len(calls)
            return list(got[:n]), list(got[n : 2 * n]), list(got[2 * n :])
        return self._direct_on_cluster(self.client, readers, pieces, location, places, edges)

    def _direct_on_cluster(
        self,
        client: Client,
        readers: list[Any],
        pieces: Sequence[Piece],
        location: Location,
        places: Sequence[Place],
        edges: Sequence[tuple[int, list[int]]],
    ) -> tuple[list[Any], list[tuple[bool, dict[int, str]]], list[str | None]]:
        token = self.token
        results = [
            client.submit(
                count_direct,
                readers[p.source],
                p,
                location,
                places[i],
                key=f"flow-convert-count-{token}-{i}",
            )
            for i, p in enumerate(pieces)
        ]
        writes = [
            client.submit(
                write_edge,
                location,
                k,
                places[js[0]],
                [
                    client.submit(
                        edge_part, results[j], k, key=f"flow-convert-edge-{token}-{k}-{j}"
                    )
                    for j in js
                ],
                key=f"flow-convert-write-{token}-{k}",
            )
            for k, js in edges
        ]
        summaries = [
            client.submit(_direct_summary, f, key=f"flow-convert-nnz-{token}-{i}")
            for i, f in enumerate(results)
        ]
        counts = [
            client.submit(_counts_of, f, key=f"flow-convert-cells-{token}-{i}")
            for i, f in enumerate(results)
        ]
        # the pieces' results (their edge values) are released on the workers as soon as the
        # tasks above that read them have run, not held until every piece is done
        del results
        cells = {f.key: p.n_cells for f, p in zip(summaries, pieces, strict=True)}
        done_cells, n_cells = 0, sum(cells.values())
        for f in as_completed(summaries):
            f.result()  # raises the task's error here
            done_cells += cells[f.key]
            self._report(done_cells, n_cells)
        digests = list(client.gather(writes))
        self._report(n_cells, n_cells)
        return counts, list(client.gather(summaries)), digests

    def summaries(self, handles: list[Any]) -> list[tuple[int, tuple[tuple[bool, float], ...]]]:
        """Each piece's nonzeros and per-block dtype flags, in order."""
        if self.client is None:
            return [h.summary for h in handles]
        got = self.client.gather(self._summaries)
        del self._summaries
        return list(got)

    def fetch(self, handles: list[Any], i: int) -> PieceCounts:
        """Piece ``i``'s per-cell counts, fetched once (its handle is dropped)."""
        h, handles[i] = handles[i], None
        return h if self.client is None else h.result()

    def write(
        self,
        location: Location,
        spans: Sequence[tuple[list[Segment], int, int, int]],
        shard: int,
    ) -> list[list[str]]:
        """Phase 2: one :func:`write_span` task per span ``(segments, start, stop, cells)``;
        returns each span's shard digests, in order."""
        total = sum(s[3] for s in spans)
        if self.client is None:
            calls = [
                delayed(write_span, pure=False)(location, seg, start=a, stop=b, shard=shard)
                for seg, a, b, _ in spans
            ]
            written = list(dask_compute(*calls, scheduler="threads"))
            self._report(total, total)
            return written
        futures = [
            self.client.submit(
                write_span,
                location,
                seg,
                start=a,
                stop=b,
                shard=shard,
                key=f"flow-convert-write-{self.token}-{i}",
            )
            for i, (seg, a, b, _) in enumerate(spans)
        ]
        cells = {f.key: s[3] for f, s in zip(futures, spans, strict=True)}
        done_cells = 0
        for f in as_completed(futures):
            f.result()
            done_cells += cells[f.key]
            self._report(done_cells, total)
        return list(self.client.gather(futures))

    def _report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


def _counts_of(result: DirectCounts) -> PieceCounts:
    return result.counts


def _direct_summary(result: DirectCounts) -> tuple[bool, dict[int, str]]:
    return result.summary


def _summary_of(counts: PieceCounts) -> tuple[int, tuple[tuple[bool, float], ...]]:
    return counts.summary
