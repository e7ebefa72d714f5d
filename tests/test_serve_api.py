"""The OpenAI API as clients use it, through the official `openai` client (and raw HTTP where
the client hides the status): n, log-probs (completions and chat), echo with the prompt's
log-probs, penalties, logit_bias, min_tokens, stop_token_ids, ignore_eos, batched prompts,
vLLM's tokenize/detokenize and runtime LoRA endpoints, Prometheus metrics, and a 400 naming
every field the server does not implement."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serving import client, request, running
from test_generate import make_models

from domainlm.model.hf import load_hf_folder
from domainlm.model.sampling import SamplingParams
from domainlm.serve import Engine

MESSAGES = [{"role": "user", "content": "A ledger?"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory.mktemp("serve-api"))


@pytest.fixture(scope="module")
def engine(models):
    folder, adapters = models
    return Engine(folder, {"a": adapters["a"]}, name="base")


@pytest.fixture(scope="module")
def server(engine):
    with running(engine, allow_adapter_updates=True) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return client(server)


@pytest.fixture(scope="module")
def reference(models):
    """A model of our own, loaded apart from the server: the log-probs' ground truth."""
    return load_hf_folder(models[0]).eval()


def logp(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].log_softmax(-1)


def post(server, path, body):
    return request(server, "POST", path, body)


def test_n_choices_greedy_and_seeded(api, engine):
    want = engine.generate("base", "The ledger", SamplingParams(10)).text
    r = api.completions.create(model="base", prompt="The ledger", max_tokens=10, n=3,
                               temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [want] * 3
    assert r.usage.completion_tokens == 3 * engine.generate(
        "base", "The ledger", SamplingParams(10)).completion_tokens
    sampled = api.completions.create(model="base", prompt="The", max_tokens=12, n=3, seed=11,
                                     temperature=1.0)
    texts = [c.text for c in sampled.choices]
    assert len(set(texts)) == 3
    second = api.completions.create(model="base", prompt="The", max_tokens=12, seed=12,
                                    temperature=1.0)
    assert second.choices[0].text == texts[1]  # choice i samples with seed + i
    chat = api.chat.completions.create(model="a", messages=MESSAGES, max_tokens=8, n=2,
                                       temperature=0)
    assert chat.choices[0].message.content == chat.choices[1].message.content


def test_completion_logprobs_are_the_models(api, engine, reference):
    r = api.completions.create(model="base", prompt="The quarterly", max_tokens=8,
                               temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    prompt = engine.sp.encode("The quarterly")
    # Token names are the pieces ("▁" as a space; byte and control pieces by name).
    ids = [engine.sp.piece_to_id(t if t.startswith("<") else t.replace(" ", "\u2581"))
           for t in lp.tokens]
    assert engine.sp.decode(ids) == r.choices[0].text
    scores = logp(reference, prompt + ids)
    for i, (token, value, top) in enumerate(zip(ids, lp.token_logprobs, lp.top_logprobs,
                                                strict=True)):
        row = scores[len(prompt) - 1 + i]
        assert value == pytest.approx(float(row[token]), abs=1e-4)
        assert len(top) == 3 and max(top.values()) == value  # greedy: the chosen is the top
        assert sorted(top.values(), reverse=True) == pytest.approx(
            row.topk(3).values.tolist(), abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(r.choices[0].text)


def test_echo_scores_the_prompt_as_lm_eval_asks(server, engine, reference):
    """lm-eval's local-completions request: token ids, echo, max_tokens 1, logprobs 1."""
    a, b = engine.sp.encode("The quarterly ledger"), engine.sp.encode("Prices rose")
    status, _, r = post(server, "/v1/completions", {
        "model": "base", "prompt": [a, b], "echo": True, "max_tokens": 1, "logprobs": 1,
        "temperature": 0, "seed": 1234})
    assert status == 200 and [c["index"] for c in r["choices"]] == [0, 1]
    for ids, choice in zip((a, b), r["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one new token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        scores = logp(reference, ids)
        for i in range(1, len(ids)):
            assert lp["token_logprobs"][i] == pytest.approx(float(scores[i - 1, ids[i]]),
                                                            abs=1e-4)
        assert choice["text"].startswith(engine.sp.decode(ids))
    assert r["usage"]["prompt_tokens"] == len(a) + len(b)
    # max_tokens 0 with echo: the prompt's log-probs alone.
    r = post(server, "/v1/completions", {
        "model": "base", "prompt": "Prices rose", "echo": True, "max_tokens": 0,
        "logprobs": 0})[2]
    assert r["choices"][0]["text"] == "Prices rose"
    assert len(r["choices"][0]["logprobs"]["tokens"]) == len(b)
    assert r["usage"]["completion_tokens"] == 0


def test_chat_logprobs_content(api):
    r = api.chat.completions.create(model="a", messages=MESSAGES, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    text = bytes(b for item in content for b in item.bytes).decode("utf-8", "replace")
    assert text.startswith(r.choices[0].message.content)
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob <= item.top_logprobs[0].logprob
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 1.5}, {"frequency_penalty": 0.8}, {"repetition_penalty": 1.5},
    {"min_tokens": 6, "max_tokens": 8}, {"ignore_eos": True, "max_tokens": 12},
    {"logit_bias": {"40": 5.0}}, {"top_k": 3, "temperature": 0.7, "seed": 3},
    {"min_p": 0.2, "temperature": 0.9, "seed": 4}])
def test_sampling_fields_reach_the_engine(api, engine, extra):
    extra = {"max_tokens": 20, "temperature": 0, **extra}
    plain = api.completions.create(model="base", prompt="The ledger ledger", max_tokens=20,
                                   temperature=0)
    known = {"max_tokens", "temperature", "seed", "presence_penalty", "frequency_penalty",
             "logit_bias"}
    r = api.completions.create(model="base", prompt="The ledger ledger",
                               **{k: v for k, v in extra.items() if k in known},
                               extra_body={k: v for k, v in extra.items() if k not in known})
    names = {"max_tokens": "max_new_tokens"}
    params = {names.get(k, k): v for k, v in extra.items()}
    if "logit_bias" in params:
        params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
    want = engine.generate("base", "The ledger ledger", SamplingParams(**params))
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)
    if extra.get("temperature") == 0:
        assert r.choices[0].text != plain.choices[0].text or "min_tokens" in extra


def test_bias_stop_token_ids_and_batched_prompts(api, engine):
    token = engine.sp.encode(" ledger")[0]
    r = api.completions.create(model="base", prompt="x", max_tokens=5, temperature=0,
                               logit_bias={str(token): 100})
    assert r.choices[0].text == engine.sp.decode([token] * 5) != ""
    stop = api.completions.create(model="base", prompt="x", max_tokens=5, temperature=0,
                                  logit_bias={str(token): 100},
                                  extra_body={"stop_token_ids": [token]})
    assert (stop.choices[0].text, stop.choices[0].finish_reason) == (
        engine.sp.decode([token]), "stop")
    prompts = ["The ledger", "Prices rose", ""]
    r = api.completions.create(model="a", prompt=prompts, max_tokens=8, temperature=0, n=2)
    want = [engine.generate("a", p, SamplingParams(8)).text for p in prompts]
    assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]
    assert [c.index for c in r.choices] == list(range(6))


def test_streaming_n_with_logprobs_equals_the_whole_answer(api):
    kw = dict(model="base", prompt="Prices rose", max_tokens=15, temperature=0, n=2, logprobs=1)
    whole = api.completions.create(**kw)
    chunks = list(api.completions.create(stream=True, **kw))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == whole.choices[index].text
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        assert tokens == whole.choices[index].logprobs.tokens
        assert mine[-1].finish_reason == whole.choices[index].finish_reason
    echo = list(api.completions.create(stream=True, echo=True, **{**kw, "n": 1}))
    assert "".join(c.choices[0].text for c in echo).startswith("Prices rose")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"some_unknown_key": 1}, "some_unknown_key"),
    ({"echo": True}, "echo"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"seed": 2**64}, "seed"),
    ({"temperature": "1e400"}, "temperature"),
    ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_unimplemented_or_bad_chat_fields_are_400s_that_name_them(server, body, param):
    raw = {"model": "base", "messages": MESSAGES, "max_tokens": 3, **body}
    data = json.dumps(raw).replace('"1e400"', "1e400").encode()  # a number JSON cannot hold
    status, _, answer = post(server, "/v1/chat/completions", data)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["message"]


@pytest.mark.parametrize("body, param", [
    ({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix"), ({"user2": "x"}, "user2"),
    ({"max_tokens": 0}, "max_tokens"), ({"prompt": [[1, 99999]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"), ({"n": 200}, "n"), ({"logprobs": True}, "logprobs"),
    ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
])
def test_bad_completion_fields_are_400s_that_name_them(api, body, param):
    kw = {"model": "base", "prompt": "x", "max_tokens": 3, **body}
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(**{k: kw.pop(k) for k in ("model", "prompt")}, extra_body=kw)
    assert e.value.body["param"] == param


def test_tokenize_and_detokenize_as_vllm(server, engine):
    status, _, r = post(server, "/tokenize", {"model": "base", "prompt": "The ledger",
                                              "return_token_strs": True})
    ids = engine.sp.encode("The ledger")
    assert status == 200 and r["tokens"] == ids and r["count"] == len(ids)
    assert r["max_model_len"] == engine.context and "".join(r["token_strs"]) == "The ledger"
    chat = post(server, "/tokenize", {"messages": MESSAGES})[2]
    assert chat["tokens"] == engine.encode(MESSAGES)[0]
    assert post(server, "/detokenize", {"tokens": ids})[2] == {"prompt": "The ledger"}
    assert post(server, "/detokenize", {"tokens": [10**6]})[0] == 400
    assert post(server, "/tokenize", {"prompt": "x", "bogus": 1})[2]["error"]["param"] == "bogus"


def _scrape(server) -> dict[str, float]:
    status, headers, text = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_count_requests_tokens_latency_and_the_queue(server, api):
    before = _scrape(server)
    usage = [api.completions.create(model="base", prompt=p, max_tokens=7, temperature=0).usage
             for p in ("The", "A ledger", "Prices")]
    after = _scrape(server)
    key = "domainlm_requests_total{route=/v1/completions,status=200}"
    assert after[key] - before.get(key, 0) == 3
    assert after["domainlm_generation_tokens_total"] - before.get(
        "domainlm_generation_tokens_total", 0) == sum(u.completion_tokens for u in usage)
    assert after["domainlm_prompt_tokens_total"] - before.get(
        "domainlm_prompt_tokens_total", 0) == sum(u.prompt_tokens for u in usage)
    count = "domainlm_request_latency_seconds_count{route=/v1/completions}"
    assert after[count] - before.get(count, 0) == 3
    assert after["domainlm_requests_waiting"] == 0 and after["domainlm_requests_running"] == 0
    assert after["domainlm_decode_steps_total"] > before.get("domainlm_decode_steps_total", 0)
    assert after["domainlm_connections_open"] >= 1


def test_adapters_load_and_unload_at_run_time(server, api, models, engine):
    path = str(models[1]["b"])
    status, _, text = post(server, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": path})
    assert status == 200 and "added" in text
    assert [m.id for m in api.models.list().data] == ["base", "a", "c"]
    r = api.completions.create(model="c", prompt="The ledger", max_tokens=10, temperature=0)
    fresh = Engine(models[0], {"b": models[1]["b"]}, name="base")
    assert r.choices[0].text == fresh.generate("b", "The ledger", SamplingParams(10)).text
    status, _, answer = post(server, "/v1/load_lora_adapter", {"lora_name": "c",
                                                               "lora_path": path})
    assert status == 400 and "already taken" in answer["error"]["message"]
    assert post(server, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "/nowhere"}
                )[0] == 400
    status, _, text = post(server, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert status == 200 and "removed" in text
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="c", prompt="x", max_tokens=2)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "c"})[0] == 404
    # The other adapters are as they were.
    a = api.completions.create(model="a", prompt="The ledger", max_tokens=10, temperature=0)
    assert a.choices[0].text == engine.generate("a", "The ledger", SamplingParams(10)).text


def test_adapter_updates_are_off_unless_asked_for(engine, models):
    with running(engine) as server:
        status, _, answer = post(server, "/v1/load_lora_adapter",
                                 {"lora_name": "z", "lora_path": str(models[1]["b"])})
    assert status == 403 and "--allow-adapter-updates" in answer["error"]["message"]
    assert "z" not in engine.models()
