"""Rank bands: the ragged layout of the encoding store's rankings (numpy and zarr arrays; no
Dask here).

Ranks are cut into *bands* of ``band_width`` ranks (512): band ``k`` holds, for every cell, its
ranks ``[band_width * k, min(band_width * (k + 1), length))``, one cell after another, in a
flat 1-D array per band (``bands/<k>/tokens`` and ``bands/<k>/counts``). Storage is the total
number of ranked genes, whatever the longest cell: a cell of 7,000 genes costs 7,000 entries,
not every cell 7,000.

Each cell block owns one region of ``region`` entries (a whole number of the flat arrays'
chunks) in every band, starting at ``band_start[block, band]``, so parallel writers never share
a chunk (DESIGN section 8). A block's region can hold all its cells at full band width
(``block_size * band_width``), so its start is known before anything is ranked; the block
fills it from the front, and the chunks past its last entry are never written (an unwritten
Zarr chunk costs nothing). Within a region, cell ``i`` of the block starts at the sum of the
band sizes of the cells before it, where a cell's band size is
``clip(length - band_width * k, 0, band_width)``: the stored ``length`` locates every entry.

The dense ``(cell, rank)`` view readers see (:attr:`flow.encode.store.EncodingStore.tokens`) is
built chunk by chunk from these slices: chunk ``(block, k)`` reads only band ``k`` of that block,
and pads it in memory (block x band_width). Readers that want flat values (the export's model
input, the drop-rate and dropped-gene queries) skip the dense view: :class:`BandReader` reads
a block's (or one cell's) entries of a band as they are stored, :func:`band_take` says where
each cell's ranks ``[lo, hi)`` lie in such a slice, and :func:`gather` collects them, cell after
cell, with no per-cell loop and no padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "BandLayout",
    "BandReader",
    "band_rows",
    "band_sizes",
    "band_take",
    "gather",
    "index_dtype",
    "read_band_chunk",
    "split_bands",
    "write_band",
]

#: Entries per chunk of a band's flat array (128 KiB of uint16 tokens): one chunk holds the
#: band of about 128 cells at full width, many more in the sparse deep bands.
FLAT_CHUNK = 1 << 16


@dataclass(frozen=True)
class BandLayout:
    """Where every block's bands live in the flat arrays (a few integers; no data)."""

    n_cells: int
    block_size: int
    band_width: int
    width: int  # the dense view's rank axis: at least the longest ranking
    flat_chunk: int

    @classmethod
    def plan(cls, n_cells: int, block_size: int, band_width: int, width: int) -> BandLayout:
        """The layout of a new store (flat chunks no larger than a block's full band)."""
        chunk = max(1, min(FLAT_CHUNK, block_size * band_width))
        return cls(n_cells, block_size, band_width, width, chunk)

    @property
    def n_blocks(self) -> int:
        """Cell blocks."""
        return -(-self.n_cells // self.block_size)

    @property
    def n_bands(self) -> int:
        """Bands of ``band_width`` ranks covering ``width``."""
        return -(-self.width // self.band_width)

    @property
    def region(self) -> int:
        """Entries each block owns in each band: its full band, rounded up to whole chunks."""
        full = self.block_size * self.band_width
        return -(-full // self.flat_chunk) * self.flat_chunk

    @property
    def flat_size(self) -> int:
        """Length of every band's flat array."""
        return self.n_blocks * self.region

    def band_start(self) -> npt.NDArray[np.int64]:
        """``(n_blocks, n_bands)`` first entry of each block's region in each band."""
        starts = np.arange(self.n_blocks, dtype=np.int64) * self.region
        return np.repeat(starts[:, None], self.n_bands, axis=1)

    def band_chunks(self) -> tuple[int, ...]:
        """The rank chunks of the dense view: one per band."""
        last = self.width - self.band_width * (self.n_bands - 1)
        return (*([self.band_width] * (self.n_bands - 1)), last) if self.n_bands else ()

    def blocks_of_flat_chunk(self, chunk: int) -> list[int]:
        """The block whose region holds chunk ``chunk`` of a band's flat array."""
        block = chunk * self.flat_chunk // self.region
        return [block] if 0 <= block < self.n_blocks else []

    def to_attrs(self) -> dict[str, int]:
        """What :meth:`from_attrs` needs (recorded in the store's ``attrs["flow"]["bands"]``)."""
        return {
            "n_cells": self.n_cells,
            "block_size": self.block_size,
            "band_width": self.band_width,
            "width": self.width,
            "flat_chunk": self.flat_chunk,
        }

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> BandLayout:
        """The layout recorded by :meth:`to_attrs`."""
        return cls(**{k: int(attrs[k]) for k in cls.__dataclass_fields__})


def band_sizes(lengths: npt.ArrayLike, band: int, band_width: int) -> npt.NDArray[np.int64]:
    """Entries of each cell in band ``band``: ``clip(length - band_width * band, 0, band_width)``."""
    lens = np.asarray(lengths, dtype=np.int64)
    return np.clip(lens - band_width * band, 0, band_width)


def split_bands(
    flat: npt.NDArray[Any], lengths: npt.ArrayLike, band_width: int
) -> list[npt.NDArray[Any]]:
    """Flat rankings (cells one after another) cut into bands, each in cell order.

    Returns one array per band up to the longest cell's last band; ``flat.size`` entries in all.
    """
    lens = np.asarray(lengths, dtype=np.int64)
    longest = int(lens.max(initial=0))
    n_bands = -(-longest // band_width)
    if n_bands <= 1:
        return [flat] if n_bands else []
    # the band of each entry, in small dtypes (a few bytes per entry: memory follows the block)
    idx = np.int32 if flat.size < 2**31 else np.int64
    offsets: npt.NDArray[np.signedinteger[Any]] = np.arange(flat.size, dtype=idx)
    offsets -= np.repeat((np.cumsum(lens) - lens).astype(idx), lens)
    offsets //= band_width
    band = offsets.astype(np.uint16 if n_bands < 2**16 else np.int64)
    del offsets
    return [flat[band == k] for k in range(n_bands)]


def band_rows(
    flat: npt.NDArray[Any], lengths: npt.ArrayLike, band: int, band_width: int, fill: Any
) -> npt.NDArray[Any]:
    """``(cells, band_width)`` dense rows of one band from its flat slice, ``fill`` past each end.

    ``flat`` starts at the block's region start and holds at least the block's entries.
    """
    sizes = band_sizes(lengths, band, band_width)
    out = np.full((sizes.size, band_width), fill, dtype=flat.dtype)
    total = int(sizes.sum())
    if total:
        out[np.arange(band_width) < sizes[:, None]] = flat[:total]  # row-major = rank order
    return out


def read_band_chunk(
    lengths: np.ndarray,
    shared: tuple[list[Any], np.ndarray],
    b: int,
    k: int,
    layout: BandLayout,
) -> np.ndarray:
    """Chunk ``(b, k)`` of the dense view: block ``b``'s slice of band ``k``, padded in
    memory to (block, band width)."""
    sources, starts = shared
    width = layout.band_width
    total = int(np.clip(lengths - width * k, 0, width).sum())
    array = sources[k]
    start = int(starts[b, k])
    flat = array[start : start + total] if total else np.empty(0, array.dtype)
    rows = band_rows(flat, lengths, k, width, array.fill_value)
    return rows[:, : min(width, layout.width - width * k)]


def write_band(array: Any, start: int, values: np.ndarray, fill: Any) -> None:
    """Write one block's entries of one band from its region's start, in whole chunks (the
    last one completed with ``fill``: no chunk is read back or shared with another block)."""
    step = int(array.chunks[0])
    end = -(-values.size // step) * step
    padded = np.full(end, fill, dtype=array.dtype)
    padded[: values.size] = values
    array[start : start + end] = padded


def band_take(
    lengths: npt.ArrayLike, band: int, band_width: int, lo: npt.ArrayLike, hi: npt.ArrayLike
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Where each cell's ranks ``[lo, hi)`` lie in a block's flat slice of band ``band``.

    ``lengths`` are the block's cells' lengths (in block order); ``lo`` and ``hi`` are ranks
    (scalars or one per cell; clipped to the cell's entries in this band). Returns per cell
    the offset of its first wanted entry in the slice and the number of wanted entries
    (0 where the cell has none of those ranks in this band).
    """
    stored = band_sizes(lengths, band, band_width)
    first = np.cumsum(stored) - stored
    base = band_width * band
    a = np.clip(np.asarray(lo, dtype=np.int64) - base, 0, stored)
    b = np.clip(np.asarray(hi, dtype=np.int64) - base, 0, stored)
    return first + a, np.maximum(b - a, 0)


def gather(flat: npt.NDArray[Any], offsets: np.ndarray, sizes: np.ndarray) -> npt.NDArray[Any]:
    """``flat[offsets[i] : offsets[i] + sizes[i]]`` for every ``i``, one after another.

    One fancy index (no per-cell loop); a plain slice when the pieces are already contiguous.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    total = int(sizes.sum())
    if not total:
        return flat[:0]
    starts = np.cumsum(sizes) - sizes
    live = sizes > 0
    shift = offsets[live] - starts[live]
    if np.all(shift == shift[0]):  # contiguous pieces: one slice
        return flat[int(shift[0]) : int(shift[0]) + total]
    index = np.arange(total, dtype=index_dtype(flat.size))
    index += np.repeat(shift, sizes[live]).astype(index.dtype, copy=False)
    return flat[index]


def index_dtype(size: int) -> type[np.signedinteger[Any]]:
    """The smallest index type for positions below ``size`` (int32 for any block: half the
    memory traffic of int64)."""
    return np.int32 if size < 2**31 else np.int64


@dataclass(frozen=True, eq=False)
class BandReader:
    """Reads one ranking array's bands (``bands/<k>/tokens`` or ``.../counts``) flat: a block's
    entries of a band, or a part of them, as stored (no padding).

    Holds the opened zarr arrays and the band starts: small and picklable, so a task can carry
    it to a worker.
    """

    arrays: tuple[Any, ...]  # bands/<k>/<name>, k = 0 .. n_bands - 1
    starts: npt.NDArray[np.int64]  # (n_blocks, n_bands)
    layout: BandLayout

    @classmethod
    def of(
        cls, group: Any, name: str, layout: BandLayout, *, bands: Iterable[int] | None = None
    ) -> BandReader:
        """The reader of ``bands/<k>/<name>`` of an opened encoding store group; with
        ``bands``, only those bands are opened (reading another one is an error)."""
        wanted = range(layout.n_bands) if bands is None else frozenset(bands)
        arrays = tuple(
            group[f"bands/{k}/{name}"] if k in wanted else None for k in range(layout.n_bands)
        )
        return cls(arrays, np.asarray(group["band_start"][...], dtype=np.int64), layout)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The array's dtype."""
        opened = [a for a in self.arrays if a is not None]
        return np.dtype(opened[0].dtype) if opened else np.dtype(np.int32)

    def read(self, block: int, band: int, lo: int, hi: int) -> npt.NDArray[Any]:
        """Entries ``[lo, hi)`` of block ``block``'s region of band ``band`` (reads only the
        chunks that hold them)."""
        array = self.arrays[band]
        if array is None:
            msg = f"band {band} was not opened by this reader"
            raise ValueError(msg)
        if hi <= lo:
            return np.empty(0, dtype=array.dtype)
        start = int(self.starts[block, band])
        return np.asarray(array[start + lo : start + hi])

    def take(
        self, block: int, band: int, lengths: np.ndarray, lo: npt.ArrayLike, hi: npt.ArrayLike
    ) -> tuple[npt.NDArray[Any], npt.NDArray[np.int64]]:
        """Each cell's ranks ``[lo, hi)`` in band ``band`` of block ``block``, cell after cell,
        and how many each cell gave (``lengths``: the block's lengths). Reads the band only up
        to the last entry wanted."""
        offsets, sizes = band_take(lengths, band, self.layout.band_width, lo, hi)
        if not sizes.any():
            return np.empty(0, dtype=self.dtype), sizes
        live = sizes > 0
        first = int(offsets[live].min())
        end = int((offsets + sizes)[live].max())
        flat = self.read(block, band, first, end)
        return gather(flat, offsets - first, sizes), sizes
