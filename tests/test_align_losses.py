"""The objectives of `make align` against hand-worked values: GAE, the per-token rewards with
the KL penalty, the clipped policy and value losses, DPO/IPO, Bradley-Terry, GRPO's group
advantages and the adaptive KL coefficient."""

from __future__ import annotations

import math

import pytest
import torch

from domainlm.align import losses


def test_gae_on_a_hand_worked_example():
    """gamma 0.9, lambda 0.5. Row 0: three tokens, reward 1 on the last. Row 1: two tokens
    (the third is padding, whose reward 9 and value 5 must be ignored).

    Row 0: d2 = 1 - 0.3 = 0.7, A2 = 0.7; d1 = 0.9*0.3 - 0.4 = -0.13, A1 = -0.13 + 0.45*0.7 =
    0.185; d0 = 0.9*0.4 - 0.5 = -0.14, A0 = -0.14 + 0.45*0.185 = -0.05675.
    Row 1: d1 = 2 - 0.2 = 1.8, A1 = 1.8; d0 = 0.9*0.2 - 0.1 = 0.08, A0 = 0.08 + 0.45*1.8 = 0.89.
    Returns are A + V.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = torch.tensor([[0.5, 0.4, 0.3], [0.1, 0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[-0.05675, 0.185, 0.7], [0.89, 1.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.44325, 0.585, 1.0], [0.99, 2.0, 0.0]]))


def test_gae_with_lambda_one_and_no_discount_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.5, -1.0, 2.0, 0.25]])
    values = torch.tensor([[0.3, 0.1, -0.2, 0.4]])
    adv, ret = losses.gae(rewards, values, torch.ones(1, 4), gamma=1.0, lam=1.0)
    to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    torch.testing.assert_close(ret, to_go)
    torch.testing.assert_close(adv, to_go - values)


def test_kl_terms_are_zero_when_policy_equals_reference():
    logp = torch.log_softmax(torch.randn(3, 7), -1)
    assert torch.equal(losses.kl_per_token(logp, logp), torch.zeros(3, 7))
    assert torch.equal(losses.kl_k3(logp, logp), torch.zeros(3, 7))
    # ... and positive (k3) when they differ
    other = torch.log_softmax(torch.randn(3, 7), -1)
    assert (losses.kl_k3(logp, other) > 0).all()


def test_token_rewards_put_the_score_on_the_last_token_and_penalize_kl():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    r = losses.token_rewards(torch.tensor([2.0, -1.0]), kl, mask, beta=0.5)
    torch.testing.assert_close(
        r, torch.tensor([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25, -0.25 - 1.0, 0.0, 0.0]]))


def test_policy_loss_clips_the_ratio():
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    mask = torch.ones(1, 3)
    loss, clipfrac = losses.policy_loss(new, old, adv, mask, clip=0.2)
    # max(-A r, -A clip(r)): -1.2 (clipped at 1.2), 0.8 (clipped at 0.8), -1.1 (inside)
    assert math.isclose(float(loss), (-1.2 + 0.8 - 1.1) / 3, rel_tol=1e-6)
    assert math.isclose(float(clipfrac), 2 / 3, rel_tol=1e-6)


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    got = losses.value_loss(new, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64; token 1: 0.81 both ways
    assert math.isclose(float(got), 0.5 * (0.64 + 0.81) / 2, rel_tol=1e-6)


def test_dpo_and_ipo_losses():
    policy = torch.tensor([[-10.0, -12.0]])
    reference = torch.tensor([[-11.0, -11.0]])
    losses_, chosen, rejected = losses.dpo_loss(policy, reference, beta=0.5)
    # beta * ((pc - rc) - (pr - rr)) = 0.5 * (1 - (-1)) = 1
    assert math.isclose(float(losses_[0]), -math.log(1 / (1 + math.exp(-1))), rel_tol=1e-6)
    assert float(chosen[0]) == 0.5 and float(rejected[0]) == -0.5
    ipo, _, _ = losses.dpo_loss(policy, reference, 0.5, "ipo", torch.tensor([[2, 4]]))
    # per-token log-ratios 1/2 and -1/4: (0.75 - 1/(2*0.5))^2 = 0.0625
    assert math.isclose(float(ipo[0]), 0.0625, rel_tol=1e-6)
    with pytest.raises(ValueError, match="token counts"):
        losses.dpo_loss(policy, reference, 0.5, "ipo")


def test_bradley_terry():
    loss, acc = losses.bradley_terry(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert math.isclose(float(loss), expected, rel_tol=1e-6) and float(acc) == 0.5


def test_group_advantages_standardize_within_each_group():
    adv = losses.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    torch.testing.assert_close(adv[:3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-3, rtol=0)
    assert torch.equal(adv[3:], torch.zeros(3))  # a group that agrees teaches nothing


def test_adaptive_kl_moves_beta_toward_the_target_at_most_20_percent():
    assert losses.adaptive_kl(0.1, kl=2.0, target=1.0, n=100, horizon=100) == pytest.approx(0.12)
    assert losses.adaptive_kl(0.1, kl=0.9, target=1.0, n=50, horizon=100) == pytest.approx(
        0.1 * (1 - 0.1 * 0.5))


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = losses.whiten(x, mask)
    assert abs(float(losses.masked_mean(w, mask))) < 1e-6
    assert float(w[0, 3]) == 0.0
    assert float(losses.masked_mean(w**2, mask)) == pytest.approx(1.0, rel=1e-4)
