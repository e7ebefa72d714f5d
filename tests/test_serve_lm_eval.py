"""lm-eval's `local-completions` scores log-likelihoods through the server (token-id prompts,
echo, logprobs) and equals lm-eval's `hf` backend (transformers) on the same model folder,
request by request, on a tiny task written here."""

from __future__ import annotations

import json

import pytest
from serving import running
from test_generate import make_models

from domainlm.model.sampling import SamplingParams
from domainlm.serve import Engine

pytestmark = pytest.mark.slow  # lm-eval runs twice (~15 s)


def test_local_completions_equals_hf_on_the_same_folder(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    folder, _ = make_models(tmp_path)
    engine = Engine(folder, name="base")
    # Contexts whose greedy next token, appended as text, encodes as exactly that token after
    # the context's tokens: then the choice is greedy however lm-eval splits the request.
    words = "The ledger Prices rose closes signs report".split()
    sp = engine.sp
    greedy = {}
    for c in (f"{a} {b}" for a in words for b in words):
        s = engine.stream("base", c, SamplingParams(1))
        "".join(s)
        ids = sp.encode(c)
        g = sp.decode([*ids, s.token_ids[0]])[len(sp.decode(ids)):]
        if g.strip() and g.isprintable() and sp.encode(c + g) == [*ids, s.token_ids[0]]:
            greedy[c] = g
    assert len(greedy) >= 2
    docs = [{"context": c, "choices": [" today", g, " the account"], "label": i % 3}
            for i, (c, g) in enumerate(list(greedy.items())[:4])]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    manager = TaskManager(include_path=str(tmp_path))
    with running(engine) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/completions"
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=["tiny_mc"], task_manager=manager,
            log_samples=True, model_args=f"model=base,base_url={url},tokenizer={folder},"
            "tokenizer_backend=huggingface,max_length=64,batch_size=3")
    local = lm_eval.simple_evaluate(model="hf", tasks=["tiny_mc"], task_manager=manager,
                                    log_samples=True,
                                    model_args=f"pretrained={folder},device=cpu,dtype=float32")
    got = [r[0] for s in served["samples"]["tiny_mc"] for r in s["resps"]]
    want = [r[0] for s in local["samples"]["tiny_mc"] for r in s["resps"]]
    assert len(got) == len(want) == 3 * len(docs)
    for (ll, greedy), (ll_hf, greedy_hf) in zip(got, want, strict=True):
        assert ll == pytest.approx(ll_hf, abs=1e-4) and greedy == greedy_hf
    assert sum(g for _, g in got) >= 1  # the greedy choices are recognised as greedy
    assert served["results"]["tiny_mc"]["acc,none"] == local["results"]["tiny_mc"]["acc,none"]
