"""What a training run will do: the recipe's `train:` section and plan.json resolved into a
model config, batch sizes, steps, and a Lightning accelerator/strategy/precision, with one
clear error for each choice this machine cannot run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.plan.record import Plan
from domainlm.recipe import Recipe
from domainlm.recipe.model import LlamaConfig
from domainlm.recipe.stages import MUON_UNSHARDED, muon_strategy_error

GPU_ONLY_STRATEGIES = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}


@dataclass
class RunSettings:
    config: LlamaConfig
    seq_len: int
    micro_batch: int
    grad_accum: int
    devices: int  # per node
    num_nodes: int
    total_steps: int
    accelerator: str  # "cpu" or "gpu"
    strategy: str  # auto, ddp, fsdp, deepspeed_stage_2, deepspeed_stage_3
    precision: str
    checkpointing: bool
    plan: Plan | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size * self.seq_len

    @property
    def tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.config.to_dict(),
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "devices": self.devices,
            "num_nodes": self.num_nodes,
            "world_size": self.world_size,
            "total_steps": self.total_steps,
            "tokens_per_step": self.tokens_per_step,
            "tokens": self.tokens,
            "accelerator": self.accelerator,
            "strategy": self.strategy,
            "precision": self.precision,
            "activation_checkpointing": self.checkpointing,
        }

    @property
    def params(self) -> int:
        return self.config.num_params()


def _read_plan(recipe: Recipe, needed: list[str]) -> Plan | None:
    path = recipe.layout.plan
    if not path.exists():
        if needed:
            raise UserError(
                f"{path} does not exist and {', '.join(needed)} come from it: run "
                f"`make plan RECIPE={recipe.path}` first, or set them in the recipe"
            )
        return None
    return Plan.read(path)


def resolve_accelerator(requested: str) -> str:
    cuda = torch.cuda.is_available()
    if requested == "gpu" and not cuda:
        raise UserError(
            "train.accelerator is gpu, but this machine has no CUDA GPU (torch.cuda.is_available()"
            " is False): set train.accelerator to auto or cpu, or run on a GPU machine"
        )
    if requested == "auto":
        return "gpu" if cuda else "cpu"
    return requested


def _strategy(recipe: Recipe, plan: Plan | None, accelerator: str, world: int) -> str:
    t = recipe.train
    name = t.strategy
    if name == "plan":
        planned = plan.strategy if plan else "auto"
        name = {"deepspeed_stage_2": "deepspeed", "deepspeed_stage_3": "deepspeed"}.get(
            planned, planned
        )
        if world == 1 or (accelerator == "cpu" and name in GPU_ONLY_STRATEGIES):
            name = "ddp" if world > 1 else "auto"
    if name in GPU_ONLY_STRATEGIES and accelerator != "gpu":
        raise UserError(
            f"train.strategy: {name} ({GPU_ONLY_STRATEGIES[name]}) needs CUDA GPUs and this run is "
            "on the CPU: use strategy ddp (several processes, gloo) or auto, or run on GPUs"
        )
    if t.optimizer == "muon" and name in MUON_UNSHARDED:
        why = "the plan chose it" if t.strategy == "plan" else "the recipe sets it"
        raise UserError(f"train.optimizer: {muon_strategy_error(name)} ({why})")
    if name == "deepspeed":
        return f"deepspeed_stage_{t.zero_stage}"
    if name == "auto" and world > 1:
        return "ddp"
    return name


def resolve(recipe: Recipe) -> RunSettings:
    """Every concrete setting of the run, from the recipe and (where it leaves them) the plan."""
    t, m = recipe.train, recipe.model
    needed = [
        f"train.{k}" for k in ("tokens", "micro_batch", "seq_len") if getattr(t, k) is None
    ] + (["the model shape (model.from_plan is true)"] if m.from_plan else [])
    plan = _read_plan(recipe, needed)
    notes: list[str] = []

    vocab = _vocab(recipe)
    if m.from_plan:
        if plan.shape.vocab_size != vocab:
            raise UserError(
                f"plan.json was made for a vocabulary of {plan.shape.vocab_size}, but the "
                f"tokenizer has {vocab}: run `make plan` again"
            )
        shape = plan.shape
    else:
        shape = m.shape(vocab)
    seq_len = t.seq_len or (plan.seq_len if plan else recipe.plan.seq_len)
    max_seq = max(seq_len, m.max_seq_len if not m.from_plan else seq_len)
    config = dataclasses.replace(shape, max_seq_len=max_seq)

    accelerator = resolve_accelerator(t.accelerator)
    if t.devices == "auto":
        devices = torch.cuda.device_count() if accelerator == "gpu" else 1
    else:
        devices = t.devices
    if accelerator == "gpu" and devices > torch.cuda.device_count():
        raise UserError(
            f"train.devices is {devices} but this machine has {torch.cuda.device_count()} GPU(s)"
        )
    world = devices * t.num_nodes
    micro = t.micro_batch or (plan.micro_batch if plan else 1)
    if t.grad_accum:
        accum = t.grad_accum
    else:
        # Keep the plan's global batch whatever the number of devices.
        sequences = plan.global_batch_sequences if plan else micro * world
        accum = max(1, math.ceil(sequences / (micro * world)))
    tokens = t.tokens or int(plan.tokens)
    per_step = micro * accum * world * seq_len
    steps = max(1, math.ceil(tokens / per_step))

    precision = t.precision
    if accelerator == "cpu" and precision == "16-mixed":
        raise UserError(
            "train.precision: 16-mixed (float16 with loss scaling) is for GPUs; on the CPU use "
            "bf16-mixed (the default) or 32-true"
        )
    if t.compile and accelerator == "cpu":
        notes.append("torch.compile on the CPU: the first steps compile for a while")
    checkpointing = t.activation_checkpointing
    if checkpointing is None:
        checkpointing = plan.activation_checkpointing if plan else False
    return RunSettings(
        config=config,
        seq_len=seq_len,
        micro_batch=micro,
        grad_accum=accum,
        devices=devices,
        num_nodes=t.num_nodes,
        total_steps=steps,
        accelerator=accelerator,
        strategy=_strategy(recipe, plan, accelerator, world),
        precision=precision,
        checkpointing=checkpointing,
        plan=plan,
        notes=notes,
    )


def _vocab(recipe: Recipe) -> int:
    meta = recipe.layout.tokens / "meta.json"
    if not meta.exists():
        raise UserError(f"{meta} does not exist: run `make tokens RECIPE={recipe.path}` first")
    try:
        return int(read_json(meta)["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{meta} is unreadable ({e}): run `make tokens` again") from None
