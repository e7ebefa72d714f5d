"""The recipe's `finetune:` section: instruction data, template, methods and their settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from domainlm.recipe.checks import Rule, at_least, fraction, positive

LR = Rule(0, 10, lo_inclusive=False, what="a learning rate")


@dataclass
class InstructionSource:
    """One instruction file (or the built-in demo set) in the fine-tuning mixture."""

    name: str = ""  # the task's name in reports; default: the file's stem
    kind: Literal["jsonl", "python-docs"] = "jsonl"  # python-docs: built from the stdlib
    path: str | None = None  # JSONL: alpaca (instruction/input/output), prompt/completion, messages
    weight: float | None = None  # share of training examples; null: as many as the file has

    RANGES: ClassVar[dict[str, Rule | str]] = {"name": "name", "weight": at_least(0, "a share")}


@dataclass
class LoRAConfig:
    r: int = 8  # rank of the update B·A
    alpha: float = 16.0  # scaling alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.05  # on the LoRA branch's input
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rslora: bool = False  # rank-stabilized scaling (Kalajdzievski 2023)
    lr: float = 1e-3

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "r": at_least(1, "a rank"),
        "alpha": positive("a scale"),
        "dropout": fraction("a probability", closed=False),
        "lr": LR,
    }


@dataclass
class AdapterConfig:
    bottleneck: int = 32  # hidden size of each bottleneck adapter (Houlsby et al. 2019)
    where: list[Literal["attention", "mlp"]] = field(default_factory=lambda: ["attention", "mlp"])
    lr: float = 1e-3

    RANGES: ClassVar[dict[str, Rule | str]] = {"bottleneck": at_least(1, "a width"), "lr": LR}


@dataclass
class PromptTuningConfig:
    virtual_tokens: int = 16  # trainable embeddings prepended to every input (Lester et al. 2021)
    lr: float = 3e-2

    RANGES: ClassVar[dict[str, Rule | str]] = {"virtual_tokens": at_least(1, "tokens"), "lr": LR}


@dataclass
class SelectiveConfig:
    top_blocks: int = 1  # train the last k blocks (0: none)
    norms: bool = True  # and every RMSNorm gain
    lr: float = 3e-4

    RANGES: ClassVar[dict[str, Rule | str]] = {"top_blocks": at_least(0, "blocks"), "lr": LR}


@dataclass
class QLoRAConfig:
    """LoRA over a frozen base quantized to 4 bits (Dettmers et al. 2023); the LoRA settings
    (rank, alpha, targets) are finetune.lora's."""

    group_size: int = 64  # int4 quantization group along each weight row
    lr: float = 1e-3

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "group_size": at_least(2, "weights per group"),
        "lr": LR,
    }


@dataclass
class FullConfig:
    lr: float = 1e-4

    RANGES: ClassVar[dict[str, Rule | str]] = {"lr": LR}


@dataclass
class FinetuneConfig:
    """Instruction tuning and parameter-efficient adaptation (`make finetune`)."""

    data: list[InstructionSource] = field(
        default_factory=lambda: [InstructionSource(name="python-docs", kind="python-docs")]
    )
    template: str = "chat"  # built-in: chat, alpaca, plain; or a path to a Jinja template file
    methods: list[Literal["full", "lora", "qlora", "adapter", "prompt", "selective"]] = field(
        default_factory=lambda: ["full", "lora"]
    )
    full: FullConfig = field(default_factory=FullConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    qlora: QLoRAConfig = field(default_factory=QLoRAConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prompt: PromptTuningConfig = field(default_factory=PromptTuningConfig)
    selective: SelectiveConfig = field(default_factory=SelectiveConfig)
    epochs: float = 2.0  # passes over the training mixture
    micro_batch: int = 16
    grad_accum: int = 1
    max_seq_len: int = 256  # longer examples are truncated (the completion's end is cut)
    packing: bool = False  # several short examples per sequence (attention may cross them)
    heldout_fraction: float = 0.1  # held out for evaluation (by hash; python-docs: by module)
    eval_examples: int = 64  # held-out examples scored with ROUGE-L and exact match
    max_new_tokens: int = 48  # generation length when scoring
    warmup_steps: int | None = None  # null: 2% of the steps
    weight_decay: float = 0.0

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "epochs": positive("passes over the data"),
        "micro_batch": at_least(1, "sequences"),
        "grad_accum": at_least(1, "micro-batches"),
        "max_seq_len": at_least(2, "tokens"),
        "heldout_fraction": fraction("of the examples", closed=False),
        "eval_examples": at_least(0, "examples"),
        "max_new_tokens": at_least(1, "tokens"),
        "warmup_steps": at_least(0, "steps"),
        "weight_decay": Rule(0, 10, what="a decoupled decay rate"),
    }
