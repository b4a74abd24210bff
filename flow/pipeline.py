"""The stages chained together: the one place (with the CLI) that decides what runs when.

Every stage takes opened, typed artifacts and returns the one it wrote, so a chain such as
:func:`run` opens each store and each dictionary file once::

    inputs --convert--> CountStore --nonzero_medians--> MedianSet
    CountStore + MedianSet + Vocabulary (+ GeneMapping) --tokenize--> EncodingStore
    EncodingStore + Preset --export--> Hugging Face dataset / Parquet

A stage also accepts a path (or :class:`~flow._location.Location`) where it takes an
artifact: that is the caller's first call, and the path is opened there, once. Each function
here is a compute boundary: it runs graphs on the current Dask client (see
:mod:`flow.cluster`) and writes a store. Messages and progress go through one
:class:`~flow.cluster.Reporter` (silent by default).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from dask.base import compute as dask_compute
from dask.delayed import delayed

from ._claim import claim_output
from ._location import Location, LocationLike
from .cluster import CLUSTER_CELLS as CLUSTER_CELLS  # where it was (the rule: flow.cluster)
from .cluster import QUIET, Reporter, WorkerLostError, current_client, run_task, working_on
from .datasets import synthetic_counts
from .encode.store import EncodingStore, open_encoding, plan_encoding, write_encoding
from .errors import InputError, SchemaError, StoreNotFoundError
from .export import export_summary, write_model_dataset
from .ingest import ReadOptions, Source, open_source
from .medians import (
    MedianSet,
    bundled_medians,
    export_medians,
    import_median_dictionary,
    medians_of,
    merge_median_sets,
    open_medians,
    write_medians,
)
from .query import coverage_summary
from .sketch._tdigest import DEFAULT_COMPRESSION
from .store import DEFAULT_BLOCK_SIZE, CountStore, open_counts, write_counts
from .vocab import (
    DEFAULT_PRESET,
    GeneMapping,
    Preset,
    Vocabulary,
    bundled_gene_mapping,
    bundled_vocabulary,
    read_gene_mapping,
    read_vocabulary,
    resolve_preset,
    vocabulary_from_genes,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from distributed import Client

__all__ = [
    "RunResult",
    "convert",
    "demo",
    "export",
    "load_gene_mapping",
    "load_medians",
    "load_vocabulary",
    "medians",
    "nonzero_medians",
    "preset_dictionaries",
    "run",
    "tokenize",
]

#: Inputs from which ``convert`` opens them (reads their metadata) as parallel tasks.
OPEN_IN_TASKS = 8

Format = Literal["hf", "parquet"]
Method = Literal["tdigest", "exact"]


# --------------------------------------------------------------------------- opening, once


def _counts(
    store: CountStore | LocationLike, storage_options: Mapping[str, Any] | None
) -> CountStore:
    return (
        store
        if isinstance(store, CountStore)
        else open_counts(store, storage_options=storage_options)
    )


def load_medians(
    medians: MedianSet | LocationLike, *, storage_options: Mapping[str, Any] | None = None
) -> MedianSet:
    """A median set: as given, read from a median set store (without its digests: enough to
    tokenize), or imported from a Geneformer median pickle."""
    if isinstance(medians, MedianSet):
        return medians
    return open_medians(medians, storage_options=storage_options, digests=False)


def load_vocabulary(
    vocabulary: Vocabulary | LocationLike | None,
    median_set: MedianSet | None = None,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Vocabulary:
    """A vocabulary: as given, read from a token dictionary file (``.pkl``/``.json``/``.tsv``),
    or built from the expressed genes of a median set (a ``.zarr`` median set path, or
    ``median_set`` when ``vocabulary`` is None: a new model's vocabulary)."""
    if isinstance(vocabulary, Vocabulary):
        return vocabulary
    if vocabulary is not None:
        where = Location.of(vocabulary, storage_options)
        if not where.path.rstrip("/").endswith(".zarr"):
            return read_vocabulary(where.path)
        median_set = load_medians(where)
    if median_set is None:
        msg = "No vocabulary: give a token dictionary (--vocabulary) or the medians to build one from."
        raise InputError(msg)
    return vocabulary_from_genes(median_set.gene_ids[~np.isnan(median_set.medians)])


def load_gene_mapping(mapping: GeneMapping | LocationLike | None) -> GeneMapping | None:
    """A gene mapping: as given, or read (and normalised) from a file; None for none."""
    if mapping is None or isinstance(mapping, GeneMapping):
        return mapping
    return read_gene_mapping(Location.of(mapping).path)


def preset_dictionaries(preset: Preset | str) -> dict[str, Any]:
    """Geneformer's dictionaries for a model preset, as shipped with flow: ``medians``,
    ``vocabulary`` and ``gene_mapping`` (its Ensembl mapping, applied as upstream does; V2's
    also maps upper-case gene symbols, V1's is the identity on its vocabulary), ready for
    :func:`run` or :func:`tokenize`: ``run(inputs, out, preset="V2", **preset_dictionaries("V2"))``.
    """
    chosen = resolve_preset(preset)
    if chosen.dictionaries is None:
        msg = f"Preset {chosen.name!r} has no Geneformer dictionaries; use V1 or V2."
        raise InputError(msg)
    return {
        "medians": bundled_medians(chosen.name),
        "vocabulary": bundled_vocabulary(chosen.name),
        "gene_mapping": bundled_gene_mapping(chosen.name),
    }


@contextlib.contextmanager
def _naming_blocks(store: CountStore) -> Iterator[None]:
    """Re-raise a :class:`~flow.cluster.WorkerLostError` of a per-block task with the size of
    that block of ``store`` and the options that fix it."""
    try:
        yield
    except WorkerLostError as err:
        b = err.block
        if b is None or not 0 <= b < store.n_blocks:
            raise
        offsets = store.attrs["block_nnz_offsets"]
        size = store.block_size
        cells = min(size, int(store.attrs["n_cells"]) - b * size)
        nnz = int(offsets[b + 1]) - int(offsets[b])
        msg = (
            f"block {b} of {store.url} ({cells:,} cells, {nnz:,} nonzeros) killed its worker "
            f"{err.attempts} times, most likely out of memory (task {err.task}): convert again "
            f"with a smaller --block-size (now {size:,} cells), or give the workers more "
            "memory (--memory-limit), then rerun the same command."
        )
        raise WorkerLostError(msg, task=err.task, block=b, attempts=err.attempts) from None


# --------------------------------------------------------------------------- stages


def convert(
    inputs: Sequence[LocationLike | Source],
    output: LocationLike,
    *,
    read: ReadOptions | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    allow_non_integer: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
    client: Client | None = None,
) -> CountStore:
    """Convert input matrices (paths, URLs or opened sources) into one count store (computes
    and writes; see :func:`flow.store.write_counts`).

    The inputs are read by many tasks at once (one per file, and one per range of cells of a
    file that allows it), with the same bytes as a result whatever the workers. Without
    ``client`` the inputs are opened here and the tasks run where
    :func:`flow.cluster.current_client` says for that many cells (in
    :func:`flow.cluster.lazy_client`, the local cluster starts only for inputs of at least
    :func:`flow.cluster.cluster_cells` cells), else on dask's threaded scheduler. Given a
    ``distributed.Client``, the inputs are opened by one task (``flow-convert``) on a worker,
    which hands the reads and writes to the cluster's workers: they must all see the inputs
    and the output (shared file system or object store). ``storage_options`` apply to every
    path given as text, inputs and output alike.
    """
    options = read or ReadOptions()
    out = Location.of(output, storage_options)
    sources = [_input(s, storage_options) for s in inputs]
    progress = reporter.progress("convert")
    if client is None:
        return _convert_here(
            sources, out, options, block_size, allow_non_integer, progress, client=None
        )
    # a worker's working directory is not this one: local paths go as absolute paths
    absolute = [
        Location(s.url, s.storage_options) if isinstance(s, Location) else s for s in sources
    ]
    try:
        url = run_task(
            client,
            "convert",
            _convert_to_url,
            absolute,
            Location(out.url, out.storage_options),
            options,
            block_size,
            allow_non_integer,
            progress=progress,
        )
    except InputError as err:  # a path seen here may not be seen by the workers
        where = getattr(client.scheduler, "address", "?")
        msg = f"{err} (read on a worker of the cluster at {where}: inputs must be reachable from the workers)"
        raise InputError(msg) from err
    return open_counts(Location(url, out.storage_options))


def _input(
    item: LocationLike | Source, storage_options: Mapping[str, Any] | None
) -> Location | Source:
    """A path or URL as a Location (with the storage options); an opened source as it is."""
    if isinstance(item, str | os.PathLike | Location):
        return Location.of(item, storage_options)
    return item


def _convert_here(
    inputs: Sequence[Location | Source],
    output: Location,
    read: ReadOptions,
    block_size: int,
    allow_non_integer: bool,
    progress: Any,
    *,
    client: Client | None,
) -> CountStore:
    """Open the inputs here and write the count store with tasks on ``client`` (None: the
    current client for that many cells, :func:`flow.cluster.current_client`, else dask's
    threaded scheduler)."""
    sources = _open_inputs(inputs, read, client)
    if client is None:
        client = current_client(cells=sum(s.info.n_cells for s in sources))
    return write_counts(
        sources,
        output,
        block_size=block_size,
        allow_non_integer=allow_non_integer,
        progress=progress,
        client=client,
    )


def _open_inputs(
    inputs: Sequence[Location | Source], read: ReadOptions, client: Client | None
) -> list[Source]:
    """Open the inputs given as locations (their metadata): one after the other for a few,
    as tasks for :data:`OPEN_IN_TASKS` or more (on ``client``, else the current client, else
    dask's threads): a corpus of thousands of files is opened in parallel too."""
    where = [i for i, s in enumerate(inputs) if isinstance(s, Location)]
    opened: list[Any] = list(inputs)
    if len(where) < OPEN_IN_TASKS:
        for i in where:
            opened[i] = open_source(opened[i], read)
        return opened
    client = client or current_client(cells=0)  # metadata: a cluster only if there is one
    locations = [inputs[i] for i in where]
    if client is None:
        got = dask_compute(
            *[delayed(open_source, pure=False)(loc, read) for loc in locations],
            scheduler="threads",
        )
    else:
        token = uuid.uuid4().hex[:12]
        keys = [f"flow-convert-open-{token}-{k}" for k in range(len(locations))]
        got = client.gather(client.map(open_source, locations, [read] * len(keys), key=keys))
    for i, src in zip(where, got, strict=True):
        opened[i] = src
    return opened


def _convert_to_url(
    inputs: Sequence[Location | Source],
    output: Location,
    read: ReadOptions,
    block_size: int,
    allow_non_integer: bool,
    *,
    progress: Any = None,
) -> str:
    """:func:`_convert_here` on a worker, its tasks on the worker's cluster (this task leaves
    its thread to them meanwhile); returns the store's URL (what a task sends back)."""
    from distributed import worker_client  # on a worker: imported already (see flow.cluster)

    with worker_client() as client:
        store = _convert_here(
            inputs, output, read, block_size, allow_non_integer, progress, client=client
        )
    return store.url


def nonzero_medians(
    stores: CountStore | LocationLike | Sequence[CountStore | LocationLike],
    *,
    method: Method = "tdigest",
    compression: float | None = None,
    n_counts_column: str = "n_counts",
    gene_mapping: GeneMapping | LocationLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
) -> MedianSet:
    """The median set of one or more count stores (computes; writes nothing)."""
    many = stores if isinstance(stores, Sequence) and not isinstance(stores, str) else [stores]
    opened = [_counts(s, storage_options) for s in many]
    # one store: its block numbers are the tasks' (a block too large for memory: say which)
    with (
        working_on(sum(int(s.attrs["n_cells"]) for s in opened)),
        _naming_blocks(opened[0]) if len(opened) == 1 else contextlib.nullcontext(),
    ):
        return medians_of(
            opened,
            method=method,
            compression=compression or DEFAULT_COMPRESSION,
            n_counts_column=n_counts_column,
            gene_mapping=load_gene_mapping(gene_mapping),
            compute=lambda *graphs: reporter.compute(*graphs, label=f"medians ({method})"),
        )


def medians(
    stores: Sequence[CountStore | LocationLike],
    output: LocationLike | None,
    *,
    method: Method = "tdigest",
    compression: float | None = None,
    update: MedianSet | LocationLike | None = None,
    merge: Sequence[MedianSet | LocationLike] = (),
    import_dictionary: LocationLike | None = None,
    preset: str | None = None,
    export: LocationLike | None = None,
    n_counts_column: str = "n_counts",
    gene_mapping: GeneMapping | LocationLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
) -> MedianSet:
    """Compute, merge, update, import and/or export a median set (computes and writes).

    ``update`` and ``merge`` name existing median sets whose digests are merged with those of
    ``stores``; the old data is not read again. ``import_dictionary`` (a Geneformer median
    pickle) and ``preset`` (``"V1"``/``"V2"``: Geneformer's medians shipped with flow) are
    merged in too. Returns the resulting :class:`MedianSet`, bound to ``output`` when written.
    The output is claimed first (:func:`flow._claim.claim_output`): a second run on it stops.
    """
    out = None if output is None else Location.of(output, storage_options)
    with claim_output(out, command="medians") if out is not None else contextlib.nullcontext():
        return _medians(
            stores,
            out,
            method=method,
            compression=compression,
            update=update,
            merge=merge,
            import_dictionary=import_dictionary,
            preset=preset,
            export=export,
            n_counts_column=n_counts_column,
            gene_mapping=gene_mapping,
            storage_options=storage_options,
            reporter=reporter,
        )


def _medians(
    stores: Sequence[CountStore | LocationLike],
    output: Location | None,
    *,
    method: Method,
    compression: float | None,
    update: MedianSet | LocationLike | None,
    merge: Sequence[MedianSet | LocationLike],
    import_dictionary: LocationLike | None,
    preset: str | None,
    export: LocationLike | None,
    n_counts_column: str,
    gene_mapping: GeneMapping | LocationLike | None,
    storage_options: Mapping[str, Any] | None,
    reporter: Reporter,
) -> MedianSet:
    """:func:`medians`, with its output claimed."""
    parts = []
    if import_dictionary is not None:
        parts.append(import_median_dictionary(Location.of(import_dictionary).path))
    if preset is not None:
        parts.append(bundled_medians(resolve_preset(preset).name))
    earlier = [*([update] if update is not None else []), *merge]
    parts.extend(
        p if isinstance(p, MedianSet) else open_medians(p, storage_options=storage_options)
        for p in earlier
    )
    if stores:
        parts.append(
            nonzero_medians(
                stores,
                method=method,
                compression=compression,
                n_counts_column=n_counts_column,
                gene_mapping=gene_mapping,
                storage_options=storage_options,
                reporter=reporter,
            )
        )
    if not parts:
        msg = "Nothing to compute: give count stores, --import, --preset, --update or --merge."
        raise InputError(msg)
    result = merge_median_sets(parts) if len(parts) > 1 else parts[0]
    if output is not None:
        result = write_medians(result, output)
    if export is not None:
        export_medians(result, Location.of(export).path)
    return result


def tokenize(
    store: CountStore | LocationLike,
    output: LocationLike,
    *,
    medians: MedianSet | LocationLike,
    vocabulary: Vocabulary | LocationLike | None = None,
    gene_mapping: GeneMapping | LocationLike | None = None,
    n_counts_column: str = "n_counts",
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
) -> EncodingStore:
    """Rank every cell of a count store into an encoding store (computes and writes).

    ``medians`` is a median set (or its store, or a Geneformer median pickle); ``vocabulary``
    a token dictionary (or its file), or None to build one from the medians' expressed genes.
    Rerun with the same arguments, a finished store is left as it is and an unfinished one
    resumed; an output written from other inputs or parameters is replaced only with
    ``overwrite`` (see :func:`flow.encode.store.write_encoding`). The output is claimed first
    (:func:`flow._claim.claim_output`): a second run on it stops at once.
    """
    with claim_output(output, command="tokenize", storage_options=storage_options) as out:
        return _tokenize(
            store,
            out,
            medians=medians,
            vocabulary=vocabulary,
            gene_mapping=gene_mapping,
            n_counts_column=n_counts_column,
            overwrite=overwrite,
            storage_options=storage_options,
            reporter=reporter,
        )


def _tokenize(
    store: CountStore | LocationLike,
    output: Location,
    *,
    medians: MedianSet | LocationLike,
    vocabulary: Vocabulary | LocationLike | None,
    gene_mapping: GeneMapping | LocationLike | None,
    n_counts_column: str,
    overwrite: bool,
    storage_options: Mapping[str, Any] | None,
    reporter: Reporter,
) -> EncodingStore:
    """:func:`tokenize`, with its output claimed."""
    counts = _counts(store, storage_options)
    median_set = load_medians(medians, storage_options=storage_options)
    vocab = load_vocabulary(vocabulary, median_set, storage_options=storage_options)
    plan = plan_encoding(
        counts,
        median_set,
        vocab,
        gene_mapping=load_gene_mapping(gene_mapping),
        n_counts_column=n_counts_column,
    )
    # a block too large for the workers' memory: say which
    with working_on(int(counts.attrs["n_cells"])), _naming_blocks(counts):
        return write_encoding(
            plan,
            output,
            compute=lambda *graphs: reporter.compute(*graphs, label="tokenize"),
            overwrite=overwrite,
            say=reporter.say,
        )


def export(
    encoding: EncodingStore | LocationLike,
    output: LocationLike,
    *,
    format: Format = "hf",
    preset: Preset | str | None = DEFAULT_PRESET,
    input_size: int | None = None,
    obs_columns: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
) -> str:
    """Write the model input of an encoding store as a Hugging Face dataset or Parquet
    (computes); returns where it was written. The output is claimed first
    (:func:`flow._claim.claim_output`): a second run on it stops at once."""
    with claim_output(output, command="export", storage_options=storage_options) as out:
        return _export(
            encoding,
            out,
            format=format,
            preset=preset,
            input_size=input_size,
            obs_columns=obs_columns,
            storage_options=storage_options,
            reporter=reporter,
        )


def _export(
    encoding: EncodingStore | LocationLike,
    out: Location,
    *,
    format: Format,
    preset: Preset | str | None,
    input_size: int | None,
    obs_columns: Sequence[str] | None,
    storage_options: Mapping[str, Any] | None,
    reporter: Reporter,
) -> str:
    """:func:`export`, with its output claimed."""
    enc = (
        encoding
        if isinstance(encoding, EncodingStore)
        else open_encoding(encoding, storage_options=storage_options)
    )
    chosen = resolve_preset(preset, input_size)
    graph = write_model_dataset(
        enc, out, preset=chosen, format=format, obs_columns=obs_columns, compute=False
    )
    label = f"export ({format}, {chosen.name}, {chosen.input_size} tokens)"
    with working_on(enc.layout.n_cells):
        reporter.compute(graph, label=label)
    reporter.say(f"exported {out.path}: {export_summary(enc, chosen)}")
    return out.path


@dataclass(frozen=True)
class RunResult:
    """What :func:`run` wrote (or used), opened, and where each is."""

    counts: CountStore
    medians: MedianSet
    encoding: EncodingStore
    paths: dict[str, str]


def run(
    inputs: Sequence[LocationLike | Source],
    outdir: LocationLike,
    *,
    medians: MedianSet | LocationLike | None = None,
    vocabulary: Vocabulary | LocationLike | None = None,
    gene_mapping: GeneMapping | LocationLike | None = None,
    preset: Preset | str | None = DEFAULT_PRESET,
    input_size: int | None = None,
    format: Format = "hf",
    obs_columns: Sequence[str] | None = None,
    read: ReadOptions | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    storage_options: Mapping[str, Any] | None = None,
    reporter: Reporter = QUIET,
    client: Client | None = None,
) -> RunResult:
    """Convert, compute medians (unless given), tokenize and export in one go (computes).

    Writes ``counts.zarr``, ``medians.zarr`` (when computed), ``encoding.zarr`` and
    ``dataset`` (or ``parquet``) under ``outdir``. A single input that is a flow count store is
    used as it is (no ``counts.zarr`` is written). Each store and dictionary is opened once and
    handed on as an object. ``client``: read the inputs on a worker (see :func:`convert`).
    """
    chosen = resolve_preset(preset, input_size)  # a wrong preset fails before any work
    out = Location.of(outdir, storage_options)
    with claim_output(out, command="run"):  # the folder: a second run on it stops at once
        out.makedirs()
        mapping = load_gene_mapping(gene_mapping)
        given = None if medians is None else load_medians(medians, storage_options=storage_options)
        vocab = (
            None
            if vocabulary is None
            else load_vocabulary(vocabulary, storage_options=storage_options)
        )
        store = _count_store_input(inputs, storage_options)
        if store is not None:
            reporter.say(f"[1/4] using the count store {store.url} as it is")
            paths = {"counts": store.url}
        else:
            target = out.join("counts.zarr")
            paths = {"counts": target.path}
            reporter.say(f"[1/4] convert {len(inputs)} input(s) -> {target.path}")
            with claim_output(target, command="convert"):
                store = convert(
                    inputs,
                    target,
                    read=read,
                    block_size=block_size,
                    reporter=reporter,
                    client=client,
                )
        reporter.say(store.describe())
        median_set = given
        if median_set is not None:
            paths["medians"] = (
                (median_set.url or f"{median_set.method} medians in memory (not written)")
                if isinstance(medians, MedianSet)
                else str(medians)
            )
            reporter.say(f"[2/4] using the given medians {paths['medians']}")
        else:
            target = out.join("medians.zarr")
            reporter.say(f"[2/4] medians -> {target.path} (t-digest)")
            with claim_output(target, command="medians"):
                median_set = write_medians(
                    nonzero_medians(store, gene_mapping=mapping, reporter=reporter), target
                )
            reporter.say(median_set.describe(target.path))
            paths["medians"] = target.path
        target = out.join("encoding.zarr")
        reporter.say(f"[3/4] tokenize -> {target.path} (full rankings)")
        enc = tokenize(
            store,
            target,
            medians=median_set,
            vocabulary=vocab,
            gene_mapping=mapping,
            overwrite=True,  # run owns what it writes under outdir (convert replaces counts too)
            reporter=reporter,
        )
        reporter.say(enc.describe())
        paths["encoding"] = target.path
        target = out.join("dataset" if format == "hf" else "parquet")
        reporter.say(
            f"[4/4] export ({format}) -> {target.path} ({chosen.name}: {chosen.input_size:,} tokens)"
        )
        paths["dataset"] = export(
            enc, target, format=format, preset=chosen, obs_columns=obs_columns, reporter=reporter
        )
        return RunResult(store, median_set, enc, paths)


def _count_store_input(
    inputs: Sequence[LocationLike | Source], storage_options: Mapping[str, Any] | None
) -> CountStore | None:
    """The count store given as the only input, or None for inputs to convert."""
    if len(inputs) != 1 or not isinstance(inputs[0], str | os.PathLike | Location):
        return None
    try:
        return open_counts(inputs[0], storage_options=storage_options)
    except (StoreNotFoundError, SchemaError):  # not a count store; an unfinished one raises
        return None


def demo(
    outdir: LocationLike,
    *,
    n_cells: int = 20_000,
    n_genes: int = 20_000,
    seed: int = 0,
    reporter: Reporter = QUIET,
) -> RunResult:
    """:func:`run` on a seeded synthetic source (computes and writes), then the coverage.

    The model input is V2's (``<cls>`` + up to 4,094 genes + ``<eos>``); the medians and the
    vocabulary come from the synthetic data itself.
    """
    source = synthetic_counts(n_cells, n_genes, seed=seed)
    reporter.say(f"synthetic data: {n_cells:,} cells x {n_genes:,} genes (seed {seed})")
    t0 = time.perf_counter()
    result = run([source], outdir, preset="V2", reporter=reporter)
    seconds = time.perf_counter() - t0
    reporter.say(coverage_summary(result.encoding))
    reporter.say(
        f"Done in {seconds:.1f} s ({n_cells / seconds:,.0f} cells/s end to end). Results are in "
        f"{Location.of(outdir).url}/; open the dataset with "
        f"datasets.load_from_disk({result.paths['dataset']!r})"
    )
    return result
