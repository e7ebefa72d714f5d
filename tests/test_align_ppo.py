"""PPO and GRPO on the project's Trainer with a toy reward (1 when the completion holds one
token): the mean reward rises while the KL to the reference stays bounded; the KL is exactly
zero while the policy equals its reference (a fresh LoRA adapter, or a full copy)."""

from __future__ import annotations

import csv
import random

import pytest
import torch
from builders import TINY_VOCAB, small_config, tiny_model
from test_align_reward import tiny_recipe

from domainlm.align.methods import run_rl
from domainlm.align.ppo import PPOModule, eos_penalized
from domainlm.align.sequences import disable_dropout
from domainlm.model.llama import Llama
from domainlm.model.peft.lora import ADAPTER_NAME, add_lora
from domainlm.recipe import AlignLoRAConfig, GRPOConfig, PPOConfig

TARGET = 7  # the token whose presence is rewarded
TOY_VOCAB = 16  # so that a random decoder samples TARGET often enough to learn from


def toy_reward(prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
    return torch.tensor([float(TARGET in c) for c in completions])


def toy_model():
    torch.manual_seed(0)
    return Llama(small_config(vocab_size=TOY_VOCAB))


def prompts(n: int = 24, vocab: int = TOY_VOCAB) -> list[list[int]]:
    rng = random.Random(0)
    return [rng.choices(range(4, vocab), k=rng.randint(2, 5)) for _ in range(n)]


def lora_policy(seed: int = 0):
    model = tiny_model(seed)
    model.requires_grad_(False)
    torch.manual_seed(seed)
    add_lora(model, AlignLoRAConfig(r=8, alpha=16).config(), ADAPTER_NAME)
    disable_dropout(model)
    return model.train()


def train(tmp_path, cfg, name: str = "ppo"):
    """All weights of a random 16-token decoder train; the reference is a frozen copy."""
    recipe = tiny_recipe(tmp_path, grad_clip=1.0)
    policy, reference = toy_model().train(), toy_model()
    module, _ = run_rl(recipe, name, policy, toy_reward, prompts(), cfg, reference=reference,
                       max_new_tokens=8, fingerprint=name, force=False, progress=False)
    path = tmp_path / "build" / "toy" / "align" / name / "logs" / "metrics.csv"
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward")]
    return module, rows


def test_kl_is_zero_while_the_policy_is_its_reference():
    for reference in (None, "copy"):
        policy = lora_policy() if reference is None else tiny_model(0).requires_grad_(True)
        ref = tiny_model(0) if reference == "copy" else None
        module = PPOModule(policy, toy_reward, prompts(vocab=TINY_VOCAB),
                           PPOConfig(prompts_per_step=8),
                           tiny_recipe_train(), max_new_tokens=8, seed=1, reference=ref)
        ro = module.rollout(list(range(8)), iteration=0)
        assert ro.mask.sum() > 8
        assert torch.equal(ro.logp, ro.ref_logp)


def test_a_rollout_without_eos_loses_the_missing_eos_penalty():
    from domainlm.tokenizer.special import EOS_ID

    scores = torch.tensor([1.0, 1.0, -0.5])
    completions = [[5, 6, EOS_ID], [5, 6, 7], [EOS_ID]]
    assert torch.equal(eos_penalized(scores, completions, 2.0), torch.tensor([1.0, -1.0, -0.5]))
    assert torch.equal(eos_penalized(scores, completions, None), scores)
    # in the rollouts: those that end (EOS sampled) keep the reward, the others lose the penalty
    module = PPOModule(toy_model(), lambda p, c: torch.zeros(len(c)), prompts(),
                       PPOConfig(prompts_per_step=16, missing_eos_penalty=1.5),
                       tiny_recipe_train(), max_new_tokens=8, seed=1, reference=toy_model())
    ro = module.rollout(list(range(16)), iteration=0)
    ended = (ro.seq == EOS_ID).any(1)
    assert 0 < int(ended.sum()) < len(ended)  # both kinds among these rollouts
    assert torch.equal(ro.scores, torch.where(ended, 0.0, -1.5))


def tiny_recipe_train():
    from domainlm.recipe import TrainConfig

    return TrainConfig(precision="32-true", log_every=1)


@pytest.mark.slow
def test_ppo_raises_a_toy_reward_with_the_kl_bounded(tmp_path):
    cfg = PPOConfig(steps=14, prompts_per_step=16, ppo_epochs=4, minibatch=8, lr=1e-3,
                    kl_coef=0.05, temperature=1.0, ckpt_every=7)
    _, rows = train(tmp_path, cfg)
    reward = [float(r["train/reward"]) for r in rows]
    kl = [float(r["train/kl"]) for r in rows]
    assert len(reward) == cfg.steps
    first, last = sum(reward[:3]) / 3, sum(reward[-3:]) / 3
    assert last > first + 0.2 and last >= 0.7, reward
    assert abs(kl[0]) < 1e-6  # the first rollouts come from the reference itself
    assert max(kl) < 3.0, kl  # nats per completion of at most 8 tokens
    assert all(float(r["train/clipfrac"]) <= 1 for r in rows)


@pytest.mark.slow
def test_grpo_raises_the_toy_reward(tmp_path):
    cfg = GRPOConfig(steps=14, prompts_per_step=4, group_size=4, ppo_epochs=2, minibatch=8,
                     lr=1e-3, kl_coef=0.04, ckpt_every=7)
    _, rows = train(tmp_path, cfg, name="grpo")
    reward = [float(r["train/reward"]) for r in rows]
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.2, reward
    assert "train/kl_k3" in rows[0]


@pytest.mark.parametrize("bad", [{"group_size": 1}])
def test_recipe_checks(tmp_path, bad):
    from domainlm.align.stage import check
    from domainlm.errors import UserError

    recipe = tiny_recipe(tmp_path)
    for k, v in bad.items():
        setattr(recipe.align.grpo, k, v)
    with pytest.raises(UserError, match="align.grpo.group_size is 1; it must be at least 2"):
        check(recipe)
