"""Training memory per device: weights, gradients, AdamW states, activations, per strategy."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from domainlm.recipe.model import LlamaConfig

GiB = 1 << 30


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each training state, and per element of activations."""

    name: str
    weights: int
    grads: int
    optimizer: int  # AdamW's exp_avg and exp_avg_sq, in the parameters' dtype
    activation: int
    note: str


PRECISIONS: dict[str, Precision] = {
    p.name: p
    for p in (
        # Lightning's bf16-mixed keeps the parameters in fp32 and runs the forward pass under
        # torch.autocast(bfloat16): fp32 weights, fp32 gradients, fp32 moments (4 + 4 + 8), and
        # bf16 copies of the weights that autocast caches for the step (counted as a buffer).
        Precision("bf16-mixed", 4, 4, 8, 2, "fp32 weights and states, bf16 autocast compute"),
        # Everything in bf16: AdamW creates its moments like the parameters (2 + 2 + 4).
        Precision("bf16-true", 2, 2, 4, 2, "bf16 weights, gradients and AdamW moments"),
        Precision("32-true", 4, 4, 8, 4, "fp32 throughout"),
    )
}

STRATEGIES = ("ddp", "zero2", "fsdp")
LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "fsdp": "FSDP"}
LIGHTNING = {"ddp": "ddp", "zero2": "deepspeed_stage_2", "fsdp": "fsdp"}

# Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
# eq. 2): a layer keeps s*b*h*(34 + 5*a*s/h) bytes of 16-bit activations; fused attention
# (scaled_dot_product_attention) never stores the a*s*s score matrix, which leaves 34 s*b*h.
ACTIVATION_BYTES_PER_LAYER = 34
# Lightning's DeepSpeedStrategy defaults: reduce_bucket_size and allgather_bucket_size, elements.
DEEPSPEED_BUCKET = 200_000_000


@dataclass(frozen=True)
class StateBytes:
    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def state_bytes(
    n_params: int, precision: str = "bf16-mixed", strategy: str = "ddp", devices: int = 1
) -> StateBytes:
    """Bytes per device of the weights, gradients and AdamW states.

    DDP replicates all three. FSDP (ZeRO-3) shards all three over the devices. ZeRO-2 means
    DeepSpeed stage 2, whose bf16 mode keeps 16-bit weights and gradients on every device and
    fp32 master weights plus moments in shards: 2 + (2 + 12) / devices bytes per parameter, as
    in the ZeRO paper (Rajbhandari et al. 2020, section 5.2), for bf16-mixed and bf16-true alike.
    """
    p = PRECISIONS[precision]
    n = n_params
    shard = math.ceil(n / devices)
    if strategy == "ddp":
        return StateBytes(n * p.weights, n * p.grads, n * p.optimizer)
    if strategy == "fsdp":
        return StateBytes(shard * p.weights, shard * p.grads, shard * p.optimizer)
    if strategy == "zero2":
        if precision == "32-true":
            return StateBytes(4 * n, 4 * shard, 8 * shard)
        return StateBytes(2 * n, 2 * shard, 12 * shard)
    raise ValueError(f"unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}")


def activation_bytes(
    shape: LlamaConfig, micro_batch: int, seq_len: int, precision: str, checkpointing: bool
) -> int:
    """Activations kept for the backward pass of one micro-batch, logits included.

    Without recomputation every layer keeps 34 s*b*d bytes (16-bit; twice that in fp32).
    With full activation checkpointing a layer keeps only its input, and one layer at a time
    rebuilds its activations during backward. The logits are held in the compute dtype, as
    fp32 log-probabilities for the cross-entropy and as their fp32 gradient.
    """
    p = PRECISIONS[precision]
    tokens = micro_batch * seq_len
    layer = tokens * shape.d_model * ACTIVATION_BYTES_PER_LAYER * p.activation // 2
    if checkpointing:
        layers = shape.n_layers * tokens * shape.d_model * p.activation + layer
    else:
        layers = shape.n_layers * layer
    logits = tokens * shape.vocab_size * (p.activation + 4 + 4)
    return layers + logits


def buffer_bytes(shape: LlamaConfig, precision: str, strategy: str, devices: int) -> int:
    """Memory that is neither a training state nor an activation, but lives during a step.

    DDP: its gradient buckets (a flat copy of the gradients) on more than one device. FSDP:
    two gathered units (the one computing and the one prefetched) and one unit's full
    gradients before the reduce-scatter, in the compute dtype; a unit is a block, or the
    embedding table when that is larger. ZeRO-2: DeepSpeed's reduce and all-gather buckets.
    bf16-mixed adds the bf16 weight copies that autocast caches from forward to backward.
    """
    p = PRECISIONS[precision]
    n = shape.num_params()
    compute = 2 if precision != "32-true" else 4
    if strategy == "fsdp":
        unit = max(shape.layer_params, shape.embedding_params)
        return 3 * unit * compute
    if strategy == "zero2":
        return 2 * min(n, DEEPSPEED_BUCKET) * compute
    out = n * p.grads if devices > 1 else 0
    if precision == "bf16-mixed":
        out += 2 * n
    return out


@dataclass(frozen=True)
class Option:
    """One way to train: a strategy, with or without checkpointing, at its micro-batch."""

    strategy: str
    checkpointing: bool
    micro_batch: int  # the largest that fits (and that the global batch needs); 0: none fits
    weights: int
    grads: int
    optimizer: int
    activations: int  # at max(micro_batch, 1)
    buffers: int
    total: int
    fits: bool

    @property
    def label(self) -> str:
        return LABELS[self.strategy] + (" + ckpt" if self.checkpointing else "")

    def to_dict(self) -> dict:
        return {**asdict(self), "label": self.label, "lightning": LIGHTNING[self.strategy]}


def usable_bytes(memory_bytes: int, device: str) -> int:
    """Memory a run can plan on: headroom for the allocator, CUDA context and the OS.

    GPUs: 90% less 2 GiB (CUDA context, NCCL buffers, fragmentation of the caching allocator).
    CPUs: 75% of RAM, since the OS, data loaders and other processes share it.
    """
    if device == "cpu":
        return int(memory_bytes * 0.75)
    return max(0, int(memory_bytes * 0.9) - 2 * GiB)


def option(
    shape: LlamaConfig,
    precision: str,
    strategy: str,
    checkpointing: bool,
    devices: int,
    seq_len: int,
    usable: int,
    max_micro_batch: int,
) -> Option:
    """The memory of one strategy at the largest micro-batch (<= max_micro_batch) that fits."""
    states = state_bytes(shape.num_params(), precision, strategy, devices)
    buffers = buffer_bytes(shape, precision, strategy, devices)
    static = states.total + buffers
    per_seq = activation_bytes(shape, 1, seq_len, precision, checkpointing)
    # With checkpointing one layer's full activations are a fixed cost per sequence too, so
    # the total stays linear in the micro-batch and the largest fitting one is a division.
    micro = max(0, min(max_micro_batch, (usable - static) // per_seq)) if usable > static else 0
    activations = activation_bytes(shape, max(micro, 1), seq_len, precision, checkpointing)
    total = static + activations
    return Option(
        strategy,
        checkpointing,
        micro,
        states.weights,
        states.grads,
        states.optimizer,
        activations,
        buffers,
        total,
        micro >= 1,
    )


def options(
    shape: LlamaConfig,
    precision: str,
    devices: int,
    seq_len: int,
    usable: int,
    max_micro_batch: int,
) -> list[Option]:
    """Every strategy without, then with, activation checkpointing, simplest first.

    Sharding comes before checkpointing: ZeRO-2 and FSDP cost communication that overlaps
    with compute, recomputation costs a third more compute. On one device sharding saves
    nothing, so only the plain strategy is listed.
    """
    strategies = STRATEGIES if devices > 1 else ("ddp",)
    return [
        option(shape, precision, s, ckpt, devices, seq_len, usable, max_micro_batch)
        for ckpt in (False, True)
        for s in strategies
    ]


def devices_needed(
    shape: LlamaConfig, precision: str, seq_len: int, usable: int, limit: int = 1 << 16
) -> int | None:
    """The fewest devices on which FSDP with checkpointing fits one sequence; None: no count."""
    per_seq = activation_bytes(shape, 1, seq_len, precision, True)
    buffers = buffer_bytes(shape, precision, "fsdp", 2)
    if per_seq + buffers >= usable:
        return None
    lo, hi, n = 1, limit, shape.num_params()
    if state_bytes(n, precision, "fsdp", hi).total + buffers + per_seq > usable:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if state_bytes(n, precision, "fsdp", mid).total + buffers + per_seq <= usable:
            hi = mid
        else:
            lo = mid + 1
    return lo
