"""The recipe's `align:` section: preference data, the reward model, DPO/IPO, PPO and GRPO."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from domainlm.recipe.checks import Rule, at_least, fraction, positive
from domainlm.recipe.finetune import LR, LoRAConfig


@dataclass
class PreferenceSource:
    """One preference file, or the demo's set labeled by a program standing in for people."""

    name: str = ""  # the source's name in reports; default: the file's stem
    kind: Literal["jsonl", "python-docs"] = "jsonl"  # python-docs: the demo's labeled samples
    path: str | None = None  # JSONL: ranked completions, preference pairs or scored completions

    RANGES: ClassVar[dict[str, Rule | str]] = {"name": "name"}


@dataclass
class AlignLoRAConfig:
    """The policy's LoRA adapter (each method's own `lr` trains it)."""

    r: int = 8  # rank of the update B·A
    alpha: float = 16.0  # scaling alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # on the LoRA branch's input (off: log-probs must match rollouts)
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]
    )
    rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "r": at_least(1, "a rank"),
        "alpha": positive("a scale"),
        "dropout": fraction("a probability", closed=False),
    }

    def config(self) -> LoRAConfig:
        """As the LoRA module takes it (its lr is not used)."""
        return LoRAConfig(r=self.r, alpha=self.alpha, dropout=self.dropout,
                          target_modules=list(self.target_modules), rslora=self.rslora)


@dataclass
class RewardConfig:
    """The reward model: the instruction-tuned decoder with a scalar head (Bradley-Terry)."""

    tuning: Literal["full", "lora"] = "full"  # every weight, or LoRA (align.lora) and the head
    lr: float = 1e-4
    epochs: float = 2.0  # passes over the training pairs

    RANGES: ClassVar[dict[str, Rule | str]] = {"lr": LR, "epochs": positive("passes")}


@dataclass
class DPOConfig:
    """Direct preference optimization (Rafailov et al. 2023); the `ipo:` section uses the same
    fields for IPO (Azar et al. 2023), whose beta is the regularization tau."""

    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    sft_weight: float = 0.0  # weight of the chosen replies' token NLL added (RPO); 0: plain DPO
    lr: float = 1e-3
    epochs: float = 2.0  # passes over the training pairs

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "beta": positive("a KL strength"),
        "sft_weight": at_least(0, "a loss weight"),
        "lr": LR,
        "epochs": positive("passes"),
    }


@dataclass
class PPOConfig:
    """PPO against the reward model with a per-token KL penalty (Ouyang et al. 2022)."""

    steps: int = 30  # rollout batches (PPO iterations)
    prompts_per_step: int = 16  # rollouts per batch, one per prompt
    ppo_epochs: int = 4  # passes over each batch of rollouts
    minibatch: int = 8  # rollouts per optimizer step
    lr: float = 1e-3
    clip_range: float = 0.2  # epsilon of the clipped probability-ratio objective
    value_clip_range: float = 0.2  # how far a value may move from its rollout value per batch
    value_coef: float = 0.1  # weight of the value loss beside the policy loss
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    kl_coef: float = 0.05  # beta of the KL penalty: fixed, or the start of the adaptive one
    kl_target: float | None = None  # adaptive beta toward this KL (Ziegler et al. 2019); null: off
    kl_horizon: int = 10000  # rollouts over which the adaptive beta moves by at most 20%
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float | None = None  # nucleus sampling of the rollouts; null: the whole distribution
    # subtracted from the reward of a rollout that ends without EOS (cut at max_new_tokens)
    missing_eos_penalty: float | None = None
    ckpt_every: int = 5  # rollout batches between checkpoints

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "steps": at_least(1, "rollout batches"),
        "prompts_per_step": at_least(1, "prompts"),
        "ppo_epochs": at_least(1, "passes"),
        "minibatch": at_least(1, "rollouts"),
        "lr": LR,
        "clip_range": Rule(0, 1, lo_inclusive=False, what="a ratio's epsilon"),
        "value_clip_range": positive("a value change"),
        "value_coef": at_least(0, "a loss weight"),
        "gamma": fraction("a discount"),
        "lam": fraction("GAE's lambda"),
        "kl_coef": at_least(0, "a KL strength"),
        "kl_target": positive("nats"),
        "kl_horizon": at_least(1, "rollouts"),
        "temperature": positive("a sampling temperature"),
        "top_p": Rule(0, 1, lo_inclusive=False, what="a probability mass"),
        "missing_eos_penalty": at_least(0, "a reward penalty"),
        "ckpt_every": at_least(1, "rollout batches"),
    }


@dataclass
class GRPOConfig:
    """Group-relative policy optimization (Shao et al. 2024): several samples per prompt, the
    advantage is a sample's reward standardized within its group; no value head."""

    steps: int = 30  # rollout batches
    prompts_per_step: int = 4  # prompts per batch
    group_size: int = 4  # samples per prompt
    ppo_epochs: int = 2  # passes over each batch of rollouts
    minibatch: int = 8  # rollouts per optimizer step
    lr: float = 1e-3
    clip_range: float = 0.2  # epsilon of the clipped probability-ratio objective
    kl_coef: float = 0.04  # beta of the KL term in the loss (k3 estimator)
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float | None = None  # nucleus sampling of the rollouts; null: the whole distribution
    # subtracted from the reward of a rollout that ends without EOS (cut at max_new_tokens)
    missing_eos_penalty: float | None = None
    ckpt_every: int = 5  # rollout batches between checkpoints

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "steps": at_least(1, "rollout batches"),
        "prompts_per_step": at_least(1, "prompts"),
        "group_size": at_least(2, "samples per prompt"),
        "ppo_epochs": at_least(1, "passes"),
        "minibatch": at_least(1, "rollouts"),
        "lr": LR,
        "clip_range": Rule(0, 1, lo_inclusive=False, what="a ratio's epsilon"),
        "kl_coef": at_least(0, "a KL strength"),
        "temperature": positive("a sampling temperature"),
        "top_p": Rule(0, 1, lo_inclusive=False, what="a probability mass"),
        "missing_eos_penalty": at_least(0, "a reward penalty"),
        "ckpt_every": at_least(1, "rollout batches"),
    }


@dataclass
class AlignConfig:
    """Preference tuning of the instruction-tuned model (`make align`)."""

    data: list[PreferenceSource] = field(
        default_factory=lambda: [PreferenceSource(name="python-docs", kind="python-docs")]
    )
    sft_model: str = "full"  # the model to align, by run model name: full, lora-merged, selective
    methods: list[Literal["dpo", "ipo", "ppo", "grpo"]] = field(
        default_factory=lambda: ["dpo", "ppo"]
    )
    tuning: Literal["lora", "full"] = "lora"  # lora: the reference is the adapter switched off
    lora: AlignLoRAConfig = field(default_factory=AlignLoRAConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ipo: DPOConfig = field(default_factory=lambda: DPOConfig(beta=0.5))
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    micro_batch: int = 8  # pairs per forward (reward model, DPO)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_seq_len: int = 256  # prompt + completion tokens; a longer completion loses its end
    max_new_tokens: int = 48  # tokens of a sampled completion (labeling, rollouts, judging)
    heldout_fraction: float = 0.1  # prompts held out (by hash; python-docs: by module)
    eval_prompts: int = 64  # held-out prompts of the win rates
    samples: int = 4  # python-docs: completions sampled per prompt for the labeler
    label_prompts: int = 256  # python-docs: training prompts labeled
    # python-docs: rank the reference answer first among the samples (true), or keep it as the
    # judge's `reference` only, so that every pair is between the model's own samples (false)
    rank_reference: bool = True
    # python-docs: reference answers of this many other prompts added to each prompt's replies
    # (ranked by the judge like the samples): answers that do not fit the question
    other_answers: int = 0
    temperature: float = 1.0  # python-docs: sampling temperature of the labeled completions
    top_p: float | None = 0.95  # python-docs: nucleus of the labeled completions
    warmup_steps: int | None = None  # reward model, DPO: null: 2% of the steps
    weight_decay: float = 0.0

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "micro_batch": at_least(1, "pairs"),
        "grad_accum": at_least(1, "micro-batches"),
        "max_seq_len": at_least(2, "tokens"),
        "max_new_tokens": at_least(1, "tokens"),
        "heldout_fraction": fraction("of the prompts", closed=False),
        "eval_prompts": at_least(1, "prompts"),
        "samples": at_least(2, "completions to rank"),
        "label_prompts": at_least(1, "prompts"),
        "other_answers": at_least(0, "replies"),
        "temperature": positive("a sampling temperature"),
        "top_p": Rule(0, 1, lo_inclusive=False, what="a probability mass"),
        "warmup_steps": at_least(0, "steps"),
        "weight_decay": Rule(0, 10, what="a decoupled decay rate"),
    }
