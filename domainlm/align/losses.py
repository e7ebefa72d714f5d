"""The objectives of preference tuning as plain functions of tensors: Bradley-Terry for the
reward model, DPO and IPO, and PPO's pieces (per-token KL, GAE, the clipped ratio and value
losses, entropy, the adaptive KL coefficient) and GRPO's group-relative advantages."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor) -> tuple[Tensor, Tensor]:
    """Mean -log sigmoid(r_chosen - r_rejected) (the pairwise loss of Ouyang et al. 2022) and
    the share of pairs ranked right."""
    diff = r_chosen.float() - r_rejected.float()
    return -F.logsigmoid(diff).mean(), (diff > 0).float().mean()


def dpo_loss(
    policy: Tensor, reference: Tensor, beta: float, kind: str = "sigmoid",
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses and the implicit rewards beta * (log pi - log pi_ref) of chosen and
    rejected.

    policy, reference: (B, 2) summed log-probabilities of (chosen, rejected). sigmoid: DPO,
    -log sigmoid(beta * ((pc - rc) - (pr - rr))) (Rafailov et al. 2023). ipo: IPO's squared
    loss (Azar et al. 2023, eq. 17) on log-ratios averaged per completion token, lengths (B, 2)
    being the token counts, as TRL computes it.
    """
    ratios = policy.float() - reference.float()
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))
    elif kind == "ipo":
        if lengths is None:
            raise ValueError("the IPO loss needs the completions' token counts")
        avg = ratios / lengths.float().clamp(min=1)
        losses = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {kind!r}; use sigmoid or ipo")
    rewards = beta * ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """x standardized over the masked entries (mean 0 unless shift_mean is off, variance 1)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_per_token(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """log pi(a_t) - log pi_ref(a_t) of the sampled tokens: the estimator whose expectation
    under the policy is KL(pi || pi_ref); zero where the two models agree."""
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """exp(r) - r - 1 with r = log pi_ref - log pi: non-negative, unbiased for KL(pi || pi_ref)
    (Schulman 2020), GRPO's penalty."""
    r = ref_logp - logp
    return torch.exp(r) - r - 1


def token_rewards(score: Tensor, kl: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """r_t = -beta * KL_t on every completion token, plus the reward model's score on the last
    one (Ziegler et al. 2019; Ouyang et al. 2022). score (B,), kl and mask (B, T)."""
    rewards = -beta * kl * mask
    last = (mask.cumsum(-1) * mask).argmax(-1)  # index of each row's last completion token
    return rewards.scatter_add(1, last[:, None], score[:, None].to(rewards.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
        ) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) over completion tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with
    V = 0 after the last token; returns (advantages, returns = A + V), zero outside the mask.
    Completion tokens are contiguous and right-padded, so "next" is the next column.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        nxt = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                clip: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimize, and the share of
    tokens whose ratio left [1 - clip, 1 + clip] (the clip fraction)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return loss, clipfrac


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip: float) -> Tensor:
    """0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped kept within clip of the value
    at rollout time, as PPO implementations for RLHF clip it."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2),
                             mask)


def entropy(logits: Tensor, mask: Tensor) -> Tensor:
    """Mean entropy (nats) of the policy's next-token distribution over the masked positions."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


def group_advantages(scores: Tensor, group_size: int) -> Tensor:
    """GRPO: each sample's reward minus its group's mean, over the group's standard deviation
    (Shao et al. 2024); scores (B,) with the groups contiguous."""
    g = scores.float().view(-1, group_size)
    adv = (g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-4)
    return adv.view(-1)


def adaptive_kl(beta: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)
    after n rollouts whose mean KL was kl."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n / horizon)
