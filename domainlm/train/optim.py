"""The optimizers (AdamW, or Muon on the hidden matrices with AdamW for the rest) and the
learning-rate schedules (warmup + cosine, or warmup-stable-decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from domainlm.recipe import TrainConfig

# The hidden matrices Muon takes: the attention and MLP projections of every block. The token
# embedding and the output projection are lookups/classifiers, not hidden transforms (Muon's
# authors keep them on AdamW), and norms and biases are not matrices.
MUON_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay every weight matrix except the embeddings; never norms (1-D gains) or biases.

    Decaying a norm's gain pulls it toward zero, and decaying an embedding row penalizes rare
    tokens that get few updates (GPT-3 and Llama decay neither in practice).
    """
    decay, no_decay = [], []
    for name, p in _trainable(model):
        if p.dim() < 2 or "embed_tokens" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out, seen = [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied output projection is the embedding: one parameter, once
        out.append((name, p))
    return out


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight of a block's attention or MLP projection (not a LoRA factor: those are
    named lora_A/lora_B and fine-tuning trains with AdamW)."""
    parts = name.split(".")
    return p.dim() == 2 and len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in MUON_LAYERS


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool = True) -> torch.optim.Optimizer:
    """The recipe's optimizer: AdamW on every parameter, or (optimizer: muon) Muon on the
    hidden matrices and AdamW on embeddings, output projection and norms."""
    if cfg.optimizer == "muon":
        return MuonAdamW(model, cfg, fused)
    return _adamw(param_groups(model, cfg.weight_decay), cfg, fused)


def _adamw(groups: list[dict], cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) when asked and this torch and device
    support it; else torch's default multi-tensor (foreach) implementation."""
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


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon (Jordan et al. 2024: momentum orthogonalized by Newton-Schulz) on the
    hidden matrices and AdamW on every other parameter, as one optimizer.

    One object, because Lightning's automatic optimization (clipping, accumulation, the
    checkpoint) takes one optimizer. Its param_groups are the two inner optimizers' own group
    dicts, so a learning-rate scheduler scales both (each from its own peak: muon_lr and lr);
    its state_dict holds both inner state dicts, so a checkpoint resumes both exactly.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, fused: bool = True) -> None:
        hidden = {id(p) for n, p in _trainable(model) if is_muon_param(n, p)}
        matrices = [p for _, p in _trainable(model) if id(p) in hidden]
        rest = [
            {**g, "params": [p for p in g["params"] if id(p) not in hidden]}
            for g in param_groups(model, cfg.weight_decay)
        ]
        self.muon = torch.optim.Muon(
            matrices, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
            momentum=cfg.muon_momentum, nesterov=True,
        ) if matrices else None
        rest = [g for g in rest if g["params"]]
        self.adamw = _adamw(rest, cfg, fused) if rest else None
        groups = [g for o in (self.muon, self.adamw) if o is not None for g in o.param_groups]
        super().__init__([{"params": []}], {"lr": cfg.lr, "fused": False})
        self.param_groups = groups  # the inner optimizers' dicts: one lr setting reaches both

    @property
    def _inner(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def state(self) -> dict:  # type: ignore[override]
        merged: dict = {}
        for o in self._inner:
            merged.update(o.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # Optimizer.__init__ assigns one; the inner ones hold it
        pass

    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickle: the inner optimizers too, but not the `step` wrapper a
        learning-rate scheduler sets on the instance (it points at this object, not a copy)."""
        return {k: v for k, v in self.__dict__.items() if k != "step"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._inner:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._inner:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:  # type: ignore[override]
        return {k: o.state_dict() if o is not None else None
                for k, o in (("muon", self.muon), ("adamw", self.adamw))}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a checkpoint of optimizer: muon (an AdamW one?): the run's "
                             "train.optimizer must stay what it was when the checkpoint was saved")
        for k, o in (("muon", self.muon), ("adamw", self.adamw)):
            if o is not None:
                o.load_state_dict(state_dict[k])
        # Loading gives the inner optimizers new group dicts: share those, or a scheduler would
        # go on setting the learning rate of the old ones.
        self.param_groups = [g for o in self._inner for g in o.param_groups]


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return min(cfg.warmup_steps, max(total_steps - 1, 0))
    return max(1, round(0.02 * total_steps))


def decay_start(cfg: TrainConfig, total: int, warmup: int) -> int:
    """wsd: the first step of the decay; every step before it has the peak rate (after the
    warmup), whatever the total, which is what lets a longer run reuse a checkpoint."""
    return max(warmup, total - max(1, round(cfg.decay_fraction * total)))


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
    start = decay_start(cfg, total, warmup)
    if step < start:
        return 1.0
    progress = (step - start) / max(last - start, 1)
    return 1.0 - (1.0 - floor) * min(progress, 1.0)
