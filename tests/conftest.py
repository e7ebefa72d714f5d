"""Shared test helpers: recipes written to a temporary folder, English-like documents."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

from domainlm.corpus.pipeline import build_corpus  # noqa: E402
from domainlm.recipe import Recipe, load_recipe  # noqa: E402


@pytest.fixture
def make_recipe(tmp_path: Path):
    """Write a recipe (a dict) into tmp_path and load it; build outputs go to tmp_path/build."""

    def make(data: dict, name: str = "test", build_dir: Path | None = None) -> Recipe:
        data = {"build_dir": str(build_dir or tmp_path / "build"), **data}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return load_recipe(path)

    return make


def write_jsonl(path: Path, records: list) -> Path:
    """Write records (dicts, or raw strings written as-is) one per line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The demo recipe's corpus (the stdlib documentation), built once (~15 s)."""
    root = tmp_path_factory.mktemp("demo")
    data = yaml.safe_load(Path("recipes/demo.yaml").read_text())
    data["build_dir"] = str(root / "build")
    data["corpus"]["sources"][1]["path"] = str(root / "shards")
    (root / "shards").mkdir()
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(data))
    build_corpus(load_recipe(path), progress=False)
    return root, data
