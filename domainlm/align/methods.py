"""Each method trained and saved: the reward model, DPO/IPO and PPO/GRPO, on a policy that is a
LoRA adapter over the instruction-tuned model (the reference is that model with the adapter
off) or all of its weights (the reference is a frozen copy)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from domainlm.align.data import StepData
from domainlm.align.fit import fit, train_config
from domainlm.align.modules import DPOModule, RewardModule, reference_logps
from domainlm.align.ppo import PPOModule, RewardFn
from domainlm.align.prepare import AlignData
from domainlm.align.reward import RewardModel, save_reward_model, score_sequences
from domainlm.align.sequences import collate_pairs, disable_dropout
from domainlm.finetune.sft_data import steps_for
from domainlm.model.hf import save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft.lora import ADAPTER_NAME, add_lora, merged, save_lora
from domainlm.recipe import GRPOConfig, PPOConfig, Recipe


def autocast(recipe: Recipe):
    """The training precision's autocast, for the forward passes made outside the Trainer
    (reference log-probabilities), so they match the ones made inside it."""
    bf16 = recipe.train.precision.startswith("bf16")
    if not bf16:
        return contextlib.nullcontext()
    device = "cuda" if torch.cuda.is_available() and recipe.train.accelerator != "cpu" else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def policy_of(sft: Llama, recipe: Recipe, *, reference: bool) -> tuple[nn.Module, nn.Module | None]:
    """(policy, reference): with LoRA, a copy of the model with a fresh adapter (it starts
    equal to the model: B = 0) and no reference (the adapter switched off is the reference);
    full, a copy that trains whole and, when asked, a frozen copy as the reference."""
    a = recipe.align
    torch.manual_seed(recipe.seed)
    policy = copy.deepcopy(sft)
    ref = None
    if a.tuning == "lora":
        policy.requires_grad_(False)
        add_lora(policy, a.lora.config(), ADAPTER_NAME)
    else:
        policy.requires_grad_(True)
        ref = copy.deepcopy(sft).requires_grad_(False).eval() if reference else None
    disable_dropout(policy)
    return policy.train(), ref


def save_policy(policy: nn.Module, method: str, recipe: Recipe, sft_dir: Path,
                chat_template: str | None) -> None:
    """align/<method>/model: a PEFT LoRA adapter whose base is the instruction-tuned folder,
    plus align/<method>/merged (a whole folder, for export and eval); or, full, the whole
    folder itself."""
    layout, tok = recipe.layout, recipe.layout.tokenizer_model
    if recipe.align.tuning == "lora":
        save_lora(policy, ADAPTER_NAME, layout.align_model(method), recipe.align.lora.config(),
                  str(sft_dir))
        save_hf_folder(merged(policy, ADAPTER_NAME), tok, layout.align_merged(method),
                       chat_template=chat_template)
    else:
        save_hf_folder(policy, tok, layout.align_model(method), chat_template=chat_template)


def _pair_items(pairs, refs: torch.Tensor | None) -> list[tuple]:
    return [(p, float(r[0]), float(r[1])) if refs is not None else (p, 0.0, 0.0)
            for p, r in zip(pairs, refs if refs is not None else [None] * len(pairs),
                            strict=True)]


def _pair_data(recipe: Recipe, train: list, val: list, steps: int) -> StepData:
    a = recipe.align
    return StepData(train, val, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
                    total_steps=steps, seed=recipe.seed, collate=collate_pairs)


def train_reward(
    recipe: Recipe, sft: Llama, data: AlignData, fingerprint: str, *, force: bool,
    progress: bool, chat_template: str | None,
) -> tuple[RewardModel, dict]:
    """The reward model: the instruction-tuned decoder with a scalar head, Bradley-Terry on
    the training pairs; saved as a LlamaForSequenceClassification folder."""
    a = recipe.align
    torch.manual_seed(recipe.seed)
    rm = RewardModel.from_decoder(sft)
    if a.reward.tuning == "lora":
        rm.backbone.requires_grad_(False)
        add_lora(rm.backbone, a.lora.config(), ADAPTER_NAME)
    disable_dropout(rm)
    steps = steps_for(len(data.train), a.reward.epochs, a.micro_batch, a.grad_accum, 1)
    cfg = train_config(recipe, a.reward.lr, steps)
    module = RewardModule(rm.train(), cfg, total_steps=steps, grad_accum=a.grad_accum,
                          flops_per_batch=_flops(sft, recipe))
    seconds = fit(recipe, "reward", module, _pair_data(recipe, _pair_items(data.train, None),
                                                        _pair_items(data.heldout, None), steps),
                  cfg, total_steps=steps, micro_batch=a.micro_batch, grad_accum=a.grad_accum,
                  seq_len=a.max_seq_len, fingerprint=fingerprint, force=force, progress=progress)
    save_reward_model(rm, recipe.layout.tokenizer_model, recipe.layout.reward_model,
                      chat_template)
    return rm.eval(), {"steps": steps, "train_seconds": seconds, "lr": a.reward.lr}


def reference_for_pairs(recipe: Recipe, sft: Llama, pairs: list) -> torch.Tensor:
    """Summed log-probabilities of every pair's replies under the instruction-tuned model:
    the DPO reference, computed once and reused by every epoch (and by DPO and IPO)."""
    batches = [collate_pairs([(p, 0.0, 0.0) for p in pairs[a : a + 16]])
               for a in range(0, len(pairs), 16)]
    with autocast(recipe):
        return reference_logps(sft.eval(), batches)


def train_dpo(recipe: Recipe, method: str, sft: Llama, data: AlignData, refs: dict,
              fingerprint: str, *, force: bool, progress: bool) -> tuple[nn.Module, dict]:
    """DPO (method dpo) or IPO (method ipo) on the training pairs, validated on held-out ones."""
    a = recipe.align
    cfg_m = a.dpo if method == "dpo" else a.ipo
    policy, _ = policy_of(sft, recipe, reference=False)
    lr = cfg_m.lr
    steps = steps_for(len(data.train), cfg_m.epochs, a.micro_batch, a.grad_accum, 1)
    cfg = train_config(recipe, lr, steps)
    module = DPOModule(policy, cfg, beta=cfg_m.beta, kind="sigmoid" if method == "dpo" else "ipo",
                       sft_weight=cfg_m.sft_weight, total_steps=steps, grad_accum=a.grad_accum,
                       flops_per_batch=_flops(sft, recipe))
    pair_data = _pair_data(recipe, _pair_items(data.train, refs["train"]),
                           _pair_items(data.heldout, refs["heldout"]), steps)
    seconds = fit(recipe, method, module, pair_data, cfg, total_steps=steps,
                  micro_batch=a.micro_batch, grad_accum=a.grad_accum, seq_len=a.max_seq_len,
                  fingerprint=fingerprint, force=force, progress=progress)
    return policy.eval(), {"steps": steps, "train_seconds": seconds, "lr": lr,
                           "beta": cfg_m.beta}


def train_rl(recipe: Recipe, method: str, sft: Llama, rm: RewardModel, prompts: list[list[int]],
             fingerprint: str, *, force: bool, progress: bool) -> tuple[nn.Module, dict]:
    """PPO (method ppo) or GRPO (method grpo) against the reward model on the training prompts."""
    a = recipe.align
    policy, reference = policy_of(sft, recipe, reference=True)

    def reward(prompt_ids: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        return score_sequences(rm, [p + c for p, c in zip(prompt_ids, completions, strict=True)])

    module, seconds = run_rl(recipe, method, policy, reward, prompts,
                             a.ppo if method == "ppo" else a.grpo, reference=reference,
                             max_new_tokens=a.max_new_tokens, fingerprint=fingerprint,
                             force=force, progress=progress)
    return policy.eval(), {"steps": module.cfg.steps, "optimizer_steps": module.global_step,
                           "train_seconds": seconds, "lr": module.cfg.lr,
                           "kl_coef_final": float(module.kl_coef)}


def run_rl(recipe: Recipe, name: str, policy: nn.Module, reward: RewardFn,
           prompts: list[list[int]], cfg: PPOConfig | GRPOConfig, *,
           reference: nn.Module | None, max_new_tokens: int, fingerprint: str, force: bool,
           progress: bool) -> tuple[PPOModule, float]:
    """PPO or GRPO (by the type of cfg) of `policy` in align/<name>/ with the Trainer: one
    training step per batch of rollouts; returns the module and the seconds it took."""
    train_cfg = train_config(recipe, cfg.lr, cfg.steps)
    module = PPOModule(policy, reward, prompts, cfg, train_cfg, max_new_tokens=max_new_tokens,
                       seed=recipe.seed, reference=reference)
    steps = cfg.steps * module.updates  # optimizer steps: what Lightning's global_step counts
    # The Trainer's copy: checkpoints every ckpt_every rollout batches, and no clipping of its
    # own (manual optimization clips inside the module; Lightning's clipping is automatic-only).
    trainer_cfg = dataclasses.replace(train_cfg, grad_clip=None,
                                      ckpt_every=cfg.ckpt_every * module.updates)
    data = StepData(list(range(len(prompts))), [], micro_batch=cfg.prompts_per_step,
                    grad_accum=1, total_steps=cfg.steps, seed=recipe.seed, collate=list,
                    steps_per_batch=module.updates)
    try:
        seconds = fit(recipe, name, module, data, trainer_cfg, total_steps=steps,
                      micro_batch=cfg.prompts_per_step, grad_accum=1,
                      seq_len=recipe.align.max_seq_len, fingerprint=fingerprint, force=force,
                      progress=progress)
    finally:
        module.detach_hooks()
    return module, seconds


def _flops(model: Llama, recipe: Recipe) -> float:
    a = recipe.align
    return model.config.flops_per_token(a.max_seq_len) * 2 * a.micro_batch * a.max_seq_len
