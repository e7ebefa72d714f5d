"""A Llama-style decoder whose parameter names and numerics match transformers' LlamaForCausalLM.

Pre-norm blocks of RMSNorm → grouped-query attention with rotary positions → RMSNorm → SwiGLU,
no biases (Touvron et al. 2023). The state dict has exactly the keys of Hugging Face's
LlamaForCausalLM, so an export is a rename-free save and the HF model gives the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from domainlm.recipe.model import LlamaConfig

# One (key, value) pair per layer, each (batch, n_kv_heads, cached positions, head_dim). Start a
# generation with an empty list; forward fills it and extends it on every call.
KVCache = list[tuple[Tensor, Tensor]]

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (prompt tokens, padding)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale after casting back, exactly as transformers does, so bf16
        # runs agree with the HF model and the statistic never overflows in half precision.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary positions (Su et al. 2021), HF's layout: halves, not pairs."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        # Non-persistent: derived from the config, so they stay out of the state dict, whose
        # keys must equal HF's.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(None)

    def _build(self, device: torch.device | None) -> None:
        dims = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (dims / self.head_dim))
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, head_dim)
        self.cos, self.sin = angles.cos(), angles.sin()

    def _apply(self, fn: Callable[[Tensor], Tensor], *args: Any, **kwargs: Any) -> RotaryEmbedding:
        # Rebuild after every move or cast: model.to(bfloat16) must not round the tables, and
        # a model made on the meta device (FSDP) gets real values when it is materialised.
        super()._apply(fn, *args, **kwargs)
        self._build(self.cos.device)
        return self


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) → (-x2, x1) on the two halves of the last dimension: HF's RoPE convention."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # Rotate in fp32 and cast back, as Meta's reference does: bf16 holds cos/sin to only about
    # three significant digits, which blurs neighbouring positions at long range.
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (Ainslie et al. 2023)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        d, kv_dim = config.d_model, config.n_kv_heads * config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        present = (k, v)  # cached before the head expansion: GQA's saving is the cache size

        # Expand key/value heads to the query heads ourselves rather than with SDPA's
        # enable_gqa: that flag needs torch >= 2.5 and silently falls back to the slow math
        # kernel in fp32, with a mask, or on GPUs without flash attention.
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)

        S = k.size(2)
        if key_mask is not None:
            # Rows of a batch at different positions (model/kvcache.py): key_mask (B, S) says
            # which cached columns hold a row's own tokens; the causal triangle is shifted by
            # the cached length as below, and a query always sees itself (no empty row).
            mask = key_mask[:, None, None, :]
            if T > 1:
                causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
                own = torch.arange(S, device=x.device) == torch.arange(
                    S - T, S, device=x.device)[:, None]
                mask = (mask & causal) | own
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif S == T:  # no cache: plain causal attention, the fused kernels' fast path
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            # Several new tokens after a cache: is_causal would align the triangle to the top
            # left, so the mask is spelt out with the diagonal shifted by the cached length.
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y), present


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        # Declared in HF's order, so even the state dict's key order is the same as theirs.
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.d_model, config.norm_eps)
        self.post_attention_layernorm = RMSNorm(config.d_model, config.norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, past: tuple[Tensor, Tensor] | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, past, key_mask)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Llama(nn.Module):
    """The decoder: token embedding, n_layers blocks, final norm, output projection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # Named after HF's LlamaModel ("model.embed_tokens", "model.layers.0...", "model.norm").
        self.model = nn.ModuleDict(
            {
                "embed_tokens": nn.Embedding(config.vocab_size, config.d_model),
                "layers": nn.ModuleList(Block(config) for _ in range(config.n_layers)),
                "norm": RMSNorm(config.d_model, config.norm_eps),
            }
        )
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One Parameter under both names: state_dict lists both keys (as HF's does) and
            # parameters() yields it once.
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryEmbedding(config.head_dim, config.max_seq_len, config.rope_theta)
        self.gradient_checkpointing = False  # recompute each block in backward to save memory
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, init_std) for every matrix; residual projections scaled by 1/sqrt(2·n_layers).

        Each block adds two outputs (o_proj, down_proj) to the residual stream; shrinking them
        keeps the stream's variance flat with depth (GPT-2, Radford et al. 2019).
        """
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        idx: Tensor | None = None,
        targets: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        start_pos: int | None = None,
        cache: KVCache | None = None,
        positions: Tensor | None = None,
        key_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T, vocab) for token ids idx (B, T) or for inputs_embeds (B, T, d_model).

        targets (B, T) are the next tokens, already shifted (targets[:, t] follows idx[:, t]);
        when given, the mean cross-entropy over targets != -100 is returned too, else None.
        cache: a KVCache (start with []) that this call extends in place; start_pos, the
        position of the first input token, defaults to the number of tokens already cached.
        A batch whose rows sit at different positions (continuous batching, model/kvcache.py)
        passes positions (B, T), each input token's position, and key_mask (B, cached + T),
        True where a column of the cache holds one of that row's tokens.
        """
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx and inputs_embeds")
        x = self.model.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        T = x.size(1)
        if positions is not None:
            # Per-row tables (B, 1, T, head_dim), broadcast over the heads. The caller keeps
            # every position below max_seq_len (indexing past the table raises anyway).
            cos, sin = self.rope.cos[positions][:, None], self.rope.sin[positions][:, None]
        else:
            cached = cache[0][0].size(2) if cache else 0
            if start_pos is None:
                start_pos = cached
            elif cache and start_pos != cached:
                raise ValueError(
                    f"start_pos {start_pos} does not follow the {cached} cached tokens")
            if start_pos + T > self.config.max_seq_len:
                raise ValueError(
                    f"{start_pos + T} positions exceed max_seq_len {self.config.max_seq_len}"
                )
            cos = self.rope.cos[start_pos : start_pos + T]
            sin = self.rope.sin[start_pos : start_pos + T]

        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        filling = not cache  # an empty cache gets one entry per layer, appended below
        for i, block in enumerate(self.model.layers):
            past = None if filling else cache[i]
            if checkpointing:
                x, present = checkpoint(block, x, cos, sin, past, key_mask, use_reentrant=False)
            else:
                x, present = block(x, cos, sin, past, key_mask)
            if cache is not None:
                if filling:
                    cache.append(present)
                else:
                    cache[i] = present
        logits = self.lm_head(self.model.norm(x))

        loss = None
        if targets is not None:
            flat = targets.reshape(-1)
            # Sum over counted tokens divided by their number (at least 1), rather than
            # cross_entropy's mean, so a batch whose targets are all ignored (a long prompt in
            # fine-tuning) gives loss 0 instead of NaN; no host sync either way.
            losses = F.cross_entropy(
                logits.float().reshape(-1, logits.size(-1)),
                flat,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            loss = losses / (flat != IGNORE_INDEX).sum().clamp(min=1)
        return logits, loss
