"""Per-gene sketches (t-digests) of nonzero normalized values, and their Dask reductions."""
