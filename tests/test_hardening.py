"""No setting a user can write destroys a result before it is checked, and a diverging run stops
with a clear message keeping its last good checkpoint (issue 12's recipe and training cases)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from builders import grammar_corpus, tiny_run
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.recipe import RecipeError, load_recipe
from domainlm.train.module import Diverged, PretrainModule
from domainlm.train.pretrain import pretrain

MODEL = {"from_plan": False, "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
         "ffn_dim": 64, "max_seq_len": 32}
TRAIN = {"seq_len": 16, "micro_batch": 4, "grad_accum": 1, "tokens": 4 * 16 * 12, "lr": 1e-2,
         "warmup_steps": 2, "val_every": 4, "ckpt_every": 4, "log_every": 1, "sample_tokens": 4}
SOURCES = {"sources": [{"name": "docs", "kind": "python-docs"}]}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the recipe


@pytest.mark.parametrize(
    "section, values, field",
    [
        ("train", {"lr": -3.0e-3}, "train.lr"),
        ("train", {"lr": 1.0e9}, "train.lr"),
        ("train", {"micro_batch": -4}, "train.micro_batch"),
        ("train", {"betas": [0.9, 1.5]}, "train.betas"),
        ("train", {"grad_clip": 0.0}, "train.grad_clip"),
        ("train", {"min_lr_ratio": 2.0}, "train.min_lr_ratio"),
        ("finetune", {"epochs": 0}, "finetune.epochs"),
        ("finetune", {"epochs": -1}, "finetune.epochs"),
        ("finetune", {"micro_batch": 0}, "finetune.micro_batch"),
        ("finetune", {"heldout_fraction": 1.0}, "finetune.heldout_fraction"),
        ("finetune", {"lora": {"dropout": 1.0}}, "finetune.lora.dropout"),
        ("finetune", {"lora": {"r": 0}}, "finetune.lora.r"),
        ("finetune", {"full": {"lr": 0.0}}, "finetune.full.lr"),
        ("finetune", {"data": [{"name": "../x", "path": "a.jsonl"}]}, "finetune.data[0].name"),
        ("plan", {"flops": -5.0}, "plan.flops"),
        ("plan", {"mfu": 1.5}, "plan.mfu"),
        ("plan", {"max_epochs": 0}, "plan.max_epochs"),
        ("tokenizer", {"character_coverage": 1.5}, "tokenizer.character_coverage"),
        ("export", {"group_size": 0}, "export.group_size"),
        ("model", {"n_heads": 3}, "model"),
    ],
)
def test_an_out_of_range_setting_is_one_error_naming_the_field(tmp_path, section, values, field):
    text = yaml.safe_dump({"corpus": SOURCES, section: values}, sort_keys=False)
    with pytest.raises(RecipeError) as e:
        load_recipe(write(tmp_path, text))
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'r.yaml'}:") and f"{field}:" in message
    line = int(message.split(":")[1])  # the line of the field itself
    assert field.split(".")[-1].split("[")[0] + ":" in text.splitlines()[line - 1]


@pytest.mark.parametrize(
    "text, match",
    [
        ("seed: 1\nseed: 2\ncorpus: {sources: [{name: d, kind: python-docs}]}\n",
         r"r\.yaml:2: .*key 'seed' appears twice.*line 1"),
        ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
         r"r\.yaml:2: .*alias \*a is not allowed"),
        ("name: ../outside\ncorpus: {sources: [{name: d, kind: python-docs}]}\n",
         r"r\.yaml:1: name: must be a plain name"),
        ("name: /tmp/elsewhere\ncorpus: {sources: [{name: d, kind: python-docs}]}\n",
         r"name: must be a plain name"),
    ],
)
def test_yaml_that_would_mislead_or_escape_is_refused(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run pretrained once, with its checkpoints and manifest."""
    root = tmp_path_factory.mktemp("hardening")
    path = tiny_run(root, vocab_size=320, corpus=grammar_corpus(docs=80), model=MODEL, train=TRAIN)
    pretrain(load_recipe(path), progress=False)
    return root, path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


def test_a_bad_setting_is_refused_before_any_output_is_touched(trained, tmp_path):
    """`train.lr: -3.0e-3` once removed last.ckpt, the step checkpoints and the manifest, then
    died with a torch traceback."""
    root, path = trained
    out = load_recipe(path).layout.pretrain
    before = snapshot(out)
    assert "manifest.json" in before and "checkpoints/last.ckpt" in before
    data = yaml.safe_load(path.read_text())
    data["train"]["lr"] = -3.0e-3
    bad = root / "bad-lr.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["pretrain", "--recipe", str(bad), "--no-progress"])
    assert result.exit_code == 2 and "train.lr" in result.output
    assert "Traceback" not in result.output
    assert snapshot(out) == before


def _nan_after(step: int):
    original = PretrainModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step >= step else loss

    return training_step


def copy_run(root: Path, path: Path, name: str, **train) -> Path:
    """A recipe of another run name sharing the tiny run's corpus, tokenizer and tokens."""
    data = yaml.safe_load(path.read_text())
    data["name"] = name
    data["train"] = {**data["train"], **train}
    for stage in ("corpus", "tokenizer", "tokens"):
        shutil.copytree(root / "build" / "tiny" / stage, root / "build" / name / stage)
    copy = root / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint(trained, monkeypatch):
    root, path = trained
    recipe = load_recipe(copy_run(root, path, "diverging"))
    # The loss becomes NaN at step 6: the weights are NaN from then on.
    monkeypatch.setattr(PretrainModule, "training_step", _nan_after(6))
    with pytest.raises(Diverged, match=r"diverged at step \d+.*lower the learning rate"):
        pretrain(recipe, progress=False)
    assert issubclass(Diverged, UserError)  # the command line prints it without a traceback
    out = recipe.layout.pretrain
    assert not (out / "model").exists() and not (out / "manifest.json").exists()
    kept = sorted((out / "checkpoints").glob("*.ckpt"))
    assert kept, "the checkpoint of step 4 is kept"
    for ckpt in kept:
        state = torch.load(ckpt, weights_only=True)
        assert state["global_step"] <= 6
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_the_previous_runs_checkpoints_survive_a_failed_new_run(trained, monkeypatch):
    root, path = trained
    first = copy_run(root, path, "rerun")
    pretrain(load_recipe(first), progress=False)
    out = load_recipe(first).layout.pretrain
    before = snapshot(out / "checkpoints")
    data = yaml.safe_load(first.read_text())
    data["train"]["lr"] = 5e-3  # a new run of the same name: its checkpoints are stale
    first.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(PretrainModule, "training_step", _nan_after(2))
    with pytest.raises(Diverged):
        pretrain(load_recipe(first), progress=False)
    # The old run's checkpoints are set aside, whole, until a new run finishes.
    assert snapshot(out / "checkpoints.previous") == before
    monkeypatch.undo()
    pretrain(load_recipe(first), progress=False)
    assert not (out / "checkpoints.previous").exists()
    assert (out / "manifest.json").is_file()
