"""The demo recipe through the command line: `make tokenizer tokens plan pretrain` as the
Makefile runs them, on the demo corpus, with the model sized by the demo's wall-clock plan."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.files import read_json
from domainlm.recipe import load_recipe

pytestmark = pytest.mark.slow  # end-to-end stages; `make test-fast` skips them


@pytest.fixture(scope="module")
def demo(demo_corpus, tmp_path_factory):
    """A copy of the demo recipe and corpus in a fresh build folder of this module's own."""
    source_root, data = demo_corpus
    root = tmp_path_factory.mktemp("demo-chain")
    shutil.copytree(source_root / "build" / "demo" / "corpus", root / "build" / "demo" / "corpus")
    data = {**data, "build_dir": str(root / "build"), "name": "demo"}
    # The plan and the model shape are the demo's own; only the number of training tokens is
    # cut to 60 steps of the plan's batch, so the test takes seconds rather than minutes.
    data["train"] = {**data["train"], "tokens": 60 * 4096, "val_every": 10, "log_every": 5}
    path = root / "demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_tokenizer_tokens_plan_pretrain_chain(demo):
    recipe = load_recipe(demo)
    run("tokenizer", "train", "--recipe", str(demo))
    run("tokens", "--recipe", str(demo))
    out = run("plan", "--recipe", str(demo))
    assert "FLOPs" in out

    plan = read_json(recipe.layout.plan)
    meta = read_json(recipe.layout.tokens / "meta.json")
    flops = float(yaml.safe_load(demo.read_text())["plan"]["flops"])
    # A FLOPs budget: the same plan on every machine, however busy.
    assert plan["budget"]["kind"] == "flops" and plan["flops"] == flops
    assert plan["data"]["checked"] and plan["data"]["unique_tokens"] == meta["train"]["tokens"]
    assert plan["shape"]["vocab_size"] == meta["vocab_size"] == 2048
    assert abs(plan["params"] / plan["target_params"] - 1) <= 0.05
    assert plan["shape"]["n_layers"] >= 2

    out = run("pretrain", "--recipe", str(demo), "--no-progress")
    manifest = read_json(recipe.layout.pretrain / "manifest.json")
    config = read_json(recipe.layout.pretrain_model / "config.json")
    assert config["hidden_size"] == plan["shape"]["d_model"]
    assert config["num_hidden_layers"] == plan["shape"]["n_layers"]
    assert manifest["settings"]["micro_batch"] == plan["strategy"]["micro_batch"]
    m = manifest["metrics"]
    assert m["steps"] == -(-60 * 4096 // plan["strategy"]["global_batch_tokens"])
    assert m["val_loss"] < m["unigram_baseline"]
    assert "perplexity" in out and "sample:" in out

    # Nothing changed: every stage says so and writes nothing.
    for args in (["tokenizer", "train"], ["tokens"], ["pretrain", "--no-progress"]):
        assert "up to date" in run(*args, "--recipe", str(demo))


def test_the_demo_shards_folder_ships_with_the_repository():
    """A fresh clone must run `make corpus`: git does not keep empty folders, so the demo's
    contributed-shards folder holds a (hidden, ignored by the reader) .gitkeep."""
    recipe = load_recipe("recipes/demo.yaml")
    shards = [s for s in recipe.corpus.sources if s.kind == "shards"]
    assert shards and all(Path(s.path).is_dir() for s in shards)
    assert Path("corpus/shards/.gitkeep").exists()
