"""make eval's first pieces: loading any exported model, per-source perplexity and bits per
byte, and few-shot classification by label likelihood."""

from __future__ import annotations

import copy
import math
import random

import pytest
import sentencepiece as spm
import sklearn.metrics as sklearn
import torch
import torch.nn.functional as F
from builders import (
    grammar_corpus,
    logits_of,
    random_tokens,
    row,
    sentencepiece_model,
    small_config,
    tiny_model,
    tiny_run,
)
from torch import nn

from domainlm.errors import UserError
from domainlm.eval.fewshot import classify, continuation_ids, label_logprob, macro_f1
from domainlm.eval.perplexity import perplexity_by_source
from domainlm.model.compressed import save_quantized
from domainlm.model.gguf import write_gguf
from domainlm.model.hf import save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.load import load_model
from domainlm.model.peft import add_lora, prepare, save, save_lora
from domainlm.model.quantized import quantize_model
from domainlm.recipe.finetune import (
    AdapterConfig,
    FinetuneConfig,
    LoRAConfig,
    PromptTuningConfig,
)
from domainlm.tokenizer.special import EOS_ID

# ------------------------------------------------------------------------------ load_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = sentencepiece_model(root / "tok")
    model = tiny_model(seed=3)
    return root, tok, model, save_hf_folder(model, tok, root / "hf")


def test_load_model_hf_folder_is_exact(exported):
    _, _, model, hf = exported
    idx = random_tokens()
    assert torch.equal(logits_of(load_model(hf), idx), logits_of(model, idx))


def test_load_model_quantized_folder(exported):
    root, tok, model, _ = exported
    folder = save_quantized(copy.deepcopy(model), root / "q8", tok, bits=8)
    idx = random_tokens()
    loaded = logits_of(load_model(folder), idx)
    torch.testing.assert_close(loaded, logits_of(quantize_model(model, 8), idx))
    assert (loaded - logits_of(model, idx)).abs().max() < 0.05


def test_load_model_gguf_f16(exported):
    root, tok, model, _ = exported
    path = write_gguf(model, tok, root / "m.gguf", "F16")
    idx = random_tokens()
    torch.testing.assert_close(
        logits_of(load_model(path), idx), logits_of(model, idx), atol=1e-2, rtol=0
    )


def test_load_model_lora_folder_on_its_base(exported):
    root, _, model, hf = exported
    tuned = copy.deepcopy(model)
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    add_lora(tuned, cfg)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # B starts at zero: make the adapter change the logits
    tuned.eval()
    folder = save_lora(tuned, "default", root / "lora", cfg, base_model=str(hf))
    idx = random_tokens()
    want = logits_of(tuned, idx)
    assert not torch.allclose(want, logits_of(model, idx))
    torch.testing.assert_close(logits_of(load_model(folder), idx), want)
    # An explicit base (path or module) wins over base_model_name_or_path.
    torch.testing.assert_close(logits_of(load_model(folder, base=model), idx), want)
    nameless = save_lora(tuned, "default", root / "lora2", cfg, base_model=None)
    with pytest.raises(UserError, match="base_model_name_or_path"):
        load_model(nameless)
    torch.testing.assert_close(logits_of(load_model(nameless, base=hf), idx), want)


@pytest.mark.parametrize("method", ["prompt", "adapter"])
def test_load_model_prompt_and_bottleneck_folders(exported, method):
    root, tok, model, hf = exported
    ft = FinetuneConfig(
        adapter=AdapterConfig(bottleneck=8, where=["attention", "mlp"]),
        prompt=PromptTuningConfig(virtual_tokens=5),
    )
    module, _ = prepare(copy.deepcopy(model), method, ft)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))  # a fresh adapter changes nothing
    module.eval()
    folder = save(module, method, root / method, ft, str(hf), tok)
    idx = random_tokens()
    want = logits_of(module, idx)
    assert not torch.allclose(want, logits_of(model, idx))
    # The bottleneck folder names no base: it comes from base=.
    loaded = load_model(folder, base=hf if method == "adapter" else None)
    torch.testing.assert_close(logits_of(loaded, idx), want)


def test_load_model_rejects_other_things(tmp_path):
    with pytest.raises(UserError, match="does not exist.*expected"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither config.json nor adapter_config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a .gguf"):
        load_model(tmp_path / "weights.bin")


# ------------------------------------------------------------------------------ perplexity


class Unigram(nn.Module):
    """Logits that ignore the context: each target's loss is fixed, however windows fall."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, idx, targets=None):
        return self.bias.expand(*idx.shape, -1), None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    train, _ = grammar_corpus()
    rng = random.Random(1)
    val = [
        row(f"The ledger {rng.randint(1, 99)} closes on day {i}. " * (1 + i % 3), "news", f"n:{i}")
        for i in range(4)
    ]
    val += [row(f"def f{i}(x):\n    return x * {i}\n", "code", f"c:{i}") for i in range(3)]
    tiny_run(root, corpus=(train, val), vocab_size=320)
    build = root / "build" / "tiny"
    return build / "tokenizer" / "tokenizer.model", build / "corpus", val


def _hand(model, sp, texts, seq_len):
    """Sum of the model's own mean losses x targets over windows of the concatenated source."""
    ids = [EOS_ID] + [t for doc in sp.encode(texts) for t in doc + [EOS_ID]]
    nats = 0.0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, seq_len):
            w = torch.tensor([ids[a : a + seq_len + 1]])
            logits = model(w[:, :-1])[0]
            nats += float(F.cross_entropy(logits[0], w[0, 1:], reduction="sum"))
    return len(ids) - 1, nats


def test_perplexity_by_source_matches_a_hand_computation(run):
    tok, corpus, val = run
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    torch.manual_seed(0)
    model = Llama(small_config(vocab_size=sp.get_piece_size())).eval()
    seq_len = 13
    got = perplexity_by_source(model, tok, corpus, seq_len, micro_batch=3)
    assert set(got["sources"]) == {"news", "code"}
    total_tokens = total_nats = total_bytes = 0
    for source, stats in got["sources"].items():
        texts = [r["text"] for r in val if r["source"] == source]
        tokens, nats = _hand(model, sp, texts, seq_len)
        partial = tokens % seq_len != 0  # a partial last window exists and is scored
        assert partial
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        assert stats["tokens"] == tokens == sum(len(d) + 1 for d in sp.encode(texts))
        assert stats["bytes"] == n_bytes and stats["documents"] == len(texts)
        assert stats["nats"] == pytest.approx(nats, rel=1e-5)
        assert stats["ppl"] == pytest.approx(math.exp(nats / tokens), rel=1e-5)
        assert stats["bits_per_byte"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
        total_tokens, total_nats, total_bytes = (
            total_tokens + tokens,
            total_nats + nats,
            total_bytes + n_bytes,
        )
    overall = got["overall"]
    assert overall["tokens"] == total_tokens and overall["bytes"] == total_bytes
    assert overall["bits_per_byte"] == pytest.approx(
        total_nats / math.log(2) / total_bytes, rel=1e-5
    )


def test_every_token_is_scored_once_whatever_the_window(run):
    tok, corpus, val = run
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    model = Unigram(sp.get_piece_size())
    logp = F.log_softmax(model.bias.detach(), -1)
    for source in ("news", "code"):
        texts = [r["text"] for r in val if r["source"] == source]
        targets = [t for doc in sp.encode(texts) for t in doc + [EOS_ID]]
        want = -float(sum(logp[t] for t in targets))
        for seq_len in (1, 5, 7, 64, 10_000):
            stats = perplexity_by_source(model, tok, corpus, seq_len)["sources"][source]
            assert stats["tokens"] == len(targets)
            assert stats["nats"] == pytest.approx(want, rel=1e-5)


def test_max_tokens_takes_whole_documents(run):
    tok, corpus, val = run
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    model = Unigram(sp.get_piece_size())
    news = [r["text"] for r in val if r["source"] == "news"]
    first = len(sp.encode(news[0])) + 1
    stats = perplexity_by_source(model, tok, corpus, 8, max_tokens=first)["sources"]["news"]
    assert stats["documents"] == 1 and stats["tokens"] == first
    assert stats["bytes"] == len(news[0].encode("utf-8"))
    with pytest.raises(UserError, match="no val-"):
        perplexity_by_source(model, tok, tok.parent, 8)


# ------------------------------------------------------------------------------ few-shot


class Scripted(nn.Module):
    """Favors the tokens of `pos` when the input starts with token `marker`, else those of `neg`."""

    def __init__(self, vocab: int, marker: int, pos: set[int], neg: set[int]):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.vocab, self.marker, self.pos, self.neg = vocab, marker, sorted(pos), sorted(neg)

    def forward(self, idx, targets=None):
        logits = torch.zeros(*idx.shape, self.vocab)
        for b in range(idx.size(0)):
            logits[b, :, self.pos if idx[b, 0] == self.marker else self.neg] = 5.0
        return logits, None


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    tok = sentencepiece_model(tmp_path_factory.mktemp("sp"))
    return spm.SentencePieceProcessor(model_file=str(tok))


def test_fewshot_predicts_the_label_the_model_favors(sp):
    template = "{text}\nSentiment: {label}\n\n"
    labels = ["positive", "negative"]
    head = "good day\nSentiment: "
    pos_ids = {t for t in (lambda f, s: f[s:])(*continuation_ids(sp, head, "positive"))}
    neg_ids = {t for t in (lambda f, s: f[s:])(*continuation_ids(sp, head, "negative"))}
    marker = sp.encode("good day")[0]
    assert marker != sp.encode("bad day")[0]
    model = Scripted(sp.get_piece_size(), marker, pos_ids - neg_ids, neg_ids - pos_ids)
    test = [("good day", "positive"), ("bad day", "negative"), ("bad day", "positive")]
    got = classify(model, sp, [], test, labels, k=0, seed=0, template=template)
    assert got["predictions"] == ["positive", "negative", "negative"]
    assert got["accuracy"] == pytest.approx(2 / 3)
    assert got["confusion"] == {
        "positive": {"positive": 1, "negative": 1},
        "negative": {"positive": 0, "negative": 1},
    }
    # F1: positive 2*1/(2+0+1) = 2/3, negative 2*1/(2+1+0) = 2/3.
    assert got["macro_f1"] == pytest.approx(2 / 3)
    # The label's score is the sum of its tokens' log-probabilities under the scripted logits.
    full, start = continuation_ids(sp, head, "positive")
    row_ = torch.zeros(sp.get_piece_size())
    row_[sorted(pos_ids - neg_ids)] = 5.0
    want = float(F.log_softmax(row_, -1)[full[start:]].sum())
    assert got["scores"][0]["positive"] == pytest.approx(want, rel=1e-6)


def test_fewshot_with_examples_on_a_real_model_is_seeded_and_exact(sp):
    model = tiny_model(seed=1)
    train = [(f"text number {i}", "positive" if i % 2 else "negative") for i in range(8)]
    test = [("a new text", "positive"), ("another one", "negative")]
    a = classify(model, sp, train, test, ["positive", "negative"], k=3, seed=4)
    b = classify(model, sp, train, test, ["positive", "negative"], k=3, seed=4)
    assert a == b
    # label_logprob by hand: log-softmax of the whole sequence at the continuation positions.
    context = "text number 1\nSentiment: positive\n\na new text\nSentiment: "
    full, start = continuation_ids(sp, context, "negative")
    logits = logits_of(model, torch.tensor([full[:-1]]))[0]
    want = sum(float(F.log_softmax(logits[i - 1], -1)[full[i]]) for i in range(start, len(full)))
    assert label_logprob(model, sp, context, "negative") == pytest.approx(want, rel=1e-5)


def test_macro_f1_by_hand_and_against_sklearn():
    labels = ["a", "b", "c"]
    truth = ["a", "a", "a", "b", "b", "c", "c", "c"]
    pred = ["a", "a", "b", "b", "c", "c", "a", "c"]
    # a: tp 2 fp 1 fn 1 -> 4/6; b: tp 1 fp 1 fn 1 -> 2/4; c: tp 2 fp 1 fn 1 -> 4/6
    assert macro_f1(truth, pred, labels) == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    # A label never true nor predicted scores 0.
    assert macro_f1(["a"], ["a"], ["a", "b"]) == pytest.approx(0.5)
    want = sklearn.f1_score(truth, pred, labels=labels, average="macro")
    assert macro_f1(truth, pred, labels) == pytest.approx(want)
