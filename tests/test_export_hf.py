"""The Hugging Face export: transformers loads our folder and agrees with us, token for token."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import transformers
from builders import small_config
from safetensors import safe_open
from safetensors.torch import save_file
from textgen import document

from domainlm.errors import UserError
from domainlm.model.hf import load_hf_folder, save_hf_folder
from domainlm.model.llama import Llama
from domainlm.recipe import TokenizerConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer import special
from domainlm.tokenizer.hf_files import write_tokenizer_files
from domainlm.tokenizer.train import trainer_options

VOCAB = 512
CHAT = special.chat_token_ids(special.DEFAULT_CHAT_TOKENS)
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CASES = [
    "The market rose 3% in the second quarter, analysts said.",
    "def f(x):\n    if x > 0:\n\treturn [1, 2]\n\n    # done\n        return None\n",
    "First paragraph.\n\nSecond paragraph.\n\n\nAfter three newlines.\n\n\n\nfour",
    "a  b   c    d     e      f",
    "12345 and 3.14, 007, 2024-01-31",
    "café naïve résumé — 中文 and emoji 😀🚀",
    "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
    "x<|user|>y<|end|><|end|>",
    "  leading and trailing  ",
    " ",
    "\n",
    "\t\tx\t",
    "",
    "a ▁ literal lower-eighth block",
]


def training_lines(seed: int = 0) -> list[str]:
    """A few hundred lines of prose, code, numbers and unicode (SentencePiece trains on lines)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for i in range(80):
        lines += document(rng, 60).split("\n")
        n, r = rng.randint(0, 99999), rng.random()
        lines += [
            f"def step_{i}(x, y=None):",
            f"    if x < {n} and y > {r:.3f}:",
            f"\treturn x / {i + 1} <= y  # note {i}",
            f"    return [x, y, 0x{n:04X}, '<p>{n}</p>']",
            f"Prix {n} € — café naïve résumé, élève {i}; 中文 {i} Ω",
        ]
    return [line for line in lines if line]


def train_sentencepiece(folder: Path, kind: str) -> Path:
    """A tiny tokenizer trained with exactly the stage's options (domainlm.tokenizer.train)."""
    options = trainer_options(TokenizerConfig(type=kind), VOCAB, threads=1)
    writer = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()), model_writer=writer, **options
    )
    path = folder / f"{kind}.model"
    path.write_bytes(writer.getvalue())
    return path


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("spm")
    return {kind: train_sentencepiece(folder, kind) for kind in ("unigram", "bpe")}


@pytest.fixture(scope="module")
def hf_tokenizers(sp_models, tmp_path_factory) -> dict[str, tuple]:
    """(SentencePieceProcessor, transformers tokenizer, folder) per model type."""
    out = {}
    for kind, model in sp_models.items():
        folder = tmp_path_factory.mktemp(f"hf-{kind}")
        write_tokenizer_files(model, folder, chat_template=TEMPLATE, model_max_length=4096)
        sp = spm.SentencePieceProcessor(model_file=str(model))
        out[kind] = (sp, transformers.AutoTokenizer.from_pretrained(folder), folder)
    return out


def random_texts(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcdefxyzABC0123456789 .,:;()[]<>/|_-+*=\"'\n\t éè中文😀€▁") + [
        "the ",
        "market ",
        "return ",
        "    ",
        "\n\n",
        *CHAT,
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 50))) for _ in range(n)]


def tie_reordering_only(sp, text: str, ours: list[int], theirs: list[int]) -> bool:
    """True when two encodings differ only by the order of pieces within runs of one character.

    The one difference left between tokenizer.json's unigram model and SentencePiece: a run
    of one repeated character ("▁▁▁▁▁", "-----") that the same pieces spell in different
    orders scores exactly the same either way; SentencePiece breaks such ties by float32
    rounding, which depends on all the text before, tokenizers adds in float64.
    """
    normalized = text.replace(" ", "▁").encode()

    def spelled(i: int) -> bytes:
        piece = sp.id_to_piece(i)
        return bytes([int(piece[3:5], 16)]) if sp.is_byte(i) else piece.encode()

    def cuts(ids: list[int]) -> list[int]:
        out = [0]
        for i in ids:
            out.append(out[-1] + len(spelled(i)))
        return out

    for ids in (ours, theirs):
        if b"".join(spelled(i) for i in ids) != normalized:
            return False
    a, b = cuts(ours), cuts(theirs)
    common = sorted(set(a) & set(b))
    for start, end in zip(common, common[1:], strict=False):
        chunk_a = ours[a.index(start) : a.index(end)]
        chunk_b = theirs[b.index(start) : b.index(end)]
        if chunk_a == chunk_b:
            continue
        chars = set(normalized[start:end].decode())
        if len(chars) != 1 or sorted(chunk_a) != sorted(chunk_b):
            return False
    return True


# ------------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_tokenizer_json_encodes_and_decodes_as_sentencepiece(hf_tokenizers, kind):
    sp, tok, _ = hf_tokenizers[kind]
    assert sp.get_piece_size() == VOCAB and len(tok) == VOCAB
    reordered = 0
    for text in CASES + random_texts(400):
        ids = tok.encode(text, add_special_tokens=False)
        want = sp.encode(text)
        if ids != want:
            # Only unigram ties can differ (see tie_reordering_only), and never in CASES.
            assert kind == "unigram" and text not in CASES, (text, tok.convert_ids_to_tokens(ids))
            assert tie_reordering_only(sp, text, want, ids), (text, tok.convert_ids_to_tokens(ids))
            reordered += 1
        assert tok.decode(ids) == sp.decode(ids)
        if "▁" not in text:  # SentencePiece itself decodes a literal "▁" as a space
            assert tok.decode(ids) == text
    assert reordered <= 10  # 3 of these 414 texts, which are full of space runs
    # Every chat piece is one token at its reserved id; whitespace pieces too.
    for piece, i in CHAT.items():
        assert tok.encode(piece, add_special_tokens=False) == [i]
    assert tok.encode("\n\n\n", add_special_tokens=False) == sp.encode("\n\n\n")
    assert len(sp.encode("\n\n\n")) == 2
    # Nothing is added around a text: pretraining documents had no <s>.
    assert tok.encode("the market") == sp.encode("the market")
    # Digits are single pieces (split_digits) in both.
    assert tok.tokenize("12345") == ["1", "2", "3", "4", "5"]


def test_tie_check_accepts_only_reordered_runs(hf_tokenizers):
    sp, _, _ = hf_tokenizers["unigram"]
    e, t, one, four = (sp.piece_to_id(p) for p in ("e", "t", "▁", "▁▁▁▁"))
    text = "e     t"
    assert tie_reordering_only(sp, text, [e, one, four, t], [e, four, one, t])
    assert not tie_reordering_only(sp, text, [e, one, four, t], [e, one, one, one, one, one, t])
    assert not tie_reordering_only(sp, text, [e, one, four, t], [t, one, four, e])
    assert not tie_reordering_only(sp, "e     tt", [e, one, four, t], [e, four, one, t])


@pytest.mark.parametrize("kind", ["unigram", "bpe"])
def test_literal_control_pieces_are_special_unless_split(hf_tokenizers, kind):
    sp, tok, folder = hf_tokenizers[kind]
    text = "a <s> b </s> <pad> <unk> <0x41>"
    # transformers' convention: a special token's text is that token.
    ids = tok.encode(text, add_special_tokens=False)
    for i in (special.UNK_ID, special.BOS_ID, special.EOS_ID, special.PAD_ID):
        assert ids.count(i) == 1 and i not in sp.encode(text)
    # SentencePiece spells them out, as the tokenizer does with split_special_tokens.
    split = transformers.AutoTokenizer.from_pretrained(folder, split_special_tokens=True)
    assert split.encode(text, add_special_tokens=False) == sp.encode(text)
    chat = "<|user|>\nhi<|end|>"
    if kind == "unigram":  # the unigram model scores chat pieces itself, as SentencePiece does
        assert split.encode(chat, add_special_tokens=False) == sp.encode(chat)
    else:  # BPE knows them only as special tokens, which split_special_tokens spells out
        assert split.encode(chat, add_special_tokens=False) != sp.encode(chat)


def test_decode_skips_control_and_chat_pieces_but_keeps_whitespace(hf_tokenizers):
    sp, tok, _ = hf_tokenizers["unigram"]
    ids = [special.BOS_ID, *sp.encode("<|user|>\nhi\n\n\tthere<|end|>"), special.EOS_ID]
    assert tok.decode(ids, skip_special_tokens=True) == "\nhi\n\n\tthere"
    assert tok.decode(ids) == "<s><|user|>\nhi\n\n\tthere<|end|></s>"


def test_tokenizer_config_and_chat_template(hf_tokenizers):
    sp, tok, folder = hf_tokenizers["unigram"]
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert config["add_bos_token"] is False and config["add_eos_token"] is False
    assert config["model_max_length"] == 4096 and tok.model_max_length == 4096
    decoder = config["added_tokens_decoder"]
    assert decoder[str(special.BOS_ID)]["content"] == "<s>" and decoder["1"]["special"] is True
    assert {decoder[str(i)]["content"] for i in CHAT.values()} == set(CHAT)
    assert (folder / "tokenizer.model").read_bytes() == sp.serialized_model_proto()
    # bos is what precedes a document in training: eos (special.DOCUMENT_START_ID).
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (2, 2, 3, 0)
    assert set(tok.all_special_tokens) >= {"</s>", "<pad>", "<unk>", *CHAT}  # <s>: added, above

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 42"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = "<|system|>\nBe brief.<|end|>\n<|user|>\nHi 42<|end|>\n<|assistant|>\n"
    assert text == want
    ids = tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(ids) == sp.encode(want)
    newline = special.expected_ids(special.DEFAULT_CHAT_TOKENS)["\n"]
    assert ids[0] == CHAT["<|system|>"] and ids[-2:] == [CHAT["<|assistant|>"], newline]


def test_tokenizer_without_chat_template_has_none(sp_models, tmp_path):
    write_tokenizer_files(sp_models["unigram"], tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    assert json.loads((tmp_path / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_tokenizer_json_pipeline(hf_tokenizers):
    spec = json.loads((hf_tokenizers["unigram"][2] / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "Unigram" and spec["model"]["byte_fallback"] is True
    assert spec["model"]["unk_id"] == special.UNK_ID
    assert spec["normalizer"] == {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    assert spec["pre_tokenizer"] is None and spec["post_processor"] is None
    assert [d["type"] for d in spec["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse"]
    added = {t["id"]: (t["content"], t["special"]) for t in spec["added_tokens"]}
    assert added == {i: (p, True) for p, i in {**special.CONTROL_PIECES, **CHAT}.items()}
    bpe = json.loads((hf_tokenizers["bpe"][2] / "tokenizer.json").read_text())
    assert bpe["model"]["type"] == "BPE" and bpe["model"]["merges"]


def test_sentencepiece_settings_it_cannot_reproduce_are_refused(tmp_path):
    options = trainer_options(TokenizerConfig(), 400, threads=1)
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_lines()[:300]),
        model_writer=writer,
        **{**options, "add_dummy_prefix": True},
    )
    (tmp_path / "prefix.model").write_bytes(writer.getvalue())
    with pytest.raises(UserError, match="add_dummy_prefix must be false"):
        write_tokenizer_files(tmp_path / "prefix.model", tmp_path / "out")


def test_missing_or_foreign_tokenizer_model_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope.model is missing"):
        write_tokenizer_files(tmp_path / "nope.model", tmp_path / "out")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\xff\xff not a proto")
    with pytest.raises(UserError, match="bad.model is not a SentencePiece model"):
        write_tokenizer_files(bad, tmp_path / "out")


# ----------------------------------------------------------------------------------- model


def tiny_model(tied: bool, seed: int = 0) -> Llama:
    """Grouped-query attention (4 query heads, 2 key/value heads); every weight randomised,
    norm gains included, so a tensor that is not carried over changes the logits."""
    torch.manual_seed(seed)
    config = small_config(
        vocab_size=VOCAB, max_seq_len=32, tie_embeddings=tied, rope_theta=50000.0, norm_eps=1e-6
    )
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def exported(sp_models, tmp_path_factory) -> dict[str, tuple[Llama, Path]]:
    out = {}
    for name, tied in (("tied", True), ("untied", False)):
        model = tiny_model(tied)
        folder = tmp_path_factory.mktemp(name) / "hf"
        assert save_hf_folder(model, sp_models["unigram"], folder, chat_template=TEMPLATE) == folder
        out[name] = (model, folder)
    return out


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_transformers_gives_our_logits(exported, name):
    model, folder = exported[name]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, model.config.max_seq_len))
    with torch.no_grad():
        ours = model(idx)[0]
        expected = theirs(input_ids=idx).logits
    assert ours.shape == expected.shape == (2, 32, VOCAB)
    assert (ours - expected).abs().max().item() <= 1e-4
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) is (name == "untied")
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_load_hf_folder_round_trips(exported, name):
    model, folder = exported[name]
    loaded = load_hf_folder(folder)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert tied is (name == "tied")
    idx = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_config_and_generation_config(exported):
    _, folder = exported["tied"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 2, 3)
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert config["num_key_value_heads"] == 2 and config["tie_word_embeddings"] is True
    # config.json says llama; the tokenizer must still be tokenizer.json as written.
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert all(tok.encode(t, add_special_tokens=False) == sp.encode(t) for t in CASES)
    assert tok.chat_template == TEMPLATE and tok.model_max_length == 32
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (2, 2, 3)
    assert "max_length" not in json.loads((folder / "generation_config.json").read_text())
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }


def test_transformers_generate_does_not_warn(exported):
    """generation_config.json sets nothing that makes generate warn, whichever length the
    caller gives (a max_length there warned on every max_new_tokens call)."""
    import logging
    import warnings

    _, folder = exported["untied"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = torch.tensor([[5, 6, 7]])
    logger = transformers.utils.logging.get_logger("transformers")
    for kwargs in ({"max_new_tokens": 4}, {"max_length": 8}, {"max_new_tokens": 3,
                                                              "do_sample": True}):
        log = io.StringIO()
        handler = logging.StreamHandler(log)
        logger.addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                theirs.generate(idx, **kwargs)
        finally:
            logger.removeHandler(handler)
        assert [str(w.message) for w in caught] == [] and log.getvalue() == "", kwargs


def test_every_folder_carries_a_chat_template(sp_models, tmp_path):
    """A folder saved without a template (the base model's) still has one for apply_chat_template:
    the built-in chat template, which the adapters served on it were trained with."""
    from domainlm.tokenizer.templates import CHAT as BUILTIN_CHAT

    folder = save_hf_folder(tiny_model(tied=True), sp_models["unigram"], tmp_path / "base")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == BUILTIN_CHAT
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>\nHi<|end|>\n<|assistant|>\n"


def test_lm_eval_hf_backend_scores_a_text_as_we_do(exported, sp_models):
    """lm-eval's `hf` backend starts a text with the tokenizer's bos for rolling perplexity; the
    folder's bos is eos, the token every training document follows, so its log-likelihood of
    a text equals ours (the text read right after eos)."""
    import numpy as np
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from domainlm.model.evaluate import evaluate_stream

    model, folder = exported["untied"]
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1, dtype="float32")
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    text = "The ledger balances at the end of the quarter."
    ids = sp.encode(text)
    assert len(ids) < model.config.max_seq_len  # one window: the same context both ways
    request = Instance("loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    (theirs,) = lm.loglikelihood_rolling([request])
    ours = evaluate_stream(model, np.array([special.DOCUMENT_START_ID, *ids]),
                           model.config.max_seq_len)
    assert ours.tokens == len(ids)
    assert theirs == pytest.approx(-ours.nats, abs=1e-3)


def test_bf16_export_and_generation_entries(sp_models, tmp_path):
    model = tiny_model(tied=False)
    folder = save_hf_folder(
        model,
        sp_models["unigram"],
        tmp_path / "hf",
        dtype="bfloat16",
        generation={"eos_token_id": [2, CHAT["<|end|>"]], "temperature": 0.7, "do_sample": True},
    )
    config = json.loads((folder / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    state = model.state_dict()
    assert all(torch.equal(t, state[k].to(torch.bfloat16)) for k, t in tensors.items())
    assert set(tensors) == set(state)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, CHAT["<|end|>"]] and generation["temperature"] == 0.7

    loaded = load_hf_folder(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert theirs.dtype == torch.bfloat16


def test_export_replaces_the_folder_atomically(sp_models, exported, tmp_path):
    model, _ = exported["tied"]
    out = tmp_path / "hf"
    save_hf_folder(model, sp_models["unigram"], out)
    (out / "stale.txt").write_text("from an older export")
    save_hf_folder(model, sp_models["bpe"], out, dtype="float16")
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert (out / "tokenizer.model").read_bytes() == sp_models["bpe"].read_bytes()
    # A failed export leaves the previous folder whole, and no temporary folder beside it.
    with pytest.raises(UserError, match="missing.model is missing"):
        save_hf_folder(model, tmp_path / "missing.model", out)
    with pytest.raises(UserError, match="dtype 'int8' is not supported"):
        save_hf_folder(model, sp_models["unigram"], out, dtype="int8")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_vocab_smaller_than_the_tokenizer_is_refused(sp_models, tmp_path):
    torch.manual_seed(0)
    small = Llama(
        LlamaConfig(vocab_size=100, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=64)
    )
    with pytest.raises(UserError, match="has 512 pieces but the model's vocab_size is 100"):
        save_hf_folder(small, sp_models["unigram"], tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def copy_folder(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_load_errors_name_the_file_and_the_fix(exported, tmp_path):
    _, folder = exported["untied"]
    with pytest.raises(UserError, match=r"nowhere/config\.json is missing"):
        load_hf_folder(tmp_path / "nowhere")

    no_weights = copy_folder(folder, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no-weights/model\.safetensors is missing"):
        load_hf_folder(no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="never unpickles"):
        load_hf_folder(no_weights)

    wrong_shape = copy_folder(folder, tmp_path / "wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["intermediate_size"] = 128
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UserError,
        match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.gate_proj\.weight has "
        r"shape \(96, 64\), but .*config\.json implies \(128, 64\)",
    ):
        load_hf_folder(wrong_shape)

    untied_missing_head = copy_folder(folder, tmp_path / "no-head")
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "lm_head.weight"}
    save_file(tensors, str(untied_missing_head / "model.safetensors"))
    with pytest.raises(UserError, match=r"lacks tensors \['lm_head\.weight'\]"):
        load_hf_folder(untied_missing_head)
