"""The computed side of :mod:`flow.retention`: what was asked, the merged histograms, the
selected ranks and values, and the tables, curves and xarray view made from them (all small,
in memory; nothing here touches Dask or the store)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, Final

import numpy as np
import pandas as pd
import xarray as xr  # already loaded by anndata and the median set: no import cost here

from . import _retention_kernels as k
from .errors import InputError

__all__ = [
    "ALL_CELLS",
    "TAIL_COLUMNS",
    "TAIL_QUANTILES",
    "KeepFraction",
    "RetentionResult",
    "RetentionSpec",
    "next_windows",
    "start_selections",
]

TAIL_QUANTILES: Final = (Fraction(1, 10), Fraction(1, 2), Fraction(9, 10))
"""The tail's log2 fold-change quantiles: p10, p50, p90."""
TAIL_COLUMNS: Final = ("log2_fold_change_p10", "log2_fold_change_p50", "log2_fold_change_p90")
ALL_CELLS: Final = "(all)"
"""The tail's group label for every passing cell, beside each group's rows."""
VALUE_BINS_PER_WINDOW: Final = 1 << 14
"""Bins per fold-change window in a refinement pass (14 bits of the key per pass). States are
sparse, but at 10**9 occurrences every bin near a median is hit, so the fold-change windows
also share at most ``max_bins / 16`` bins (about 12 MB of state)."""
PARTS: Final = ("kept", "dropped")
_NO_TAIL: Final = "The tail was not computed: use gene_retention(..., tail=True)."


@dataclass(frozen=True)
class KeepFraction:
    """A keep fraction ``p`` in (0, 1], exact as written (``label`` names its column)."""

    label: str
    fraction: Fraction

    @property
    def column(self) -> str:
        """The genes table's column: ``input_size_for_<label>``."""
        return f"input_size_for_{self.label}"


@dataclass(frozen=True)
class RetentionSpec:
    """What was asked, resolved (small): cutoffs, keep fractions, groups, genes and sets."""

    url: str
    cutoffs: tuple[int, ...]
    keep: tuple[KeepFraction, ...]
    group_by: str | None
    groups: tuple[str, ...]
    tracked: np.ndarray  # tokens with a gene slot, ascending (slot order)
    shown: np.ndarray  # tokens of the genes table, in its order
    gene_ids: np.ndarray  # per token
    symbols: np.ndarray  # per token
    set_names: tuple[str, ...]
    set_tokens: tuple[np.ndarray, ...]
    requested: bool  # genes were asked for

    @property
    def value_groups(self) -> tuple[str, ...]:
        """The tail's groups: each group, then every passing cell when grouped."""
        return self.groups if self.group_by is None else (*self.groups, ALL_CELLS)

    def slots(self, tokens: np.ndarray) -> np.ndarray:
        """Gene slots of tracked tokens."""
        return np.searchsorted(self.tracked, np.asarray(tokens, dtype=np.int64))

    def label(self, token: int) -> str:
        """A gene's symbol, else its ID."""
        return str(self.symbols[token] or self.gene_ids[token])


def _rank_bin(edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, np.arange(int(edges[-1])), side="right") - 1


@dataclass(frozen=True)
class RetentionResult:
    """Computed retention (small): tables (:meth:`genes_frame`, :meth:`sets_frame`,
    :meth:`tail_frame`), curves for plots and an xarray view.

    Attributes
    ----------
    rank_edges
        Pass-1 rank bin edges (every cutoff below the widest cell is one).
    gene_hist
        ``(group, gene slot, rank bin)`` expressing cells per rank bin.
    value_hist
        ``(tail group, rank interval, value bin)`` occurrences per 1/256-octave value bin
        (intervals split at the cutoffs); None without the tail.
    set_losing
        ``(gene set, group, cutoff)`` passing cells losing one of the set's genes.
    gene_rank
        ``(group, gene slot, keep)`` the selected 0-based rank (-1: no expressing cell).
    value_key
        ``(tail group, cutoff, part, quantile)`` the selected value's key (-1: none).
    passes
        Passes made over the store.
    """

    spec: RetentionSpec
    rank_edges: np.ndarray
    gene_hist: np.ndarray
    value_hist: np.ndarray | None
    set_losing: np.ndarray
    gene_rank: np.ndarray | None = None
    value_key: np.ndarray | None = None
    passes: int = 1

    @classmethod
    def from_first_pass(
        cls, spec: RetentionSpec, t: k.Tables, state: dict[str, np.ndarray]
    ) -> RetentionResult:
        """The result of pass 1 (nothing selected yet)."""
        values = None
        if "sum:values" in state:
            values = state["sum:values"].reshape(t.n_groups, t.n_intervals, k.N_VALUE_BINS)
            if len(spec.value_groups) > t.n_groups:
                values = np.concatenate([values, values.sum(axis=0, keepdims=True)])
        return cls(
            spec,
            t.rank_edges,
            state["sum:genes"].astype(np.int64).reshape(t.n_groups, t.n_slots, t.n_rank_bins),
            values,
            state["sum:sets"].reshape(t.n_sets, t.n_groups, len(spec.cutoffs)),
        )

    def value_populations(self) -> np.ndarray:
        """``(tail group, cutoff, part, value bin)``: kept (rank < L) and dropped."""
        if self.value_hist is None:
            raise InputError(_NO_TAIL)
        cum = np.cumsum(self.value_hist, axis=1)  # intervals 0..c: ranks below cutoff c
        kept = cum[:, : len(self.spec.cutoffs)]
        return np.stack([kept, cum[:, -1:] - kept], axis=2)

    def with_answers(self, genes: k.Selection, values: k.Selection, passes: int) -> RetentionResult:
        """This result with the selected ranks and value keys."""
        n_g, n_s = self.gene_hist.shape[:2]
        key = None
        if self.value_hist is not None:
            shape = (len(self.spec.value_groups), len(self.spec.cutoffs), 2, 3)
            key = values.answer.reshape(shape)
        rank = genes.answer.reshape(n_g, n_s, len(self.spec.keep))
        return replace(self, gene_rank=rank, value_key=key, passes=passes)

    # ---- figures

    def _gene_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(group, slot)`` expressing cells and ``(group, slot, cutoff)`` dropped."""
        n = self.gene_hist.sum(axis=-1)
        cum = np.concatenate(
            [np.zeros((*n.shape, 1), np.int64), np.cumsum(self.gene_hist, axis=-1)], axis=-1
        )
        at = np.searchsorted(self.rank_edges, np.minimum(self.spec.cutoffs, self.rank_edges[-1]))
        return n, n[..., None] - cum[..., at]

    def _input_sizes(self) -> np.ndarray:
        """``(group, slot, keep)`` float: 1 + the selected rank, NaN without expressing cells."""
        if self.gene_rank is None:
            msg = "Not computed yet: use Retention.compute()."
            raise InputError(msg)
        return np.where(self.gene_rank >= 0, self.gene_rank + 1.0, np.nan)

    def genes_frame(self) -> pd.DataFrame:
        """Per gene (and group): ``gene_id``, ``symbol``, ``expressing_cells``,
        ``dropped_at_<L>`` per cutoff, ``input_size_for_<p>`` per keep fraction (nullable
        integers: empty without expressing cells), ``group`` first when grouped.

        Genes asked for keep their order; otherwise the genes needing the largest input for
        the last keep fraction come first (then by token).
        """
        spec = self.spec
        n, dropped = self._gene_counts()
        sizes = self._input_sizes()
        slots = spec.slots(spec.shown)
        frames = []
        for g, label in enumerate(spec.groups):
            cols: dict[str, Any] = {} if spec.group_by is None else {"group": label}
            cols |= {
                "gene_id": spec.gene_ids[spec.shown],
                "symbol": spec.symbols[spec.shown],
                "expressing_cells": n[g, slots],
            }
            for c, cutoff in enumerate(spec.cutoffs):
                cols[f"dropped_at_{cutoff}"] = dropped[g, slots, c]
            for q, p in enumerate(spec.keep):
                cols[p.column] = pd.array(sizes[g, slots, q], dtype="Int64")
            frame = pd.DataFrame(cols)
            if not spec.requested:
                last = np.nan_to_num(sizes[g, slots, -1], nan=-1.0)
                frame = frame.iloc[np.lexsort((spec.shown, -last))]
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def sets_frame(self) -> pd.DataFrame:
        """Per gene set (and group): ``gene_set``, ``genes_in_vocabulary``, ``occurrences``
        (expressing cell x gene pairs), ``dropped_at_<L>`` and ``cells_losing_any_at_<L>``
        per cutoff, ``group`` first when grouped."""
        spec = self.spec
        n, dropped = self._gene_counts()
        rows = []
        for g, label in enumerate(spec.groups):
            for s, (name, tokens) in enumerate(zip(spec.set_names, spec.set_tokens, strict=True)):
                slots = spec.slots(tokens)
                row: dict[str, Any] = {} if spec.group_by is None else {"group": label}
                row |= {
                    "gene_set": name,
                    "genes_in_vocabulary": int(tokens.size),
                    "occurrences": int(n[g, slots].sum()),
                }
                for c, cutoff in enumerate(spec.cutoffs):
                    row[f"dropped_at_{cutoff}"] = int(dropped[g, slots, c].sum())
                for c, cutoff in enumerate(spec.cutoffs):
                    row[f"cells_losing_any_at_{cutoff}"] = int(self.set_losing[s, g, c])
                rows.append(row)
        columns = [
            *(["group"] if spec.group_by is not None else []),
            "gene_set",
            "genes_in_vocabulary",
            "occurrences",
            *(f"dropped_at_{c}" for c in spec.cutoffs),
            *(f"cells_losing_any_at_{c}" for c in spec.cutoffs),
        ]
        return pd.DataFrame(rows, columns=columns)

    def tail_frame(self) -> pd.DataFrame:
        """Per cutoff and part (``kept``, ``dropped``), and group: ``occurrences``,
        ``below_median_fraction`` (value < 1) and ``log2_fold_change_p10/p50/p90``; NaN
        where there is no occurrence. Grouped, each group's rows then every cell's
        (:data:`ALL_CELLS`)."""
        if self.value_hist is None or self.value_key is None:
            raise InputError(_NO_TAIL)
        pops = self.value_populations()
        log2 = np.full(self.value_key.shape, np.nan)
        has = self.value_key >= 0
        log2[has] = np.log2(self.value_key[has].view(np.float64))
        rows = []
        for g, label in enumerate(self.spec.value_groups):
            for c, cutoff in enumerate(self.spec.cutoffs):
                for part, name in enumerate(PARTS):
                    hist = pops[g, c, part]
                    occ = int(hist.sum())
                    row: dict[str, Any] = {} if self.spec.group_by is None else {"group": label}
                    row |= {
                        "cutoff": cutoff,
                        "part": name,
                        "occurrences": occ,
                        "below_median_fraction": hist[: k.ONE_VALUE_BIN].sum() / occ
                        if occ
                        else np.nan,
                    }
                    row |= dict(zip(TAIL_COLUMNS, log2[g, c, part].tolist(), strict=True))
                    rows.append(row)
        return pd.DataFrame(rows)

    # ---- curves for plots

    def kept_curve(
        self, genes: list[str] | None = None, sets: list[str] | None = None
    ) -> pd.DataFrame:
        """Share of occurrences kept at each input size (all groups), per gene and set.

        Evaluated at the pass-1 rank edges (every cutoff among them); columns ``input_size``,
        then one per gene (by symbol or ID; default the genes asked for, at most 8), per set
        (default all, at most 8) and, when every gene was tracked, ``all genes``.
        """
        spec = self.spec
        hist = self.gene_hist.sum(axis=0)  # (slot, bin)
        sizes = self.rank_edges[1:]
        out: dict[str, Any] = {"input_size": sizes}
        picked = list(spec.shown[:8]) if genes is None and spec.requested else []
        labels = {spec.label(t): t for t in spec.tracked}
        for name in genes or []:
            if name not in labels:
                msg = f"{name!r} is not among the genes of this result (by symbol or ID)."
                raise InputError(msg)
            picked.append(labels[name])
        curves = {spec.label(t): hist[spec.slots(np.array([t]))[0]] for t in picked}
        names = list(spec.set_names[:8]) if sets is None else sets
        for name in names:
            tokens = spec.set_tokens[spec.set_names.index(name)]
            curves[name] = hist[spec.slots(tokens)].sum(axis=0)
        if not spec.requested:
            curves["all genes"] = hist.sum(axis=0)
        for name, h in curves.items():
            total = h.sum()
            out[name] = np.cumsum(h) / total if total else np.full(sizes.size, np.nan)
        return pd.DataFrame(out)

    def fold_change_histogram(self, cutoff: int, *, per_octave: int = 16) -> pd.DataFrame:
        """Occurrences kept and dropped at ``cutoff`` (every passing cell) per log2 fold-change
        bin of ``1 / per_octave`` (a divisor of 256): ``log2_fold_change`` (bin start),
        ``kept``, ``dropped``; only the range holding values."""
        if self.value_hist is None:
            raise InputError(_NO_TAIL)
        c = self.spec.cutoffs.index(cutoff)
        pops = self.value_populations()[-1, c]  # (part, bin): the last group is every cell
        merge = 256 // per_octave
        parts = pops.reshape(2, -1, merge).sum(axis=2)
        start = (np.arange(parts.shape[1]) * merge - k.ONE_VALUE_BIN) / 256.0
        used = np.flatnonzero(parts.sum(axis=0))
        lo, hi = (used[0], used[-1] + 1) if used.size else (0, 0)
        return pd.DataFrame(
            {"log2_fold_change": start[lo:hi], "kept": parts[0, lo:hi], "dropped": parts[1, lo:hi]}
        )

    def to_dataset(self) -> xr.Dataset:
        """The figures as an :class:`xarray.Dataset` (dims ``group``, ``gene``, ``cutoff``,
        ``keep``, ``gene_set``, ``tail_group``, ``part``, ``quantile``)."""
        spec = self.spec
        n, dropped = self._gene_counts()
        slots = spec.slots(spec.shown)
        gene = {"gene": spec.gene_ids[spec.shown].astype(str)}
        data: dict[str, Any] = {
            "expressing_cells": (("group", "gene"), n[:, slots]),
            "dropped": (("group", "gene", "cutoff"), dropped[:, slots]),
            "input_size": (("group", "gene", "keep"), self._input_sizes()[:, slots]),
            "symbol": (("gene",), spec.symbols[spec.shown].astype(str)),
            "cells_losing_any": (("gene_set", "group", "cutoff"), self.set_losing),
        }
        coords: dict[str, Any] = {
            "group": list(spec.groups),
            **gene,
            "cutoff": list(spec.cutoffs),
            "keep": [p.label for p in spec.keep],
            "gene_set": list(spec.set_names),
        }
        if self.value_hist is not None:
            tail = self.tail_frame()
            shape = (len(spec.value_groups), len(spec.cutoffs), 2)
            dims = ("tail_group", "cutoff", "part")
            for name in ("occurrences", "below_median_fraction", *TAIL_COLUMNS):
                data[f"tail_{name}"] = (dims, tail[name].to_numpy().reshape(shape))
            coords |= {"tail_group": list(spec.value_groups), "part": list(PARTS)}
        return xr.Dataset(data, coords=coords, attrs={"encoding": spec.url})


# --------------------------------------------------------------------------------------------
# selection (driven by flow.retention.Retention.compute)


def start_selections(result: RetentionResult) -> tuple[k.Selection, k.Selection]:
    """Both selections, started from the pass-1 histograms.

    Gene targets are ``(group, slot, keep)``, value targets
    ``(tail group, cutoff, part, quantile)``, flattened in that order.
    """
    keep = result.spec.keep
    pops = result.gene_hist.reshape(-1, result.gene_hist.shape[-1])
    n = np.repeat(pops.sum(axis=1), len(keep))
    num = np.tile([p.fraction.numerator for p in keep], pops.shape[0])
    den = np.tile([p.fraction.denominator for p in keep], pops.shape[0])
    targets = np.arange(n.size) // len(keep)
    genes = k.start_selection(pops, k.kth(n, num, den), targets, result.rank_edges)
    if result.value_hist is None:
        none = np.zeros(0, np.int64)
        values = k.start_selection(np.zeros((0, 1), np.int64), none, none, none)
        return genes, values
    vpops = result.value_populations().reshape(-1, k.N_VALUE_BINS)
    vn = np.repeat(vpops.sum(axis=1), 3)
    vnum = np.tile([q.numerator for q in TAIL_QUANTILES], vpops.shape[0])
    vden = np.tile([q.denominator for q in TAIL_QUANTILES], vpops.shape[0])
    values = k.start_selection(
        vpops, k.kth(vn, vnum, vden), np.arange(vn.size) // 3, k.value_edges()
    )
    return genes, values


def next_windows(
    result: RetentionResult, genes: k.Selection, values: k.Selection, max_bins: int
) -> dict[str, k.Windows]:
    """The next pass's windows of the selections still active."""
    out = {}
    if genes.active.any():
        rank_bin = _rank_bin(result.rank_edges)
        pop = np.arange(genes.k.size) // len(result.spec.keep)
        bin_of = (
            pop * result.gene_hist.shape[-1] + rank_bin[np.clip(genes.lo, 0, rank_bin.size - 1)]
        )
        wanted = np.zeros(result.gene_hist.size, bool)
        out["genes"] = genes.windows(max_bins, wanted=wanted, bin_of=bin_of)
    if values.active.any():
        group = np.arange(values.k.size) // (len(result.spec.cutoffs) * 2 * 3)
        bin_of = group * k.N_VALUE_BINS + k.value_bins(values.lo)
        budget = min(max_bins, VALUE_BINS_PER_WINDOW * int(values.active.sum()))
        wanted = np.zeros(len(result.spec.value_groups) * k.N_VALUE_BINS, bool)
        out["values"] = values.windows(budget, wanted=wanted, bin_of=bin_of)
    return out
