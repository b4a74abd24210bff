"""The stages chained together; the only place (with the CLI) that decides what to compute when.

Each function here is a compute boundary: it reads inputs, runs graphs on the current Dask
client (see :mod:`flow.cluster`) and writes a store.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .store import DEFAULT_BLOCK_SIZE, CountStore, write_counts

__all__ = ["convert", "demo", "describe_counts", "describe_medians", "medians"]


def convert(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    format: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    obs_columns: Sequence[str] | None = None,
    genome: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_non_integer: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    progress: Any = None,
    client: Any = None,
) -> CountStore:
    """Convert input matrices into one count store (computes and writes; see :func:`write_counts`).

    The inputs are read as one stream: in this process, or, given a ``distributed.Client``,
    in one task (``flow-convert``) on a worker of its cluster, which must see the inputs and
    the output (shared file system or object store). ``progress(done, total)`` is called here
    either way.
    """
    from ._io import store_url
    from .errors import InputError
    from .store import open_counts

    options: dict[str, Any] = {
        "format": format,
        "layer": layer,
        "use_raw": use_raw,
        "gene_id_column": gene_id_column,
        "obs_columns": list(obs_columns) if obs_columns is not None else None,
        "genome": genome,
        "block_size": block_size,
        "allow_non_integer": allow_non_integer,
        "storage_options": storage_options,
    }
    if client is None:
        return _convert_here([os.fspath(p) for p in inputs], output, progress=progress, **options)
    from .cluster import run_task

    # a worker's working directory is not this one: local paths go as absolute paths
    paths = [store_url(p) for p in inputs]
    try:
        url = run_task(
            client,
            "convert",
            _convert_to_url,
            paths,
            store_url(output),
            progress=progress,
            **options,
        )
    except InputError as err:  # a path seen here may not be seen by the workers
        where = client.scheduler.address
        msg = f"{err} (read on a worker of the cluster at {where}: inputs must be reachable from the workers)"
        raise InputError(msg) from err
    return open_counts(url, storage_options=storage_options)


def _convert_to_url(*args: Any, **kwargs: Any) -> str:
    """:func:`_convert_here`, returning the store's URL (what a task sends back)."""
    return _convert_here(*args, **kwargs).url


def _convert_here(
    inputs: Sequence[str],
    output: str | os.PathLike[str],
    *,
    block_size: int,
    allow_non_integer: bool,
    storage_options: Mapping[str, Any] | None,
    progress: Any,
    **reader_options: Any,
) -> CountStore:
    """Open the inputs and write the count store, in this process."""
    from .ingest import open_source

    sources = [open_source(p, storage_options=storage_options, **reader_options) for p in inputs]
    return write_counts(
        sources,
        output,
        block_size=block_size,
        allow_non_integer=allow_non_integer,
        storage_options=storage_options,
        progress=progress,
    )


def describe_counts(store: CountStore) -> str:
    """A short human-readable summary of a count store (reads obs only)."""
    a = store.attrs
    genes = store.obs_column("n_genes")
    q = np.percentile(genes, [0, 50, 90, 99, 100]) if genes.size else np.zeros(5)
    sources = "\n".join(
        f"    {s['path']} ({s['format']}, {s['n_cells']:,} cells)" for s in a["sources"]
    )
    return (
        f"count store {store.url}\n"
        f"  cells x genes: {a['n_cells']:,} x {a['n_genes']:,}; nonzeros {a['nnz']:,}; dtype {a['dtype']}\n"
        f"  detected genes per cell: min {q[0]:.0f}, median {q[1]:.0f}, p90 {q[2]:.0f}, "
        f"p99 {q[3]:.0f}, max {q[4]:.0f}\n"
        f"  blocks: {store.n_blocks} of {a['block_size']:,} cells\n"
        f"  sources:\n{sources}"
    )


def medians(
    stores: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str] | None,
    *,
    method: str = "tdigest",
    compression: float | None = None,
    update: str | os.PathLike[str] | None = None,
    merge: Sequence[str | os.PathLike[str]] = (),
    import_dictionary: str | os.PathLike[str] | None = None,
    export: str | os.PathLike[str] | None = None,
    n_counts_column: str = "n_counts",
    gene_mapping: str | os.PathLike[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    quiet: bool = True,
) -> Any:
    """Compute, merge, update, import and/or export a median set (computes and writes).

    ``update`` and ``merge`` name existing median sets whose digests are merged with those of
    ``stores``; the old data is not read again. Returns the resulting :class:`MedianSet`.
    """
    from functools import partial

    from . import medians as med
    from .cluster import compute
    from .sketch import _tdigest
    from .store import open_counts
    from .vocab import read_gene_mapping

    mapping = read_gene_mapping(gene_mapping) if gene_mapping else None
    parts = []
    if import_dictionary is not None:
        parts.append(med.import_median_dictionary(import_dictionary))
    parts.extend(
        med.open_medians(path, storage_options=storage_options)
        for path in [*([update] if update else []), *merge]
    )
    if stores:
        opened = [open_counts(s, storage_options=storage_options) for s in stores]
        parts.append(
            med.medians_of(
                opened,
                method=method,  # type: ignore[arg-type]
                compression=compression or _tdigest.DEFAULT_COMPRESSION,
                n_counts_column=n_counts_column,
                gene_mapping=mapping,
                compute=partial(compute, quiet=quiet, label=f"medians ({method})"),
            )
        )
    result = med.merge_median_sets(parts) if len(parts) > 1 else parts[0]
    if output is not None:
        med.write_medians(result, output, storage_options=storage_options)
    if export is not None:
        med.export_medians(result, export)
    return result


def describe_medians(result: Any, output: str | os.PathLike[str] | None) -> str:
    """A short summary of a median set."""
    expressed = int(np.sum(~np.isnan(result.medians)))
    where = f" -> {output}" if output else ""
    cells = sum(max(0, int(s.get("n_cells", 0))) for s in result.stores)
    return (
        f"median set{where}: {len(result.gene_ids):,} genes ({expressed:,} expressed), "
        f"method {result.method}, {cells:,} cells from {len(result.stores)} store(s)"
    )


def demo(
    outdir: str | os.PathLike[str],
    *,
    n_cells: int = 20_000,
    n_genes: int = 20_000,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, str]:
    """The whole pipeline on seeded synthetic data, printing what it did (computes and writes).

    Returns the paths of what it wrote.
    """
    import sys
    import time

    from .cli._common import TextProgress
    from .datasets import write_synthetic

    os.makedirs(outdir, exist_ok=True)
    paths = {
        "counts": os.path.join(outdir, "counts.zarr"),
        "medians": os.path.join(outdir, "medians.zarr"),
    }

    def say(text: str) -> None:
        print(text, file=sys.stderr if quiet else sys.stdout)

    t0 = time.perf_counter()
    say(
        f"[1/4] generating {n_cells:,} synthetic cells x {n_genes:,} genes (seed {seed}) into {paths['counts']}"
    )
    store = write_synthetic(
        paths["counts"],
        n_cells,
        n_genes,
        seed=seed,
        progress=TextProgress("      cells", quiet=quiet),
    )
    say(describe_counts(store))
    t1 = time.perf_counter()
    say(f"      {n_cells / (t1 - t0):,.0f} cells/s")
    say(f"[2/4] per-gene nonzero medians (t-digest) -> {paths['medians']}")
    result = medians([paths["counts"]], paths["medians"], quiet=quiet)
    say(describe_medians(result, paths["medians"]))
    t2 = time.perf_counter()
    say(f"      {n_cells / (t2 - t1):,.0f} cells/s")
    paths["encoding"] = os.path.join(outdir, "encoding.zarr")
    say(f"[3/4] full rank value encodings -> {paths['encoding']}")
    enc = tokenize(paths["counts"], paths["encoding"], medians=paths["medians"], quiet=quiet)
    say(describe_encoding(enc))
    t3 = time.perf_counter()
    say(f"      {n_cells / (t3 - t2):,.0f} cells/s")
    paths["dataset"] = os.path.join(outdir, "dataset")
    say(f"[4/4] model input (V2: <cls> + up to 4,094 genes + <eos>) -> {paths['dataset']}")
    export(paths["encoding"], paths["dataset"], preset="V2", quiet=quiet)
    t4 = time.perf_counter()
    say(
        f"      {n_cells / (t4 - t3):,.0f} cells/s; open with datasets.load_from_disk({paths['dataset']!r})"
    )
    try:
        from .query import coverage_summary
    except ImportError:  # pragma: no cover - the query stage is optional in the demo
        coverage_summary = None  # type: ignore[assignment]
    if coverage_summary is not None:
        say(coverage_summary(enc))
    say(f"Done in {t4 - t0:.1f} s. Results are in {os.path.abspath(outdir)}/")
    return paths


def _load_medians(
    medians_path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> Any:
    from .medians import open_medians

    return open_medians(medians_path, storage_options=storage_options, digests=False)


def _load_vocabulary(
    vocabulary: str | os.PathLike[str] | None,
    median_set: Any,
    storage_options: Mapping[str, Any] | None,
) -> Any:
    """A vocabulary from a file, or built from a median set's genes (a new model's vocabulary)."""
    from .vocab import read_vocabulary, vocabulary_from_genes

    if vocabulary is None:
        ok = ~np.isnan(median_set.medians)
        return vocabulary_from_genes(median_set.gene_ids[ok])
    text = os.fspath(vocabulary)
    if text.rstrip("/").endswith(".zarr"):
        built = _load_medians(text, storage_options)
        return vocabulary_from_genes(built.gene_ids[~np.isnan(built.medians)])
    return read_vocabulary(text)


def tokenize(
    store_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    medians: str | os.PathLike[str],
    vocabulary: str | os.PathLike[str] | None = None,
    gene_mapping: str | os.PathLike[str] | None = None,
    n_counts_column: str = "n_counts",
    storage_options: Mapping[str, Any] | None = None,
    quiet: bool = True,
) -> Any:
    """Rank every cell of a count store into an encoding store (computes and writes; resumes).

    ``medians`` is a median set store or a Geneformer median pickle; ``vocabulary`` a token
    dictionary (.pkl/.json/.tsv) or a median set to build one from (default: ``medians``).
    """
    from functools import partial

    from .cluster import compute
    from .encode.store import plan_encoding, write_encoding
    from .store import open_counts
    from .vocab import read_gene_mapping

    store = open_counts(store_path, storage_options=storage_options)
    median_set = _load_medians(medians, storage_options)
    vocab = _load_vocabulary(vocabulary, median_set, storage_options)
    mapping = read_gene_mapping(gene_mapping) if gene_mapping else None
    plan = plan_encoding(
        store, median_set, vocab, gene_mapping=mapping, n_counts_column=n_counts_column
    )
    return write_encoding(
        plan,
        output,
        storage_options=storage_options,
        compute=partial(compute, quiet=quiet, label="tokenize"),
    )


def export(
    encoding_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    format: str = "hf",
    preset: str | None = "V1",
    input_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    quiet: bool = True,
) -> str:
    """Write the model input of an encoding store as a Hugging Face dataset or Parquet (computes)."""
    from .cluster import compute
    from .encode.store import open_encoding
    from .export import write_model_dataset
    from .vocab import resolve_preset

    enc = open_encoding(encoding_path, storage_options=storage_options)
    chosen = resolve_preset(preset, input_size)
    special = enc.attrs["special"]
    specials = {s: special.get(s) for s in (*chosen.prepend, *chosen.append)}
    missing = [s for s, v in specials.items() if v is None]
    if missing:
        from .errors import VocabularyError

        msg = f"Preset {chosen.name} needs special tokens {missing}, which the encoding's vocabulary lacks."
        raise VocabularyError(msg)
    cls = special.get(chosen.prepend[0]) if chosen.prepend else None
    eos = special.get(chosen.append[0]) if chosen.append else None
    # per-cell arrays stay lazy: each shard task reads its own cells
    columns = {name: enc.cell_array(name) for name in enc.obs_columns}
    graph = write_model_dataset(
        enc.tokens,
        enc.cell_array("length"),
        output,
        input_size=chosen.input_size,
        cls=cls,
        eos=eos,
        keep=enc.cell_array("filter_pass").astype(bool),
        columns=columns,
        format=format,  # type: ignore[arg-type]
        compute=False,
        storage_options=storage_options,
    )
    compute(
        graph, quiet=quiet, label=f"export ({format}, {chosen.name}, {chosen.input_size} tokens)"
    )
    return os.fspath(output)


def run(
    inputs: Sequence[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    *,
    medians_path: str | os.PathLike[str] | None = None,
    vocabulary: str | os.PathLike[str] | None = None,
    preset: str | None = "V1",
    input_size: int | None = None,
    gene_mapping: str | os.PathLike[str] | None = None,
    format: str = "hf",
    convert_options: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    quiet: bool = True,
    say: Any = None,
) -> dict[str, str]:
    """Convert, compute medians (unless given), tokenize and export in one go (computes).

    Writes ``counts.zarr``, ``medians.zarr`` (when computed), ``encoding.zarr`` and
    ``dataset`` (or ``parquet``) under ``outdir``; returns their paths. A single input that is
    a flow count store is used as it is (no ``counts.zarr`` is written).
    """
    from .cli._common import TextProgress

    tell = say or (lambda text: None)
    join = (
        (lambda name: f"{os.fspath(outdir).rstrip('/')}/{name}")
        if "://" in os.fspath(outdir)
        else (lambda name: os.path.join(outdir, name))
    )
    if "://" not in os.fspath(outdir):
        os.makedirs(outdir, exist_ok=True)
    paths = {
        "counts": join("counts.zarr"),
        "encoding": join("encoding.zarr"),
        "dataset": join("dataset" if format == "hf" else "parquet"),
    }
    store = _count_store_input(inputs, storage_options)
    if store is not None:
        paths["counts"] = store.url
        tell(f"using the count store {store.url} as it is")
    else:
        tell(f"convert {len(inputs)} input(s) -> {paths['counts']}")
        store = convert(
            inputs,
            paths["counts"],
            storage_options=storage_options,
            progress=TextProgress("convert", quiet=quiet),
            **dict(convert_options or {}),
        )
    tell(describe_counts(store))
    if medians_path is None:
        paths["medians"] = join("medians.zarr")
        tell(f"medians -> {paths['medians']}")
        result = medians(
            [paths["counts"]],
            paths["medians"],
            gene_mapping=gene_mapping,
            storage_options=storage_options,
            quiet=quiet,
        )
        tell(describe_medians(result, paths["medians"]))
    else:
        paths["medians"] = os.fspath(medians_path)
    tell(f"tokenize -> {paths['encoding']}")
    enc = tokenize(
        paths["counts"],
        paths["encoding"],
        medians=paths["medians"],
        vocabulary=vocabulary,
        gene_mapping=gene_mapping,
        storage_options=storage_options,
        quiet=quiet,
    )
    tell(describe_encoding(enc))
    tell(f"export ({format}) -> {paths['dataset']}")
    export(
        paths["encoding"],
        paths["dataset"],
        format=format,
        preset=preset,
        input_size=input_size,
        storage_options=storage_options,
        quiet=quiet,
    )
    return paths


def _count_store_input(
    inputs: Sequence[str | os.PathLike[str]], storage_options: Mapping[str, Any] | None
) -> CountStore | None:
    """The count store given as the only input, or None for inputs to convert."""
    from .errors import SchemaError, StoreNotFoundError
    from .store import open_counts

    if len(inputs) != 1:
        return None
    try:
        return open_counts(inputs[0], storage_options=storage_options)
    except (StoreNotFoundError, SchemaError):  # not a count store; an unfinished one raises
        return None


def describe_encoding(enc: Any) -> str:
    """A short summary of an encoding store."""
    a = enc.attrs
    lengths = enc.lengths
    keep = enc.cell_column("filter_pass").astype(bool)
    empty = int(np.sum(keep & (lengths == 0)))
    return (
        f"encoding store {enc.url}: {a['n_cells']:,} cells ({int(keep.sum()):,} passing filter), "
        f"full rankings up to {a['width']:,} genes; {a['n_genes_kept']:,} vocabulary genes matched "
        f"({a['n_duplicates_summed']:,} duplicate IDs summed); {empty:,} passing cells with no "
        f"vocabulary gene (kept with length 0)"
    )
