"""Rank-value encoding: from cells x genes counts to per-cell rankings of gene tokens.

``_kernels.py`` holds the numpy kernels (no Dask): :func:`~flow.encode._kernels.value_matrix`
computes ``((count / n_counts) * 10_000) / median`` in float64 (the one fixed value arithmetic;
its first two operations are :func:`flow._kernels.normalize`, shared with the medians), and
:func:`~flow.encode._kernels.rank_block` ranks a block of cells exactly: value descending, ties
by token ID ascending, explicit zeros never tokens. The Dask wiring (``map_blocks`` over the
count store's blocks of cells) lives beside it in ``rank.py`` and calls only these kernels.
"""

from __future__ import annotations
