"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from domainlm.recipe import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every weight matrix except the embeddings; never norms (1-D gains) or biases.

    Decaying a norm's gain pulls it toward zero, and decaying an embedding row penalizes rare
    tokens that get few updates (GPT-3 and Llama decay neither in practice).
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied output projection is the embedding: one parameter, once
        if p.dim() < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel for all parameters) when asked and this torch and device
    support it; else torch's default multi-tensor (foreach) implementation."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fusable = fused and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    if fusable:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch without fused AdamW on this device
            pass
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, max(total_steps - 1, 0))
    return max(1, round(0.02 * total_steps))


def lr_factor(step: int, total: int, warmup: int, cfg: TrainConfig) -> float:
    """The multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warmup to 1, then either cosine decay to min_lr_ratio at the last step, or
    warmup-stable-decay (Hu et al. 2024, MiniCPM): flat at 1, then a linear decay to
    min_lr_ratio over the last decay_fraction of the steps.
    """
    floor = cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    last = max(total - 1, warmup)
    if cfg.schedule == "cosine":
        progress = (step - warmup) / max(last - warmup, 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = max(warmup, total - max(1, round(cfg.decay_fraction * total)))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(last - decay_start, 1)
    return 1.0 - (1.0 - floor) * min(progress, 1.0)
