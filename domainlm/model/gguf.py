"""A GGUF file (llama.cpp's format) of our decoder and SentencePiece tokenizer, and back.

Written with the `gguf` package (llama.cpp's own Python writer) as llama.cpp's
convert_hf_to_gguf.py writes a Llama: architecture "llama", tensor names from gguf's
TensorNameMap, and the query/key rows permuted from Hugging Face's rotate-half RoPE layout
(pairs (i, i + d/2) of a head) to GGML's interleaved one (pairs (2i, 2i + 1)). Both layouts
give the same attention scores; only the order of the rows differs.

Tensor types per qtype (norms and other 1-D tensors are always F32, as llama.cpp keeps them):

* F16, BF16, Q8_0: every matrix in that type, the token embedding and output included
  (what convert_hf_to_gguf.py writes for --outtype f16/bf16/q8_0).
* Q4_0: every matrix in Q4_0 except the output projection, which is Q8_0. llama-quantize gives
  the output Q6_K, which the gguf package cannot quantize; Q8_0 is the nearest finer type it
  can. A tied model has no output.weight (llama.cpp then uses token_embd as the output), so
  there token_embd is the one in Q8_0.
* A matrix whose rows are not a multiple of the 32-value block falls back to F16, as the
  converter does.

The tokenizer is written so that llama.cpp, given text, makes SentencePiece's ids:

* Only a SentencePiece BPE model is exported, as `tokenizer.ggml.model = "llama"`: llama.cpp's
  SPM tokenizer merges adjacent symbols by the score of their union, highest first, leftmost on
  a tie, and falls back to bytes, as SentencePiece's BPE does. A unigram model (Viterbi over
  piece scores) is refused: written as "llama" it is merged by score instead (1.8x the tokens
  on the demo), and llama.cpp's unigram tokenizer ("t5") has no byte fallback (an unknown
  character becomes <unk>, SentencePiece writes its UTF-8 bytes) and splits a run of reserved
  newlines differently, so neither is exact. Train the tokenizer with `tokenizer.type: bpe`.
* Only identity normalization (what domainlm trains) is exported: llama.cpp's SPM tokenizer
  does not normalize.
* bos is id 2 (</s>), the token every document was trained after, and add_bos is false: a text
  prompt is fed as its SentencePiece ids alone, as `domainlm generate`/`serve` feed it, and the
  chat template's text as fine-tuning trained it (from the first position, with no token
  before). A tool that puts a start token before a document (a perplexity run, a rolling
  log-likelihood) puts the one pretraining did.
* Every file carries a chat template: the one given (the model's), else the built-in `chat`.
  llama.cpp reads "<|end|>" as an end-of-generation token by its spelling, so a chat reply ends
  there as the template's stop string says.

What stays different: text that spells a control piece (<s>, </s>, <pad>, <unk>) is that
control token in llama.cpp when it parses special tokens (llama-cpp-python does, for every
prompt), and plain text to SentencePiece.

`read_gguf_model` dequantizes a file written here back into our Llama, so tests can prove
that the file holds the model.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
import torch
from gguf import GGMLQuantizationType as QT

from domainlm.errors import UserError
from domainlm.files import atomic_path
from domainlm.model.llama import Llama
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer.hf_files import BPE, read_model_proto
from domainlm.tokenizer.special import DOCUMENT_START_ID, SpecialTokens
from domainlm.tokenizer.templates import load_template

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]  # "llama"
# qtype -> (the type of the matrices, general.file_type)
QTYPES: dict[str, tuple[QT, gguf.LlamaFileType]] = {
    "F16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "BF16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "Q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (QT.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
OUTPUT, TOKEN_EMBD = "output.weight", "token_embd.weight"
PAD_SCORE = -1000.0  # score of the filler tokens of a model whose vocabulary outgrows its tokenizer


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from HF's rotate-half layout to GGML's interleaved pairs.

    Within each head, new row 2i + a is old row a·d/2 + i (a = 0, 1; d the head size).
    """
    rows = w.shape[0]
    return (
        w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of permute_rope: GGML's interleaved rows back to HF's rotate-half layout."""
    rows = w.shape[0]
    return (
        w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    )


def _name_map(n_layers: int) -> dict[str, str]:
    """Our (= Hugging Face's) parameter names -> GGUF tensor names, from gguf's own table."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    with torch.device("meta"):
        names = Llama(LlamaConfig(8, n_layers, 8, 2, 2, 8, max_seq_len=2)).state_dict()
    out = {}
    for name in names:
        mapped = table.get_name(name, try_suffixes=(".weight",))
        if mapped is None:  # pragma: no cover - a parameter llama.cpp has no name for
            raise RuntimeError(f"gguf has no Llama tensor name for {name}")
        out[name] = mapped
    return out


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: str, tied: bool) -> QT:
    """The GGML type a tensor is written in (see the module docstring)."""
    if len(shape) < 2:
        return QT.F32
    want = QTYPES[qtype][0]
    if qtype == "Q4_0" and (gguf_name == OUTPUT or (tied and gguf_name == TOKEN_EMBD)):
        want = QT.Q8_0
    if shape[-1] % gguf.GGML_QUANT_SIZES[want][0]:
        return QT.F16
    return want


def _tokenizer(tokenizer_model: Path, vocab_size: int) -> tuple[list, SpecialTokens, bool]:
    """(pieces as (text, score, type), reserved ids, add_dummy_prefix) for vocab_size tokens."""
    proto = read_model_proto(tokenizer_model)
    if proto.trainer_spec.model_type != BPE:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(proto.trainer_spec.model_type, "non-BPE")
        raise UserError(
            f"{tokenizer_model} is a SentencePiece {kind} model, which llama.cpp cannot tokenize "
            "as SentencePiece does (a GGUF of it would read text prompts as other tokens): train "
            "a BPE tokenizer (`tokenizer.type: bpe`, the default) and the model on it, or export "
            "formats other than gguf-*"
        )
    norm = proto.normalizer_spec
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        raise UserError(
            f"{tokenizer_model} normalizes text ({norm.name}), which llama.cpp's SentencePiece "
            "tokenizer does not: train it with domainlm's tokenizer stage (identity normalization)"
        )
    ids = SpecialTokens.from_model(
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    )
    if vocab_size < len(proto.pieces):
        raise UserError(
            f"{tokenizer_model} has {len(proto.pieces)} pieces but the model's vocab_size is "
            f"{vocab_size}: export with the tokenizer the model was trained with"
        )
    # SentencePiece's piece types are GGUF's token types, number for number.
    pieces = [(p.piece, float(p.score), gguf.TokenType(p.type)) for p in proto.pieces]
    # A vocabulary rounded up past the tokenizer gets fillers, as llama.cpp's converter writes
    # them: llama.cpp wants one token per embedding row.
    pieces += [
        (f"[PAD{i}]", PAD_SCORE, gguf.TokenType.UNUSED)
        for i in range(1, vocab_size - len(pieces) + 1)
    ]
    return pieces, ids, bool(norm.add_dummy_prefix)


def write_gguf(
    model: Llama,
    tokenizer_model: Path,
    out_file: Path,
    qtype: str,
    chat_template: str | None = None,
    name: str = "domainlm",
) -> Path:
    """Write model and tokenizer as one GGUF file of type qtype (F16, BF16, Q8_0 or Q4_0).

    chat_template is the Jinja template the model was fine-tuned with (None: the built-in
    `chat`, which fine-tuning uses by default). The file is written under a temporary name and
    renamed into place. Returns out_file.
    """
    if qtype not in QTYPES:
        raise UserError(f"GGUF type {qtype!r} is not supported; use one of {', '.join(QTYPES)}")
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model exports its original
    config, out_file = model.config, Path(out_file)
    pieces, ids, dummy_prefix = _tokenizer(Path(tokenizer_model), config.vocab_size)

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    w.add_name(name)
    w.add_file_type(QTYPES[qtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(config.vocab_size)
    w.add_context_length(config.max_seq_len)
    w.add_embedding_length(config.d_model)
    w.add_block_count(config.n_layers)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(float(config.rope_theta))
    w.add_layer_norm_rms_eps(float(config.norm_eps))

    w.add_tokenizer_model("llama")  # llama.cpp's SentencePiece tokenizer (no pre-tokenizer)
    w.add_token_list([p[0] for p in pieces])
    w.add_token_scores([p[1] for p in pieces])
    w.add_token_types([p[2] for p in pieces])
    # Documents were trained after </s>: it is the start token (see the module docstring).
    w.add_bos_token_id(DOCUMENT_START_ID)
    w.add_eos_token_id(ids.eos_id)
    w.add_unk_token_id(ids.unk_id)
    w.add_pad_token_id(ids.pad_id)
    # Prompts are fed as they are (llama.cpp's defaults for a "llama" tokenizer are a BOS and a
    # space prefix; domainlm's SentencePiece adds neither), so all three are spelt out.
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(dummy_prefix)
    w.add_remove_extra_whitespaces(False)
    w.add_chat_template(chat_template if chat_template is not None else
                        load_template("chat").source)

    names = _name_map(config.n_layers)
    tied = config.tie_embeddings
    for key, value in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd as the output when output.weight is absent
        t = value.detach().to(device="cpu", dtype=torch.float32)
        if key.endswith("self_attn.q_proj.weight"):
            t = permute_rope(t, config.n_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            t = permute_rope(t, config.n_kv_heads)
        gname = names[key]
        ggml_type = tensor_type(gname, tuple(t.shape), qtype, tied)
        data = gguf.quants.quantize(t.contiguous().numpy(), ggml_type)
        quantized = ggml_type not in (QT.F32, QT.F16)  # stored as bytes, the type given
        w.add_tensor(gname, data, raw_dtype=ggml_type if quantized else None)

    with atomic_path(out_file) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return out_file


# ------------------------------------------------------------------------------------ reading


def _field(reader: gguf.GGUFReader, key: str, path: Path):
    field = reader.fields.get(key)
    if field is None:
        raise UserError(f"{path} lacks the GGUF key {key!r}; write it with domainlm's write_gguf")
    return field.contents()


def _float32(value: float) -> float:
    # GGUF stores these as float32; the shortest text that round-trips float32 (1e-05) gives
    # back the value that was written, not 9.99999974738e-06.
    return float(str(np.float32(value)))


def read_gguf_model(path: Path) -> Llama:
    """Our Llama (fp32, eval mode) from a GGUF file of a Llama: dequantized, RoPE rows undone."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: write it with write_gguf first")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture", path)
    if arch != ARCH:
        raise UserError(f"{path} holds a {arch!r} model; only {ARCH!r} models can be read back")
    tensors = {t.name: t for t in reader.tensors}

    def key(suffix: str):
        return _field(reader, f"{ARCH}.{suffix}", path)

    embd = tensors.get(TOKEN_EMBD)
    if embd is None:
        raise UserError(f"{path} has no {TOKEN_EMBD} tensor")
    config = LlamaConfig(
        vocab_size=int(embd.shape[1]),  # GGML lists dimensions innermost first
        n_layers=int(key("block_count")),
        d_model=int(key("embedding_length")),
        n_heads=int(key("attention.head_count")),
        n_kv_heads=int(key("attention.head_count_kv")),
        ffn_dim=int(key("feed_forward_length")),
        max_seq_len=int(key("context_length")),
        tie_embeddings=OUTPUT not in tensors,
        rope_theta=_float32(key("rope.freq_base")),
        norm_eps=_float32(key("attention.layer_norm_rms_epsilon")),
    )

    names = _name_map(config.n_layers)
    state = {}
    for ours, gname in names.items():
        if gname not in tensors:
            if config.tie_embeddings and ours == "lm_head.weight":
                continue
            raise UserError(f"{path} lacks the tensor {gname} that its metadata implies")
        t = tensors[gname]
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        value = torch.from_numpy(np.array(data, dtype=np.float32))
        if ours.endswith("self_attn.q_proj.weight"):
            value = unpermute_rope(value, config.n_heads)
        elif ours.endswith("self_attn.k_proj.weight"):
            value = unpermute_rope(value, config.n_kv_heads)
        state[ours] = value
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    # Built on the meta device and then allocated, as load_hf_folder does: no random init.
    with torch.device("meta"):
        model = Llama(config)
    model = model.to_empty(device="cpu")
    if config.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = model.state_dict()
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise UserError(
                f"{path}: {names[k]} has shape {tuple(v.shape)}, expected "
                f"{tuple(expected[k].shape)} from the file's metadata"
            )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model.eval()
