"""The decoder's shape, described once: LlamaConfig (sizes, exact parameter and FLOP counts, its
config.json form). The recipe's `model:` section loads into it, the planner searches over it,
plan.json carries it, and the decoder is built from it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from domainlm.errors import UserError


class ModelConfigError(UserError, ValueError):
    """A model shape that cannot be built; the message names the field and the fix."""


@dataclass
class LlamaConfig:
    """A Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases."""

    # The tokenizer's vocabulary size; never set in a recipe (None there: the tokenizer decides).
    vocab_size: int | None = field(default=None, metadata={"recipe": False})
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    n_kv_heads: int = 4  # fewer than n_heads: grouped-query attention; 1: multi-query attention
    ffn_dim: int = 704  # SwiGLU hidden size
    max_seq_len: int = 1024  # positions (RoPE table); training uses train/plan seq_len
    tie_embeddings: bool = True  # the output projection reuses the token embedding
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02  # std of the initial weights (residual projections scaled down)

    def __post_init__(self) -> None:
        sizes = "vocab_size n_layers d_model n_heads n_kv_heads ffn_dim max_seq_len".split()
        for name in sizes:
            value = getattr(self, name)
            if name == "vocab_size" and value is None:
                continue
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

    def shape(self, vocab_size: int | None = None) -> LlamaConfig:
        """This shape as a plain LlamaConfig (a recipe section drops its own settings), with
        vocab_size set when given."""
        values = {f.name: getattr(self, f.name) for f in fields(LlamaConfig)}
        if vocab_size is not None:
            values["vocab_size"] = vocab_size
        return LlamaConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus head_dim and the exact parameter count (plan.json's `shape`)."""
        out = {f.name: getattr(self, f.name) for f in fields(LlamaConfig)}
        return {**out, "head_dim": self.head_dim, "params": self.num_params()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read to_dict's output back (derived entries are ignored)."""
        return cls(**{f.name: d[f.name] for f in fields(LlamaConfig) if f.name in d})

    @property
    def embedding_params(self) -> int:
        return self._vocab * self.d_model

    @property
    def layer_params(self) -> int:
        """One block: q, k, v, o without bias, SwiGLU gate/up/down, two RMSNorm weights."""
        d, kv_dim = self.d_model, self.n_kv_heads * self.head_dim
        return 2 * d * d + 2 * d * kv_dim + 3 * d * self.ffn_dim + 2 * d

    @property
    def _vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("this shape has no vocab_size yet (it comes from the tokenizer)")
        return self.vocab_size

    def describe(self) -> str:
        heads = "head" if self.n_heads == 1 else "heads"
        attention = f"{self.n_heads} {heads} of {self.head_dim}"
        if self.n_kv_heads != self.n_heads:
            attention += f", {self.n_kv_heads} kv heads"
        tied = "tied" if self.tie_embeddings else "untied"
        return (
            f"{self.n_layers} layers, d_model {self.d_model}, {attention}, ffn {self.ffn_dim}, "
            f"vocab {self.vocab_size} ({tied} embeddings)"
        )

    # ----------------------------------------------------------------------------------------
    # Counting.

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact number of distinct parameters, as sum(p.numel()) over the built model.

        Without embeddings, the token embedding and (when untied) the output projection are left
        out: Kaplan et al.'s "non-embedding" count, which the scaling laws are written in.
        """
        body = self.n_layers * self.layer_params + self.d_model  # + the final norm
        if not include_embeddings:
            return body
        return body + self.embedding_params * (1 if self.tie_embeddings else 2)

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
        n = self.num_params(include_embeddings=False) + self.embedding_params
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


@dataclass
class ModelConfig(LlamaConfig):
    """The recipe's `model:` section: a decoder shape (LlamaConfig's fields, vocab_size from the
    tokenizer), or, with from_plan, the shape `make plan` chose."""

    from_plan: bool = True  # take the shape from plan.json; false: the fields here
