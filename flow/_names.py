"""Names a user types, resolved against an encoding store: cells, genes, groups, table files.

Shared by the queries over an encoding store (:mod:`flow.query`, :mod:`flow.retention`):
barcodes and cell indices, genes by Ensembl ID or symbol (one at a time, with close matches
in the error, or many at once for gene sets), the groups of a carried cell column, and the
table format a file name asks for. Everything here is small and eager (reads the store's
per-cell or per-token arrays, never its rankings).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .errors import InputError
from .vocab import normalize_gene_ids

if TYPE_CHECKING:
    from .encode.store import EncodingStore

__all__ = [
    "GeneIndex",
    "as_str",
    "close_matches",
    "gene_tokens",
    "group_codes",
    "resolve_cell",
    "resolve_gene",
    "shortlist",
    "table_writer",
]


def as_str(values: np.ndarray) -> np.ndarray:
    """Any array (numpy StringDType included) as an object array of Python str."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUT":  # T: numpy's variable-width StringDType
        return arr.astype(object)
    return np.array([str(v) for v in arr.tolist()], dtype=object)


def gene_tokens(table: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean mask of the tokens that are genes (not special tokens, not unassigned)."""
    ids = as_str(table["gene_id"])
    return np.array(
        [bool(g) and not (g.startswith("<") and g.endswith(">")) for g in ids], dtype=bool
    )


def shortlist(word: str, candidates: list[str], size: int) -> list[int]:
    """Indices of at most ``size`` candidates that look like ``word`` (vectorized, no loops).

    Half by the longest common prefix + suffix, half by the characters equal at the same
    position counted from the start and from the end; ties go to candidates of similar length.
    """
    width = max(len(word), *(len(c) for c in candidates))
    runs = np.zeros(len(candidates), dtype=np.int64)
    same = np.zeros(len(candidates), dtype=np.int64)
    for w, cands in ((word, candidates), (word[::-1], [c[::-1] for c in candidates])):
        grid = np.asarray(cands, dtype=f"<U{width}").view(np.uint32).reshape(len(cands), width)
        probe = np.asarray([w], dtype=f"<U{width}").view(np.uint32)
        eq = (grid == probe) & (probe != 0)
        runs += np.where(eq.all(axis=1), width, eq.argmin(axis=1))
        same += np.count_nonzero(eq, axis=1)
    gap = np.abs(np.array([len(c) for c in candidates]) - len(word))
    half = max(1, size // 2)
    by_run = np.lexsort((gap, -runs))[:half]
    by_same = np.lexsort((gap, -same))[:half]
    return sorted(set(by_run.tolist()) | set(by_same.tolist()))


def close_matches(
    word: str, candidates: Sequence[str], n: int = 5, *, shortlist_size: int = 200
) -> list[str]:
    """Up to ``n`` close matches of ``word`` (case-insensitive) among ``candidates``.

    Many candidates (barcodes of a large store) are first narrowed to a shortlist of
    ``shortlist_size``, so an error message never takes seconds.
    """
    lowered = {c.lower(): c for c in candidates if c}
    keys = list(lowered)
    probe = word.lower()
    if len(keys) > shortlist_size and probe:
        keys = [keys[i] for i in shortlist(probe, keys, shortlist_size)]
    return [lowered[m] for m in difflib.get_close_matches(probe, keys, n=n, cutoff=0.6)]


def resolve_cell(enc: EncodingStore, cell: int | str) -> int:
    """The 0-based index of a cell given by index or barcode (reads barcodes for a barcode).

    A string is looked up as a barcode first; a string of digits that is not a barcode is an
    index.

    Raises
    ------
    InputError
        Index out of range, or unknown barcode (the message names close matches).
    """
    n_cells = int(enc.attrs["n_cells"])
    if isinstance(cell, bool) or not isinstance(cell, int | np.integer | str):
        msg = f"cell must be a 0-based index or a barcode, got {cell!r}."
        raise TypeError(msg)
    if isinstance(cell, str):
        barcodes = np.asarray(enc.cell_column("cell"))
        hits = np.flatnonzero(barcodes == cell)
        if hits.size:
            return int(hits[0])
        if not cell.strip().isdigit():
            close = close_matches(cell, as_str(barcodes).tolist())
            hint = f" Close matches: {', '.join(close)}." if close else ""
            msg = f"No cell with barcode {cell!r} in {enc.url} ({n_cells:,} cells).{hint}"
            raise InputError(msg)
        cell = int(cell)
    index = int(cell)
    if not 0 <= index < n_cells:
        msg = (
            f"Cell index {index} is out of range: the encoding has {n_cells:,} cells "
            f"(0..{n_cells - 1})."
        )
        raise InputError(msg)
    return index


def resolve_gene(
    enc: EncodingStore, gene: str, *, table: dict[str, np.ndarray] | None = None
) -> int:
    """The token of a gene given by Ensembl ID (any version suffix) or symbol (any case).

    Raises
    ------
    InputError
        Unknown gene (the message names close matches), or a symbol shared by several genes
        (the message lists their IDs: ask again by ID).
    """
    if not isinstance(gene, str) or not gene.strip():
        msg = f"gene must be an Ensembl ID or a symbol, got {gene!r}."
        raise TypeError(msg)
    table = enc.token_table() if table is None else table
    is_gene = gene_tokens(table)
    ids = as_str(table["gene_id"])
    symbols = as_str(table["symbol"])
    wanted = str(normalize_gene_ids([gene])[0])
    hits = np.flatnonzero(is_gene & (ids == wanted))
    if hits.size:
        return int(hits[0])
    upper = np.array([s.upper() for s in symbols], dtype=object)
    hits = np.flatnonzero(is_gene & (upper == gene.strip().upper()))
    if hits.size == 1:
        return int(hits[0])
    if hits.size > 1:
        listed = ", ".join(f"{ids[t]} (token {t})" for t in hits)
        msg = f"Symbol {gene!r} names {hits.size} genes: {listed}. Ask by Ensembl ID instead."
        raise InputError(msg)
    close = close_matches(gene, [*symbols[is_gene].tolist(), *ids[is_gene].tolist()])
    hint = f" Close matches: {', '.join(close)}." if close else ""
    msg = f"Gene {gene!r} is not in the vocabulary of {enc.url} (by Ensembl ID or symbol).{hint}"
    raise InputError(msg)


@dataclass(frozen=True)
class GeneIndex:
    """Many gene names resolved at once (gene sets): the rules of :func:`resolve_gene`.

    Built once from a token table; :meth:`lookup` is a dictionary look-up per name, so a GMT
    file of thousands of sets resolves in milliseconds.
    """

    by_id: dict[str, int]
    by_symbol: dict[str, tuple[int, ...]]
    candidates: tuple[str, ...]

    @classmethod
    def of(cls, table: dict[str, np.ndarray]) -> GeneIndex:
        """The index of the gene tokens of a token table (:meth:`EncodingStore.token_table`)."""
        tokens = np.flatnonzero(gene_tokens(table))
        ids = as_str(table["gene_id"])[tokens]
        symbols = as_str(table["symbol"])[tokens]
        by_id = dict(zip(ids.tolist(), tokens.tolist(), strict=True))
        by_symbol: dict[str, list[int]] = {}
        for symbol, token in zip(symbols.tolist(), tokens.tolist(), strict=True):
            if symbol:
                by_symbol.setdefault(symbol.upper(), []).append(token)
        return cls(
            by_id,
            {k: tuple(v) for k, v in by_symbol.items()},
            tuple(s for s in [*symbols.tolist(), *ids.tolist()] if s),
        )

    def lookup(self, name: str) -> tuple[int, ...]:
        """Tokens of a name: one for an ID, all genes of a symbol, none when unknown."""
        wanted = str(normalize_gene_ids([name])[0])
        if wanted in self.by_id:
            return (self.by_id[wanted],)
        return self.by_symbol.get(name.strip().upper(), ())

    def close(self, name: str, n: int = 3) -> list[str]:
        """Close matches of an unknown name (for messages)."""
        return close_matches(name, self.candidates, n=n)


def group_codes(
    enc: EncodingStore, keep: np.ndarray, group_by: str | None, *, max_groups: int
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Per-cell group code (-1 for cells that do not pass) and the group labels.

    Without ``group_by`` every passing cell is in group 0, labelled ``"all"``. Codes are the
    smallest integer type that holds them: they travel in the graph, one slice per cell block.

    Raises
    ------
    InputError
        No such carried column, or more than ``max_groups`` distinct values among passing cells.
    """
    if group_by is None:
        return np.where(keep, 0, -1).astype(np.int8), ("all",)
    available = enc.obs_columns
    if group_by not in available:
        msg = f"No cell column {group_by!r} in {enc.url}; carried columns are {available}."
        raise InputError(msg)
    values = as_str(enc.cell_column(group_by))
    labels, inverse = np.unique(values[keep], return_inverse=True)
    if labels.size > max_groups:
        msg = (
            f"Column {group_by!r} has {labels.size:,} distinct values among passing cells; "
            f"group summaries take a label column such as cell_type "
            f"(at most {max_groups:,} groups)."
        )
        raise InputError(msg)
    codes = np.full(keep.size, -1, dtype=np.int8 if labels.size < 128 else np.int16)
    codes[keep] = inverse
    return codes, tuple(str(x) for x in labels)


def table_writer(path: str | os.PathLike[str]) -> Callable[[pd.DataFrame, str], None]:
    """The writer a table file's name asks for: ``.csv`` (``.csv.gz``), ``.tsv`` or ``.parquet``.

    Raises
    ------
    InputError
        Any other suffix (checked before anything is computed).
    """
    lower = os.fspath(path).lower()
    if lower.endswith((".csv", ".csv.gz")):
        return lambda frame, p: frame.to_csv(p, index=False)
    if lower.endswith((".tsv", ".tsv.gz")):
        return lambda frame, p: frame.to_csv(p, index=False, sep="\t")
    if lower.endswith(".parquet"):
        return lambda frame, p: frame.to_parquet(p, index=False)
    msg = (
        f"Cannot tell the table format of {os.fspath(path)!r}: use a .csv, .tsv or .parquet suffix."
    )
    raise InputError(msg)
