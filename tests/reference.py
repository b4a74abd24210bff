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
