"""Rank-value encoding: from cells x genes counts to per-cell rankings of gene tokens.

``_kernels.py`` holds the numpy kernels (no Dask): :func:`~flow.encode._kernels.value_matrix`
computes ``((count / n_counts) * 10_000) / median`` in float64 (the one fixed value arithmetic;
its first two operations are :func:`flow._kernels.normalize`, shared with the medians), and
:func:`~flow.encode._kernels.rank_block_flat` ranks a block of cells exactly (value descending,
ties by token ID ascending, explicit zeros never tokens) into flat rankings with no padding;
:func:`~flow.encode._kernels.rank_block` pads them to a width. The Dask wiring (``map_blocks``
over the count store's blocks of cells) lives beside it in ``rank.py`` and calls only these
kernels; ``_bands.py`` lays the rankings out in rank bands, ``store.py`` is the encoding store.
"""

from __future__ import annotations
