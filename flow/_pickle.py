"""Restricted reading of dictionary pickles (Geneformer's ``*.pkl`` files).

Pickles can run arbitrary code when loaded: a pickle may name any importable callable
(``os.system``, ``subprocess.Popen``, ...) and ask the loader to call it. Geneformer ships its
token, median and gene-mapping dictionaries as pickles, so flow never hands them to
:func:`pickle.load`. :func:`load_dict` uses an unpickler whose ``find_class`` admits only the
globals that a plain ``dict`` of ``str`` -> ``str``/``int``/``float`` needs when its numbers are
numpy scalars (V1 token values are ``numpy.int16``, medians are ``numpy.float64``):

- ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar`` (one numpy scalar), and
- ``numpy.dtype`` (the scalar's type),

and even those are replaced by small functions that accept only boolean, integer and
floating-point dtypes and return plain Python numbers. Any other global is refused before it is
imported, with an :class:`~flow.errors.InputError` naming the file and the global.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any, Final

import numpy as np

from flow.errors import InputError

__all__ = ["load_dict"]

# "<i2", "i2", "f8", "?", "b1", "u4" ...: the descriptors numpy writes for numeric dtypes.
_NUMERIC_DTYPE_STR: Final = re.compile(r"^[<>|=]?(?:[biuf]\d{1,2}|\?)$")
_NUMERIC_KINDS: Final = frozenset("biuf")


def _numeric_dtype(obj: object, align: object = False, copy: object = False) -> np.dtype[Any]:
    """Stand-in for ``numpy.dtype`` that builds only boolean / integer / float dtypes."""
    if not isinstance(obj, str) or _NUMERIC_DTYPE_STR.match(obj) is None:
        msg = f"numpy.dtype({obj!r}) is not a plain numeric dtype"
        raise pickle.UnpicklingError(msg)
    return np.dtype(obj, align=bool(align), copy=bool(copy))


def _numeric_scalar(dtype: object, data: object = None) -> int | float | bool:
    """Stand-in for ``numpy.core.multiarray.scalar``: a plain Python number from raw bytes."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.fields:
        msg = f"numpy scalar of dtype {dtype!r} is not a plain number"
        raise pickle.UnpicklingError(msg)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        msg = f"numpy scalar of dtype {dtype} needs {dtype.itemsize} bytes"
        raise pickle.UnpicklingError(msg)
    value: int | float | bool = np.frombuffer(data, dtype=dtype, count=1)[0].item()
    return value


_ALLOWED: Final[dict[tuple[str, str], Any]] = {
    ("numpy.core.multiarray", "scalar"): _numeric_scalar,
    ("numpy._core.multiarray", "scalar"): _numeric_scalar,
    ("numpy", "dtype"): _numeric_dtype,
}


class _ForbiddenGlobalError(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.global_name = f"{module}.{name}"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str, /) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _ForbiddenGlobalError(module, name) from None


def _plain(value: object) -> object:
    """Validate one dictionary value: str, int, float (bool counts as int) or a list of them."""
    if isinstance(value, str | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    msg = f"a value of type {type(value).__name__}"
    raise TypeError(msg)


def load_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a pickled dictionary of strings and numbers without running code.

    Parameters
    ----------
    path
        A pickle holding a ``dict`` whose keys are ``str`` and whose values are ``str``,
        ``int``, ``float`` (numpy scalars included) or lists of those, such as Geneformer's
        ``token_dictionary_*.pkl``, ``gene_median_dictionary_*.pkl`` or
        ``ensembl_mapping_dict_*.pkl``.

    Returns
    -------
    dict
        The dictionary, with numpy scalars converted to plain Python ``int``/``float``/``bool``
        and tuples to lists. Eager: the file is read when this is called.

    Raises
    ------
    InputError
        If the pickle references any global other than the numpy scalar constructors (the
        message names the file and the global, which is never imported or called), if it is
        corrupt or truncated, or if it does not hold a dict of ``str`` keys and plain values.
    FileNotFoundError
        If ``path`` does not exist.

    Notes
    -----
    Admitted globals: ``numpy.core.multiarray.scalar``, ``numpy._core.multiarray.scalar`` and
    ``numpy.dtype``; each is replaced by a function that accepts only boolean, integer and
    floating-point dtypes. Everything else is refused in ``find_class``, before import.
    """
    fspath = os.fspath(path)
    with open(fspath, "rb") as fh:
        raw = fh.read()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
    except _ForbiddenGlobalError as err:
        msg = (
            f"Refusing to load {fspath!r}: the pickle references the global {err.global_name!r}, "
            "which a dictionary of strings and numbers does not need (pickles can run code, so "
            "flow admits only numpy number scalars). Expected a pickled dict of str -> "
            "str/int/float, such as Geneformer's dictionaries; if the file is yours, re-save it "
            "as a plain dict (or as JSON/TSV)."
        )
        raise InputError(msg) from None
    except Exception as err:  # corrupt pickle: UnpicklingError, EOFError, ValueError, ...
        msg = (
            f"Cannot read {fspath!r} as a pickled dictionary: {type(err).__name__}: {err}. "
            "Expected an intact pickle of a dict of str -> str/int/float; check the file "
            "(e.g. against the published SHA-256) or download it again."
        )
        raise InputError(msg) from err
    if not isinstance(obj, dict):
        msg = (
            f"{fspath!r} holds a pickled {type(obj).__name__}, expected a dict of "
            "str -> str/int/float."
        )
        raise InputError(msg)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            msg = f"{fspath!r}: expected str keys, got {key!r} ({type(key).__name__})."
            raise InputError(msg)
        try:
            out[key] = _plain(value)
        except TypeError as err:
            msg = (
                f"{fspath!r}: key {key!r} holds {err}, expected str, int, float or a list of those."
            )
            raise InputError(msg) from None
    return out
