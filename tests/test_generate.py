"""Generation: the KV cache changes nothing, streamed text equals the whole text, stop strings,
eos and max_new_tokens end it as they should, sampling is seeded, top-k/top-p filter as
defined, and LoRA adapters switch on one base without leaving a trace."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from builders import sentencepiece_model, small_config
from click.testing import CliRunner
from torch import nn

from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.model.decode import (
    ContextError,
    ParamError,
    SamplingParams,
    complete,
    generate,
    stream,
    top_p_filter,
)
from domainlm.model.hf import load_hf_folder, save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft import LoRALinear, PromptTuned, add_lora, load_lora, save_lora
from domainlm.recipe.finetune import LoRAConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.serve import Engine, UnknownModel
from domainlm.tokenizer.special import EOS_ID
from domainlm.tokenizer.templates import ALPACA

VOCAB = 320  # builders.sentencepiece_model's size
PROMPTS = ["The quarterly ledger", "Prices rose", ""]
LORA = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def make_models(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny base model's HF folder and two LoRA adapter folders ("a", "b") for it.

    init_std 0.1 spreads the logits, so greedy choices are not near-ties that rounding could flip.
    """
    tokenizer = sentencepiece_model(root)
    torch.manual_seed(0)
    base = Llama(small_config(vocab_size=VOCAB, init_std=0.1)).eval()
    folder = save_hf_folder(base, tokenizer, root / "base")
    adapters = {}
    for seed, name in enumerate(("a", "b"), start=1):
        model = copy.deepcopy(base)
        add_lora(model, LORA, name)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, LoRALinear):
                    for w in (m.lora_A[name].weight, m.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        adapters[name] = save_lora(model, name, root / name, LORA, str(folder))
    return folder, adapters


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return make_models(tmp_path_factory.mktemp("generate"))


@pytest.fixture(scope="module")
def engine(models) -> Engine:
    folder, adapters = models
    return Engine(folder, adapters, name="base")


def greedy(n: int = 30, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


# --------------------------------------------------------------------------------------------
# The real (tiny) model.


@pytest.mark.parametrize("model", ["base", "a"])
def test_greedy_with_the_cache_equals_without_and_equals_llama_generate(engine, models, model):
    reference = load_hf_folder(models[0])
    if model != "base":
        load_lora(reference, models[1][model], model)
    for prompt in PROMPTS:
        with_cache = engine.stream(model, prompt, greedy(40))
        text = "".join(with_cache)
        without = engine.generate(model, prompt, greedy(40, use_cache=False))
        assert (text, with_cache.finish_reason) == (without.text, without.finish_reason)
        assert with_cache.completion_tokens == without.completion_tokens
        # The model's own decoding loop (tested against transformers) picks the same ids.
        ids = torch.tensor([engine.sp.encode(prompt) or [EOS_ID]])
        out = generate(reference, ids, 40, eos_id=EOS_ID)[0, ids.size(1):].tolist()
        assert with_cache.token_ids == out[: len(with_cache.token_ids)]


def test_streamed_pieces_concatenate_to_the_whole_text(engine):
    for model in engine.models():
        pieces = list(engine.stream(model, "The ledger", greedy(40)))
        assert len(pieces) > 1
        assert "".join(pieces) == engine.generate(model, "The ledger", greedy(40)).text


def test_the_same_seed_samples_the_same_text_and_another_seed_another(engine):
    def sample(seed):
        return engine.generate("base", "The", SamplingParams(40, temperature=1.0, seed=seed))

    assert sample(1) == sample(1)
    assert sample(1).text != sample(2).text  # 40 draws from near-flat distributions


def test_top_k_1_and_a_tiny_top_p_are_greedy(engine):
    want = engine.generate("base", "Prices rose", greedy(30))
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        params = SamplingParams(30, temperature=1.5, seed=7, **extra)
        assert engine.generate("base", "Prices rose", params) == want


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])  # sorted: 0.5, 0.25, 0.15, 0.1
    logits = probs.log()
    for p, kept in [(0.3, {1}), (0.5, {1}), (0.6, {1, 3}), (0.76, {1, 3, 2}), (0.95, {0, 1, 2, 3}),
                    (1.0, {0, 1, 2, 3})]:
        out = top_p_filter(logits, p)
        assert {i for i in range(4) if out[i] > -math.inf} == kept, p
        assert torch.equal(out[list(kept)], logits[list(kept)])  # kept logits are unchanged
    batch = top_p_filter(torch.stack([logits, logits.flip(0)]), 0.6)
    assert (batch > -math.inf).sum(dim=1).tolist() == [2, 2]


def test_adapters_change_the_output_and_switching_back_restores_the_base(engine, models):
    prompt = "The quarterly ledger"
    before = engine.generate("base", prompt, greedy(30))
    a = engine.generate("a", prompt, greedy(30))
    b = engine.generate("b", prompt, greedy(30))
    assert len({before.text, a.text, b.text}) == 3
    assert engine.generate("base", prompt, greedy(30)) == before
    assert engine.generate("a", prompt, greedy(30)) == a
    # Equal to a model that holds that one adapter alone, loaded from scratch.
    alone = load_hf_folder(models[0])
    load_lora(alone, models[1]["b"], "b")
    assert complete(alone, engine.sp, engine.sp.encode(prompt), greedy(30)) == b


def test_a_prompt_longer_than_the_context_loses_its_start_or_is_refused(engine):
    ids = engine.sp.encode("The quarterly ledger closes the annual account. " * 10)
    assert len(ids) > engine.context
    params = greedy(20)
    long = stream(engine.model, engine.sp, ids, params)
    text = "".join(long)
    assert long.truncated == len(ids) - (engine.context - 20)
    assert long.prompt_tokens == engine.context - 20
    assert text == complete(engine.model, engine.sp, ids[long.truncated:], params).text
    with pytest.raises(ContextError, match="context is 64 tokens"):
        engine.generate("base", "The quarterly ledger " * 30, params, truncate=False)
    with pytest.raises(ParamError, match="max_new_tokens"):
        engine.generate("base", "x", greedy(64))


def test_prompt_tuned_models_spend_context_on_their_virtual_tokens(engine):
    tuned = PromptTuned(copy.deepcopy(engine.model), 8).eval()
    ids = engine.sp.encode("The ledger")
    cached = stream(tuned, engine.sp, ids, greedy(40))
    text = "".join(cached)
    assert text == complete(tuned, engine.sp, ids, greedy(40, use_cache=False)).text
    assert cached.token_ids == generate(tuned, torch.tensor([ids]), 40, eos_id=EOS_ID)[
        0, len(ids): len(ids) + len(cached.token_ids)].tolist()
    assert stream(tuned, engine.sp, ids * 10, greedy(40)).prompt_tokens == 64 - 8 - 40
    with pytest.raises(ParamError, match="at most 55"):
        stream(tuned, engine.sp, ids, greedy(56))


def test_chat_messages_use_the_template_and_stop_at_its_end_of_turn(engine, models):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids, stops = engine.encode(messages)
    assert engine.sp.decode(ids) == engine.template.render(messages, add_generation_prompt=True)
    assert stops == ["<|end|>"]
    s = engine.stream("base", messages, greedy(10, stop=["zz"]))
    assert s.params.stop == ["zz", "<|end|>"]
    with pytest.raises(ParamError, match=r"messages\[0\].role"):
        engine.encode([{"role": "tool", "content": "x"}])
    # A folder whose tokenizer_config.json names a built-in template gets its stop string.
    root = models[0].parent / "alpaca"
    save_hf_folder(load_hf_folder(models[0]), models[0] / "tokenizer.model", root,
                   chat_template=ALPACA)
    assert json.loads((root / "tokenizer_config.json").read_text())["chat_template"] == ALPACA
    alpaca = Engine(root)
    assert alpaca.template.name == "alpaca"
    assert alpaca.encode(messages)[1] == ["\n\n### Instruction:"]


def test_engine_names_and_errors(engine, models):
    assert engine.models() == ["base", "a", "b"]
    assert Engine(models[0]).name == "base"  # the folder's name
    with pytest.raises(UnknownModel, match="'c' does not exist"):
        engine.generate("c", "x")
    with pytest.raises(UserError, match="already taken"):
        Engine(models[0], {"base": models[1]["a"]})
    with pytest.raises(UserError, match="does not exist"):
        Engine(models[0].parent / "nowhere")


@pytest.mark.parametrize(
    "field, value",
    [("max_new_tokens", 0), ("max_new_tokens", 2.0), ("temperature", -1.0),
     ("temperature", float("nan")), ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5),
     ("stop", [""]), ("stop", [3]), ("seed", "1"), ("use_cache", 1)],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ParamError, match=field) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


# --------------------------------------------------------------------------------------------
# A scripted model: the decoding loop on exactly known tokens.


class Scripted(nn.Module):
    """Emits `script` token by token whatever the input; counts positions with or without cache."""

    def __init__(self, script: list[int], prompt_len: int, max_seq_len: int = 64) -> None:
        super().__init__()
        self.config = LlamaConfig(VOCAB, 1, 8, 2, 2, 8, max_seq_len=max_seq_len)
        self.script, self.prompt_len = script, prompt_len
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx, cache=None):
        position = (cache[0] if cache else 0) + idx.size(1)
        if cache is not None:
            cache[:] = [position]
        logits = torch.zeros(1, idx.size(1), VOCAB)
        logits[0, -1, self.script[position - self.prompt_len]] = 1.0
        return logits, None


@pytest.fixture(scope="module")
def sp(engine):
    return engine.sp


def run(sp, text: str, eos: bool = True, **kw):
    script = sp.encode(text) + ([EOS_ID] if eos else [])
    s = stream(Scripted(script, 1), sp, [5], SamplingParams(**{"max_new_tokens": 60, **kw}))
    return list(s), s


def test_byte_pieces_are_emitted_only_as_whole_characters(sp):
    text = "hello 日本 wörld 😀!"
    assert any(sp.id_to_piece(i).startswith("<0x") for i in sp.encode(text))
    pieces, s = run(sp, text)
    assert "".join(pieces) == s.text == text
    assert not any("\ufffd" in p for p in pieces)
    assert (s.finish_reason, s.completion_tokens) == ("stop", len(sp.encode(text)) + 1)


@pytest.mark.parametrize("use_cache", [True, False])
def test_eos_stops(sp, use_cache):
    pieces, s = run(sp, "short", use_cache=use_cache)
    assert ("".join(pieces), s.finish_reason, s.token_ids[-1]) == ("short", "stop", EOS_ID)
    pieces, s = run(sp, "")
    assert (pieces, s.finish_reason, s.completion_tokens) == ([], "stop", 1)


def test_stop_strings_stop_and_are_not_emitted(sp):
    text = "the end<|end|> and more text"
    pieces, s = run(sp, text, stop=["<|end|>"])
    assert ("".join(pieces), s.finish_reason) == ("the end", "stop")
    # A stop string made of several pieces: its start is held back, never emitted.
    pieces, s = run(sp, "hello world", stop=["lo w", "xyz"])
    assert ("".join(pieces), s.text, s.finish_reason) == ("hel", "hel", "stop")
    # The earliest of several stop strings wins; a stop string that never completes is text.
    assert "".join(run(sp, "abc def ghi", stop=["ghi", "c d"])[0]) == "ab"
    pieces, s = run(sp, "hello", stop=["lo!"])
    assert ("".join(pieces), s.finish_reason) == ("hello", "stop")


def test_max_new_tokens_ends_with_length(sp):
    ids = sp.encode("a much longer text than four tokens")
    pieces, s = run(sp, "a much longer text than four tokens", max_new_tokens=4, stop=["zz"])
    assert ("".join(pieces), s.finish_reason) == (sp.decode(ids[:4]), "length")
    assert s.completion_tokens == len(s.token_ids) == 4


def test_generate_command_streams_the_engine_text(engine, models):
    folder, adapters = models
    want = engine.generate("a", "The ledger", greedy(12)).text
    result = CliRunner().invoke(main, ["generate", "--model", str(folder), "--adapter",
                                       str(adapters["a"]), "--prompt", "The ledger", "-n", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout == want + "\n"
    assert "prompt tokens" in result.stderr
    bad = CliRunner().invoke(main, ["generate", "--model", str(folder), "--prompt", "x",
                                    "--top-p", "2"])
    assert bad.exit_code == 2 and "top_p" in bad.stderr and "Traceback" not in bad.output
