"""The OpenAI-compatible server, driven by the official `openai` client on loopback: models,
completions, chat, streaming, adapters by name (also from concurrent threads), and errors in
OpenAI's shape after which the server keeps serving."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from test_generate import make_models

from domainlm.model.decode import SamplingParams
from domainlm.serve import Engine
from domainlm.serve.server import make_server

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A ledger?"}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    folder, adapters = make_models(tmp_path_factory.mktemp("serve"))
    return Engine(folder, adapters, name="base")


@pytest.fixture(scope="module")
def server(engine):
    server = make_server(engine)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    port = server.server_address[1]
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60
    )


def post(server, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def greedy(n: int = 20) -> SamplingParams:
    return SamplingParams(max_new_tokens=n)


def test_models_lists_the_base_then_the_adapters(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["base", "a", "b"]
    assert all(m.object == "model" and m.owned_by == "domainlm" for m in models)
    assert client.models.retrieve("a").id == "a"


def test_completion_equals_the_engine(client, engine):
    r = client.completions.create(model="base", prompt="The ledger", max_tokens=20, temperature=0)
    want = engine.generate("base", "The ledger", greedy())
    assert r.object == "text_completion" and r.model == "base" and r.id.startswith("cmpl-")
    assert r.created > 0
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        want.prompt_tokens, want.completion_tokens)
    assert r.usage.total_tokens == want.prompt_tokens + want.completion_tokens
    listed = client.completions.create(model="base", prompt=["The ledger"], max_tokens=20,
                                       temperature=0)
    assert listed.choices[0].text == want.text


def test_chat_equals_the_engine(client, engine):
    r = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=20,
                                       temperature=0)
    want = engine.generate("base", MESSAGES, greedy())
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (
        want.text, want.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (
        want.prompt_tokens, want.completion_tokens)


def test_streamed_deltas_concatenate_to_the_whole_text(client):
    kw = dict(model="a", max_tokens=30, temperature=0)
    whole = client.completions.create(prompt="Prices rose", **kw)
    chunks = list(client.completions.create(prompt="Prices rose", stream=True, **kw))
    assert len(chunks) > 2 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    whole = client.chat.completions.create(messages=MESSAGES, **kw)
    chunks = list(client.chat.completions.create(
        messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **kw))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *deltas, usage = chunks
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == (
        whole.choices[0].message.content)
    assert deltas[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == [] and usage.usage.completion_tokens == whole.usage.completion_tokens


def test_the_model_field_picks_the_adapter(client, engine):
    texts = {}
    for name in ("base", "a", "b", "base"):
        r = client.completions.create(model=name, prompt="The quarterly ledger", max_tokens=25,
                                      temperature=0)
        want = engine.generate(name, "The quarterly ledger", greedy(25)).text
        assert r.choices[0].text == want
        texts[name] = want
    assert len(set(texts.values())) == 3


def test_concurrent_requests_to_different_adapters_get_their_own_outputs(client, engine):
    prompts = ["The ledger", "Prices rose", "An auditor"]
    jobs = [(m, p, stream) for m in ("base", "a", "b") for p in prompts for stream in (0, 1)]
    want = {(m, p): engine.generate(m, p, greedy(25)).text for m, p, _ in jobs}  # one at a time
    assert len({want[("base", p)] for p in prompts} | {want[("a", p)] for p in prompts}) == 6

    def request(job):
        model, prompt, stream = job
        kw = dict(model=model, prompt=prompt, max_tokens=25, temperature=0)
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(request, jobs * 2))
    assert got == [want[(m, p)] for m, p, _ in jobs * 2]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=5)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

    status, body = post(server, "/v1/completions", b'{"model": "base", "prompt": ')
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert post(server, "/v1/chat/completions", b"[1, 2]")[0] == 400

    for max_tokens in (0, 10**6, -3):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="base", prompt="x", max_tokens=max_tokens)
        assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="base", prompt="the ledger " * 100, max_tokens=5)
    assert e.value.status_code in (400, 413)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="a", messages=MESSAGES * 20, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded"

    bad = [({"n": 0}, "n"), ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"),
           ({"stop": 3}, "stop"), ({"seed": 1.5}, "seed"), ({"logprobs": 21}, "logprobs"),
           ({"prompt": 7}, "prompt")]
    for extra, param in bad:
        body = json.dumps({"model": "base", "prompt": "x", "max_tokens": 5, **extra}).encode()
        status, answer = post(server, "/v1/completions", body)
        assert (status, answer["error"]["param"]) == (400, param), extra
    status, answer = post(server, "/v1/chat/completions", json.dumps(
        {"model": "base", "messages": [{"role": "robot", "content": "x"}]}).encode())
    assert status == 400 and "role" in answer["error"]["param"]

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("GET", "/v2/nothing")
    response = conn.getresponse()
    assert response.status == 404 and "error" in json.loads(response.read())
    conn.close()

    r = client.completions.create(model="base", prompt="x", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_bug_is_a_500_and_the_server_keeps_serving(client, engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "streams", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="base", prompt="x", max_tokens=5)
    assert e.value.body["type"] == "server_error" and "a bug" in e.value.body["message"]
    monkeypatch.undo()
    assert client.completions.create(model="base", prompt="x", max_tokens=5).choices
