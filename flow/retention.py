"""What input size keeps my genes: retention of every gene and gene set at every cutoff, and the tail.

For all genes at once, from an encoding store (:func:`flow.encode.store.open_encoding`), and
for passing cells only (as every query in :mod:`flow.query`):

- per gene (and group): the cells expressing it, the cells dropping it at each cutoff, and
  the **input size that keeps it** in a fraction ``p`` of its expressing cells:
  ``1 + r_k``, where ``r_k`` is the k-th smallest 0-based rank of the gene over those cells,
  ``k = ceil(p x n)`` (exact decimal ``p``);
- per gene set (and group): its genes in the vocabulary, their occurrences (expressing
  cell x gene pairs), the occurrences dropped and the cells losing at least one of them at
  each cutoff;
- the **tail's fold change**: per cutoff, for the occurrences kept and dropped, how many
  there are, the fraction below the corpus median (value < 1) and the log2 fold change
  quantiles ``p10, p50, p90`` (the k-th smallest value, ``k = ceil(q x n)``; its log2).

The value of an occurrence is the one the cell was ranked by (count / n_counts x 10,000 /
median), derived by the encoding's own value arithmetic.

How it is exact in bounded memory
---------------------------------
Ranks are integers below the widest cell's length, and values are float64 whose bit patterns
sort as the values do, so each figure is the k-th smallest of a set of integer keys: it is
found by *radix selection over histograms*, which merge by addition across blocks:

1. **Pass 1** (one lazy graph, :attr:`Retention.first_pass`): per cell block, a histogram of
   every gene's ranks over rank bins (a regular grid that has every cutoff as an edge, so the
   counts at each cutoff are exact), a histogram of value keys per rank interval between
   cutoffs (1/256-octave bins; 1 is an edge), and the cells losing each set's genes;
   tree-summed over blocks.
2. **Refinement passes**: each wanted k-th key lies in one bin; a pass counts the keys inside
   that bin only, in finer bins, recording each bin's smallest and largest key and how many
   keys equal them; the k-th key is then found, or the bin holding it, shrunk to
   ``[min, max]``, is the next window. A window one key wide is the answer.

Every state is a fixed-size array of about ``max_bins`` counts per histogram (genes x groups x
rank bins, or windows x bins; at least genes x groups x (cutoffs + 1), and 2 bins per window),
never growing with cells; the bins per pass follow from that budget, so more genes or groups
mean wider first bins and maybe a pass more, never more memory. With the default budget the
second pass counts every rank of each window one by one, so every rank figure is exact after
it for up to about 25k genes and cells of 8k genes. Fold-change windows get 16,384 bins a pass
(2**-22 of a value); a bin whose keys take at most two distinct values near the wanted one
ends its window at once, otherwise a third pass settles it (measured: two or three passes on
PBMC 1k and on synthetic stores of 100k and 1M cells). Block tasks walk each rank chunk in
segments between rank-bin edges, so every update is a small histogram over genes (or value
bins) that stays in cache. An exact per-gene histogram of every rank would need genes x
widest-cell counts (25k x 8k x 8 B = 1.6 GB per task); a t-digest bracket, as the medians
use, would leave millions of tail values to gather per figure.

What each pass reads: ``tokens`` for the ranks; ``counts`` too (and ``n_counts``) while a
fold-change figure is being selected. Tasks: one per cell block and pass, plus the merge tree.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import pandas as pd
from dask.base import tokenize
from dask.delayed import Delayed, delayed

from . import _retention_kernels as k
from ._gene_sets import (
    GeneSet,
    RetentionWarning,
    read_gene_list,
    read_gene_sets,
    resolve_sets,
    set_membership,
)
from ._names import GeneIndex, as_str, gene_tokens, group_codes, resolve_gene, table_writer
from ._retention_result import (
    ALL_CELLS,
    TAIL_COLUMNS,
    TAIL_QUANTILES,
    KeepFraction,
    RetentionResult,
    RetentionSpec,
    next_windows,
    start_selections,
)
from .cluster import compute as cluster_compute
from .errors import FlowError, InputError
from .sketch.reduce import tree_merge

if TYPE_CHECKING:
    from .encode.store import EncodingStore

__all__ = [
    "ALL_CELLS",
    "DEFAULT_CUTOFFS",
    "DEFAULT_KEEP",
    "TAIL_COLUMNS",
    "TAIL_QUANTILES",
    "GeneSet",
    "KeepFraction",
    "Retention",
    "RetentionResult",
    "RetentionWarning",
    "gene_retention",
    "parse_cutoffs",
    "parse_keep",
    "read_gene_list",
    "read_gene_sets",
    "write_retention",
]

DEFAULT_CUTOFFS: Final = (512, 1024, 2048, 4096)
DEFAULT_KEEP: Final = ("0.5", "0.9", "0.95")
DEFAULT_MAX_BINS: Final = 1 << 22
"""Counts per histogram state (16 MiB of int32 per gene histogram): bounds each task's memory
and sets the bins per pass. Two passes find every rank when it is at least genes x groups x
sqrt(widest cell x keep fractions): 4M covers 25k genes and cells of 8k genes."""
MIN_RANK_BIN: Final = 16
"""Pass-1 rank bins are at least this wide (narrower ones cost more per block than they save)."""
MAX_GROUPS: Final = 256
MAX_PASSES: Final = 64

Compute = Callable[..., tuple[Any, ...]]


def _default_compute() -> Compute:
    return cluster_compute


# --------------------------------------------------------------------------------------------
# arguments


def _keep_fraction(value: str | float | KeepFraction) -> KeepFraction:
    """Parse ``"0.9"``, ``0.9`` or ``"9/10"`` (exact as written).

    Raises
    ------
    InputError
        Not a number, or outside (0, 1].
    """
    if isinstance(value, KeepFraction):
        return value
    if isinstance(value, bool) or not isinstance(value, str | float | int):
        msg = f"A keep fraction is a number in (0, 1], got {value!r}."
        raise TypeError(msg)
    label = value.strip() if isinstance(value, str) else repr(value)
    try:
        fraction = Fraction(label)
    except (ValueError, ZeroDivisionError) as err:
        msg = f"Keep fraction {label!r} is not a number: give fractions such as 0.5,0.9."
        raise InputError(msg) from err
    if not 0 < fraction <= 1:
        msg = f"Keep fraction {label} is outside (0, 1]: give a fraction of expressing cells."
        raise InputError(msg)
    return KeepFraction(label, fraction)


def _items(values: str | Sequence[Any]) -> list[Any]:
    if isinstance(values, str):
        return [t for t in values.replace(",", " ").split() if t]
    return list(values)


def parse_keep(values: str | Sequence[str | float | KeepFraction]) -> tuple[KeepFraction, ...]:
    """Keep fractions from ``"0.5,0.9"`` or a sequence; each in (0, 1], none twice.

    Raises
    ------
    InputError
        None given, one outside (0, 1], not a number, or given twice.
    """
    parsed = tuple(_keep_fraction(v) for v in _items(values))
    if not parsed:
        msg = "Give at least one keep fraction in (0, 1], e.g. --keep 0.5,0.9."
        raise InputError(msg)
    if len({p.fraction for p in parsed}) < len(parsed):
        msg = f"A keep fraction is given twice: {', '.join(p.label for p in parsed)}."
        raise InputError(msg)
    return parsed


def parse_cutoffs(values: str | Sequence[int]) -> tuple[int, ...]:
    """Cutoffs (model input sizes) from ``"2048,4096"`` or a sequence: sorted, each >= 1.

    Raises
    ------
    InputError
        None given, one below 1, not an integer, or given twice.
    """
    out = []
    for item in _items(values):
        if isinstance(item, bool) or not isinstance(item, int | np.integer | str):
            msg = f"A cutoff is an integer input size such as 2048, got {item!r}."
            raise TypeError(msg)
        try:
            out.append(int(item))
        except ValueError as err:
            msg = f"Cutoff {item!r} is not an integer: give input sizes such as 2048,4096."
            raise InputError(msg) from err
    if not out:
        msg = "Give at least one cutoff, e.g. --cutoffs 2048,4096."
        raise InputError(msg)
    if min(out) < 1:
        msg = f"Cutoffs must be at least 1 (a model input size), got {min(out)}."
        raise InputError(msg)
    if len(set(out)) < len(out):
        msg = f"A cutoff is given twice: {', '.join(map(str, out))}."
        raise InputError(msg)
    return tuple(sorted(out))


# --------------------------------------------------------------------------------------------
# the lazy graphs


def _block_inputs(enc: EncodingStore, *, values: bool) -> list[tuple[Any, ...]]:
    """Per cell block, what the kernels read of the encoding store: its rank chunks of
    ``tokens`` (and of ``counts``), ``length`` and ``n_counts``, each read by a task of its
    own. The graph side's only knowledge of the store's layout (the kernels' is
    :func:`flow._retention_kernels.ranked_entries`).
    """
    tokens = enc.tokens.to_delayed()
    counts = enc.counts.to_delayed() if values else None
    lengths = enc.cell_array("length").to_delayed().ravel()
    n_counts = enc.cell_array("n_counts").to_delayed().ravel() if values else None
    return [
        (
            list(tokens[b]),
            None if counts is None else list(counts[b]),
            lengths[b],
            None if n_counts is None else n_counts[b],
        )
        for b in range(tokens.shape[0])
    ]


def _pass_graph(
    enc: EncodingStore,
    codes: np.ndarray,
    kernel: Any,
    *shared: Any,
    name: str,
    values: bool,
    split_every: int,
) -> Delayed:
    """One task per cell block ``kernel(tokens, counts, lengths, n_counts, codes, *shared)``,
    merged in a fixed tree; ``shared`` objects enter the graph once each."""
    refs = [
        delayed(x, pure=True, traverse=False, name=f"{name}-shared-{i}")
        for i, x in enumerate(shared)
    ]
    edges = np.cumsum((0, *enc.tokens.chunks[0]))
    leaves = [
        delayed(kernel, pure=True)(
            tok,
            cnt,
            lengths,
            n_counts,
            codes[edges[b] : edges[b + 1]],
            *refs,
            dask_key_name=(name, b),
        )
        for b, (tok, cnt, lengths, n_counts) in enumerate(_block_inputs(enc, values=values))
    ]
    return tree_merge(leaves, split_every=split_every, name=f"{name}-merge", merge=k.merge_states)


@dataclass(frozen=True)
class Retention:
    """Retention of genes and gene sets and the tail's fold change, as lazy passes.

    Nothing is computed until :meth:`compute` (a compute boundary), which runs
    :attr:`first_pass` and then the refinement passes its results call for (usually one or
    two; each one graph over the store's cell blocks).

    Attributes
    ----------
    first_pass
        The lazy first pass: a Delayed computing to a dict of merged histograms.
    """

    spec: RetentionSpec
    tables: k.Tables = field(repr=False)
    codes: np.ndarray = field(repr=False)
    enc: EncodingStore = field(repr=False)
    max_bins: int
    split_every: int
    first_pass: Delayed = field(repr=False)

    def refine_pass(self, windows: dict[str, k.Windows], number: int) -> Delayed:
        """The lazy graph of refinement pass ``number`` over these windows."""
        tok = tokenize(self.first_pass.key, {n: (w.lo, w.hi) for n, w in windows.items()})
        return _pass_graph(
            self.enc,
            self.codes,
            k.refine_block,
            self.tables,
            windows,
            len(self.spec.keep),
            len(self.spec.value_groups),
            name=f"flow-retention-pass{number}-{tok}",
            values="values" in windows,
            split_every=self.split_every,
        )

    def compute(self, *, compute: Compute | None = None) -> RetentionResult:
        """Run the first pass, then refinement passes until every figure is exact
        (a compute boundary).

        ``compute`` runs graphs (default :func:`flow.cluster.compute`: the current client,
        else Dask's scheduler).

        Raises
        ------
        InputError
            The store changed between passes.
        """
        run = compute or _default_compute()
        (state,) = run(self.first_pass)
        result = RetentionResult.from_first_pass(self.spec, self.tables, state)
        genes, values = start_selections(result)
        passes = 1
        while genes.active.any() or values.active.any():
            passes += 1
            if passes > MAX_PASSES:  # pragma: no cover - every pass shrinks every window
                msg = f"Retention selection did not end in {MAX_PASSES} passes."
                raise FlowError(msg)
            windows = next_windows(result, genes, values, self.max_bins)
            (state,) = run(self.refine_pass(windows, passes))
            for name, sel in (("genes", genes), ("values", values)):
                if name in windows:
                    k.narrow(sel, windows[name], state, name)
        return result.with_answers(genes, values, passes)


def _rank_edges(width: int, cutoffs: tuple[int, ...], n_bins: int) -> np.ndarray:
    """Pass-1 rank bin edges: a regular grid of at most ``n_bins`` bins, and every cutoff."""
    step = max(MIN_RANK_BIN, -(-width // max(1, n_bins)))
    inner = [c for c in cutoffs if c < width]
    return np.unique(np.r_[np.arange(0, width, step), inner, width]).astype(np.int64)


def _tracked_tokens(
    enc: EncodingStore,
    table: dict[str, np.ndarray],
    genes: Sequence[str] | None,
    set_tokens: Sequence[np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens with a gene slot, ascending; tokens of the genes table, in its order)."""
    if genes is None:
        has_median = np.isfinite(np.asarray(table["median"], dtype=np.float64))
        shown = np.flatnonzero(gene_tokens(table) & has_median).astype(np.int64)
        return shown, shown
    if isinstance(genes, str):
        msg = "genes must be a list of gene IDs or symbols, not one string."
        raise TypeError(msg)
    if not len(genes):
        msg = "Give at least one gene (an Ensembl ID or a symbol), or no gene list at all."
        raise InputError(msg)
    shown = np.array(
        list(dict.fromkeys(resolve_gene(enc, g, table=table) for g in genes)), dtype=np.int64
    )
    tracked = np.unique(np.concatenate([shown, *set_tokens]))
    return tracked.astype(np.int64), shown


def _tables(
    enc: EncodingStore,
    table: dict[str, np.ndarray],
    spec: RetentionSpec,
    n_groups: int,
    *,
    width: int,
    tail: bool,
    max_bins: int,
) -> k.Tables:
    n_tokens = int(spec.gene_ids.size)
    slot_of = np.full(n_tokens, -1, np.int32)
    slot_of[spec.tracked] = np.arange(spec.tracked.size, dtype=np.int32)
    n_slots = max(1, int(spec.tracked.size))
    set_ptr, set_ids = set_membership(spec.set_tokens, n_tokens)
    return k.Tables(
        n_groups,
        slot_of,
        n_slots,
        _rank_edges(width, spec.cutoffs, max_bins // (n_groups * n_slots)),
        np.asarray(spec.cutoffs, np.int64),
        np.nan_to_num(np.asarray(table["median"], dtype=np.float64), nan=1.0),
        set_ptr,
        set_ids,
        len(spec.set_names),
        tail,
    )


def gene_retention(
    enc: EncodingStore,
    cutoffs: str | Sequence[int] = DEFAULT_CUTOFFS,
    *,
    keep: str | Sequence[str | float | KeepFraction] = DEFAULT_KEEP,
    genes: Sequence[str] | None = None,
    gene_sets: Sequence[GeneSet] | str | os.PathLike[str] | None = None,
    group_by: str | None = None,
    tail: bool = True,
    max_bins: int = DEFAULT_MAX_BINS,
    split_every: int = 8,
) -> Retention:
    """Retention of every gene (or the given genes) and gene set at each cutoff, and the tail.

    Lazy: validates the arguments (reading the store's small per-cell and per-token arrays)
    and builds the first pass; nothing is computed. :meth:`Retention.compute` runs it.

    Parameters
    ----------
    enc
        An opened encoding store (any chunking: tasks are its cell blocks, each reading the
        block's rank chunks).
    cutoffs
        Model input sizes ``L`` (``"512,2048"`` or a sequence; each >= 1).
    keep
        Fractions ``p`` in (0, 1] of a gene's expressing cells to keep it in; each gives the
        column ``input_size_for_<p>`` (written as given).
    genes
        Genes (Ensembl IDs or symbols) for the genes table, in this order; default every
        vocabulary gene with a median.
    gene_sets
        Gene sets, or a GMT / gene-list file (see :func:`read_gene_sets`). Names not in the
        vocabulary are left out with a :class:`RetentionWarning` naming them.
    group_by
        A carried cell column (e.g. ``cell_type``): every figure per group (at most
        :data:`MAX_GROUPS`); the tail also over all passing cells.
    tail
        Also select the tail's fold-change figures (then ``counts`` is read too).
    max_bins
        Counts per histogram state (see the module docstring): bounds task memory.
    split_every
        Fan-in of the merge tree.

    Returns
    -------
    Retention

    Raises
    ------
    InputError
        Bad cutoffs or keep fractions, an unknown or ambiguous gene, unusable gene sets, an
        unknown group column or too many groups.
    """
    if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < 2:
        msg = f"max_bins must be an integer of at least 2, got {max_bins!r}."
        raise InputError(msg)
    table = enc.token_table()
    passing = np.asarray(enc.cell_column("filter_pass")).astype(bool)
    spec, codes = _spec(enc, table, passing, cutoffs, keep, genes, gene_sets, group_by)
    width = max(1, int(np.asarray(enc.lengths, dtype=np.int64)[passing].max(initial=0)))
    tables = _tables(enc, table, spec, len(spec.groups), width=width, tail=tail, max_bins=max_bins)
    tok = tokenize(enc.url, enc.attrs.get("plan"), tables, codes, split_every)
    first = _pass_graph(
        enc,
        codes,
        k.first_pass_block,
        tables,
        name=f"flow-retention-pass1-{tok}",
        values=tail,
        split_every=split_every,
    )
    return Retention(spec, tables, codes, enc, max_bins, split_every, first)


def _spec(
    enc: EncodingStore,
    table: dict[str, np.ndarray],
    passing: np.ndarray,
    cutoffs: str | Sequence[int],
    keep: str | Sequence[str | float | KeepFraction],
    genes: Sequence[str] | None,
    gene_sets: Sequence[GeneSet] | str | os.PathLike[str] | None,
    group_by: str | None,
) -> tuple[RetentionSpec, np.ndarray]:
    """What was asked, checked and resolved; and each cell's group code."""
    cuts, fractions = parse_cutoffs(cutoffs), parse_keep(keep)
    sets = read_gene_sets(gene_sets) if isinstance(gene_sets, str | os.PathLike) else gene_sets
    set_names, set_tokens = resolve_sets(sets, GeneIndex.of(table)) if sets else ((), ())
    tracked, shown = _tracked_tokens(enc, table, genes, set_tokens)
    codes, groups = group_codes(enc, passing, group_by, max_groups=MAX_GROUPS)
    spec = RetentionSpec(
        enc.url,
        cuts,
        fractions,
        group_by,
        groups,
        tracked,
        shown,
        as_str(table["gene_id"]),
        as_str(table["symbol"]),
        set_names,
        set_tokens,
        genes is not None,
    )
    return spec, codes


# --------------------------------------------------------------------------------------------
# writing


def write_retention(
    result: RetentionResult,
    genes: str | os.PathLike[str],
    *,
    sets: str | os.PathLike[str] | None = None,
    tail: str | os.PathLike[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Write the genes table (and the sets and tail tables); the suffix picks the format.

    ``.csv`` (``.csv.gz``), ``.tsv`` or ``.parquet``. Every table is written to a hidden
    file beside its target first and renamed once all are written, so a file with the
    target's name is always complete. Returns the tables written, by name.

    Raises
    ------
    InputError
        An unknown suffix, sets asked for without gene sets, or the tail without the tail
        computed (checked before anything is written).
    """
    paths: Mapping[str, str | os.PathLike[str] | None] = {
        "genes": genes,
        "sets": sets,
        "tail": tail,
    }
    wanted = {name: os.fspath(p) for name, p in paths.items() if p is not None}
    writers = {name: table_writer(p) for name, p in wanted.items()}
    if "sets" in wanted and not result.spec.set_names:
        msg = "A sets table needs gene sets (--gene-sets FILE.gmt)."
        raise InputError(msg)
    if "tail" in wanted and result.value_key is None:
        msg = "The tail table needs the tail computed (gene_retention(..., tail=True))."
        raise InputError(msg)
    makers = {"genes": result.genes_frame, "sets": result.sets_frame, "tail": result.tail_frame}
    frames = {name: makers[name]() for name in wanted}
    temps: dict[str, str] = {}
    try:
        for name, path in wanted.items():
            folder, base = os.path.split(os.path.abspath(path))
            temps[name] = os.path.join(folder, f".{uuid.uuid4().hex}.partial-{base}")
            writers[name](frames[name], temps[name])
        for name, path in wanted.items():
            os.replace(temps.pop(name), path)
    finally:
        for leftover in temps.values():
            if os.path.exists(leftover):
                os.remove(leftover)
    return frames
