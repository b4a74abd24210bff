"""Slow, obviously-correct numpy/Python references for the tests. Never imported by flow/."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

# --------------------------------------------------------------------------------------------
# rank-value encoding of one cell


def reference_rank_cell(
    counts_row_dense: npt.ArrayLike,
    n_counts: float,
    medians: npt.ArrayLike,
    tokens: npt.ArrayLike,
) -> npt.NDArray[Any]:
    """Tokens of one cell, ranked by flow's definition, with a plain Python loop.

    value = ((count / n_counts) * 10000) / median in IEEE double (Python float), over the genes
    with count > 0; order: value descending, then token ascending.
    """
    counts = np.asarray(counts_row_dense).tolist()
    meds = np.asarray(medians, dtype=np.float64).tolist()
    toks = np.asarray(tokens)
    pairs = []
    for j, c in enumerate(counts):
        if c > 0:
            value = ((float(c) / float(n_counts)) * 10000.0) / meds[j]
            pairs.append((value, int(toks[j])))
    ranked = sorted(pairs, key=lambda p: (-p[0], p[1]))
    return np.array([t for _, t in ranked], dtype=toks.dtype)


def upstream_rank_cell(
    counts_row_dense: npt.ArrayLike,
    n_counts: float,
    medians: npt.ArrayLike,
    tokens: npt.ArrayLike,
) -> npt.NDArray[Any]:
    """Tokens of one cell as upstream Geneformer's ``tokenize_cell``/``rank_genes`` rank them.

    Values as ``X / n_counts * target_sum / norm_factor_vector`` on a dense row (float64,
    left to right), the nonzero genes kept in column order, then ``np.argsort(-values)`` with
    numpy's default (unstable) sort: the order of tied values is unspecified.
    """
    x = np.asarray(counts_row_dense)
    values = x / n_counts * 10000.0 / np.asarray(medians, dtype=np.float64)
    nonzero = np.nonzero(values)[0]
    return np.asarray(tokens)[nonzero][np.argsort(-values[nonzero])]


# --------------------------------------------------------------------------------------------
# retention (flow.retention): from the counts, the medians and a stable sort only


def rank_cells(
    x: Any, n_counts: npt.ArrayLike, medians_of_columns: npt.ArrayLike, tokens_of_columns: Any
) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """Every cell's ranking: (tokens, values) by value descending, then token (stable sort).

    ``x`` is cells x genes (dense or scipy sparse); columns with token -1 are not in the
    vocabulary; value = ((count / n_counts) * 10,000) / median in float64.
    """
    import scipy.sparse as sp

    csr = sp.csr_matrix(x)
    nc = np.asarray(n_counts, dtype=np.float64)
    med = np.asarray(medians_of_columns, dtype=np.float64)
    tok = np.asarray(tokens_of_columns)
    out = []
    for i in range(csr.shape[0]):
        cols = csr.indices[csr.indptr[i] : csr.indptr[i + 1]]
        counts = csr.data[csr.indptr[i] : csr.indptr[i + 1]].astype(np.float64)
        ok = (counts > 0) & (tok[cols] >= 0)
        cols, counts = cols[ok], counts[ok]
        values = ((counts / nc[i]) * 10000.0) / med[cols]
        order = np.lexsort((tok[cols], -values))  # stable: value descending, then token
        out.append((tok[cols][order].astype(np.int64), values[order]))
    return out


def kth_smallest(values: npt.ArrayLike, p: Any) -> Any:
    """The k-th smallest of ``values`` with ``k = ceil(p * n)`` (``p`` a Fraction), or None."""
    import math

    arr = np.sort(np.asarray(values))
    if not arr.size:
        return None
    return arr[math.ceil(p * arr.size) - 1]


def ranks_by_token(
    rankings: list[tuple[Any, Any]], members: npt.ArrayLike
) -> dict[int, npt.NDArray[np.int64]]:
    """The 0-based ranks of each token over the cells in ``members`` (one per expressing cell)."""
    cells = np.flatnonzero(members)
    tokens = np.concatenate([rankings[i][0] for i in cells] or [np.zeros(0, np.int64)])
    ranks = np.concatenate([np.arange(rankings[i][0].size) for i in cells] or [np.zeros(0)])
    order = np.argsort(tokens, kind="stable")
    tokens, ranks = tokens[order], ranks[order].astype(np.int64)
    bounds = np.flatnonzero(np.diff(tokens)) + 1
    return {
        int(t[0]): r
        for t, r in zip(np.split(tokens, bounds), np.split(ranks, bounds), strict=True)
        if t.size
    }


def retention_gene(ranks: npt.ArrayLike | None, cutoffs: Any, fractions: Any) -> dict[str, Any]:
    """One gene from its ranks (:func:`ranks_by_token`): expressing cells, dropped at each
    cutoff, and ``1 + kth_smallest(ranks, p)`` per keep fraction (None without any)."""
    r = np.zeros(0, np.int64) if ranks is None else np.asarray(ranks)
    out: dict[str, Any] = {"expressing_cells": int(r.size)}
    for c in cutoffs:
        out[f"dropped_at_{c}"] = int(np.count_nonzero(r >= c))
    for p in fractions:
        kth = kth_smallest(r, p)
        out[str(p)] = None if kth is None else int(kth) + 1
    return out


def retention_set(
    rankings: list[tuple[Any, Any]], members: npt.ArrayLike, tokens: Any, cutoffs: Any
) -> dict[str, Any]:
    """One gene set over the cells in ``members``: occurrences, dropped occurrences and cells
    losing any of its genes at each cutoff."""
    wanted = np.asarray(sorted(set(np.asarray(tokens).tolist())), dtype=np.int64)
    out: dict[str, Any] = {"genes_in_vocabulary": int(wanted.size), "occurrences": 0}
    for c in cutoffs:
        out[f"dropped_at_{c}"] = 0
        out[f"cells_losing_any_at_{c}"] = 0
    for i in np.flatnonzero(members):
        ranks = np.flatnonzero(np.isin(rankings[i][0], wanted))
        out["occurrences"] += int(ranks.size)
        for c in cutoffs:
            lost = int(np.count_nonzero(ranks >= c))
            out[f"dropped_at_{c}"] += lost
            out[f"cells_losing_any_at_{c}"] += int(lost > 0)
    return out


def retention_tail(
    rankings: list[tuple[Any, Any]], members: npt.ArrayLike, cutoff: int, part: str
) -> dict[str, Any]:
    """Occurrences kept (rank < cutoff) or dropped in the cells of ``members``: their number,
    the fraction with value < 1, and log2 of the p10, p50, p90 values (k-th smallest)."""
    from fractions import Fraction

    values = [
        v[:cutoff] if part == "kept" else v[cutoff:]
        for i, (_, v) in enumerate(rankings)
        if np.asarray(members)[i]
    ]
    allv = np.concatenate(values) if values else np.zeros(0)
    out: dict[str, Any] = {
        "occurrences": int(allv.size),
        "below_median_fraction": np.count_nonzero(allv < 1) / allv.size if allv.size else None,
    }
    for name, q in (("p10", Fraction(1, 10)), ("p50", Fraction(1, 2)), ("p90", Fraction(9, 10))):
        kth = kth_smallest(allv, q)
        out[f"log2_fold_change_{name}"] = None if kth is None else float(np.log2(kth))
    return out
