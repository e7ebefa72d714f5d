"""PPO with a KL penalty (and GRPO, its group-relative variant) as a LightningModule with manual
optimization: one training step is one PPO iteration, rollouts then several epochs of clipped
updates, so the Trainer's checkpoints, resume, clean stop and CSV log work as for every stage."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning as L
import torch
from torch import Tensor, nn

from domainlm.align import losses
from domainlm.align.sampling import rollout_tokens
from domainlm.align.sequences import HiddenStates, evaluating, token_logps
from domainlm.model.llama import IGNORE_INDEX
from domainlm.model.peft.lora import ADAPTER_NAME, set_adapter
from domainlm.recipe import GRPOConfig, PPOConfig, TrainConfig
from domainlm.tokenizer import special
from domainlm.train import optim

# scores (N,) of prompts and their completions' tokens (EOS included when produced)
RewardFn = Callable[[list[list[int]], list[list[int]]], Tensor]


@dataclass
class Rollouts:
    """A batch of sampled completions and everything PPO fixes at rollout time; per-token
    tensors are (N, R) over completion tokens, `mask` 1 on real ones (EOS included)."""

    seq: Tensor  # (N, L) prompt + completion, right-padded with PAD
    starts: Tensor  # (N,) position of the first completion token in seq
    mask: Tensor
    logp: Tensor
    ref_logp: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    scores: Tensor  # (N,) the reward function's


def pack(prompts: list[list[int]], completions: list[list[int]]) -> tuple[Tensor, Tensor, int]:
    """(seq, starts, R): prompts and completions in one right-padded batch, and the longest
    completion's length."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    seq = torch.full((len(prompts), width), special.PAD_ID, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        seq[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
    starts = torch.tensor([len(p) for p in prompts])
    return seq, starts, max(len(c) for c in completions)


def eos_penalized(scores: Tensor, completions: list[list[int]], penalty: float | None
                  ) -> Tensor:
    """The scores less `penalty` for each completion without EOS (cut at max_new_tokens: a
    reply that never ends, often a loop), as TRL's missing_eos_penalty."""
    if not penalty:
        return scores
    missing = torch.tensor([special.EOS_ID not in c for c in completions], dtype=scores.dtype)
    return scores - penalty * missing.to(scores.device)


def completion_view(per_position: Tensor, starts: Tensor, r: int) -> Tensor:
    """Values at the positions that predict completion tokens 0..r-1 (position start - 1 + t)
    of (N, L-1, ...) per-position tensors: (N, r, ...)."""
    index = (starts[:, None] - 1 + torch.arange(r)[None, :]).clamp(max=per_position.size(1) - 1)
    index = index.to(per_position.device)
    if per_position.dim() == 3:
        index = index[..., None].expand(-1, -1, per_position.size(-1))
    return per_position.gather(1, index)


class PPOModule(L.LightningModule):
    """The policy (a decoder, usually with a LoRA adapter), a value head on its final hidden
    state (PPO), and the reference: a frozen copy, or the same decoder with the adapter off.

    Each training step gets a batch of prompt ids, samples completions (the generator seeded
    by the step, so a resumed run samples what the first did), scores them, and makes
    ppo_epochs passes of minibatch updates. Logged per step: reward (mean score), kl (mean
    summed KL of a completion to the reference), kl_coef, policy_loss, value_loss, clipfrac,
    entropy and the completion length.
    """

    def __init__(self, policy: nn.Module, reward: RewardFn, prompts: list[list[int]],
                 cfg: PPOConfig | GRPOConfig, train: TrainConfig, *, max_new_tokens: int,
                 seed: int, reference: nn.Module | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model, self.reference = policy, reference
        if reference is not None:
            reference.requires_grad_(False).eval()
        self.reward, self.prompts, self.cfg, self.train_cfg = reward, prompts, cfg, train
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.grpo = isinstance(cfg, GRPOConfig)
        self.group = cfg.group_size if self.grpo else 1
        self.value_head = None if self.grpo else nn.Linear(policy.config.d_model, 1)
        if self.value_head is not None:
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        # The KL coefficient moves (adaptive control); a buffer, so checkpoints carry it.
        self.register_buffer("kl_coef", torch.tensor(float(cfg.kl_coef), dtype=torch.float64))
        self.n_rollouts = cfg.prompts_per_step * self.group
        self.updates = cfg.ppo_epochs * -(-self.n_rollouts // cfg.minibatch)
        self.grad_accum = 1
        self.flops_per_batch = 0.0  # rollouts dominate; tokens/s is not what PPO is judged by
        self._hidden = HiddenStates(policy)

    # -------------------------------------------------------------------- the two models

    @contextlib.contextmanager
    def _reference(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
            return
        set_adapter(self.model, None)  # the base alone: no second copy in memory
        try:
            yield self.model
        finally:
            set_adapter(self.model, ADAPTER_NAME)

    def _forward(self, model: nn.Module, seq: Tensor, starts: Tensor, r: int
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log-probs (N, r) of the completion tokens, their logits (N, r, V), values (N, r)
        when `model` is the policy with a value head)."""
        x, y = seq[:, :-1], seq[:, 1:].masked_fill(seq[:, 1:] == special.PAD_ID, IGNORE_INDEX)
        # The distribution the rollouts were sampled from: the logits over the temperature (as
        # TRL does), so ratios, KL and entropy are those of the policy that acted.
        logits = model(x)[0] / self.cfg.temperature
        logp = completion_view(token_logps(logits, y), starts, r)
        values = None
        if model is self.model and self.value_head is not None:
            v = self.value_head(self._hidden.last.float()).squeeze(-1)
            values = completion_view(v, starts, r)
        return logp, completion_view(logits, starts, r), values

    # ------------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def rollout(self, prompt_idx: list[int], iteration: int) -> Rollouts:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + iteration)
        prompts = [self.prompts[i] for i in prompt_idx]
        completions = rollout_tokens(
            self.model, prompts, self.group, max_new_tokens=self.max_new_tokens,
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, generator=gen)
        prompts = [p for p in prompts for _ in range(self.group)]
        scores = eos_penalized(self.reward(prompts, completions).float(), completions,
                               self.cfg.missing_eos_penalty).to(self.device)
        seq, starts, r = pack(prompts, completions)
        seq = seq.to(self.device)
        mask = (torch.arange(r)[None, :] < torch.tensor([len(c) for c in completions])[:, None])
        mask = mask.float().to(self.device)
        with evaluating(self.model):
            logp, _, values = self._forward(self.model, seq, starts, r)
            with self._reference() as ref:
                ref_logp, _, _ = self._forward(ref, seq, starts, r)
        logp, ref_logp = logp * mask, ref_logp * mask
        if self.grpo:
            adv = losses.group_advantages(scores, self.group)[:, None] * mask
            values = returns = torch.zeros_like(mask)
        else:
            kl = losses.kl_per_token(logp, ref_logp)
            rewards = losses.token_rewards(scores, kl, mask, self.kl_coef.float())
            adv, returns = losses.gae(rewards, values * mask, mask, self.cfg.gamma, self.cfg.lam)
            adv = losses.whiten(adv, mask)
        return Rollouts(seq, starts, mask, logp, ref_logp, values * mask, adv, returns, scores)

    # ------------------------------------------------------------------------- updates

    def training_step(self, batch: list[int], batch_idx: int) -> None:
        iteration = self.global_step // self.updates
        ro = self.rollout(list(batch), iteration)
        opt = self.optimizers()
        gen = torch.Generator().manual_seed(self.seed * 7919 + iteration)
        stats: dict[str, list[Tensor]] = {k: [] for k in
                                          ("policy_loss", "value_loss", "clipfrac", "entropy")}
        n, mb = ro.seq.size(0), self.cfg.minibatch
        for _ in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=gen)
            for a in range(0, n, mb):
                i = order[a : a + mb].to(self.device)
                mask = ro.mask[i]
                r = int(mask.sum(0).nonzero().max()) + 1  # this minibatch's longest completion
                seq = ro.seq[i][:, : int((ro.starts[i.cpu()] + r).max())]
                logp, logits, values = self._forward(self.model, seq, ro.starts[i.cpu()], r)
                mask = mask[:, :r]
                pg, clipfrac = losses.policy_loss(logp, ro.logp[i, :r], ro.advantages[i, :r],
                                                  mask, self.cfg.clip_range)
                if self.grpo:
                    vf = losses.masked_mean(losses.kl_k3(logp, ro.ref_logp[i, :r]), mask)
                    loss = pg + self.cfg.kl_coef * vf
                else:
                    vf = losses.value_loss(values, ro.values[i, :r], ro.returns[i, :r], mask,
                                           self.cfg.value_clip_range)
                    loss = pg + self.cfg.value_coef * vf
                opt.zero_grad()
                self.manual_backward(loss)
                if self.train_cfg.grad_clip:
                    self.clip_gradients(opt, gradient_clip_val=self.train_cfg.grad_clip,
                                        gradient_clip_algorithm="norm")
                opt.step()
                stats["policy_loss"].append(pg.detach())
                stats["value_loss"].append(vf.detach())
                stats["clipfrac"].append(clipfrac.detach())
                stats["entropy"].append(losses.entropy(logits.detach(), mask))
        kl = (losses.kl_per_token(ro.logp, ro.ref_logp) * ro.mask).sum(-1).mean()
        if not self.grpo and self.cfg.kl_target is not None:
            self.kl_coef.fill_(losses.adaptive_kl(float(self.kl_coef), float(kl),
                                                  self.cfg.kl_target, n, self.cfg.kl_horizon))
        if (iteration + 1) % self.train_cfg.log_every == 0:
            metrics = {k: torch.stack(v).mean() for k, v in stats.items()}
            metrics |= {"reward": ro.scores.mean(), "kl": kl, "kl_coef": self.kl_coef.float(),
                        "length": ro.mask.sum(-1).mean()}
            if self.grpo:
                metrics["kl_k3"] = metrics.pop("value_loss")
            for k, v in metrics.items():
                self.log(f"train/{k}", torch.tensor(float(v)), prog_bar=k in ("reward", "kl"))

    def detach_hooks(self) -> None:
        """Remove the hidden-state hook from the policy (it outlives the module otherwise)."""
        self._hidden.remove()

    def configure_optimizers(self):
        return optim.make_optimizer(self, self.train_cfg, fused=False)
