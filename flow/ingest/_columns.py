"""Identifiers and cell columns as the readers find them, decoded into what the store carries.

Shared by every reader: text in any stored form (bytes, ``str`` objects, numpy ``StringDType``,
categoricals) becomes ``str``; barcodes are held compactly (numpy ``StringDType``); cell
columns stay numeric or become categoricals, so a million cells with a few labels cost a byte
each. AnnData elements (HDF5 or Zarr) are decoded with ``anndata.io.read_elem``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
from pandas.api.types import union_categoricals

from ..errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "ALWAYS_CARRIED",
    "as_str_array",
    "attr_str",
    "carried_column",
    "check_ids",
    "is_group",
    "read_cell_column",
    "read_elem",
    "read_ids",
    "select_columns",
    "text_column",
]

#: Cell columns carried whatever ``obs_columns`` says, when present.
ALWAYS_CARRIED = ("filter_pass", "n_counts")

_ID_SLICE = 1 << 16  # identifiers decoded per slice


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and value != value) or value is pd.NA


def as_str_array(values: Any, *, missing: str | None = "") -> np.ndarray:
    """Values as an object array of ``str`` (bytes decoded as UTF-8; missing -> ``missing``)."""
    if isinstance(values, pd.Categorical | pd.api.extensions.ExtensionArray | pd.Series):
        values = np.asarray(values.astype(object))
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.char.decode(arr, "utf-8", errors="replace").astype(object)
    if arr.dtype.kind == "U":
        return arr.astype(object)
    items = arr.ravel().tolist()
    if all(type(v) is str for v in items):  # the common case: nothing to decode or fill
        return np.asarray(items, dtype=object).reshape(arr.shape)
    out = np.empty(arr.shape, dtype=object)
    for i, v in enumerate(items):
        if _is_missing(v):
            out[i] = missing
        elif isinstance(v, bytes):
            out[i] = v.decode("utf-8", errors="replace")
        else:
            out[i] = str(v)
    return out


def attr_str(value: Any) -> str | None:
    """An HDF5/Zarr attribute as text (bytes decoded), or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def is_group(elem: Any) -> bool:
    """Whether an HDF5/Zarr element is a group (has keys) rather than an array."""
    return hasattr(elem, "keys")


def read_elem(elem: Any) -> Any:
    """An AnnData element decoded by anndata (dataframe columns, categoricals, ...)."""
    return ad.io.read_elem(elem)


def _plain_strings(elem: Any) -> Any | None:
    """A plain 1-D text dataset (HDF5 or Zarr) as something to slice into, else None."""
    if is_group(elem) or len(elem.shape) != 1:
        return None
    if attr_str(elem.attrs.get("encoding-type")) not in (None, "string-array"):
        return None
    kind = getattr(elem.dtype, "kind", "")
    if kind not in ("O", "S", "U", "T"):
        return None
    return elem.asstr() if kind == "O" and hasattr(elem, "asstr") else elem


def read_ids(elem: Any, decode: Callable[[Any], np.ndarray] = as_str_array) -> np.ndarray:
    """A column of cell identifiers (barcodes) as a compact numpy ``StringDType`` array.

    ``StringDType`` holds a 15-character barcode in 16 bytes and an 18-character one in about
    40, where ``str`` objects take about 75. A plain text dataset (HDF5 or Zarr) is read and
    decoded a slice at a time, so the object form never exists whole; other encodings
    (categorical) are read by anndata and converted.
    """
    compact = np.dtypes.StringDType()
    rows = _plain_strings(elem)
    if rows is None:
        return decode(read_elem(elem)).astype(compact)
    out = np.empty(elem.shape[0], dtype=compact)
    for a in range(0, elem.shape[0], _ID_SLICE):
        out[a : a + _ID_SLICE] = decode(rows[a : a + _ID_SLICE])
    return out


def read_cell_column(elem: Any) -> np.ndarray | pd.Categorical | None:
    """:func:`carried_column` of an obs element, reading a text dataset a slice at a time.

    Labels stored as plain text (a cell type per cell) become a categorical slice by slice,
    so the million strings never exist at once; mostly distinct text (IDs) is read whole.
    """
    rows = _plain_strings(elem)
    n = 0 if rows is None else int(elem.shape[0])
    if rows is None or n == 0:
        return carried_column(read_elem(elem))
    parts, distinct = [], pd.Index([], dtype=object)
    for a in range(0, n, _ID_SLICE):
        parts.append(pd.Categorical(as_str_array(rows[a : a + _ID_SLICE], missing=None)))
        distinct = distinct.union(parts[-1].categories)
        if 2 * len(distinct) > n:  # mostly distinct: IDs, kept as text
            return carried_column(read_elem(elem))
    return union_categoricals(parts, sort_categories=True)


def text_column(values: Any) -> np.ndarray | pd.Categorical:
    """Text cell values, held compactly: a categorical with ``str`` categories (missing values
    missing), or ``str`` objects (missing ``None``) when most values are distinct (IDs).

    A column of a million cells holding a few labels costs a byte per cell, not a string each.
    """
    if isinstance(values, pd.Categorical):
        categories = as_str_array(values.categories)
        if pd.Index(categories).is_unique:
            return pd.Categorical.from_codes(values.codes, categories=categories)
        values = values.astype(object)  # categories equal as text (1 and "1"): regroup them
    strings = as_str_array(values, missing=None)
    labels = pd.Categorical(strings)
    return strings if 2 * len(labels.categories) > len(strings) else labels


def carried_column(values: Any) -> np.ndarray | pd.Categorical | None:
    """A cell column in a form the count store can carry, or None if it is not 1-D and simple.

    Numbers and booleans stay numeric; text and categoricals go through :func:`text_column`;
    nullable integers with missing values become float with NaN.
    """
    if isinstance(values, pd.Categorical):
        return text_column(values)
    if isinstance(values, pd.api.extensions.ExtensionArray):
        kind = getattr(values.dtype, "kind", "O")
        has_na = bool(np.asarray(values.isna()).any())
        if kind in "iuf" and has_na:
            return np.asarray(values.to_numpy(dtype=np.float64, na_value=np.nan))
        if kind in "biuf" and not has_na:
            return np.asarray(values.to_numpy(dtype=values.dtype.numpy_dtype))
        return text_column(values)
    arr = np.asarray(values)
    if arr.ndim != 1:
        return None
    if arr.dtype.kind in "biuf":
        return arr
    if arr.dtype.kind in "OSUT":  # T: numpy's StringDType, as zarr v3 returns text
        return text_column(arr)
    return None


def select_columns(
    available: Sequence[str], requested: Sequence[str] | None, *, path: str, where: str
) -> list[str]:
    """The cell columns to carry: all of ``available`` or ``requested`` plus :data:`ALWAYS_CARRIED`."""
    if requested is None:
        return list(available)
    missing = [c for c in requested if c not in available]
    if missing:
        msg = (
            f"{path}: {where} has no column {', '.join(map(repr, missing))}. Available: "
            f"{', '.join(map(repr, available)) or 'none'}. Pass obs_columns from that list."
        )
        raise InputError(msg)
    return list(dict.fromkeys([*requested, *(c for c in ALWAYS_CARRIED if c in available)]))


def check_ids(ids: np.ndarray, *, n: int, path: str, what: str, fix: str) -> None:
    """Refuse identifiers of the wrong length or with empty values."""
    if len(ids) != n:
        msg = f"{path}: {len(ids)} {what} for a matrix with {n}; the file is inconsistent. {fix}"
        raise InputError(msg)
    empty = np.flatnonzero((ids == "") | (ids == "nan"))
    if empty.size:
        msg = (
            f"{path}: {empty.size} of {n} {what} are missing (first at position "
            f"{int(empty[0])}). {fix}"
        )
        raise InputError(msg)
