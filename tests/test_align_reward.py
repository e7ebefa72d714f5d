"""The reward model: it learns a planted preference on the project's Trainer to >= 0.9 held-out
pairwise accuracy, and its folder is a transformers LlamaForSequenceClassification whose
scores equal ours."""

from __future__ import annotations

import random

import pytest
import torch
from builders import TINY_VOCAB, sentencepiece_model, tiny_model
from transformers import AutoModelForSequenceClassification

from domainlm.align.data import StepData
from domainlm.align.evaluate import pair_accuracy
from domainlm.align.fit import fit, train_config
from domainlm.align.modules import RewardModule
from domainlm.align.reward import (
    RewardModel,
    load_reward_model,
    save_reward_model,
    score_sequences,
)
from domainlm.align.sequences import EncodedPair, collate_pairs
from domainlm.errors import UserError
from domainlm.finetune.sft_data import steps_for
from domainlm.model.llama import IGNORE_INDEX
from domainlm.recipe import Recipe
from domainlm.tokenizer import special

PLANTED = 7  # the token people prefer replies to contain


def planted_pairs(n: int, seed: int) -> list[EncodedPair]:
    """Random prompts and replies; the chosen reply holds PLANTED somewhere, the rejected
    one never does."""
    rng = random.Random(seed)
    ordinary = [t for t in range(10, TINY_VOCAB) if t != PLANTED]

    def seq(prompt: list[int], reply: list[int]) -> tuple[list[int], list[int]]:
        reply = [*reply, special.EOS_ID]
        return prompt + reply, [IGNORE_INDEX] * len(prompt) + reply

    out = []
    for i in range(n):
        prompt = rng.choices(ordinary, k=rng.randint(3, 6))
        good = rng.choices(ordinary, k=rng.randint(4, 8))
        good.insert(rng.randrange(len(good) + 1), PLANTED)
        bad = rng.choices(ordinary, k=rng.randint(4, 9))
        out.append(EncodedPair(seq(prompt, good), seq(prompt, bad), f"planted:{i}"))
    return out


def tiny_recipe(tmp_path, **train) -> Recipe:
    recipe = Recipe(name="toy", build_dir=str(tmp_path / "build"), seed=3)
    recipe.train.precision = "32-true"
    recipe.train.log_every = 5
    for k, v in train.items():
        setattr(recipe.train, k, v)
    return recipe


@pytest.mark.slow
def test_the_reward_model_learns_a_planted_preference(tmp_path):
    train, heldout = planted_pairs(320, seed=1), planted_pairs(100, seed=2)
    recipe = tiny_recipe(tmp_path)
    torch.manual_seed(0)
    rm = RewardModel.from_decoder(tiny_model(0)).train()
    steps = steps_for(len(train), 3, 16, 1, 1)
    cfg = train_config(recipe, 3e-3, steps)
    module = RewardModule(rm, cfg, total_steps=steps, grad_accum=1, flops_per_batch=1.0)
    items = [(p, 0.0, 0.0) for p in train]
    data = StepData(items, [(p, 0.0, 0.0) for p in heldout], micro_batch=16, grad_accum=1,
                    total_steps=steps, seed=recipe.seed, collate=collate_pairs)
    before = pair_accuracy(rm, heldout)
    fit(recipe, "reward", module, data, cfg, total_steps=steps, micro_batch=16, grad_accum=1,
        seq_len=32, fingerprint="planted", force=False, progress=False)
    after = pair_accuracy(rm.eval(), heldout)
    assert before < 0.75 and after >= 0.9, (before, after)
    log = (tmp_path / "build" / "toy" / "align" / "reward" / "logs" / "metrics.csv").read_text()
    assert "train/loss" in log and "val/accuracy" in log


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    tok = sentencepiece_model(root / "tok")
    torch.manual_seed(4)
    rm = RewardModel.from_decoder(tiny_model(0, tie_embeddings=True))
    with torch.no_grad():
        rm.score.weight.normal_()  # scores far from zero, so equality is not trivial
    save_reward_model(rm, tok, root / "reward")
    return rm.eval(), root / "reward"


def test_the_folder_is_a_transformers_sequence_classifier_with_our_scores(exported):
    rm, folder = exported
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(10, TINY_VOCAB, (n,), generator=g).tolist() for n in (12, 5, 20, 9)]
    ours = score_sequences(rm, seqs)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), special.PAD_ID)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert ours.abs().min() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # ... and what transformers saves loads back in ours, equal
    again = load_reward_model(folder)
    torch.testing.assert_close(score_sequences(again, seqs), ours, atol=1e-6, rtol=0)


def test_a_causal_lm_folder_is_not_a_reward_model(tmp_path):
    from domainlm.model.hf import save_hf_folder

    tok = sentencepiece_model(tmp_path / "tok")
    save_hf_folder(tiny_model(0), tok, tmp_path / "lm")
    with pytest.raises(UserError, match="LlamaForSequenceClassification"):
        load_reward_model(tmp_path / "lm")
