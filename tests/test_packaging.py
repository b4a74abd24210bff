"""The package's public surface and its packaging files agree."""

from __future__ import annotations

import re
import tomllib

import yaml

import flow

from conftest import REPO

#: conda-forge names that differ from the PyPI ones.
_PYPI_NAME = {"tiledbsoma-py": "tiledbsoma"}


def _name(req: str) -> str:
    name = re.split(r"[<>=\[ ;]", req, maxsplit=1)[0].lower()
    return _PYPI_NAME.get(name, name)


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert conda == wanted


def test_public_names_are_sorted_and_exist():
    assert flow.__all__ == sorted(flow.__all__)
    for name in flow.__all__:
        assert hasattr(flow, name), name
