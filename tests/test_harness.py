"""lm-evaluation-harness integration: DomainLM's scores equal our own computations."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from builders import sentencepiece_model, tiny_model
from lm_eval.api.instance import Instance

from domainlm.eval.harness import DomainLM
from domainlm.model.evaluate import evaluate_windows
from domainlm.model.hf import save_hf_folder
from domainlm.tokenizer.special import EOS_ID

TEXT = "the market closed higher on strong earnings and the bank raised its outlook"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harness")
    tok = sentencepiece_model(tmp / "tok")
    return save_hf_folder(tiny_model(seed=0, max_seq_len=32), tok, tmp / "hf")


@pytest.fixture(scope="module")
def lm(folder):
    return DomainLM(pretrained=str(folder), batch_size=3)


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log P(ids[t] | ids[:t]) for t >= 1, from one forward pass (len(ids) <= max_seq_len + 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0][0]
    return logits.float().log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_loglikelihood_equals_log_softmax_sum_and_greedy_is_right(lm):
    pairs = [("the market", " closed higher"), ("", "the bank"), ("and the", " outlook")]
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (ll, _) in zip(pairs, got, strict=True):
        ctx = lm.sp.encode(context) or [EOS_ID]  # encoded separately, as fine-tuning does
        cont = lm.sp.encode(continuation)
        want = float(token_logprobs(lm.model, ctx + cont)[-len(cont) :].sum())
        assert ll == pytest.approx(want, abs=1e-4)
        assert ll < 0

    # A continuation built from the model's own argmax tokens is greedy; changing its last
    # token to anything else is not.
    ctx = lm.sp.encode("the market")
    ids = list(ctx)
    for _ in range(3):
        with torch.no_grad():
            ids.append(int(lm.model(torch.tensor([ids]))[0][0, -1].argmax()))
    greedy = lm._score([(ids, 3)])[0]
    other = ids[:-1] + [(ids[-1] + 1) % lm.model.config.vocab_size]
    assert greedy[1] is True and lm._score([(other, 3)])[0][1] is False
    assert greedy[0] > lm._score([(other, 3)])[0][0]


def test_loglikelihood_truncates_the_context_from_the_left(lm):
    context = " ".join([TEXT] * 3)
    (ll, _), = lm.loglikelihood([req("loglikelihood", context, " outlook")])
    ids = (lm.sp.encode(context) + lm.sp.encode(" outlook"))[-(lm.max_length + 1) :]
    n = len(lm.sp.encode(" outlook"))
    assert ll == pytest.approx(float(token_logprobs(lm.model, ids)[-n:].sum()), abs=1e-4)


def test_rolling_short_text_equals_direct_sum_and_our_evaluator(lm):
    text = "the bank raised"
    ids = [EOS_ID, *lm.sp.encode(text)]
    assert len(ids) <= lm.max_length + 1
    (ll,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert ll == pytest.approx(float(token_logprobs(lm.model, ids).sum()), abs=1e-4)
    x, y = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
    assert ll == pytest.approx(-evaluate_windows(lm.model, [(x, y)], micro_batch=1).nats, abs=1e-3)


def test_rolling_long_text_matches_our_validation_windows(lm):
    """Default stride: disjoint windows, exactly pretraining's TokenWindows over eos + text
    (a text of whole windows: a last, shorter window gets a full context, as in lm-eval)."""
    L = lm.max_length
    words = (TEXT + " ") * 6
    text = next(t for t in (" ".join(words.split()[:k]) for k in range(30, 80))
                if len(lm.sp.encode(t)) % L == 0)
    ids = [EOS_ID, *lm.sp.encode(text)]
    assert len(ids) > 3 * L
    (ll,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    direct = sum(
        float(token_logprobs(lm.model, ids[a : a + L + 1]).sum()) for a in range(0, len(ids) - 1, L)
    )
    assert ll == pytest.approx(direct, abs=1e-3)
    windows = [
        (torch.tensor(ids[a : a + L]), torch.tensor(ids[a + 1 : a + L + 1]))
        for a in range(0, len(ids) - 1, L)
    ]
    loss = evaluate_windows(lm.model, windows, micro_batch=1)
    assert loss.tokens == len(ids) - 1
    assert ll == pytest.approx(-loss.nats, abs=1e-3)


def test_rolling_stride_scores_every_token_once_with_the_context_that_fits(folder):
    lm = DomainLM(pretrained=str(folder), rolling_stride=5, batch_size=2)
    ids = [EOS_ID, *lm.sp.encode(TEXT)]
    L = lm.max_length
    windows = lm.windows(TEXT)
    assert sum(n for _, n in windows) == len(ids) - 1
    (ll,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", TEXT)])
    # Token t is predicted from the tokens of its window: all before it in the first window,
    # then at least L - stride of them.
    want, end = float(token_logprobs(lm.model, ids[: L + 1]).sum()), L + 1
    while end < len(ids):
        new = min(5, len(ids) - end)
        end += new
        want += float(token_logprobs(lm.model, ids[end - L - 1 : end])[-new:].sum())
    assert ll == pytest.approx(want, abs=1e-3)
    stride1 = DomainLM(pretrained=str(folder), rolling_stride=1)
    full = sum(
        float(token_logprobs(lm.model, ids[max(0, t - L) : t + 1])[-1]) for t in range(1, len(ids))
    )
    (ll1,) = stride1.loglikelihood_rolling([req("loglikelihood_rolling", TEXT)])
    assert ll1 == pytest.approx(full, abs=1e-3)


def test_generate_until_stops_at_the_until_string(lm):
    (free,) = lm.generate_until([req("generate_until", "the market", {"max_gen_toks": 8})])
    assert len(free) >= 2
    stop = free[1:3]
    (cut,) = lm.generate_until(
        [req("generate_until", "the market", {"until": [stop], "max_gen_toks": 8})]
    )
    assert stop not in cut and free.startswith(cut)
    assert cut == free[: free.find(stop)]


DOCS = [
    {"question": "the market", "answer": " closed"},
    {"question": "the bank raised", "answer": " its outlook"},
    {"question": "strong", "answer": " earnings"},
]


def local_task(tmp_path):
    """A loglikelihood task on a local JSONL file (lm-eval's `json` dataset, no network)."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny.yaml").write_text(
        "task: domainlm_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
        "    higher_is_better: false\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n"
    )
    return tasks


def check_results(res, lm):
    direct = lm.loglikelihood([req("loglikelihood", d["question"], d["answer"]) for d in DOCS])
    want_ppl = math.exp(-sum(ll for ll, _ in direct) / len(DOCS))
    assert res["perplexity,none"] == pytest.approx(want_ppl, rel=1e-4)
    assert res["acc,none"] == pytest.approx(sum(g for _, g in direct) / len(DOCS))


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task(folder, tmp_path, lm):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="domainlm",
        model_args=f"pretrained={folder}",
        tasks=["domainlm_tiny"],
        task_manager=TaskManager(include_path=str(local_task(tmp_path))),
        batch_size=2,
        device="cpu",
    )
    check_results(out["results"]["domainlm_tiny"], lm)


@pytest.mark.slow
def test_command_line_resolves_model_domainlm(folder, tmp_path, lm):
    """`domainlm-lm-eval` (here `python -m domainlm.eval.harness`) is lm-eval's CLI."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "domainlm.eval.harness", "--model", "domainlm",
           "--model_args", f"pretrained={folder}", "--tasks", "domainlm_tiny",
           "--include_path", str(local_task(tmp_path)), "--output_path", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    check_results(json.loads(results.read_text())["results"]["domainlm_tiny"], lm)
