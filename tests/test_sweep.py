"""`domainlm sweep` and `train.early_stopping` on a tiny pretrained model: trials in their own
folders, a deliberately bad setting pruned, a best recipe that loads; early stopping that stops
and saves the model of the best validation."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml
from builders import grammar_corpus, tiny_run
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.recipe import load_recipe

pytestmark = pytest.mark.slow  # trains real (tiny) models

WORDS = {"positive": "good great strong solid fine".split(),
         "negative": "bad weak poor awful grim".split()}
NOUNS = "report ledger audit quarter market bond client invoice loan fund".split()


def instructions(path: Path) -> Path:
    rng = random.Random(1)
    lines = [json.dumps({"instruction": f"Sentiment: {n} was {a}.", "output": label})
             for label, adjs in WORDS.items() for a in adjs for n in NOUNS]
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A pretrained tiny run ("tiny"): its recipe's data, and the recipe's path."""
    root = tmp_path_factory.mktemp("sweep")
    path = tiny_run(
        root, vocab_size=320, corpus=grammar_corpus(docs=120),
        model={"from_plan": False, "n_layers": 2, "d_model": 48, "n_heads": 2, "n_kv_heads": 1,
               "ffn_dim": 96, "max_seq_len": 64},
        train={"seq_len": 32, "micro_batch": 8, "grad_accum": 1, "tokens": 8 * 32 * 40,
               "lr": 1e-2, "val_every": 20, "ckpt_every": 40, "log_every": 5,
               "sample_tokens": 2, "precision": "32-true"},
        finetune={"data": [{"name": "sentiment", "path": str(instructions(root / "s.jsonl"))}],
                  "methods": ["full"], "full": {"lr": 3e-3}, "epochs": 1, "micro_batch": 16,
                  "max_seq_len": 40, "heldout_fraction": 0.2, "eval_examples": 0},
    )
    result = CliRunner().invoke(main, ["pretrain", "--recipe", str(path), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return yaml.safe_load(path.read_text()), path


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def test_sweep_prunes_a_bad_rate_and_writes_a_best_recipe_that_loads(pretrained, tmp_path):
    data, _ = pretrained
    data = {**data, "sweep": {
        # A grid in the written order: two sensible rates, then one far too small to learn
        # anything in these few steps, which falls behind the median of the first two.
        "params": {"finetune.full.lr": {"choices": [3e-3, 1e-2, 1e-7]}},
        "fixed": {"finetune.epochs": 1.0},
        "sampler": "grid", "startup_trials": 2, "warmup_validations": 0}}
    path = write(tmp_path / "tiny.yaml", data)
    result = CliRunner().invoke(main, ["sweep", "--recipe", str(path), "--stage", "finetune"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    out = recipe.layout.sweep
    with open(out / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["finetune.full.lr"]) for r in rows] == [3e-3, 1e-2, 1e-7]
    assert [r["state"] for r in rows] == ["complete", "complete", "pruned"]
    assert int(rows[0]["validations"]) >= 2
    # Each trial trained in its own folder; the run's own fine-tuning folder was never made.
    for i in (0, 1):
        trial = out / "trials" / f"trial-00{i}"
        assert (trial / "sft" / "full" / "model" / "config.json").is_file()
    assert not recipe.layout.sft.exists()
    best = load_recipe(out / "best.yaml")
    winner = min(rows[:2], key=lambda r: float(r["val_loss"]))
    assert best.finetune.full.lr == float(winner["finetune.full.lr"])
    assert best.name == recipe.name and best.finetune.epochs == recipe.finetune.epochs
    table = (out / "trials.md").read_text()
    assert "| pruned |" in table and "Best: trial" in table


def test_sweep_rejects_a_field_that_is_not_in_the_recipe(pretrained, tmp_path):
    data, _ = pretrained
    data = {**data, "sweep": {"params": {"finetune.full.rate": {"low": 1e-4, "high": 1e-3}}}}
    path = write(tmp_path / "tiny.yaml", data)
    result = CliRunner().invoke(main, ["sweep", "--recipe", str(path), "--stage", "finetune"])
    assert result.exit_code == 2
    assert "'finetune.full.rate' is not a recipe field" in result.output
    assert "lr" in result.output  # the section's fields are listed


def validation_loss(recipe, model) -> float:
    """The fine-tuning validation loss of `model`, computed as the stage computes it: the same
    held-out examples, encoded and batched the same way, the mean over every target token."""
    import sentencepiece as spm
    import torch

    from domainlm.finetune.sft_data import SFTData, encode_examples
    from domainlm.finetune.stage import load_instructions
    from domainlm.tokenizer.templates import load_template

    ft = recipe.finetune
    sp = spm.SentencePieceProcessor(model_file=str(recipe.layout.tokenizer_model))
    template = load_template(ft.template)
    data = load_instructions(ft, recipe.seed)
    heldout = sorted(data.heldout, key=lambda ex: hashlib.blake2b(ex.origin.encode()).digest())
    seq_len = min(ft.max_seq_len, model.config.max_seq_len)
    val = encode_examples(sp, template, heldout, seq_len, [])
    train = encode_examples(sp, template, data.train["sentiment"], seq_len, [])
    loader = SFTData(train, val, micro_batch=ft.micro_batch, grad_accum=1, total_steps=1,
                     seed=recipe.seed, max_seq_len=seq_len).val_dataloader()
    total = count = 0.0
    with torch.no_grad():
        for x, y in loader:
            _, loss = model(x, y)
            n = float((y != -100).sum())
            total, count = total + float(loss) * n, count + n
    return total / count


def test_early_stopping_stops_and_keeps_the_best_model(pretrained, tmp_path):
    from domainlm.model.load import load_model

    data, _ = pretrained
    data = {**data, "train": {**data["train"], "val_every": 2,
                              "early_stopping": {"patience": 2, "min_delta": 0.0}},
            "finetune": {**data["finetune"], "full": {"lr": 3e-2}, "epochs": 12}}
    path = write(tmp_path / "tiny.yaml", data)
    result = CliRunner().invoke(main, ["finetune", "--recipe", str(path), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    manifest = json.loads((recipe.layout.sft / "manifest.json").read_text())
    early = manifest["methods"]["full"]["early_stopping"]
    with open(recipe.layout.sft_method("full") / "logs" / "metrics.csv", newline="") as f:
        losses = {int(r["step"]): float(r["val/loss"]) for r in csv.DictReader(f)
                  if r.get("val/loss")}
    # It stopped before the planned steps, `patience` validations after the best one.
    assert early["stopped_early"]
    best_step = min(losses, key=losses.get)
    assert early["best_val_loss"] == pytest.approx(losses[best_step], rel=1e-6)
    assert len([s for s in losses if s > best_step]) == 2  # exactly `patience` more validations
    # The saved model is the best validation's, not the last step's.
    model = load_model(recipe.layout.sft_model("full")).float().eval()
    assert validation_loss(recipe, model) == pytest.approx(early["best_val_loss"], rel=1e-4)
    assert validation_loss(recipe, model) < losses[max(losses)]
