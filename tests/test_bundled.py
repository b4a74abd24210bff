"""flow.geneformer: the bundled Geneformer dictionaries equal the real pickles, exactly."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flow import geneformer
from flow._pickle import load_dict
from flow.errors import FlowError, InputError
from flow.geneformer import KINDS, PACKAGE_DIR, PRESETS, SOURCES_FILE, bundled_path, load, verify
from flow.geneformer.build import build, main

from conftest import REPO

CASES = [(p, k) for p in PRESETS for k in KINDS]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sources(directory: Path = PACKAGE_DIR) -> dict[str, Any]:
    return json.loads((directory / SOURCES_FILE).read_text(encoding="utf-8"))


def _name(preset: str, kind: str) -> str:
    """The key of a bundled file in SOURCES.json: its path relative to the package data."""
    return bundled_path(preset, kind).relative_to(PACKAGE_DIR).as_posix()


def _entry(preset: str, kind: str) -> dict[str, Any]:
    return _sources()["outputs"][_name(preset, kind)]


def _fingerprint(table: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Keys in order, each value's type and exact value (floats by their bits, via hex)."""
    return [
        (key, type(v).__name__, v.hex() if isinstance(v, float) else repr(v))
        for key, v in table.items()
    ]


@pytest.fixture(scope="session")
def geneformer_dir(shared_data: Path) -> Path:
    """Geneformer's pickles in the shared data (skips, or fails under CI=true, when absent)."""
    path = shared_data / "geneformer"
    if not path.is_dir():
        msg = f"{path} not found: set FLOW_SHARED_DATA to the folder with geneformer/"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# ------------------------------------------------------------------ equal to the real pickles


@pytest.mark.data
@pytest.mark.parametrize(("preset", "kind"), CASES)
def test_load_equals_the_pickle_exactly(geneformer_dir: Path, preset: str, kind: str) -> None:
    expected = load_dict(geneformer_dir / _entry(preset, kind)["source"])
    got = load(preset, kind)
    assert got == expected
    assert list(got) == list(expected)  # same order
    assert _fingerprint(got) == _fingerprint(expected)  # int vs float, float64 bits


@pytest.mark.data
@pytest.mark.parametrize(("preset", "kind"), CASES)
def test_sources_record_the_real_pickles(geneformer_dir: Path, preset: str, kind: str) -> None:
    entry = _entry(preset, kind)
    source = geneformer_dir / entry["source"]
    assert entry["source_sha256"] == _sha256(source)
    assert entry["source_size"] == source.stat().st_size
    sums = geneformer_dir.parent / "SHA256SUMS"  # the published checksums of the shared data
    if sums.is_file():
        published = {
            line.split()[1].removeprefix("./"): line.split()[0]
            for line in sums.read_text().splitlines()
            if line.strip()
        }
        assert published[f"geneformer/{entry['source']}"] == entry["source_sha256"]


@pytest.mark.data
def test_build_reproduces_the_shipped_bytes(geneformer_dir: Path, tmp_path: Path) -> None:
    # once through the command line, once through the function: both equal the shipped files
    cmd = [sys.executable, "-m", "flow.geneformer.build", str(geneformer_dir)]
    run = subprocess.run(
        [*cmd, "--output", str(tmp_path / "cli")], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 8 files" in run.stdout
    build(geneformer_dir, output_dir=tmp_path / "api")
    shipped = _sources()
    same_zlib = shipped["format"]["zlib"] == zlib.ZLIB_RUNTIME_VERSION
    for out in (tmp_path / "cli", tmp_path / "api"):
        verify(directory=out)
        for name in shipped["outputs"]:
            rebuilt, ours = (out / name).read_bytes(), (PACKAGE_DIR / name).read_bytes()
            assert gzip.decompress(rebuilt) == gzip.decompress(ours), name
            if same_zlib:  # compressed bytes also depend on the zlib library
                assert rebuilt == ours, name
        if same_zlib:
            assert (out / SOURCES_FILE).read_bytes() == (PACKAGE_DIR / SOURCES_FILE).read_bytes()


# ------------------------------------------------------------------ shipped files (no data needed)


def test_shipped_files_match_sources_json() -> None:
    record = _sources()
    assert set(record["outputs"]) == {_name(p, k) for p, k in CASES}
    for preset, kind in CASES:
        entry = _entry(preset, kind)
        path = bundled_path(preset, kind)
        assert path.is_file()
        assert path.is_relative_to(PACKAGE_DIR / preset)
        assert (entry["preset"], entry["kind"]) == (preset, kind)
        assert entry["corpus"] == {"V1": "gc30M", "V2": "gc104M"}[preset]
        assert entry["source"].endswith(f"_{entry['corpus']}.pkl")
        assert entry["sha256"] == _sha256(path)
        assert entry["size"] == path.stat().st_size
        payload = gzip.decompress(path.read_bytes())
        assert entry["json_sha256"] == hashlib.sha256(payload).hexdigest()
        assert len(json.loads(payload)) == entry["entries"] == len(load(preset, kind))
    verify()


def test_shipped_files_are_deterministic_gzip() -> None:
    for preset, kind in CASES:
        header = bundled_path(preset, kind).read_bytes()[:10]
        assert header[:3] == b"\x1f\x8b\x08"  # gzip, deflate
        assert header[3] == 0  # no flags: no file name, no comment, no extra field
        assert header[4:8] == b"\0\0\0\0"  # mtime 0


def test_documented_facts_of_the_dictionaries() -> None:
    """The facts ../shared/data/README.md states about the pickles hold for the bundled copies."""
    v1, v2 = load("V1", "token_dictionary"), load("V2", "token_dictionary")
    assert len(v1) == 25_426
    assert (v1["<pad>"], v1["<mask>"]) == (0, 1)
    assert sorted(v1.values()) == list(range(25_426))
    assert len(v2) == 20_275
    assert [v2[t] for t in ("<pad>", "<mask>", "<cls>", "<eos>")] == [0, 1, 2, 3]
    assert len(load("V1", "medians")) == 25_424
    assert len(load("V2", "medians")) == 42_005
    medians = load("V2", "medians")
    assert all(type(m) is float and math.isfinite(m) and m > 0 for m in medians.values())
    mapping = load("V2", "gene_mapping")
    assert len(mapping) == 173_697
    assert mapping["GAPDH"] == "ENSG00000111640"
    assert "GAPDH" not in load("V1", "gene_mapping")  # V1's mapping holds no symbols


def test_load_returns_a_fresh_dict() -> None:
    first = load("V1", "medians")
    first.clear()
    first["x"] = 1.0
    assert len(load("V1", "medians")) == 25_424
    assert load("v1", "medians") == load("V1", "medians")  # presets are case-insensitive


@pytest.mark.parametrize("bad", ["V3", "", "gc30M"])
def test_bad_preset_names_the_valid_ones(bad: str) -> None:
    for call in (load, bundled_path):
        with pytest.raises(InputError, match=r"V1, V2") as info:
            call(bad, "medians")
        assert isinstance(info.value, ValueError)
        assert isinstance(info.value, FlowError)


@pytest.mark.parametrize("bad", ["median", "gene_median_dictionary", "Medians"])
def test_bad_kind_names_the_valid_ones(bad: str) -> None:
    for call in (load, bundled_path):
        with pytest.raises(ValueError, match=r"token_dictionary, medians, name_id, gene_mapping"):
            call("V2", bad)


def test_non_string_arguments_are_type_errors() -> None:
    with pytest.raises(TypeError, match="preset"):
        load(2, "medians")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="kind"):
        bundled_path("V2", None)  # type: ignore[arg-type]


def test_verify_detects_damaged_and_missing_files(tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    verify(directory=copy)
    target = copy / "V2" / "gene_median_dictionary.json.gz"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"V2/gene_median_dictionary\.json\.gz.*SHA-256"):
        verify(directory=copy)
    target.unlink()
    with pytest.raises(InputError, match=r"gene_median_dictionary\.json\.gz cannot be read"):
        verify(directory=copy)
    (copy / SOURCES_FILE).write_text("{}")
    with pytest.raises(InputError, match=SOURCES_FILE):
        verify(directory=copy)


# ------------------------------------------------------------------ the converter, on made-up pickles


def _fake_sources(root: Path, table: dict[str, Any]) -> Path:
    for preset, kind in CASES:
        path = root / geneformer.source_name(preset, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(table, protocol=4))
    return root


def test_build_is_exact_on_awkward_values(tmp_path: Path) -> None:
    table = {
        "zeta": np.float64(0.1),
        "<pad>": np.int16(0),
        "ENSG2": np.int64(-(2**40)),
        "tiny": np.float64(5e-324),
        "neg0": -0.0,
        "third": 1 / 3,
        "big": 1.7976931348623157e308,
        "f32": np.float32(0.1),
        "one": 1.0,
        "flag": np.bool_(True),
        "名前": "ENSG00000000003",
        "list": [1, 2.5, "x"],
    }
    src = _fake_sources(tmp_path / "src", table)
    record = build(src, output_dir=tmp_path / "a")
    build(src, output_dir=tmp_path / "b")
    expected = load_dict(src / geneformer.source_name("V1", "medians"))
    for name, entry in record["outputs"].items():
        raw = (tmp_path / "a" / name).read_bytes()
        assert raw == (tmp_path / "b" / name).read_bytes()  # reruns give the same bytes
        got = json.loads(gzip.decompress(raw))
        assert _fingerprint(got) == _fingerprint(expected)
        assert got["f32"] == float(np.float32(0.1)) != 0.1
        assert entry["entries"] == len(table)
    assert (tmp_path / "a" / SOURCES_FILE).read_bytes() == (
        tmp_path / "b" / SOURCES_FILE
    ).read_bytes()
    verify(directory=tmp_path / "a")


def test_build_refuses_values_json_cannot_carry(tmp_path: Path) -> None:
    src = _fake_sources(tmp_path / "src", {"ENSG1": np.float64("nan")})
    with pytest.raises(InputError, match=r"gc30M\.pkl.*exact JSON"):
        build(src, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / SOURCES_FILE).exists()


def test_build_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    src = _fake_sources(tmp_path / "src", {"ENSG1": 1})
    evil = src / geneformer.source_name("V2", "name_id")
    evil.write_bytes(pickle.dumps({"ENSG1": os.getcwd}, protocol=4))  # names posix.getcwd
    with pytest.raises(InputError, match=r"Refusing to load .*gene_name_id_dict_gc104M\.pkl"):
        build(src, output_dir=tmp_path / "out")


def test_build_cli_missing_source_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "src" / "v1_gc30M").mkdir(parents=True)
    assert main([str(tmp_path / "src"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert "v1_gc30M/token_dictionary_gc30M.pkl" in err
    assert "FLOW_SHARED_DATA" in err
    assert not (tmp_path / "out").exists()  # nothing written
