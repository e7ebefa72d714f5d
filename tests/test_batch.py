"""Continuous batching in the decoding engine: sequences that join a batch at different steps,
with different prompt lengths, adapters and parameters, get token for token what they get
alone; the logits processors (bias, bans, penalties) do what their definitions say; log-probs
are the model's own; the scheduler really puts concurrent requests in one batch."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_generate import VOCAB, make_models
from torch import nn

from domainlm.model.batch import BatchDecoder, Sequence, decode_alone
from domainlm.model.hf import load_hf_folder
from domainlm.model.kvcache import RaggedCache
from domainlm.model.llama import Llama
from domainlm.model.peft import PromptTuned, load_lora
from domainlm.model.peft.lora import set_row_adapters, unload_lora
from domainlm.model.sampling import ParamError, SamplingParams
from domainlm.recipe.model import LlamaConfig
from domainlm.serve import Engine
from domainlm.tokenizer.special import EOS_ID

PROMPTS = ["The quarterly ledger closes", "Prices", "An auditor reviews the annual report of",
           "x"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("batch"))


@pytest.fixture(scope="module")
def engine(models):
    folder, adapters = models
    return Engine(folder, adapters, name="base")


def greedy(n: int = 20, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, **kw)


def alone(model: nn.Module, prompt: list[int], params: SamplingParams,
          adapter: str | None = None, adapters: bool = False) -> Sequence:
    seq = Sequence(prompt, params, adapter)
    if adapters:
        decoder = BatchDecoder(model, adapters=True)
        decoder.add([seq])
        while decoder.rows:
            decoder.step()
    else:
        list(decode_alone(model, seq))
    return seq


def staggered(decoder: BatchDecoder, seqs: list[Sequence], every: int = 3) -> None:
    """Add one sequence every `every` steps, then run until all finish."""
    pending = list(seqs)
    step = 0
    while pending or decoder.rows:
        if pending and step % every == 0:
            decoder.add([pending.pop(0)])
        else:
            decoder.step()
        step += 1


def test_positions_and_key_mask_give_the_logits_of_separate_sequences():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(VOCAB, 2, 32, 4, 2, 48, max_seq_len=32, init_std=0.1)).eval()
    a, b = torch.randint(4, VOCAB, (1, 9)), torch.randint(4, VOCAB, (1, 4))
    cache = RaggedCache()
    with torch.no_grad():
        for ids in (a, b):
            c: list = []
            model(ids, cache=c)
            cache.join(c)
        assert cache.pad == [0, 5] and cache.lengths() == [9, 4]
        copied = [(k.clone(), v.clone()) for k, v in cache.layers]
        nxt = [7, 11]
        got = cache.step(model, nxt, torch.device("cpu"))
        for row, ids in enumerate((a, b)):
            want = model(torch.cat((ids, torch.tensor([[nxt[row]]])), dim=1))[0][0, -1]
            torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)
        # Without the mask the padded row attends to the padding: the mask is what makes it right.
        unmasked = model(torch.tensor([nxt]).T, cache=copied, positions=torch.tensor([[9], [4]]))
        torch.testing.assert_close(unmasked[0][0, -1], got[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(unmasked[0][1, -1], got[1], atol=1e-3)
        cache.keep([1])
        assert cache.pad == [0] and cache.width == 5


@pytest.mark.parametrize("kind", ["plain", "lora-mixed", "prompt-tuned"])
def test_greedy_batched_equals_each_sequence_alone_token_for_token(engine, models, kind):
    model, adapters, names = engine.model, True, [None, "a", "b", None]
    if kind == "plain":
        model, adapters, names = load_hf_folder(models[0]).eval(), False, [None] * 4
    elif kind == "prompt-tuned":
        model, adapters = PromptTuned(load_hf_folder(models[0]), 6).eval(), False
        torch.manual_seed(1)
        with torch.no_grad():
            model.prompt_embeddings.normal_(0, 1)
        names = [None] * 4
    prompts = [engine.sp.encode(p) for p in PROMPTS]
    want = [alone(model, p, greedy(), n, adapters).ids for p, n in zip(prompts, names,
                                                                        strict=True)]
    assert len({tuple(w) for w in want}) == 4
    seqs = [Sequence(p, greedy(), n) for p, n in zip(prompts, names, strict=True)]
    decoder = BatchDecoder(model, adapters=adapters)
    staggered(decoder, seqs)
    assert [s.ids for s in seqs] == want
    assert all(s.finish_reason in ("stop", "length") for s in seqs)


def test_mixed_adapters_in_one_batch_equal_their_own_models(engine, models):
    """Each adapter's rows in a mixed batch equal a model holding that adapter alone."""
    prompts = [engine.sp.encode(p) for p in PROMPTS[:2]]
    for name in ("b",):
        own = load_hf_folder(models[0]).eval()
        load_lora(own, models[1][name], name)
        want = [alone(own, p, greedy()).ids for p in prompts]
        seqs = [Sequence(p, greedy(), n) for p in prompts for n in (name, None, "a", "b")]
        decoder = BatchDecoder(engine.model, adapters=True)
        staggered(decoder, seqs, every=2)
        assert [s.ids for s in seqs[::4]] == want


def test_row_adapters_fall_back_to_one_adapter_and_unload_leaves_the_rest(models):
    model = load_hf_folder(models[0]).eval()
    for name in ("a", "b"):
        load_lora(model, models[1][name], name)
    x = torch.randint(4, VOCAB, (3, 5))
    with torch.no_grad():
        set_row_adapters(model, ["a", None, "b"])
        mixed = model(x)[0]
        for row, name in enumerate(["a", None, "b"]):
            set_row_adapters(model, [name])
            torch.testing.assert_close(mixed[row], model(x[row:row + 1])[0][0])
        unload_lora(model, "a")
        set_row_adapters(model, ["b"])
        after = model(x)[0]
    fresh = load_hf_folder(models[0]).eval()
    load_lora(fresh, models[1]["b"], "b")
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x)[0])
    with pytest.raises(ValueError, match="no LoRA adapter named 'a'"):
        unload_lora(model, "a")


def test_n_choices_share_one_prefill_and_seeds_differ_per_choice(engine):
    prompt = engine.sp.encode("The ledger")
    seqs = [Sequence(prompt, greedy(20)) for _ in range(3)]
    decoder = BatchDecoder(engine.model, adapters=True)
    decoder.add(seqs)
    assert decoder.cache.rows == 3
    while decoder.rows:
        decoder.step()
    assert seqs[0].ids == seqs[1].ids == seqs[2].ids == alone(
        engine.model, prompt, greedy(20), None, True).ids
    sampled = [Sequence(prompt, SamplingParams(20, temperature=1.0, seed=5 + i))
               for i in range(3)]
    decoder.add(sampled)
    while decoder.rows:
        decoder.step()
    again = alone(engine.model, prompt, SamplingParams(20, temperature=1.0, seed=6), None, True)
    assert sampled[1].ids == again.ids
    assert len({tuple(s.ids) for s in sampled}) == 3


def test_logprobs_are_the_models_own(engine):
    prompt = engine.sp.encode("The quarterly ledger")
    seq = alone(engine.model, prompt, greedy(12, logprobs=3, prompt_logprobs=2,
                                             repetition_penalty=1.3), None, True)
    full = torch.tensor([prompt + seq.ids])
    set_row_adapters(engine.model, [None])
    with torch.no_grad():
        logp = engine.model(full)[0][0].log_softmax(-1)
    for i, token in enumerate(seq.tokens):
        pos = len(prompt) - 1 + i
        assert token.logprob.logprob == pytest.approx(float(logp[pos, token.id]), abs=1e-5)
        top = logp[pos].topk(3)
        assert [t for t, _ in token.logprob.top] == top.indices.tolist()
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        lp = seq.prompt_logprobs[i]
        assert lp.logprob == pytest.approx(float(logp[i - 1, prompt[i]]), abs=1e-5)
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]


class Fixed(nn.Module):
    """The same logits at every position: a known distribution to test the processors on."""

    def __init__(self, logits: dict[int, float]) -> None:
        super().__init__()
        self.config = LlamaConfig(VOCAB, 1, 8, 2, 2, 8, max_seq_len=64)
        self.row = torch.full((VOCAB,), -10.0)
        for i, v in logits.items():
            self.row[i] = v
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx, cache=None, **batched):
        if cache is not None:
            cache[:] = [None]
        return self.row.expand(idx.size(0), idx.size(1), -1).clone(), None


def reference(row: dict[int, float], prompt: list[int], n: int, f=0.0, p=0.0, r=1.0) -> list[int]:
    """Greedy choices under the penalties' definitions, written out in plain Python."""
    out: list[int] = []
    for _ in range(n):
        scores = {}
        for t, v in row.items():
            if r != 1 and (t in prompt or t in out):
                v = v / r if v > 0 else v * r
            c = out.count(t)
            scores[t] = v - f * c - p * (c > 0)
        out.append(max(scores, key=lambda t: (scores[t], -t)))
    return out


@pytest.mark.parametrize("penalty", [dict(f=0.3), dict(p=0.5), dict(r=2.5), dict(f=0.2, r=1.2)])
def test_penalties_follow_their_definitions(penalty):
    row = {5: 1.0, 6: 0.55, 7: 0.45, 8: -0.3}  # no two scores tie under these penalties
    prompt = [9, 6]
    names = {"f": "frequency_penalty", "p": "presence_penalty", "r": "repetition_penalty"}
    params = greedy(12, **{names[k]: v for k, v in penalty.items()})
    got = alone(Fixed(row), prompt, params).ids
    assert got == reference(row, prompt, 12, **penalty)
    assert got != [5] * 12


def test_bias_bans_and_stops():
    row = {EOS_ID: 2.0, 5: 1.0, 6: 0.5}
    model = Fixed(row)
    assert alone(model, [9], greedy(10)).ids == [EOS_ID]
    seq = alone(model, [9], greedy(10, min_tokens=3))
    assert seq.ids == [5, 5, 5, EOS_ID] and seq.finish_reason == "stop"
    seq = alone(model, [9], greedy(6, ignore_eos=True))
    assert seq.ids == [EOS_ID] * 6 and seq.finish_reason == "length"
    assert alone(model, [9], greedy(5, logit_bias={6: 100}, ignore_eos=True)).ids == [6] * 5
    seq = alone(model, [9], greedy(5, logit_bias={EOS_ID: -100, 5: -100}))
    assert seq.ids == [6] * 5
    seq = alone(Fixed({EOS_ID: 2.0, 5: 1.1, 6: 0.5}), [9], greedy(
        8, ignore_eos=True, stop_token_ids=[6], logit_bias={6: 0.3}, frequency_penalty=0.5))
    assert seq.ids[-1] == 6 and 6 not in seq.ids[:-1] and len(seq.ids) > 2
    assert seq.finish_reason == "stop"
    with pytest.raises(ParamError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ParamError, match="min_tokens"):
        SamplingParams(max_new_tokens=3, min_tokens=4)
    with pytest.raises(ParamError, match="seed"):
        SamplingParams(seed=2**64)


def test_the_scheduler_batches_concurrent_requests_and_their_outputs_are_their_own(engine):
    jobs = [(m, p) for m in ("base", "a", "b") for p in PROMPTS]
    want = {(m, p): engine.generate(m, p, greedy(25)).text for m, p in jobs}
    before = copy.copy(engine.scheduler.stats)
    got: dict = {}
    start = threading.Barrier(len(jobs))

    def run(job):
        start.wait()
        got[job] = engine.generate(*job, greedy(25)).text

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    stats = engine.scheduler.stats
    steps, rows = stats.steps - before.steps, stats.rows - before.rows
    assert rows / steps > 2  # most steps advanced several requests at once
    assert stats.running == 0 and stats.waiting == 0


def test_grouped_adapters_policy_gives_the_same_outputs(models, engine):
    folder, adapters = models
    grouped = Engine(folder, adapters, name="base", mix_adapters=False)
    for m in ("base", "a", "b"):
        streams = grouped.streams(m, PROMPTS, greedy(20))
        assert ["".join(s[0]) for s in streams] == [
            engine.generate(m, p, greedy(20)).text for p in PROMPTS]


def test_a_sequence_that_cannot_fit_is_refused_before_it_runs(engine):
    decoder = BatchDecoder(engine.model)
    with pytest.raises(ValueError, match="context"):
        decoder.add([Sequence(list(range(5, 60)), greedy(20))])
    assert not decoder.rows
    seq = Sequence(engine.sp.encode("The"), greedy(3))
    decoder.add([seq])
    while decoder.rows:
        decoder.step()
    assert len(seq.ids) == 3 or seq.finish_reason == "stop"
