"""The demo recipe through the command line, as `make corpus` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from domainlm.cli import main


@pytest.mark.slow
def test_demo_corpus_builds_then_does_nothing_on_rerun(tmp_path):
    data = yaml.safe_load(Path("recipes/demo.yaml").read_text())
    data["build_dir"] = str(tmp_path / "build")
    data["corpus"]["sources"][1]["path"] = str(tmp_path / "shards")  # no contributed shards
    (tmp_path / "shards").mkdir()
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(data))

    runner = CliRunner()
    first = runner.invoke(main, ["corpus", "build", "--recipe", str(recipe)])
    assert first.exit_code == 0, first.output
    out = tmp_path / "build" / "demo" / "corpus"
    manifest = json.loads((out / "manifest.json").read_text())
    total = manifest["counts"]["total"]
    assert total["in"] > 1000 and total["kept"] > 500  # the stdlib documentation
    assert manifest["counts"]["sources"]["python-docs"]["kept"] == total["kept"]
    assert list(out.glob("train-*.parquet")) and list(out.glob("val-*.parquet"))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    second = runner.invoke(main, ["corpus", "build", "--recipe", str(recipe)])
    assert second.exit_code == 0
    assert "up to date" in second.output
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_eval_names_the_missing_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: none\nbuild_dir: {tmp_path}/build\n"
                      "corpus:\n  sources: [{name: a, path: x}]\n")
    res = CliRunner().invoke(main, ["eval", "--recipe", str(recipe)])
    assert res.exit_code == 2
    assert "make corpus" in res.output and "Traceback" not in res.output
