"""The search for a decoder shape (a LlamaConfig) of N parameters, by the rules published
models follow."""

from __future__ import annotations

import math
from collections.abc import Iterator

from domainlm.errors import UserError
from domainlm.recipe.model import LlamaConfig

TOLERANCE = 0.05  # the exact count must be within 5% of the target
LARGE_D_MODEL = 2048  # from here on: head_dim 128, ffn in multiples of 256, grouped-query attention
MAX_D_MODEL = 65536
# Published decoders keep d_model / n_layers between about 32 (Pythia-410M: 1024/24 = 43) and
# 128 (Llama-2-7B: 4096/32, GPT-3 175B: 12288/96). Tiny models go deeper for their width
# (TinyStories-1M: 64/8; MobileLLM, Liu et al. 2024, argues for deep and thin small models),
# so narrow shapes may go down to 6.
ASPECT_RANGE = (32, 128)
TINY_ASPECT_RANGE = (6, 128)
TINY_D_MODEL = 256
# The usual tiers want at least two layers: one layer cannot form induction heads (Olsson et
# al. 2022), the two-layer circuit behind copying from context; one layer is a last resort.
MIN_LAYERS = 2


class ShapeError(UserError):
    """No decoder shape has the parameter count the plan asks for."""


def count_params(
    vocab_size: int,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    ffn_dim: int,
    tie_embeddings: bool = True,
) -> int:
    """Exact parameters of that shape (LlamaConfig.num_params, the one count)."""
    return LlamaConfig(
        vocab_size, n_layers, d_model, n_heads, n_kv_heads, ffn_dim, tie_embeddings=tie_embeddings
    ).num_params()


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple - 1e-9)) * multiple


def heads_for(d_model: int) -> tuple[int, int]:
    """(n_heads, n_kv_heads): head_dim 64, or 128 with grouped-query attention for large models.

    Large models share each key/value head among groups of query heads as Llama-3 does (8 kv
    heads): the KV cache shrinks by the group size at a negligible cost in quality.
    """
    if d_model < LARGE_D_MODEL:
        return d_model // 64, d_model // 64
    n_heads = d_model // 128
    return n_heads, max(k for k in range(1, 9) if n_heads % k == 0)


def standard_ffn(d_model: int) -> int:
    """SwiGLU's 8/3 d_model (Shazeer 2020; Llama), rounded up as Llama's `multiple_of` does."""
    return _round_up(8 * d_model / 3, 256 if d_model >= LARGE_D_MODEL else 64)


def _ffn_options(d_model: int, relaxed: bool) -> list[int]:
    if not relaxed:
        return [standard_ffn(d_model)]
    # Published SwiGLU widths span about 2x to 4x d_model (Llama-3-8B: 3.5x); with d_model in
    # steps of 64, tiny models need these to land near every target.
    m = 256 if d_model >= LARGE_D_MODEL else 64
    return list(range(_round_up(2 * d_model, m), 4 * d_model + 1, m))


def preferred_aspect(n_params: float) -> float:
    """d_model / n_layers that published shapes use at this size: 64 up to 100M, 128 from 10B."""
    t = (math.log10(max(n_params, 1e8)) - 8.0) / 2.0
    return 64.0 * 2.0 ** min(t, 1.0)


def smallest(
    vocab_size: int, tie_embeddings: bool = True, max_seq_len: int = 1024
) -> LlamaConfig:
    """The smallest shape the rules allow: d_model 64, one layer."""
    n_heads, n_kv = heads_for(64)
    return LlamaConfig(
        vocab_size, 1, 64, n_heads, n_kv, standard_ffn(64), max_seq_len, tie_embeddings
    )


def search_shape(
    target: float,
    vocab_size: int,
    *,
    tie_embeddings: bool = True,
    max_seq_len: int = 1024,
    rope_theta: float = 10000.0,
    norm_eps: float = 1e-5,
    tolerance: float = TOLERANCE,
) -> LlamaConfig:
    """A shape whose exact parameter count is within `tolerance` of `target`.

    Candidates go in tiers, each used only if the one before has none within tolerance:
    (0) SwiGLU at 8/3 d_model and d_model/n_layers in 32..128; (1) narrow models (d_model <= 256)
    also deeper, down to 6; (2) SwiGLU width anywhere in 2..4 d_model; (3) as 2, with a single
    layer allowed (tiers 0-2 want at least MIN_LAYERS). Within a tier the score trades the
    count's error against the distance from the usual aspect ratio.
    """
    if vocab_size < 1:
        raise ShapeError(f"vocab_size must be positive, got {vocab_size}")
    floor = smallest(vocab_size, tie_embeddings, max_seq_len)
    if target < floor.num_params() * (1 - tolerance):
        table = vocab_size * 64 * (1 if tie_embeddings else 2)
        raise ShapeError(
            f"a model of {target:,.0f} parameters cannot be built: with a vocabulary of "
            f"{vocab_size:,} the embedding table alone has {table:,} parameters at the smallest "
            f"width (d_model 64) and the smallest model has {floor.num_params():,}. Raise the "
            "budget, "
            "add data (or plan.max_epochs) when the data limit is what binds, or train a "
            "tokenizer with a smaller tokenizer.vocab_size"
        )
    aspect = preferred_aspect(target)
    # The relaxed tier is searched only when the usual ones find nothing: it is the slow one.
    for tiers in ((0, 1), (2,), (3,)):
        found = list(_candidates(target, vocab_size, tie_embeddings, aspect, tolerance, tiers))
        if found:
            _, _, n_layers, d_model, ffn_dim = min(found)
            n_heads, n_kv = heads_for(d_model)
            return LlamaConfig(
                vocab_size,
                n_layers,
                d_model,
                n_heads,
                n_kv,
                ffn_dim,
                max_seq_len,
                tie_embeddings,
                rope_theta,
                norm_eps,
            )
    # Only tiny models with a large vocabulary get here: widening d_model by 64 adds a whole
    # 64-column slice of the embedding table, a step larger than the tolerance.
    near = list(_candidates(target, vocab_size, tie_embeddings, aspect, 1.0, (3,)))
    counts = sorted({_count(vocab_size, tie_embeddings, c[2], c[3], c[4]) for c in near})
    below = max((c for c in counts if c < target), default=floor.num_params())
    above = min((c for c in counts if c > target), default=None)
    nearest = f"{below:,}" + (f" and {above:,}" if above else "")
    raise ShapeError(
        f"no decoder shape has {target:,.0f} parameters within {tolerance:.0%}: with a "
        f"vocabulary of {vocab_size:,} the embedding table dominates at this size and the "
        f"nearest shapes have {nearest}. Change the budget a little, or use a smaller "
        "tokenizer.vocab_size"
    )


def _width_step(d_model: int) -> int:
    """Widths as published families space them: steps of 64, then 128, then 1024 from 2048.

    Large widths are whole multiples of 8 heads of 128 (Llama: 4096, 5120, 8192, 16384), so
    every query group shares one of 8 kv heads.
    """
    if d_model >= LARGE_D_MODEL:
        return 1024
    return 128 if d_model >= 1024 else 64


def _count(vocab_size: int, tie: bool, n_layers: int, d_model: int, ffn_dim: int) -> int:
    n_heads, n_kv = heads_for(d_model)
    return count_params(vocab_size, n_layers, d_model, n_heads, n_kv, ffn_dim, tie)


def _candidates(
    target: float,
    vocab_size: int,
    tie_embeddings: bool,
    aspect: float,
    tolerance: float,
    tiers: tuple[int, ...],
) -> Iterator[tuple[int, float, int, int, int]]:
    """(tier, score, n_layers, d_model, ffn_dim) of every shape within tolerance."""
    d = 64
    while d <= MAX_D_MODEL:
        n_heads, n_kv = heads_for(d)
        # Parameters outside the blocks (embeddings, final norm): a one-layer model's count
        # less its layer.
        one = LlamaConfig(vocab_size, 1, d, n_heads, n_kv, standard_ffn(d),
                          tie_embeddings=tie_embeddings)
        fixed = one.num_params() - one.layer_params
        if fixed > target * (1 + tolerance):
            return
        tiny = TINY_ASPECT_RANGE if d <= TINY_D_MODEL else ASPECT_RANGE
        plans = {
            0: (ASPECT_RANGE, False, MIN_LAYERS),
            1: (tiny, False, MIN_LAYERS),
            2: (tiny, True, MIN_LAYERS),
            3: (tiny, True, 1),
        }
        for tier in tiers:
            (lo_aspect, hi_aspect), relaxed, min_layers = plans[tier]
            lo_layers = max(min_layers, math.ceil(d / hi_aspect))
            hi_layers = max(lo_layers, d // lo_aspect)
            for ffn in _ffn_options(d, relaxed):
                per_layer = LlamaConfig(vocab_size, 1, d, n_heads, n_kv, ffn).layer_params
                exact = (target - fixed) / per_layer
                for n_layers in {math.floor(exact), math.ceil(exact)}:
                    n_layers = min(max(n_layers, lo_layers), hi_layers)
                    count = fixed + n_layers * per_layer
                    error = abs(math.log(count / target))
                    if error > math.log1p(tolerance):
                        continue
                    # 5% off the count weighs as much as an aspect ratio e times the usual one.
                    score = 20.0 * error + abs(math.log(d / n_layers / aspect))
                    score += 0.01 * abs(ffn / standard_ffn(d) - 1)
                    yield tier, score, n_layers, d, ffn
        d += _width_step(d)
