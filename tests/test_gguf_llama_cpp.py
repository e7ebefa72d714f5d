"""The GGUF export in llama.cpp itself (llama-cpp-python), fed text as its users feed it.

For every tokenizer type the recipe can train: a BPE model's GGUF makes llama.cpp turn text into
SentencePiece's ids (unicode, digits, whitespace runs, byte fallback, chat pieces, empty text),
carries the chat template and the start/end ids training used, and continues a text prompt and
a chat conversation (through the template embedded in the file) with our greedy tokens; a
unigram model, which llama.cpp cannot tokenize as SentencePiece does, is refused with the fix.
"""

from __future__ import annotations

import random
from pathlib import Path

import llama_cpp
import pytest
import sentencepiece as spm
import torch
from builders import grammar_corpus, sentencepiece_model, small_config
from test_gguf import train_model
from textgen import document

from domainlm.errors import UserError
from domainlm.model.decode import SamplingParams, complete
from domainlm.model.gguf import write_gguf
from domainlm.model.llama import Llama
from domainlm.tokenizer import special
from domainlm.tokenizer.templates import load_template

pytestmark = pytest.mark.slow  # trains tokenizers and a small model, runs llama.cpp

FIXED = [
    "",
    " ",
    "   ",
    "Return the absolute value of x.",
    "x = 1234567 + 89.5e-3\n\n\tdef f():\n    return  None  ",
    "héllo wörld ünïcödé — ∑∫ 日本語のテキスト 🙂🚀",
    "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "   leading and trailing   ",
    "a\n\n\nb\t\tc\n\n\n\n",
    "ÆØÅ ß ĳ ﬁ Ω Å",
    "\u00a0nbsp\u2003em\u200b",
    "CamelCaseIdentifier_with_underscores2024",
    "tab\tseparated\tvalues\n1\t2\t3",
]
ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:()[]{}_-=+*/\\'\"\n\t") + list(
    "éüßøçñ€→∀中文한국어🙂"
)


def varied_texts(n: int = 200, seed: int = 0) -> list[str]:
    """FIXED, English-like documents, and random strings over words, digits, whitespace runs
    and characters the tokenizer never saw (byte fallback)."""
    rng = random.Random(seed)
    out = list(FIXED)
    for i in range(n):
        if i % 2:
            out.append(document(rng, rng.randint(5, 60)))
        else:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80))))
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok")
    return {kind: sentencepiece_model(root / kind, model_type=kind) for kind in ("bpe", "unigram")}


@pytest.fixture(scope="module")
def grammar_tok(tmp_path_factory) -> Path:
    """A BPE tokenizer of the grammar's words, so that the trained model's text is peaked."""
    train, _ = grammar_corpus(docs=60)
    lines = [line for r in train for line in r["text"].split("\n") if line]
    return sentencepiece_model(tmp_path_factory.mktemp("gtok"), lines=lines)


@pytest.fixture(scope="module")
def trained(grammar_tok, tmp_path_factory) -> tuple[Llama, spm.SentencePieceProcessor, Path]:
    """A small model trained on the grammar (peaked predictions), and its F16 GGUF."""
    sp = spm.SentencePieceProcessor(model_file=str(grammar_tok))
    train, _ = grammar_corpus(docs=60)
    ids = torch.tensor([i for r in train for i in [*sp.encode(r["text"]), special.EOS_ID]])
    model = train_model(sp, ids, tied=False, steps=120)
    path = write_gguf(model, grammar_tok, tmp_path_factory.mktemp("g") / "m-F16.gguf", "F16")
    return model, sp, path


def vocab_only(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_unigram_tokenizer_is_refused_with_the_fix(tokenizers, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizers["unigram"]))
    model = Llama(small_config(vocab_size=sp.get_piece_size()))
    with pytest.raises(UserError, match=r"unigram.*tokenizer\.type: bpe"):
        write_gguf(model, tokenizers["unigram"], tmp_path / "u.gguf", "F16")
    assert not (tmp_path / "u.gguf").exists()


def test_llama_cpp_tokenizes_text_as_sentencepiece(tokenizers, tmp_path):
    tok = tokenizers["bpe"]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    model = Llama(small_config(vocab_size=sp.get_piece_size()))
    llm = vocab_only(write_gguf(model, tok, tmp_path / "b.gguf", "F16"))
    texts = varied_texts()
    assert any(sp.is_byte(i) for t in texts for i in sp.encode(t))  # byte fallback exercised
    # As llama-cpp-python tokenizes every prompt: special tokens parsed, a BOS if the file asks.
    wrong = [(t, sp.encode(t), llm.tokenize(t.encode(), add_bos=True, special=True))
             for t in texts]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert not wrong, f"{len(wrong)} of {len(texts)} texts differ, e.g. {wrong[0]}"
    for t in texts:  # and back to the same text ("<|end|>" is a control token to llama.cpp)
        assert llm.detokenize(sp.encode(t), special=True).decode("utf-8") == t


def test_llama_cpp_reads_the_template_and_ids_training_used(tokenizers, tmp_path):
    tok = tokenizers["bpe"]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    model = Llama(small_config(vocab_size=sp.get_piece_size()))
    alpaca = load_template("alpaca").source
    for template, want in [(None, load_template("chat").source), (alpaca, alpaca)]:
        llm = vocab_only(write_gguf(model, tok, tmp_path / "m.gguf", "F16", template))
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == want
        # Documents were trained after </s>; prompts go in as they are, nothing added.
        assert (llm.token_bos(), llm.token_eos()) == (special.EOS_ID, special.EOS_ID)
        assert meta["tokenizer.ggml.padding_token_id"] == str(special.PAD_ID)
        assert meta["tokenizer.ggml.add_bos_token"] == "false"
        assert meta["tokenizer.ggml.add_eos_token"] == "false"
        assert llm.tokenize(b"Return the", add_bos=True) == sp.encode("Return the")
        del llm


def test_greedy_continuation_of_a_text_prompt_equals_ours(trained):
    model, sp, path = trained
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, verbose=False,
                          n_threads=1)
    for prompt in ["The quarterly ledger", "The annual bond closes the"]:
        ours = complete(model, sp, sp.encode(prompt), SamplingParams(max_new_tokens=20))
        theirs = llm.create_completion(prompt, max_tokens=20, temperature=0.0,
                                       repeat_penalty=1.0)
        assert theirs["choices"][0]["text"] == ours.text
        assert theirs["usage"]["prompt_tokens"] == ours.prompt_tokens
        assert theirs["usage"]["completion_tokens"] == ours.completion_tokens
        assert len(set(sp.encode(ours.text))) > 1  # a continuation, not one token repeated


def test_chat_through_the_embedded_template_equals_ours(trained):
    model, sp, path = trained
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.max_seq_len, verbose=False,
                          n_threads=1)
    template = load_template("chat")
    messages = [{"role": "user", "content": "The final invoice"}]
    prompt = template.render(messages, add_generation_prompt=True)
    ours = complete(model, sp, sp.encode(prompt),
                    SamplingParams(max_new_tokens=12, stop=[template.stop]))
    theirs = llm.create_chat_completion(messages, max_tokens=12, temperature=0.0,
                                        repeat_penalty=1.0)
    assert theirs["choices"][0]["message"]["content"] == ours.text
    assert theirs["usage"]["prompt_tokens"] == len(sp.encode(prompt))
