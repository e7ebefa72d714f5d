"""The decoder's shape (LlamaConfig): sizes, exact parameter and FLOP counts, HF config.json."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from domainlm.errors import UserError


class ModelConfigError(UserError, ValueError):
    """A model shape that cannot be built; the message names the field and the fix."""


class _ModelSection(Protocol):
    """The fields of the recipe's `model:` section that shape the decoder (recipe.ModelConfig)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    max_seq_len: int
    tie_embeddings: bool
    rope_theta: float
    norm_eps: float


@dataclass
class LlamaConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases."""

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int  # fewer than n_heads: grouped-query attention; 1: multi-query attention
    ffn_dim: int  # SwiGLU hidden size
    max_seq_len: int = 1024
    tie_embeddings: bool = True  # the output projection reuses the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        sizes = "vocab_size n_layers d_model n_heads n_kv_heads ffn_dim max_seq_len".split()
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(f"model.{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ModelConfigError(f"model.{name} must be a positive number, got {value!r}")
        if self.d_model % self.n_heads:
            raise ModelConfigError(
                f"model.d_model ({self.d_model}) must be a multiple of model.n_heads "
                f"({self.n_heads}); choose n_heads that divides d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise ModelConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads "
                f"({self.n_kv_heads}): each key/value head serves a whole group of query heads"
            )
        if self.head_dim % 2:
            raise ModelConfigError(
                f"head size d_model / n_heads = {self.head_dim} must be even, because RoPE "
                "rotates pairs of dimensions; change model.d_model or model.n_heads"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_model_section(cls, model: _ModelSection, vocab_size: int) -> LlamaConfig:
        """Build from the recipe's `model:` section and the trained tokenizer's vocabulary size."""
        return cls(
            vocab_size=vocab_size,
            n_layers=model.n_layers,
            d_model=model.d_model,
            n_heads=model.n_heads,
            n_kv_heads=model.n_kv_heads,
            ffn_dim=model.ffn_dim,
            max_seq_len=model.max_seq_len,
            tie_embeddings=model.tie_embeddings,
            rope_theta=model.rope_theta,
            norm_eps=model.norm_eps,
        )

    # ----------------------------------------------------------------------------------------
    # Counting.

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact number of distinct parameters, as sum(p.numel()) over the built model.

        Without embeddings, the token embedding and (when untied) the output projection are left
        out: Kaplan et al.'s "non-embedding" count, which the scaling laws are written in.
        """
        d, kv_dim = self.d_model, self.n_kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv_dim  # q, o: d x d; k, v: d x kv_dim
        mlp = 3 * d * self.ffn_dim  # gate, up, down
        norms = 2 * d
        body = self.n_layers * (attention + mlp + norms) + d  # + the final norm
        if not include_embeddings:
            return body
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return body + embeddings

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, by PaLM's formula 6N + 12·L·d·s.

        PaLM (Chowdhery et al. 2022, appendix B): each weight costs 2 FLOPs per token forward and
        4 backward, hence 6N; attention's two products (QKᵀ and AV) add 12·L·d·s for a context
        of s tokens (counted in full, not halved for the causal mask, as PaLM does). N counts
        the weights that take part in a matmul: the non-embedding parameters plus the output
        projection V·d, which costs compute whether or not it is tied to the embedding; the
        token embedding is a lookup and costs none. Norm weights are in N too (negligible).
        seq_len defaults to max_seq_len.
        """
        s = self.max_seq_len if seq_len is None else seq_len
        n = self.num_params(include_embeddings=False) + self.vocab_size * self.d_model
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * s

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json.

    def to_hf_dict(
        self,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        torch_dtype: str = "float32",
    ) -> dict[str, Any]:
        """A config.json for transformers' LlamaForCausalLM (and llama.cpp, vLLM) of this shape.

        RoPE's base is written both ways: `rope_theta` (transformers 4.x, llama.cpp's converter,
        older vLLM) and `rope_parameters` (transformers 5.x); likewise the dtype.
        """
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": float(self.rope_theta),
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
            "initializer_range": self.init_std,
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": pad_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read a Llama config.json; features this decoder lacks are refused, not ignored."""
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            vocab, layers, ffn = (
                int(d["vocab_size"]),
                int(d["num_hidden_layers"]),
                int(d["intermediate_size"]),
            )
        except KeyError as e:
            raise ModelConfigError(f"config.json lacks {e.args[0]!r}; is it a Llama config?") from e
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        unsupported = {
            "model_type": (d.get("model_type", "llama"), "llama"),
            "hidden_act": (d.get("hidden_act", "silu"), "silu"),
            "attention_bias": (d.get("attention_bias", False), False),
            "mlp_bias": (d.get("mlp_bias", False), False),
            "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
            "head_dim": (d.get("head_dim") or hidden // heads, hidden // heads),
        }
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ModelConfigError(
                    f"config.json has {key} = {got!r}; this decoder supports only {want!r}"
                )
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        # A missing key means what it means to transformers, so defaults below are its defaults.
        return cls(
            vocab_size=vocab,
            n_layers=layers,
            d_model=hidden,
            n_heads=heads,
            n_kv_heads=int(d.get("num_key_value_heads") or heads),
            ffn_dim=ffn,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            rope_theta=float(theta),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            init_std=float(d.get("initializer_range", 0.02)),
        )
