"""The decoder: HF-compatible names and logits, exact counts, loss masking, cache, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from builders import small_config

from domainlm.model.decode import generate
from domainlm.model.llama import Llama
from domainlm.recipe import ModelConfig
from domainlm.recipe.model import LlamaConfig, ModelConfigError

VOCAB = 101


def small(**overrides: object) -> LlamaConfig:
    return small_config(**{"vocab_size": VOCAB, **overrides})


def build(config: LlamaConfig, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(config).eval()


def hf_model(config: LlamaConfig):  # noqa: ANN201 (transformers is a test-only import)
    # Eager attention in fp32: HF's reference path, so any difference is ours.
    hf_config = transformers.LlamaConfig(**config.to_hf_dict(1, 2, 0), attn_implementation="eager")
    return transformers.LlamaForCausalLM(hf_config).eval()


CONFIGS = {
    "gqa-untied": small(n_kv_heads=2, tie_embeddings=False),
    "mha-tied": small(n_kv_heads=4, tie_embeddings=True, rope_theta=500000.0),
    "mqa-tied": small(n_layers=3, n_kv_heads=1, tie_embeddings=True, norm_eps=1e-6),
}


# --------------------------------------------------------------------------------------------
# Hugging Face compatibility.


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_keys_and_shapes_equal_hf(name: str) -> None:
    config = CONFIGS[name]
    ours = build(config).state_dict()
    theirs = hf_model(config).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert "lm_head.weight" in ours and not any("rope" in k or "rotary" in k for k in ours)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_hf_after_loading_our_weights(name: str) -> None:
    config = CONFIGS[name]
    ours = build(config)
    theirs = hf_model(config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (3, config.max_seq_len))
    with torch.no_grad():
        logits, _ = ours(idx)
        expected = theirs(input_ids=idx).logits
    assert logits.shape == expected.shape == (3, config.max_seq_len, VOCAB)
    assert (logits - expected).abs().max().item() <= 1e-4
    if config.tie_embeddings:
        assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()


def test_hf_dict_round_trips_through_transformers() -> None:
    for config in CONFIGS.values():
        written = config.to_hf_dict(bos_id=1, eos_id=2, pad_id=None, torch_dtype="bfloat16")
        assert written["architectures"] == ["LlamaForCausalLM"]
        assert LlamaConfig.from_hf_dict(written) == config
        # What transformers itself writes back (rope_parameters, its own key order) reads too.
        assert LlamaConfig.from_hf_dict(transformers.LlamaConfig(**written).to_dict()) == config


def test_from_hf_dict_refuses_what_the_decoder_lacks() -> None:
    base = small().to_hf_dict(1, 2, None)
    for key, value in [
        ("attention_bias", True),
        ("hidden_act", "gelu"),
        ("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5}),
    ]:
        with pytest.raises(ValueError, match=key.split("_")[0]):
            LlamaConfig.from_hf_dict({**base, key: value})
    with pytest.raises(ValueError, match="hidden_size"):
        LlamaConfig.from_hf_dict({"vocab_size": 10})


# --------------------------------------------------------------------------------------------
# Config: validation and counts.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 66}, "multiple of model.n_heads"),
        ({"n_kv_heads": 3}, "multiple of model.n_kv_heads"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"vocab_size": -5}, "vocab_size must be a positive integer"),
        ({"norm_eps": 0.0}, "norm_eps must be a positive number"),
        ({"d_model": 36, "n_heads": 4, "n_kv_heads": 4}, "must be even"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message) as info:
        small(**overrides)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", CONFIGS)
def test_num_params_is_exact(name: str) -> None:
    config = CONFIGS[name]
    model = build(config)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    embedding_params = {id(model.model.embed_tokens.weight), id(model.lm_head.weight)}
    body = sum(p.numel() for p in model.parameters() if id(p) not in embedding_params)
    assert config.num_params(include_embeddings=False) == body


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_equals_torchs_flop_counter(tied) -> None:
    """PaLM's 6N + 12·L·d·s against PyTorch's own count of a real forward and backward.

    FlopCounterMode counts matrix products only (attention too, on the math kernel, which
    computes the whole QKᵀ as PaLM's formula counts it); the one difference is the RMSNorm
    gains, which the formula's N includes (6 FLOPs per gain per token) and which multiply
    elementwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = small(tie_embeddings=tied)
    batch, seq = 2, 32
    model = Llama(config)
    x = torch.randint(0, VOCAB, (batch, seq))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(x, x)
        loss.backward()
    norm_gains = (2 * config.n_layers + 1) * config.d_model
    per_token = counter.get_total_flops() / (batch * seq)
    assert config.flops_per_token(seq) == per_token + 6 * norm_gains
    assert config.flops_per_token() == config.flops_per_token(config.max_seq_len)


def test_the_recipe_section_is_the_shape() -> None:
    section = ModelConfig(n_layers=3, d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=352)
    config = section.shape(vocab_size=500)
    assert type(config) is LlamaConfig
    assert (config.n_layers, config.d_model, config.n_kv_heads, config.vocab_size) == (
        3,
        128,
        2,
        500,
    )
    assert config.tie_embeddings == section.tie_embeddings


# --------------------------------------------------------------------------------------------
# The module.


def test_init_is_scaled_and_rope_tables_stay_fp32() -> None:
    config = small(n_layers=8, d_model=256, n_heads=4, n_kv_heads=4, ffn_dim=512)
    model = build(config)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(model.model.norm.weight == 1)
    model.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.rope.cos.dtype == torch.float32
    assert model.rope.cos.shape == (config.max_seq_len, config.head_dim)


def test_loss_ignores_minus_100_targets() -> None:
    model = build(small())
    torch.manual_seed(2)
    idx = torch.randint(0, VOCAB, (2, 12))
    targets = torch.randint(0, VOCAB, (2, 12))
    targets[0, :5] = -100
    targets[1, 7:] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    assert loss is not None and torch.allclose(loss, expected, atol=1e-6)
    all_ignored = torch.full_like(targets, -100)
    assert model(idx, all_ignored)[1].item() == 0.0  # not NaN: a prompt-only batch is harmless
    assert model(idx)[1] is None


def test_kv_cache_greedy_decode_equals_full_recompute() -> None:
    model = build(small())
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 7))
    with_cache = generate(model, prompt, 20, use_cache=True)
    without = generate(model, prompt, 20, use_cache=False)
    assert with_cache.shape == (2, 27)
    assert torch.equal(with_cache, without)


def test_kv_cache_chunks_give_the_full_logits() -> None:
    # A prefill in pieces exercises the shifted causal mask (several new tokens after a cache).
    model = build(small())
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full, _ = model(idx)
        cache: list = []
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 8), (8, 9), (9, 20)]]
    assert len(cache) == 2 and cache[0][0].shape == (2, 2, 20, 16)  # n_kv_heads, not n_heads
    assert (torch.cat(parts, dim=1) - full).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="cached"):
        model(idx[:, :1], cache=cache, start_pos=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_inputs_embeds_equal_token_ids() -> None:
    model = build(small(tie_embeddings=True))
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    targets = idx.roll(-1, dims=1)
    with torch.no_grad():
        by_ids = model(idx, targets)
        by_embeds = model(inputs_embeds=model.model.embed_tokens(idx), targets=targets)
    assert torch.equal(by_ids[0], by_embeds[0]) and torch.equal(by_ids[1], by_embeds[1])
    with pytest.raises(ValueError, match="exactly one"):
        model(idx, inputs_embeds=model.model.embed_tokens(idx))


def test_the_model_learns_a_repeated_sequence() -> None:
    model = build(small())
    model.train()
    seq = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(6))
    x, y = seq[:, :-1], seq[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(VOCAB), rel=0.1)  # starts near uniform
    assert losses[-1] < 0.2 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    grads = []
    for checkpointing in (False, True):
        model = build(small()).train()
        model.gradient_checkpointing = checkpointing
        model(idx, idx.roll(-1, dims=1))[1].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bf16_autocast_on_cpu() -> None:
    model = build(small(tie_embeddings=True)).train()
    idx = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        reference, _ = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(idx, idx.roll(-1, dims=1))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert (logits.float() - reference).abs().max().item() < 0.05
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
