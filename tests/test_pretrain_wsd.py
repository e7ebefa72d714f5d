"""`make pretrain` with optimizer: muon and schedule: wsd: a resume restores Muon's and AdamW's
state exactly, and a longer WSD run starts from a shorter one's checkpoint at its decay start
and ends where the longer run from scratch ends."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from builders import grammar_corpus, tiny_run
from safetensors.torch import load_file
from test_pretrain import MODEL, TRAIN, losses, recipe_copy

from domainlm.files import read_json
from domainlm.recipe import load_recipe
from domainlm.train.extend import INFO, TRUNK
from domainlm.train.pretrain import pretrain

STEP_TOKENS = TRAIN["micro_batch"] * TRAIN["seq_len"]
MUON = {"optimizer": "muon", "schedule": "wsd", "decay_fraction": 0.25, "warmup_steps": 2,
        "muon_lr": 0.02, "ckpt_every": 1000, "val_every": 10}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain-wsd")
    tiny_run(root, vocab_size=320, corpus=grammar_corpus(), model=MODEL, train=TRAIN)
    return root


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "pretrain" / "model" / "model.safetensors")


def run(root: Path, name: str, steps: int) -> tuple[Path, str]:
    recipe = load_recipe(recipe_copy(root, name, tokens=steps * STEP_TOKENS, **MUON))
    manifest = pretrain(recipe, progress=False)
    return recipe.layout.root, str(manifest.get("resumed_from"))


def assert_same(a: Path, b: Path, from_step: int, steps: int) -> None:
    la, lb = losses(a), losses(b)
    for step in range(from_step, steps):
        assert la[step] == pytest.approx(lb[step], abs=1e-6), step
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.slow
def test_muon_resume_equals_the_uninterrupted_run(run_root):
    ref, _ = run(run_root, "muon-ref", 40)
    ckpts = ref / "pretrain" / "checkpoints"
    assert read_json(ckpts / INFO)["step"] == 30  # 40 - 25% of 40
    state = torch.load(ckpts / TRUNK, map_location="cpu", weights_only=True)
    opt = state["optimizer_states"][0]
    assert set(opt) == {"muon", "adamw"}
    assert any("momentum_buffer" in s for s in opt["muon"]["state"].values())
    # The same run again, started from the reference's checkpoint at step 30 as from a kill.
    recipe = load_recipe(recipe_copy(run_root, "muon-resumed", tokens=40 * STEP_TOKENS, **MUON))
    dst = recipe.layout.pretrain / "checkpoints"
    dst.mkdir(parents=True)
    shutil.copy(ckpts / "run.json", dst / "run.json")
    shutil.copy(ckpts / TRUNK, dst / "last.ckpt")
    manifest = pretrain(recipe, progress=False)
    assert manifest["resumed_from"].endswith("last.ckpt")
    assert_same(recipe.layout.root, ref, 30, 40)


@pytest.mark.slow
def test_a_longer_wsd_run_starts_from_the_shorter_runs_decay_start(run_root):
    ref, _ = run(run_root, "wsd-long", 40)  # from scratch: decay from step 30
    short, resumed = run(run_root, "wsd-ext", 20)  # decay from step 15
    assert resumed == "None"
    extended, resumed = run(run_root, "wsd-ext", 40)  # the same run name, twice the tokens
    assert resumed.endswith(f"checkpoints.previous/{TRUNK}")
    assert_same(extended, ref, 15, 40)
    # A shorter run than the trunk's step cannot use it: it starts afresh.
    _, resumed = run(run_root, "wsd-ext", 12)
    assert resumed == "None"
