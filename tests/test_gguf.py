"""The GGUF export: the file holds llama.cpp's metadata, our tokenizer and our weights.

Read back with gguf's own reader; `read_gguf_model` dequantizes it into our decoder, which
must give our logits (within the rounding of the type) and our greedy continuation. The models
are trained for a few seconds on a small grammar, so their predictions are peaked as a real
model's are and a greedy comparison means something.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from builders import grammar_corpus, sentencepiece_model, small_config

from domainlm.errors import UserError
from domainlm.model.decode import generate
from domainlm.model.gguf import (
    permute_rope,
    read_gguf_model,
    unpermute_rope,
    write_gguf,
)
from domainlm.model.llama import Llama, apply_rope
from domainlm.tokenizer import special
from domainlm.tokenizer.templates import load_template

QTYPES = ["F16", "BF16", "Q8_0", "Q4_0"]
T = gguf.GGMLQuantizationType
FILE_TYPE = {"F16": 1, "BF16": 32, "Q8_0": 7, "Q4_0": 2}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
# max |logits(file) - logits(ours)| / max |logits(ours)| on 48 held-out tokens. Measured on
# these models (untied / tied): F16 4.8e-4 / 1.7e-3, BF16 8.0e-3 / 2.5e-3, Q8_0 3.8e-2 /
# 2.2e-2, Q4_0 0.42 / 0.17; the bounds sit a little above. (Q8_0 moves each weight by 0.5%;
# most of its logit change comes from layer 0's query/key, whose attention is sharp.)
BOUNDS = {"F16": 5e-3, "BF16": 1.5e-2, "Q8_0": 5e-2, "Q4_0": 0.5}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return sentencepiece_model(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def sp(tok) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tok))


@pytest.fixture(scope="module")
def text_ids(sp) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of a small grammar's training and held-out documents, each ended by </s>."""

    def encode(rows: list[dict]) -> torch.Tensor:
        return torch.tensor([i for r in rows for i in [*sp.encode(r["text"]), special.EOS_ID]])

    return tuple(encode(rows) for rows in grammar_corpus(docs=60))


def train_model(sp, ids: torch.Tensor, tied: bool, steps: int = 100) -> Llama:
    torch.manual_seed(0)
    model = Llama(small_config(vocab_size=sp.get_piece_size(), tie_embeddings=tied))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=g)
        batch = torch.stack([ids[i : i + 33] for i in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def models(sp, text_ids) -> dict[bool, Llama]:
    return {tied: train_model(sp, text_ids[0], tied) for tied in (False, True)}


@pytest.fixture(scope="module")
def files(models, tok, tmp_path_factory) -> dict[tuple[bool, str], Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        (tied, q): write_gguf(
            models[tied], tok, root / f"{'tied' if tied else 'untied'}-{q}.gguf", q, TEMPLATE
        )
        for tied in (False, True)
        for q in QTYPES
    }


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ RoPE layout


def rope_interleaved(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """GGML's RoPE (mode 0): rotate the adjacent pairs (2i, 2i + 1) by pos·theta^(-2i/d)."""
    d = x.shape[-1]
    angle = pos[:, None].float() * theta ** (-torch.arange(0, d, 2).float() / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * angle.cos() - b * angle.sin()
    out[..., 1::2] = a * angle.sin() + b * angle.cos()
    return out


def test_permute_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    for n_heads, head_dim, d in [(4, 16, 64), (2, 16, 64), (1, 8, 24), (8, 2, 5)]:
        w = torch.randn(n_heads * head_dim, d, generator=g)
        p = permute_rope(w, n_heads)
        assert torch.equal(p, w) == (head_dim == 2)  # one pair per head stays in place
        assert torch.equal(unpermute_rope(p, n_heads), w)
        assert torch.equal(permute_rope(unpermute_rope(w, n_heads), n_heads), w)
        assert sorted(p[:, 0].tolist()) == sorted(w[:, 0].tolist())  # whole rows, reordered


def test_permuted_rows_under_ggml_rope_equal_our_rope():
    """What the permutation is for: GGML's interleaved RoPE on the permuted projection gives
    the permuted result of our (HF's rotate-half) RoPE, so attention scores are unchanged."""
    config = small_config()
    model = Llama(config)
    n, hd, T_ = config.n_heads, config.head_dim, 10
    x = torch.randn(T_, config.d_model, generator=torch.Generator().manual_seed(1))
    wq = model.model.layers[0].self_attn.q_proj.weight.detach()
    ours = apply_rope(
        (x @ wq.T).view(T_, n, hd).transpose(0, 1), model.rope.cos[:T_], model.rope.sin[:T_]
    )
    ggml = rope_interleaved(
        (x @ permute_rope(wq, n).T).view(T_, n, hd).transpose(0, 1),
        torch.arange(T_),
        config.rope_theta,
    )
    expect = permute_rope(ours.transpose(0, 1).reshape(T_, n * hd).T, n).T
    torch.testing.assert_close(
        ggml.transpose(0, 1).reshape(T_, n * hd), expect, atol=1e-5, rtol=1e-5
    )


def test_file_holds_the_permuted_projections(models, files):
    model, reader = models[False], gguf.GGUFReader(files[False, "F16"])
    tensors = {t.name: t for t in reader.tensors}
    attn = model.model.layers[1].self_attn
    for name, w, heads in [("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)]:
        stored = torch.from_numpy(np.array(tensors[f"blk.1.{name}.weight"].data, np.float32))
        assert torch.equal(stored, permute_rope(w.detach(), heads).half().float())
    stored_v = torch.from_numpy(np.array(tensors["blk.1.attn_v.weight"].data, np.float32))
    assert torch.equal(stored_v, attn.v_proj.weight.detach().half().float())


# ---------------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_metadata(files, sp, qtype, tied):
    r = gguf.GGUFReader(files[tied, qtype])
    c = small_config()
    expected = {
        "general.architecture": "llama",
        "general.name": "domainlm",
        "general.file_type": FILE_TYPE[qtype],
        "llama.vocab_size": sp.get_piece_size(),
        "llama.context_length": c.max_seq_len,
        "llama.embedding_length": c.d_model,
        "llama.block_count": c.n_layers,
        "llama.feed_forward_length": c.ffn_dim,
        "llama.attention.head_count": c.n_heads,
        "llama.attention.head_count_kv": c.n_kv_heads,
        "llama.rope.dimension_count": c.head_dim,
        "llama.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.bos_token_id": 2,  # documents were trained after </s>
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.remove_extra_whitespaces": False,
        "tokenizer.chat_template": TEMPLATE,
    }
    assert {k: field(r, k) for k in expected} == expected
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == np.float32(1e-5)

    n = sp.get_piece_size()
    assert field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
    scores = np.array(field(r, "tokenizer.ggml.scores"), np.float32)
    assert np.array_equal(scores, np.array([sp.get_score(i) for i in range(n)], np.float32))

    types = field(r, "tokenizer.ggml.token_type")
    tt = gguf.TokenType
    user = [*special.DEFAULT_CHAT_TOKENS, *special.WHITESPACE_PIECES]
    for i in range(n):
        piece = sp.id_to_piece(i)
        if piece in ("<s>", "</s>", "<pad>"):
            want = tt.CONTROL
        elif piece == "<unk>":
            want = tt.UNKNOWN
        elif piece in user:
            want = tt.USER_DEFINED
        elif piece.startswith("<0x") and sp.is_byte(i):
            want = tt.BYTE
        else:
            want = tt.NORMAL
        assert types[i] == want, (i, piece)
    assert sum(t == tt.BYTE for t in types) == 256
    assert sum(t == tt.USER_DEFINED for t in types) == len(user)


def expected_types(qtype: str, tied: bool) -> dict[str, T]:
    """Every tensor and its type, spelt out: matrices in qtype, norms F32, and for Q4_0 the
    output projection (token_embd when tied) in Q8_0."""
    mat = {"F16": T.F16, "BF16": T.BF16, "Q8_0": T.Q8_0, "Q4_0": T.Q4_0}[qtype]
    out = T.Q8_0 if qtype == "Q4_0" else mat
    names = {"token_embd.weight": out if tied else mat, "output_norm.weight": T.F32}
    if not tied:
        names["output.weight"] = out
    for b in range(2):
        for m in "attn_q attn_k attn_v attn_output ffn_gate ffn_up ffn_down".split():
            names[f"blk.{b}.{m}.weight"] = mat
        names[f"blk.{b}.attn_norm.weight"] = T.F32
        names[f"blk.{b}.ffn_norm.weight"] = T.F32
    return names


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_tensor_names_shapes_and_types(files, qtype, tied):
    r = gguf.GGUFReader(files[tied, qtype])
    got = {t.name: (t.tensor_type, t.shape.tolist()) for t in r.tensors}
    types = expected_types(qtype, tied)
    assert {k: v[0] for k, v in got.items()} == types
    # GGML lists dimensions innermost first: (in, out) for a PyTorch (out, in) matrix.
    assert got["token_embd.weight"][1] == [64, 320]
    assert got["blk.0.attn_q.weight"][1] == [64, 64]
    assert got["blk.0.attn_k.weight"][1] == [64, 32]  # 2 key/value heads of 16
    assert got["blk.1.ffn_down.weight"][1] == [96, 64]
    assert got["blk.1.ffn_up.weight"][1] == [64, 96]
    assert got["output_norm.weight"][1] == [64]
    if not tied:
        assert got["output.weight"][1] == [64, 320]


# ------------------------------------------------------------------------- the weights, back


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("tied", [False, True])
def test_read_back_gives_our_logits(models, files, text_ids, qtype, tied):
    model, back = models[tied], read_gguf_model(files[tied, qtype])
    assert back.config == model.config
    x = text_ids[1][:48].unsqueeze(0)
    with torch.no_grad():
        err = relative_error(back(x)[0], model(x)[0])
    assert err < BOUNDS[qtype], err


@pytest.mark.parametrize("tied", [False, True])
def test_f16_file_generates_our_greedy_continuation(models, files, sp, tied):
    model, back = models[tied], read_gguf_model(files[tied, "F16"])
    prompt = torch.tensor([sp.encode("The quarterly ledger")])
    ours = generate(model, prompt, 20)
    assert torch.equal(generate(back, prompt, 20), ours)
    # A continuation, not one token repeated (the tiny tied model settles into a 2-token loop).
    assert len(set(ours[0, prompt.size(1) :].tolist())) > 1


def test_vocabulary_larger_than_the_tokenizer_is_padded(tok, sp, tmp_path):
    model = Llama(small_config(vocab_size=sp.get_piece_size() + 3))
    path = write_gguf(model, tok, tmp_path / "padded.gguf", "F16")
    r = gguf.GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    assert tokens[-4:] == [sp.id_to_piece(sp.get_piece_size() - 1), "[PAD1]", "[PAD2]", "[PAD3]"]
    assert field(r, "tokenizer.ggml.token_type")[-3:] == [gguf.TokenType.UNUSED] * 3
    assert read_gguf_model(path).config.vocab_size == sp.get_piece_size() + 3


def test_refusals_and_atomic_replacement(tok, sp, tmp_path):
    model = Llama(small_config(vocab_size=sp.get_piece_size()))
    with pytest.raises(UserError, match="Q5_K"):
        write_gguf(model, tok, tmp_path / "x.gguf", "Q5_K")
    with pytest.raises(UserError, match="vocab_size"):
        write_gguf(Llama(small_config(vocab_size=100)), tok, tmp_path / "x.gguf", "F16")
    with pytest.raises(UserError, match="missing"):
        read_gguf_model(tmp_path / "absent.gguf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    write_gguf(model, tok, out, "Q8_0")
    assert os.listdir(tmp_path) == ["m.gguf"]  # replaced, no temporary file left
    assert field(gguf.GGUFReader(out), "general.file_type") == 7
    # Without a template the file carries the built-in one fine-tuning uses by default.
    assert field(gguf.GGUFReader(out), "tokenizer.chat_template") == load_template("chat").source
