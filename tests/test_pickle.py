"""flow._pickle: dictionary pickles are read without running code."""

from __future__ import annotations

import os
import pickle
import pickletools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from flow._pickle import load_dict
from flow.errors import FlowError, InputError


def _write(path: Path, obj: Any, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


class _RunsShell:
    """Pickles to ``os.system(command)``: loading it with pickle.load runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (self.command,))


class _CallsEval:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (eval, ("__import__('os').getcwd()",))


# ------------------------------------------------------------------------------ plain data


@pytest.mark.parametrize("protocol", range(3, pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_scalars_become_plain_numbers(tmp_path: Path, protocol: int) -> None:
    table = {
        "<pad>": 0,
        "ENSG1": np.int16(2),
        "ENSG2": np.int64(-7),
        "ENSG3": np.uint16(65535),
        "ENSG4": np.float64(2.001186019549122),
        "ENSG5": np.float32(0.1),
        "ENSG6": np.bool_(True),
        "ENSG7": "ENSG00000000003",
        "ENSG8": 1.5,
    }
    got = load_dict(_write(tmp_path / "d.pkl", table, protocol))
    assert got == {k: (v.item() if isinstance(v, np.generic) else v) for k, v in table.items()}
    assert type(got["ENSG1"]) is int
    assert type(got["ENSG3"]) is int
    assert type(got["ENSG4"]) is float
    assert got["ENSG4"] == 2.001186019549122  # bit-exact
    assert type(got["ENSG5"]) is float
    assert got["ENSG5"] == float(np.float32(0.1))
    assert type(got["ENSG6"]) is bool


def test_legacy_numpy_core_module_name(tmp_path: Path) -> None:
    """Pickles written by numpy 1.x name ``numpy.core.multiarray.scalar`` (V1 dictionaries)."""
    raw = pickle.dumps({"ENSG1": np.int16(5)}, protocol=3)  # GLOBAL opcode: text names
    assert b"cnumpy._core.multiarray\nscalar\n" in raw
    legacy = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "legacy.pkl").write_bytes(legacy)
    got = load_dict(tmp_path / "legacy.pkl")
    assert got == {"ENSG1": 5}
    assert type(got["ENSG1"]) is int


@given(
    st.dictionaries(
        st.text(max_size=20),
        st.one_of(
            st.integers(-(2**62), 2**62),
            st.floats(allow_nan=False),
            st.text(max_size=10),
            st.lists(st.integers(0, 9), max_size=3),
        ),
        max_size=20,
    )
)
def test_round_trip_plain_dicts(tmp_path_factory: pytest.TempPathFactory, table: dict) -> None:
    path = _write(tmp_path_factory.mktemp("rt") / "d.pkl", table)
    assert load_dict(path) == table


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_does_not_run(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload = {"ENSG1": 2, "ENSG2": _RunsShell(f"touch {marker}")}
    path = _write(tmp_path / "token_dictionary.pkl", payload, protocol)
    # the pickle is a real threat: it names os.system (posix.system)
    assert any(
        op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(path.read_bytes())
    )
    with pytest.raises(InputError) as info:
        load_dict(path)
    assert not marker.exists()
    message = str(info.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # 'posix.system' on Linux
    assert isinstance(info.value, FlowError)
    assert isinstance(info.value, ValueError)


def test_protocol_2_numpy_scalars_refused(tmp_path: Path) -> None:
    """Protocols 0-2 store bytes via ``_codecs.encode``, which is not admitted (not needed:
    Geneformer's dictionaries are protocol 4/5)."""
    path = _write(tmp_path / "d.pkl", {"a": np.int16(1)}, protocol=2)
    with pytest.raises(InputError, match=r"_codecs\.encode"):
        load_dict(path)


def test_eval_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.pkl", {"a": _CallsEval()})
    with pytest.raises(InputError, match=r"builtins\.eval"):
        load_dict(path)


@pytest.mark.parametrize(
    "obj",
    [
        {"a": np.arange(3)},  # ndarray needs numpy._core.multiarray._reconstruct
        {"a": np.float64},  # a class
        {"a": complex(1, 2)},  # builtins.complex
        {"a": {1, 2}.__class__},
    ],
)
def test_other_globals_refused(tmp_path: Path, obj: dict) -> None:
    with pytest.raises(InputError, match="references the global"):
        load_dict(_write(tmp_path / "d.pkl", obj))


def test_numpy_dtype_admitted_only_for_numbers(tmp_path: Path) -> None:
    # a structured-dtype scalar goes through numpy.dtype and numpy.*.scalar, both admitted
    # names, but the stand-ins accept only bool/int/float dtypes
    scalar = np.zeros(1, dtype=[("a", "i4")])[0]
    with pytest.raises(InputError, match=r"plain numeric dtype|not a plain number"):
        load_dict(_write(tmp_path / "d.pkl", {"a": scalar}))
    # an object-dtype reconstruction is refused too
    evil = pickle.dumps({"a": np.int16(1)}, protocol=3).replace(
        b"X\x02\x00\x00\x00i2", b"X\x02\x00\x00\x00O8"
    )
    assert evil != pickle.dumps({"a": np.int16(1)}, protocol=3)
    (tmp_path / "o.pkl").write_bytes(evil)
    with pytest.raises(InputError):
        load_dict(tmp_path / "o.pkl")


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        ([1, 2, 3], "holds a pickled list"),
        ({1: 2}, "expected str keys"),
        ({"a": {1, 2}}, "holds a value of type set"),
        ({"a": {"b": 1}}, "holds a value of type dict"),
        ({"a": None}, "holds a value of type NoneType"),
    ],
)
def test_wrong_shapes_refused(tmp_path: Path, obj: Any, match: str) -> None:
    with pytest.raises(InputError, match=match):
        load_dict(_write(tmp_path / "d.pkl", obj))


def test_corrupt_pickle(tmp_path: Path) -> None:
    raw = pickle.dumps({"a": 1, "b": 2.0}, protocol=4)
    (tmp_path / "cut.pkl").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut\.pkl"):
        load_dict(tmp_path / "cut.pkl")
    (tmp_path / "text.pkl").write_text("ENSG1\t2\n")
    with pytest.raises(InputError, match=r"text\.pkl"):
        load_dict(tmp_path / "text.pkl")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_dict(tmp_path / "absent.pkl")


# ------------------------------------------------------------------------------ real files


_DICTS = [
    ("v1_gc30M/token_dictionary_gc30M.pkl", 25_426, int),
    ("v1_gc30M/gene_median_dictionary_gc30M.pkl", 25_424, float),
    ("v1_gc30M/ensembl_mapping_dict_gc30M.pkl", 25_424, str),
    ("v2_gc104M/token_dictionary_gc104M.pkl", 20_275, int),
    ("v2_gc104M/gene_median_dictionary_gc104M.pkl", 42_005, float),
    ("v2_gc104M/ensembl_mapping_dict_gc104M.pkl", 173_697, str),
]


@pytest.mark.data
@pytest.mark.parametrize(("name", "size", "kind"), _DICTS)
def test_geneformer_dictionaries_load(shared_data: Path, name: str, size: int, kind: type) -> None:
    table = load_dict(shared_data / "geneformer" / name)
    assert len(table) == size
    assert all(type(v) is kind for v in table.values())
    # same content as an unrestricted load (these files are trusted, byte-identical upstream)
    with open(shared_data / "geneformer" / name, "rb") as fh:
        trusted = pickle.load(fh)  # trusted shared files: comparison only
    assert table == {k: (v.item() if isinstance(v, np.generic) else v) for k, v in trusted.items()}
