"""The recipe's `tokenizer:`, `plan:`, `train:`, `export:` and `eval:` sections (`model:` is
recipe/model.py: the decoder's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from domainlm.recipe.checks import Rule, at_least, fraction, positive

# --------------------------------------------------------------------------------------------
# Tokenizer and plan sections.


@dataclass
class TokenizerConfig:
    """SentencePiece training (`make tokenizer`)."""

    # BPE: the type llama.cpp tokenizes exactly as SentencePiece does (a unigram model cannot be
    # exported to GGUF), and on the demo it writes 1.3% fewer tokens (scripts/tokenizer_cost.py).
    type: Literal["unigram", "bpe"] = "bpe"
    vocab_size: int | Literal["auto"] = 8192  # a multiple of 64, or auto: chosen from candidates
    candidates: list[int] = field(default_factory=lambda: [4096, 8192, 16384, 32768])
    sample_docs: int = 200_000  # training documents sampled (deterministically) from train
    max_sample_chars: int = 200_000_000  # memory cap on the training sample
    eval_docs: int = 2000  # validation documents used for auto size and the report
    character_coverage: float = 0.9999
    byte_fallback: bool = True  # unknown characters become UTF-8 bytes, never <unk>
    split_digits: bool = True  # every digit its own piece
    # Pieces reserved for the chat template, never split.
    special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    threads: int = 0  # 0 = every core

    RANGES: ClassVar[dict[str, Rule]] = {
        "sample_docs": at_least(1, "documents"),
        "max_sample_chars": at_least(1, "characters"),
        "eval_docs": at_least(1, "documents"),
        "character_coverage": Rule(0.9, 1.0, what="a share of characters, SentencePiece's range"),
        "threads": at_least(0, "0: every core"),
    }


@dataclass
class PlanConfig:
    """The compute budget and how to spend it (`make plan`): flops, gpu + hours, or minutes."""

    flops: float | None = None  # total training FLOPs
    gpu: str | None = None  # accelerator name (h100, a100, ...) with gpus, hours, mfu
    gpus: int = 1
    hours: float | None = None
    mfu: float = 0.4  # expected model FLOPs utilization
    minutes: float | None = None  # wall-clock on this machine (measured with a short probe)
    law: Literal["approach1", "approach3"] = "approach3"  # Chinchilla approach
    fit: Literal["chinchilla", "epoch"] = "chinchilla"  # approach 3 constants: paper or Epoch AI
    max_epochs: float = 4.0  # repeat the unique tokens at most this many times
    seq_len: int = 1024  # training context length
    global_batch_tokens: int | None = None  # tokens per optimizer step; null: from the plan
    require_tokens: bool = False  # a missing tokens folder is an error rather than a note

    RANGES: ClassVar[dict[str, Rule]] = {
        "flops": positive("FLOPs"),
        "gpus": at_least(1, "accelerators"),
        "hours": positive("hours"),
        "mfu": Rule(0, 1, lo_inclusive=False, what="a fraction of peak"),
        "minutes": positive("minutes"),
        "max_epochs": positive("passes over the unique tokens"),
        "seq_len": at_least(2, "tokens"),
        "global_batch_tokens": at_least(1, "tokens"),
    }


# Strategies that shard parameters: Muon orthogonalizes each whole matrix, and under FSDP or
# DeepSpeed ZeRO a rank holds flattened slices of them (torch.optim.Muon refuses non-2-D ones).
MUON_UNSHARDED = ("fsdp", "deepspeed")


def muon_strategy_error(strategy: str) -> str:
    return (
        f"muon needs each hidden matrix whole on every device, and strategy {strategy} shards "
        "them (torch.optim.Muon takes 2-D matrices only): use optimizer adamw with "
        f"{strategy}, or strategy ddp (or auto) with muon"
    )


@dataclass
class EarlyStoppingConfig:
    """Fine-tuning and alignment stop when the validation loss stops improving; the model they
    save is the one of the best validation, not the last."""

    patience: int | None = None  # validations without improvement before stopping; null: off
    min_delta: float = 0.0  # a smaller drop of the validation loss is no improvement

    RANGES: ClassVar[dict[str, Rule]] = {
        "patience": at_least(1, "validations"),
        "min_delta": at_least(0, "nats per token"),
    }


@dataclass
class TrainConfig:
    """Pretraining with Lightning (`make pretrain`). Sizes left null come from plan.json."""

    precision: Literal["bf16-mixed", "32-true", "bf16-true", "16-mixed"] = "bf16-mixed"
    # plan: the plan's recommendation; auto: one device; ddp, fsdp, deepspeed (ZeRO zero_stage).
    strategy: Literal["plan", "auto", "ddp", "fsdp", "deepspeed"] = "plan"
    zero_stage: Literal[2, 3] = 2  # DeepSpeed ZeRO stage when strategy is deepspeed
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int | Literal["auto"] = 1  # per node
    num_nodes: int = 1
    tokens: int | None = None  # training tokens; null: the plan's
    micro_batch: int | None = None  # sequences per device per forward; null: the plan's
    grad_accum: int | None = None  # micro-batches per optimizer step; null: the plan's
    seq_len: int | None = None  # null: plan.seq_len
    # adamw: AdamW on every parameter; muon: Muon on the blocks' attention and MLP matrices,
    # AdamW (lr, betas, eps, weight_decay) on embeddings, output projection and norms.
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4  # peak learning rate (AdamW's)
    muon_lr: float = 0.02  # muon: the matrices' peak learning rate (Keller Jordan's scale)
    muon_momentum: float = 0.95  # muon: Nesterov momentum
    muon_weight_decay: float = 0.0  # muon: decoupled decay of the matrices (times muon_lr)
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    schedule: Literal["cosine", "wsd"] = "cosine"  # wsd: warmup-stable-decay
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    warmup_steps: int | None = None  # null: 2% of the steps (at least 1)
    weight_decay: float = 0.1  # not applied to norms and embeddings
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max gradient norm; null: no clipping
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool | None = None  # null: the plan's choice
    val_every: int = 200  # optimizer steps between validations
    val_batches: int | None = 50  # micro-batches per validation; null: the whole val split
    ckpt_every: int = 200  # optimizer steps between checkpoints
    log_every: int = 10  # optimizer steps between logged metrics
    export_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model.safetensors
    sample_prompt: str = "The"  # `make pretrain` ends by continuing this prompt
    sample_tokens: int = 48
    # Fine-tuning and alignment only (pretraining runs its planned tokens).
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)

    RANGES: ClassVar[dict[str, Rule]] = {
        "devices": at_least(1, "devices per node"),
        "num_nodes": at_least(1, "machines"),
        "tokens": at_least(1, "training tokens"),
        "micro_batch": at_least(1, "sequences"),
        "grad_accum": at_least(1, "micro-batches"),
        "seq_len": at_least(2, "tokens"),
        "lr": Rule(0, 10, lo_inclusive=False, what="a learning rate"),
        "muon_lr": Rule(0, 10, lo_inclusive=False, what="a learning rate"),
        "muon_momentum": fraction("Muon's momentum", closed=False),
        "muon_weight_decay": Rule(0, 10, what="a decoupled decay rate"),
        "min_lr_ratio": fraction("of the peak learning rate"),
        "decay_fraction": fraction("of the steps"),
        "warmup_steps": at_least(0, "steps"),
        "weight_decay": Rule(0, 10, what="a decoupled decay rate"),
        "betas": fraction("Adam's moment decay", closed=False),
        "eps": positive("Adam's denominator floor"),
        "grad_clip": positive("a gradient norm"),
        "val_every": at_least(1, "steps"),
        "val_batches": at_least(1, "micro-batches"),
        "ckpt_every": at_least(1, "steps"),
        "log_every": at_least(1, "steps"),
        "sample_tokens": at_least(0, "tokens"),
    }


@dataclass
class ExportConfig:
    """Quantization and export (`make quantize`)."""

    # Which models: base (pretrain/model), from sft/: full, selective, lora-merged, and from
    # align/: dpo, ipo, ppo, grpo (the aligned policy as a whole folder).
    models: list[str] = field(default_factory=lambda: ["base"])
    formats: list[
        Literal[
            "hf-bf16", "hf-fp16", "int8", "int4", "gguf-f16", "gguf-bf16", "gguf-q8_0", "gguf-q4_0"
        ]
    ] = field(
        default_factory=lambda: ["hf-bf16", "int8", "int4", "gguf-f16", "gguf-q8_0", "gguf-q4_0"]
    )
    group_size: int = 64  # int4: weights quantized in groups of this many along each row
    eval_tokens: int | None = 65536  # validation tokens for the perplexity comparison; null: all

    RANGES: ClassVar[dict[str, Rule]] = {
        "group_size": at_least(2, "weights per group"),
        "eval_tokens": at_least(1, "tokens"),
    }


@dataclass
class EvalConfig:
    """The run report (`make eval`)."""

    # Sources of general-purpose text; every other source is domain text. Perplexity and bits
    # per byte are reported per source and for the two groups (as BloombergGPT compares them).
    general_sources: list[str] = field(default_factory=list)
