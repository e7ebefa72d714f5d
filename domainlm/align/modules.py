"""The LightningModules of the pairwise methods: the reward model (Bradley-Terry) and DPO/IPO,
on the same optimizer, schedule and logging cadence as pretraining's PretrainModule."""

from __future__ import annotations

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from domainlm.align.losses import bradley_terry, dpo_loss
from domainlm.align.sequences import sequence_logps
from domainlm.recipe import TrainConfig
from domainlm.train import optim


class PairModule(L.LightningModule):
    """Trains `model` on batches of pairs (chosen rows, then rejected rows). Subclasses say
    what a batch costs and measures (`measure`: the loss first, then metrics); logged as
    train/<name> every log_every optimizer steps (the mean over the step's micro-batches) and
    val/<name> (the mean over the held-out pairs)."""

    def __init__(self, model: nn.Module, train: TrainConfig, *, total_steps: int,
                 grad_accum: int, flops_per_batch: float) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train
        self.total_steps = total_steps
        self.grad_accum = grad_accum
        self.flops_per_batch = flops_per_batch  # for the throughput callback
        self._step: dict[str, Tensor] = {}
        self._val: dict[str, Tensor] = {}
        self._val_n = 0

    def measure(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        metrics = self.measure(batch)
        for k, v in metrics.items():
            part = v.detach() / self.grad_accum
            self._step[k] = self._step[k] + part if k in self._step else part
        if (batch_idx + 1) % self.grad_accum == 0:
            if (self.global_step + 1) % self.train_cfg.log_every == 0:
                for k, v in self._step.items():
                    self.log(f"train/{k}", torch.tensor(v.item()), prog_bar=k == "loss")
                self.log("train/lr", torch.tensor(self.lr_schedulers().get_last_lr()[0]))
            self._step = {}
        return metrics["loss"]

    def on_validation_epoch_start(self) -> None:
        self._val, self._val_n = {}, 0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        n = batch["ids"].size(0) // 2
        for k, v in self.measure(batch).items():
            self._val[k] = self._val.get(k, 0.0) + v.detach().double() * n
        self._val_n += n

    def on_validation_epoch_end(self) -> None:
        for k, v in self._val.items():
            self.log(f"val/{k}", (v / max(self._val_n, 1)).float(), prog_bar=k == "accuracy")

    def configure_optimizers(self):
        optimizer = optim.make_optimizer(self.model, self.train_cfg, fused=False)
        warmup = optim.warmup_steps(self.train_cfg, self.total_steps)
        total, cfg = self.total_steps, self.train_cfg
        schedule = LambdaLR(optimizer, lambda step: optim.lr_factor(step, total, warmup, cfg))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
        }


class RewardModule(PairModule):
    """The reward model on pairs: loss -log sigmoid(r_chosen - r_rejected), pairwise accuracy
    and the mean margin r_chosen - r_rejected."""

    def measure(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        rewards = self.model(batch["ids"])
        chosen, rejected = rewards.chunk(2)
        loss, accuracy = bradley_terry(chosen, rejected)
        return {"loss": loss, "accuracy": accuracy, "margin": (chosen - rejected).mean()}


class DPOModule(PairModule):
    """DPO (kind sigmoid) or IPO (kind ipo) against reference log-probabilities computed once
    before training (batch["ref"], (B, 2)), so no reference model is held during it."""

    def __init__(self, model: nn.Module, train: TrainConfig, *, beta: float, kind: str,
                 sft_weight: float = 0.0, **kwargs) -> None:
        super().__init__(model, train, **kwargs)
        self.beta, self.kind, self.sft_weight = beta, kind, sft_weight

    def measure(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return dpo_measures(self.model, batch, self.beta, self.kind, self.sft_weight)


def dpo_measures(model: nn.Module, batch: dict[str, Tensor], beta: float, kind: str,
                 sft_weight: float = 0.0) -> dict[str, Tensor]:
    """The DPO/IPO loss of a collated batch and what it implies: the implicit rewards of
    chosen and rejected, their margin and the share of pairs where chosen's is higher.

    sft_weight adds the chosen replies' negative log-likelihood per token (RPO, Pang et al.
    2024; TRL's loss_type "sft"): it keeps the chosen replies likely, where DPO alone may
    lower both sides and let greedy decoding drift."""
    logps, counts = sequence_logps(model, batch["ids"], batch["labels"])
    policy = torch.stack(logps.chunk(2), dim=1)  # (B, 2): chosen, rejected
    lengths = torch.stack(counts.chunk(2), dim=1)
    losses, chosen, rejected = dpo_loss(policy, batch["ref"].to(policy), beta, kind, lengths)
    nll = -policy[:, 0].sum() / lengths[:, 0].sum().clamp(min=1)
    return {
        "loss": losses.mean() + sft_weight * nll,
        "nll_chosen": nll.detach(),
        "reward_chosen": chosen.mean(),
        "reward_rejected": rejected.mean(),
        "margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).float().mean(),
    }


@torch.no_grad()
def reference_logps(model: nn.Module, batches) -> Tensor:
    """Summed log-probabilities (N, 2) of every pair's chosen and rejected reply under `model`
    (the reference: the policy before training, or its base with the adapter off)."""
    out = []
    for batch in batches:
        logps, _ = sequence_logps(model, batch["ids"], batch["labels"])
        out.append(torch.stack(logps.chunk(2), dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)
