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

Each shard is written by one task, whole, once, so the bytes do not depend on the number of
workers or the split (DESIGN section 8: misaligned parallel writes corrupt silently). The
scratch area is removed before the store is marked complete.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from dask.base import compute as dask_compute
from dask.delayed import delayed
from distributed import as_completed
from zarr.codecs import BloscCodec, BloscShuffle

from ._io import checked, content_hasher
from .errors import InputError

if TYPE_CHECKING:
    from distributed import Client

    from ._location import Location
    from .ingest._source import Source

__all__ = [
    "PIECE_CELLS",
    "SCRATCH",
    "Piece",
    "PieceCounts",
    "Reader",
    "Runner",
    "Segment",
    "count_piece",
    "final_dtype",
    "plan_pieces",
    "validate",
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
    col_map: np.ndarray
    n_genes: int
    allow_non_integer: bool
    block_size: int

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
        block = sp.csr_matrix(
            (raw.data, self.col_map[raw.indices], raw.indptr), shape=(raw.shape[0], self.n_genes)
        )
        block.sum_duplicates()  # sorts indices; sums repeated columns of one cell
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


def count_piece(reader: Reader, piece: Piece, location: Location, i: int) -> PieceCounts:
    """Phase 1 of piece ``i``: read, validate, count, and spill its nonzeros to the scratch
    group of the output at ``location`` (a task)."""
    nnz, totals, flags, data, indices = [], [], [], [], []
    for block in reader.blocks(piece.start, piece.stop, ranged=piece.ranged):
        nnz.append(np.diff(block.indptr).astype(np.int64))
        totals.append(np.asarray(block.sum(axis=1), dtype=np.float64).ravel())
        flags.append(_dtype_flags(block.data))
        data.append(block.data)
        indices.append(block.indices.astype(np.int32, copy=False))
    scratch: Any = location.open_group(mode="r+")[SCRATCH]
    for name, parts in ((f"d{i}", data), (f"i{i}", indices)):
        values = np.concatenate(parts) if parts else np.zeros(0, np.int32)
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
    return PieceCounts(
        nnz=np.concatenate(nnz) if nnz else np.zeros(0, np.int64),
        totals=np.concatenate(totals) if totals else np.zeros(0, np.float64),
        blocks=tuple(flags),
    )


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
    data_arr, indices_arr, scratch = root["X/data"], root["X/indices"], root[SCRATCH]
    data_parts: list[np.ndarray] = []
    index_parts: list[np.ndarray] = []
    held, pos = 0, start
    digests: list[str] = []
    for i, lo, hi in segments:
        data_parts.append(np.asarray(scratch[f"d{i}"][lo:hi]).astype(data_arr.dtype))
        index_parts.append(np.asarray(scratch[f"i{i}"][lo:hi]))
        held += hi - lo
        while held >= shard or (pos + held == stop and held):
            n = min(shard, held)
            data, data_parts = _take(data_parts, n)
            indices, index_parts = _take(index_parts, n)
            data_arr[pos : pos + n] = data
            indices_arr[pos : pos + n] = indices
            h = content_hasher()
            h.update(data.tobytes())
            h.update(indices.tobytes())
            digests.append(h.hexdigest())
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
        """The readers as the tasks receive them (scattered once on a cluster)."""
        if self.client is None:
            return readers
        return list(self.client.scatter(readers, hash=False))

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


def _summary_of(counts: PieceCounts) -> tuple[int, tuple[tuple[bool, float], ...]]:
    return counts.summary
