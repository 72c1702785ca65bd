"""Packaging: every package folder is installed, under the names pyproject promises."""

from __future__ import annotations

import importlib
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    data = {name for name in listed if name.startswith("diffalign.configs.")}
    assert all(tool["package-data"].get(name) == ["*.yaml"] for name in data), "a config folder ships no YAML"
    mapping = {v: k for k, v in tool["package-dir"].items()}  # folder -> import name
    found = set()
    # code packages, and the config folders, which ship their YAML files as data packages
    for marker in [*ROOT.glob("*/**/__init__.py"), *ROOT.glob("configs/**/*.yaml")]:
        rel = marker.parent.relative_to(ROOT).parts
        if rel[0] in mapping:
            found.add(".".join((mapping[rel[0]], *rel[1:])))
    assert found, "no packages found"
    assert found == listed, f"missing from pyproject: {found - listed}; stale: {listed - found}"


def test_packages_import_under_their_installed_names() -> None:
    for name in ("diffalign", "diffalign.objectives", "diffalign.config", "diffalign_rewards"):
        importlib.import_module(name)
