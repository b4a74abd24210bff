"""Numpy kernels of :mod:`flow.retention`: per-block histograms, and exact selection from them.

No Dask here: each function works on one cell block (or on the merged histograms, in the
driver) and is tested on its own.

Keys
----
Both selections work on non-negative int64 *keys* whose order is the order of what they stand
for: a 0-based rank is its own key; a value (a positive float64) is its IEEE bit pattern read
as an int64, which sorts exactly as the values do.

Pass 1 (:func:`first_pass_block`)
    - ``genes``: per (group, gene slot), a histogram of ranks over the bins of
      :attr:`Tables.rank_edges` (a regular grid with every cutoff as an edge, so counts at each
      cutoff are exact);
    - ``values``: per (group, rank interval between cutoffs), a histogram of value keys over
      :data:`N_VALUE_BINS` bins of 1/256 octave (``value >= 1`` starts a bin: the fraction
      below the corpus median is exact);
    - ``sets``: per (gene set, group, cutoff), the passing cells holding one of the set's genes
      at rank >= cutoff.
Refinement passes (:func:`refine_block`)
    For each unresolved *target* (a population and the k-th smallest key wanted in it) whose
    window ``[lo, hi)`` holds that key: a histogram of ``(key - lo) // step`` and, unless the
    bins are one key wide, each bin's smallest and largest key and how many keys equal them
    (all merge across blocks). :func:`narrow` keeps the bin holding the k-th key: its
    smallest or largest key when the k-th is one of those, else the bin shrunk to
    ``[min, max + 1)`` as the next window; a window one key wide is the answer. Every pass
    divides a window by the number of bins at least, so selection ends after a few passes.

Blocks are walked in segments of ranks between pass-1 rank-bin edges
(:func:`ranked_segments`), so every histogram update is a small ``bincount`` over genes or
value bins that stays in cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .encode._kernels import ranked_values
from .errors import InputError

__all__ = [
    "KEY_END",
    "N_VALUE_BINS",
    "ONE_VALUE_BIN",
    "Selection",
    "Tables",
    "Windows",
    "first_pass_block",
    "kth",
    "merge_states",
    "narrow",
    "ranked_segments",
    "refine_block",
    "start_selection",
    "value_bins",
    "value_edges",
]

IntArray = npt.NDArray[np.int64]
State = dict[str, np.ndarray]

VALUE_SHIFT: Final = 44
"""A value's pass-1 bin is its top 20 bits (sign, exponent, 8 mantissa bits): 1/256 octave."""
_FIRST_VALUE_BIN: Final = (1023 - 64) << 8  # the bin starting at 2**-64
N_VALUE_BINS: Final = 128 << 8
"""Pass-1 value bins from 2**-64 to 2**64; values outside fall in the first or last bin."""
ONE_VALUE_BIN: Final = (1023 << 8) - _FIRST_VALUE_BIN
"""The first bin of values >= 1 (the corpus median)."""
KEY_END: Final = 0x7FF0000000000000
"""The key of +inf: every finite positive value's key is below it."""
SET_CELL_ENTRIES: Final = 1 << 22
"""Most (cell, gene set) maxima held at once: a block is walked in row slices under this."""


def kth(n: npt.ArrayLike, numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> IntArray:
    """``ceil(p x n)`` for ``p = numerator / denominator``, exactly (integer arithmetic).

    Python integers (object arrays): a fraction typed with many digits has a numerator and
    denominator past int64, and ``n x numerator`` may pass it too; the result, at most ``n``,
    fits.
    """
    whole = np.asarray(n, dtype=np.int64).astype(object)
    num = np.asarray(numerator, dtype=object)
    den = np.asarray(denominator, dtype=object)
    out: IntArray = np.asarray((whole * num + den - 1) // den, dtype=np.int64)
    return out


def value_bins(keys: IntArray) -> IntArray:
    """Pass-1 bin of each value key (clipped into the first and last bin)."""
    return np.clip((keys >> VALUE_SHIFT) - _FIRST_VALUE_BIN, 0, N_VALUE_BINS - 1)


def value_edges() -> IntArray:
    """Key edges of the pass-1 value bins: bin ``i`` holds keys in ``[edges[i], edges[i+1])``."""
    inner = (np.arange(1, N_VALUE_BINS, dtype=np.int64) + _FIRST_VALUE_BIN) << VALUE_SHIFT
    return np.concatenate([[0], inner, [KEY_END]]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# the shared tables and the layout of a block


@dataclass(frozen=True)
class Tables:
    """What every block task needs to know, shipped once per graph (one key).

    Attributes
    ----------
    n_groups
        Groups of passing cells (codes ``0 .. n_groups-1``; -1 is a cell left out).
    slot_of_token
        int32 per token: the gene's row in the per-gene histograms, or -1 (not tracked).
    rank_edges
        Pass-1 rank bin edges (0 first, the widest passing cell's length last).
    interval
        Per rank ``0 .. width-1``: how many cutoffs are ``<= rank`` (its rank interval).
    cutoffs
        Sorted cutoffs.
    medians
        float64 per token (1 where there is none): the value arithmetic's divisor.
    set_ptr, set_ids
        CSR from token to the gene sets holding it (``set_ids[set_ptr[t]:set_ptr[t+1]]``).
    """

    n_groups: int
    slot_of_token: np.ndarray
    n_slots: int
    rank_edges: np.ndarray
    cutoffs: np.ndarray
    medians: np.ndarray
    set_ptr: np.ndarray
    set_ids: np.ndarray
    n_sets: int
    tail: bool
    interval: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ranks = np.arange(int(self.rank_edges[-1]), dtype=np.int64)
        intervals = np.searchsorted(self.cutoffs, ranks, side="right").astype(np.int16)
        object.__setattr__(self, "interval", intervals)

    @property
    def n_rank_bins(self) -> int:
        """Pass-1 rank bins."""
        return int(self.rank_edges.size - 1)

    @property
    def n_intervals(self) -> int:
        """Rank intervals between cutoffs (one more than cutoffs)."""
        return int(self.cutoffs.size + 1)

    @property
    def sets_per_token(self) -> np.ndarray:
        """How many gene sets hold each token."""
        return np.diff(self.set_ptr)


@dataclass(frozen=True)
class Segment:
    """The ranked entries of one run of ranks ``[first, first + width)`` of a block's rows, all
    in one pass-1 rank bin (so in one rank interval between cutoffs)."""

    bin: int
    first: int
    mask: np.ndarray  # (rows, width): which entries are ranked
    tokens: np.ndarray  # (rows, width)
    counts: np.ndarray | None

    def take(self, per_row: np.ndarray) -> np.ndarray:
        """A per-row array, one value per entry."""
        return np.broadcast_to(per_row[:, None], self.mask.shape)[self.mask]

    def ranks(self) -> IntArray:
        """The 0-based rank of each entry."""
        cols = np.arange(self.first, self.first + self.mask.shape[1], dtype=np.int64)
        return np.broadcast_to(cols, self.mask.shape)[self.mask]


def ranked_segments(
    tokens: Any, counts: Any, lengths: np.ndarray, edges: np.ndarray
) -> Iterator[Segment]:
    """The ranked entries of a ``(cell, rank)`` block, as segments of ranks between ``edges``.

    The one place of the kernels that knows the encoding store's layout: each row holds its
    ranking from rank 0 (``tokens`` and ``counts`` are the block's rank chunks, in order),
    pad-filled past its length; ``lengths`` (0 for cells left out) picks the entries.
    Segments never cross a rank chunk or an edge; ranks past the longest row are not visited.
    """
    longest = int(np.max(lengths, initial=0))
    start = 0
    for tok, cnt in _chunks(tokens, counts):
        width = tok.shape[1]
        stop = min(start + width, longest)
        inner = edges[(edges > start) & (edges < stop)].tolist()
        for a, z in itertools.pairwise([start, *inner, stop]):
            cols = slice(a - start, z - start)
            yield Segment(
                int(np.searchsorted(edges, a, side="right")) - 1,
                a,
                np.arange(a, z) < lengths[:, None],
                tok[:, cols],
                None if cnt is None else cnt[:, cols],
            )
        start += width
        if start >= longest:
            break


def _chunks(tokens: Any, counts: Any) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(tokens, counts) of a block's rank chunks, in rank order."""
    toks = tokens if isinstance(tokens, list | tuple) else [tokens]
    cnts = counts if isinstance(counts, list | tuple) else [counts] * len(toks)
    return list(zip(toks, cnts, strict=True))


def _row_slices(n_rows: int, n_sets: int) -> list[slice]:
    step = max(1, min(max(n_rows, 1), SET_CELL_ENTRIES // max(n_sets, 1)))
    return [slice(r, min(r + step, n_rows)) for r in range(0, max(n_rows, 1), step)]


def _rows(chunks: Any, rows: slice) -> Any:
    if chunks is None:
        return None
    return [c[rows] for c in (chunks if isinstance(chunks, list | tuple) else [chunks])]


def _value_keys(seg: Segment, toks: np.ndarray, n_counts: np.ndarray, t: Tables) -> IntArray:
    """Value keys of a segment's entries: the encoding's value arithmetic, bit for bit."""
    assert seg.counts is not None
    counts = seg.counts[seg.mask]
    values = ranked_values(counts[:, None], seg.take(n_counts), t.medians[toks][:, None])
    return np.ascontiguousarray(values.ravel()).view(np.int64)


def _groups(seg: Segment, codes: np.ndarray, t: Tables) -> IntArray:
    if t.n_groups == 1:
        return np.zeros(int(np.count_nonzero(seg.mask)), np.int64)
    return seg.take(codes)


# --------------------------------------------------------------------------------------------
# pass 1


def _empty_first_state(t: Tables) -> State:
    state: State = {
        # per gene and rank bin at most one count per cell: int32 (a store has < 2**31 cells)
        "sum:genes": np.zeros(t.n_groups * t.n_slots * t.n_rank_bins, np.int32),
        "sum:sets": np.zeros(t.n_sets * t.n_groups * t.cutoffs.size, np.int64),
    }
    if t.tail:
        state["sum:values"] = np.zeros(t.n_groups * t.n_intervals * N_VALUE_BINS, np.int64)
    return state


def _set_maxima(maxrank: np.ndarray, seg: Segment, toks: np.ndarray, t: Tables) -> None:
    """Raise ``maxrank[row, set]`` to the rank of each entry of the sets' genes."""
    per = t.sets_per_token[toks]
    sel = per > 0
    if not sel.any():
        return
    rows = seg.take(np.arange(seg.mask.shape[0], dtype=np.int64))[sel]
    ranks, toks, per = seg.ranks()[sel], toks[sel], per[sel]
    which = np.repeat(np.arange(toks.size), per)
    offset = np.arange(which.size) - np.repeat(np.cumsum(per) - per, per)
    sets = t.set_ids[t.set_ptr[toks][which] + offset]
    np.maximum.at(maxrank.reshape(-1), rows[which] * t.n_sets + sets, ranks[which].astype(np.int32))


def _count_set_losses(state: State, maxrank: np.ndarray, codes: np.ndarray, t: Tables) -> None:
    """Add the cells losing a set's gene at each cutoff, by group, to ``state['sum:sets']``."""
    out = state["sum:sets"].reshape(t.n_sets, t.n_groups, t.cutoffs.size)
    passing = codes >= 0
    onehot = np.zeros((t.n_groups, codes.size), np.float32)  # counts < 2**24: exact
    onehot[codes[passing], np.flatnonzero(passing)] = 1.0
    for i, cutoff in enumerate(t.cutoffs.tolist()):
        losing = (maxrank >= cutoff).astype(np.float32)
        out[:, :, i] += np.rint(onehot @ losing).astype(np.int64).T


def _first_pass_segment(
    state: State, seg: Segment, codes: np.ndarray, n_counts: np.ndarray, t: Tables
) -> np.ndarray:
    """Count one segment's entries into the gene and value histograms; returns its tokens."""
    toks = seg.tokens[seg.mask]
    slot = t.slot_of_token[toks]
    grp = _groups(seg, codes, t)
    tracked = slot >= 0
    flat = grp[tracked] * t.n_slots + slot[tracked]
    genes = state["sum:genes"].reshape(t.n_groups * t.n_slots, t.n_rank_bins)
    genes[:, seg.bin] += np.bincount(flat, minlength=t.n_groups * t.n_slots)
    if "sum:values" in state:
        bins = value_bins(_value_keys(seg, toks, n_counts, t))
        values = state["sum:values"].reshape(t.n_groups, t.n_intervals, N_VALUE_BINS)
        counted = np.bincount(grp * N_VALUE_BINS + bins, minlength=t.n_groups * N_VALUE_BINS)
        values[:, int(t.interval[seg.first])] += counted.reshape(t.n_groups, N_VALUE_BINS)
    return toks


def first_pass_block(
    tokens: Any,
    counts: Any,
    lengths: np.ndarray,
    n_counts: np.ndarray,
    codes: np.ndarray,
    t: Tables,
) -> State:
    """Pass 1 over one cell block (see the module docstring); a fixed-size state.

    ``tokens`` and ``counts`` are the block's rank chunks (lists, in rank order; ``counts``
    None without the tail), ``lengths``, ``n_counts`` and ``codes`` one entry per cell.
    """
    state = _empty_first_state(t)
    codes = np.asarray(codes, dtype=np.int64)
    live = np.where(codes >= 0, np.asarray(lengths, dtype=np.int64), 0)
    n_counts = np.asarray(n_counts if t.tail else np.ones(live.size), dtype=np.float64)
    for rs in _row_slices(live.size, t.n_sets):
        maxrank = np.full((rs.stop - rs.start, t.n_sets), -1, np.int32) if t.n_sets else None
        chunks = (_rows(tokens, rs), _rows(counts, rs) if t.tail else None)
        for seg in ranked_segments(*chunks, live[rs], t.rank_edges):
            toks = _first_pass_segment(state, seg, codes[rs], n_counts[rs], t)
            if maxrank is not None and seg.first + seg.mask.shape[1] > t.cutoffs[0]:
                _set_maxima(maxrank, seg, toks, t)
        if maxrank is not None:
            _count_set_losses(state, maxrank, codes[rs], t)
    return state


def _reduce_sparse(rows: State, name: str) -> State:
    """Rows of a sparse family ``name`` (bin ``idx:``, count ``sum:`` and, unless its bins
    are one key wide, extremes ``min:``/``max:`` and the keys at them ``minn:``/``maxn:``)
    reduced to one row per bin, in bin order."""
    idx = rows[f"idx:{name}"]
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]]) if idx.size else idx[:0]
    if not idx.size:
        return {key: value[:0] for key, value in rows.items()}
    out = {
        f"idx:{name}": idx[starts],
        f"sum:{name}": np.add.reduceat(rows[f"sum:{name}"][order], starts),
    }
    sizes = np.diff(np.r_[starts, idx.size])
    for kind, pick in (("min", np.minimum), ("max", np.maximum)):
        if f"{kind}:{name}" not in rows:
            continue
        extreme = rows[f"{kind}:{name}"][order]
        best = pick.reduceat(extreme, starts)
        at_best = np.where(extreme == np.repeat(best, sizes), rows[f"{kind}n:{name}"][order], 0)
        out[f"{kind}:{name}"] = best
        out[f"{kind}n:{name}"] = np.add.reduceat(at_best, starts)
    return out


def merge_states(*parts: State) -> State:
    """Merge block states: dense ``sum:`` keys add; sparse families (those with an ``idx:``
    key) are concatenated and reduced to one row per bin (counts add, extremes and the
    counts at them combine)."""
    sparse = {key.split(":", 1)[1] for key in parts[0] if key.startswith("idx:")}
    out: State = {}
    for key in parts[0]:
        if key.split(":", 1)[1] not in sparse:
            out[key] = parts[0][key].copy()
            for part in parts[1:]:  # in place: never all parts stacked
                out[key] += part[key]
    for name in sparse:
        keys = [key for key in parts[0] if key.split(":", 1)[1] == name]
        out |= _reduce_sparse({key: np.concatenate([p[key] for p in parts]) for key in keys}, name)
    return out


# --------------------------------------------------------------------------------------------
# refinement passes


@dataclass(frozen=True)
class Windows:
    """The windows of one pass of one selection, for the block tasks.

    ``target`` maps a target's place in its family's grid to its window (-1: none this pass);
    window ``u`` covers keys ``[lo[u], hi[u])`` in bins of ``step[u]`` keys (at most
    ``n_bins``). ``wanted`` marks the pass-1 bins (of each population) that hold a window, so
    a block task looks at only their entries.
    """

    target: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    step: np.ndarray
    n_bins: int
    wanted: np.ndarray

    @property
    def size(self) -> int:
        """Number of windows."""
        return int(self.lo.size)

    @property
    def exact(self) -> bool:
        """Every bin is one key wide: this pass finds every answer (no extremes needed)."""
        return bool((self.step == 1).all())


def _window_entries(w: Windows, targets: IntArray, keys: IntArray) -> tuple[IntArray, IntArray]:
    """(bin, key) of the entries whose target has a window holding their key."""
    u = w.target[targets].astype(np.int64)
    ok = u >= 0
    u, keys = u[ok], keys[ok]
    inside = (keys >= w.lo[u]) & (keys < w.hi[u])
    u, keys = u[inside], keys[inside]
    return u * w.n_bins + (keys - w.lo[u]) // w.step[u], keys


def _sparse_state(name: str, w: Windows, bins: list[IntArray], keys: list[IntArray]) -> State:
    """A block's sparse state of one family, from its entries' (bin, key)."""
    flat = np.concatenate(bins) if bins else np.zeros(0, np.int64)
    ones = np.ones(flat.size, np.int64)
    rows = {f"idx:{name}": flat, f"sum:{name}": ones}
    if not w.exact:
        key = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        rows |= {f"min:{name}": key, f"max:{name}": key}
        rows |= {f"minn:{name}": ones, f"maxn:{name}": ones}
    return _reduce_sparse(rows, name)


Found = dict[str, tuple[list[IntArray], list[IntArray]]]


def _refine_genes(
    found: Found, w: Windows, seg: Segment, toks: np.ndarray, grp: IntArray, t: Tables, n_keep: int
) -> None:
    slot = t.slot_of_token[toks].astype(np.int64)
    pop = grp * t.n_slots + slot
    sel = slot >= 0
    sel[sel] = w.wanted[pop[sel] * t.n_rank_bins + seg.bin]
    if not sel.any():
        return
    pop, ranks = pop[sel], seg.ranks()[sel]
    for q in range(n_keep):
        bins, keys = _window_entries(w, pop * n_keep + q, ranks)
        found["genes"][0].append(bins)
        found["genes"][1].append(keys)


def _refine_values(
    found: Found, w: Windows, keys: IntArray, grp: IntArray, interval: int, t: Tables, groups: int
) -> None:
    n_cut = t.cutoffs.size
    value_bin = value_bins(keys)
    modes = [grp] if groups == t.n_groups else [grp, np.full_like(grp, t.n_groups)]
    for g in modes:
        sel = w.wanted[g * N_VALUE_BINS + value_bin]
        g_s, k_s = g[sel], keys[sel]
        for c in range(n_cut):
            part = int(interval > c)  # rank >= cutoffs[c]: dropped
            for q in range(3):
                bins, kept = _window_entries(w, ((g_s * n_cut + c) * 2 + part) * 3 + q, k_s)
                found["values"][0].append(bins)
                found["values"][1].append(kept)


def refine_block(
    tokens: Any,
    counts: Any,
    lengths: np.ndarray,
    n_counts: np.ndarray,
    codes: np.ndarray,
    t: Tables,
    windows: dict[str, Windows],
    n_keep: int,
    value_groups: int,
) -> State:
    """A refinement pass over one cell block: sparse window histograms of ``genes`` and
    ``values`` (rows only for the bins its entries fall in).

    Gene targets are ``(group, slot, keep fraction)``; value targets
    ``(group, cutoff, part, quantile)`` with ``part`` 0 kept, 1 dropped, over
    ``value_groups`` groups (the last one is every passing cell when there are more than
    ``t.n_groups``), 3 quantiles.
    """
    codes = np.asarray(codes, dtype=np.int64)
    live = np.where(codes >= 0, np.asarray(lengths, dtype=np.int64), 0)
    genes, values = windows.get("genes"), windows.get("values")
    n_counts = np.asarray(n_counts if values is not None else np.ones(live.size), np.float64)
    found: Found = {name: ([], []) for name in windows}
    for seg in ranked_segments(tokens, counts if values is not None else None, live, t.rank_edges):
        toks = seg.tokens[seg.mask]
        grp = _groups(seg, codes, t)
        if genes is not None:
            _refine_genes(found, genes, seg, toks, grp, t, n_keep)
        if values is not None:
            keys = _value_keys(seg, toks, n_counts, t)
            interval = int(t.interval[seg.first])
            _refine_values(found, values, keys, grp, interval, t, value_groups)
    state: State = {}
    for name, (bins, entry_keys) in found.items():
        state |= _sparse_state(name, windows[name], bins, entry_keys)
    return state


# --------------------------------------------------------------------------------------------
# selection, in the driver


@dataclass
class Selection:
    """The k-th smallest key of many targets, narrowed pass by pass (see :func:`narrow`).

    ``k`` is 1-based (0: the target's population is empty, nothing to find). A target is
    active until ``answer`` holds its key (-1 for none).
    """

    k: IntArray
    lo: IntArray
    hi: IntArray
    below: IntArray
    inside: IntArray
    answer: IntArray
    active: np.ndarray

    def windows(self, max_bins: int, *, wanted: np.ndarray, bin_of: IntArray) -> Windows:
        """This pass's windows, at most ``max_bins`` bins in all (at least 2 per window).

        ``bin_of`` is each target's pass-1 bin index (in the ``wanted`` grid). A block's state
        holds only the bins its entries fall in, so ``max_bins`` bounds it, rarely reached.
        """
        ids = np.flatnonzero(self.active)
        target = np.full(self.k.size, -1, np.int32)
        target[ids] = np.arange(ids.size, dtype=np.int32)
        lo, hi = self.lo[ids], self.hi[ids]
        span = int((hi - lo).max(initial=1))
        n_bins = int(min(span, max(2, max_bins // max(ids.size, 1))))
        step = np.maximum(1, -(-(hi - lo) // n_bins))
        marks = np.zeros_like(wanted)
        marks[bin_of[ids]] = True
        return Windows(target, lo, hi, step.astype(np.int64), n_bins, marks)


def start_selection(hist: IntArray, k: IntArray, pop: IntArray, edges: IntArray) -> Selection:
    """Windows from pass-1 histograms: the bin of ``edges`` holding each target's k-th key.

    ``hist`` is ``(populations, bins)``; target ``i`` wants the ``k[i]``-th smallest key of
    population ``pop[i]`` (``k`` 0: none).
    """
    k = np.asarray(k, dtype=np.int64)
    pop = np.asarray(pop, dtype=np.int64)
    cum = np.cumsum(hist, axis=1)
    j = np.zeros(k.size, np.int64)
    for a in range(0, k.size, 1 << 14):  # (targets x bins) booleans, a slice at a time
        b = a + (1 << 14)
        j[a:b] = np.argmax(cum[pop[a:b]] >= k[a:b, None], axis=1)
    has = k > 0
    j[~has] = 0
    count = hist[pop, j] if k.size else np.zeros(0, np.int64)
    below = (cum[pop, j] if k.size else count) - count
    lo, hi = edges[j], edges[j + 1]
    done = has & (hi - lo == 1)
    return Selection(
        k,
        lo.astype(np.int64),
        hi.astype(np.int64),
        below.astype(np.int64),
        count.astype(np.int64),
        np.where(done, lo, -1).astype(np.int64),
        has & ~done,
    )


def narrow(sel: Selection, w: Windows, state: State, name: str) -> None:
    """Keep, for each active target, the bin of its window holding its k-th key (in place).

    ``state`` holds the pass's sparse rows of family ``name`` (see :func:`refine_block`):
    the k-th key is a bin's smallest when at most ``minn`` keys precede it in the bin, its
    largest when at most ``maxn`` follow, else the bin shrunk to ``[min, max + 1)`` is the
    next window (one-key bins are answers at once).

    Raises
    ------
    InputError
        A window holds a different number of keys than the pass before found there: the
        store changed while it was being read.
    """
    ids = np.flatnonzero(sel.active)
    if not ids.size:
        return
    u = w.target[ids].astype(np.int64)
    idx, count = state[f"idx:{name}"], state[f"sum:{name}"]
    owner = idx // w.n_bins  # idx is sorted: so is owner
    cum = np.r_[0, np.cumsum(count)]
    first, last = np.searchsorted(owner, u, "left"), np.searchsorted(owner, u, "right")
    if not np.array_equal(cum[last] - cum[first], sel.inside[ids]):
        msg = "The encoding store changed while it was being read: run the query again."
        raise InputError(msg)
    want = sel.k[ids] - sel.below[ids]
    row = np.searchsorted(cum, cum[first] + want, "left") - 1  # the bin holding the k-th key
    before = cum[row] - cum[first]
    sel.below[ids] += before
    sel.inside[ids] = count[row]
    if w.exact:
        lo = w.lo[u] + (idx[row] - u * w.n_bins) * w.step[u]
        hi = lo + 1
    else:
        lo, hi = state[f"min:{name}"][row], state[f"max:{name}"][row] + 1
        rank = want - before  # 1-based within the bin
        at_min = rank <= state[f"minn:{name}"][row]
        at_max = rank > count[row] - state[f"maxn:{name}"][row]
        hi = np.where(at_min, lo + 1, hi)
        lo = np.where(at_max & ~at_min, hi - 1, lo)
    sel.lo[ids], sel.hi[ids] = lo, hi
    done = hi - lo == 1
    sel.answer[ids[done]] = lo[done]
    sel.active[ids[done]] = False
