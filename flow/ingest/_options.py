"""What readers take, parsed once: :class:`ReadOptions`.

The options travel as one frozen object from the user's words (the CLI, or the first public
call) down to the reader of each format; nothing below repacks or re-checks them. Which
format an option applies to is declared beside each reader (see
:func:`flow.ingest.register_reader`) and checked once by :func:`flow.ingest.open_source`.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FORMAT_OPTIONS", "ReadOptions"]

#: Options that apply to some formats only (a reader declares which it takes); the others
#: (``format``, ``read_size``, ``temp_dir``) apply to every format.
FORMAT_OPTIONS = (
    "layer",
    "use_raw",
    "gene_id_column",
    "obs_columns",
    "genome",
    "measurement",
    "obs_filter",
)


def _optional_str(name: str, value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    msg = f"{name} must be a string or None; got {type(value).__name__} {value!r}."
    raise TypeError(msg)


def _obs_columns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # one column named on its own
        return (value,)
    try:
        columns = tuple(value)
    except TypeError:
        msg = f"obs_columns must be column names (a list of strings); got {value!r}."
        raise TypeError(msg) from None
    bad = [c for c in columns if not isinstance(c, str)]
    if bad:
        msg = f"obs_columns must be column names (strings); got {bad[0]!r} among them."
        raise TypeError(msg)
    return columns


def _read_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        msg = f"read_size must be a positive whole number or None; got {value!r}."
        raise TypeError(msg)
    try:
        size = operator.index(value)
    except TypeError:
        msg = f"read_size must be a positive whole number or None; got {value!r}."
        raise TypeError(msg) from None
    if size < 1:
        msg = f"read_size must be a positive number; got {size}."
        raise ValueError(msg)
    return size


def _temp_dir(value: Any) -> str | os.PathLike[str] | None:
    if value is None:
        return None
    if isinstance(value, str | os.PathLike):
        return os.fspath(value)
    msg = f"temp_dir must be a directory path or None; got {value!r}."
    raise TypeError(msg)


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How to read an input: the options of :func:`flow.ingest.open_source`, checked once.

    Every field is optional; the defaults read the main matrix of any format. Values are
    normalised when the object is made (a single ``obs_columns`` name becomes a 1-tuple, a
    ``temp_dir`` path a string), so an instance is hashable and pickles as plain values.

    Parameters
    ----------
    format
        The input format (see :data:`flow.ingest.FORMATS`); detected from the input when
        None. An unknown name is refused by :func:`~flow.ingest.open_source`, naming the input.
    layer
        AnnData/loom: read this layer instead of ``X`` (the main matrix).
    use_raw
        AnnData: read ``raw.X`` (with ``raw.var`` genes) instead of ``X``.
    gene_id_column
        AnnData: ``var`` column with gene IDs (default: ``ensembl_id`` if present, else
        ``var_names``). Loom: row attribute (default ``ensembl_id``, else ``Accession``).
    obs_columns
        AnnData/loom: cell columns to carry (default: all 1-D columns of numbers, booleans,
        strings or categoricals). ``filter_pass`` and ``n_counts`` are always carried when
        present.
    genome
        10x HDF5: the genome to read (Cell Ranger 2 files with several genomes need it).
    measurement
        TileDB-SOMA: the measurement to read (default ``RNA``).
    obs_filter
        TileDB-SOMA: read only the cells this ``obs`` value filter keeps (TileDB-SOMA's
        ``value_filter`` syntax, e.g. ``"cell_type == 'B cell'"``).
    read_size
        How much one read takes: cells for row-wise layouts (CSR, dense, loom, 10x HDF5;
        default: the block size, or 64 MB of dense values), entries for CSC (default
        1,048,576) and Matrix Market (default 262,144). Results do not depend on it.
    temp_dir
        Where CSC and unsorted Matrix Market inputs are transposed (default: the system's
        temporary directory, also for URL inputs).

    Raises
    ------
    TypeError
        A value of the wrong type (``use_raw`` not a bool, ``obs_columns`` not strings, ...).
    ValueError
        ``read_size`` below 1.

    Examples
    --------
    >>> ReadOptions(obs_columns="cell_type").obs_columns
    ('cell_type',)
    >>> ReadOptions(layer="counts").given()
    ('layer',)
    """

    format: str | None = None
    layer: str | None = None
    use_raw: bool = False
    gene_id_column: str | None = None
    obs_columns: tuple[str, ...] | None = None
    genome: str | None = None
    measurement: str | None = None
    obs_filter: str | None = None
    read_size: int | None = None
    temp_dir: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        for name in ("format", "layer", "gene_id_column", "genome", "measurement", "obs_filter"):
            _optional_str(name, getattr(self, name))
        if not isinstance(self.use_raw, bool):
            msg = f"use_raw must be True or False; got {self.use_raw!r}."
            raise TypeError(msg)
        object.__setattr__(self, "obs_columns", _obs_columns(self.obs_columns))
        object.__setattr__(self, "read_size", _read_size(self.read_size))
        object.__setattr__(self, "temp_dir", _temp_dir(self.temp_dir))

    def given(self) -> tuple[str, ...]:
        """The names of the format-specific options (:data:`FORMAT_OPTIONS`) that are set."""
        defaults = {f.name: f.default for f in fields(self)}
        return tuple(name for name in FORMAT_OPTIONS if getattr(self, name) != defaults[name])
