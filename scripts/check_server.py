"""Check `domainlm serve` as its clients use it, on a run's exported model: the base folder
(build/<run>/pretrain/model) and its LoRA adapter (build/<run>/sft/lora/model) when the run has
one.

Starts `domainlm serve` in a subprocess, drives it with the official `openai` client
(completions, chat, streaming, n, log-probs), compares every answer with the same model decoded
in this process, then runs lm-eval's `local-completions` against the server and lm-eval's `hf`
backend (transformers, and peft for the adapter) on the same folders, on a small log-likelihood
task built here from the run's validation documents (multiple choice, and rolling log-likelihood
of whole documents): every request's log-likelihood must agree within --tolerance and every
accuracy exactly. Exits 1 on any mismatch, naming it.

    python scripts/check_server.py --recipe recipes/demo.yaml
    python scripts/check_server.py --model build/demo/pretrain/model [--adapter PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import torch

from domainlm.errors import UserError
from domainlm.model.decode import SamplingParams, complete
from domainlm.model.load import load_model, load_tokenizer
from domainlm.model.peft.lora import load_lora
from domainlm.recipe import load_recipe
from domainlm.serve.engine import default_name
from domainlm.tokenizer.templates import chat_template

PROMPTS = ["The function returns", "Return the", ""]
MESSAGES = [{"role": "user", "content": "What does the function return?"}]


class Checks:
    """Named comparisons; failures are collected and reported together."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.passed = 0
        self.compared = 0  # lm-eval requests compared between the two backends

    def equal(self, name: str, got: object, want: object) -> None:
        if got == want:
            self.passed += 1
        else:
            self.failures.append(f"{name}: got {got!r}, want {want!r}")

    def close(self, name: str, got: float, want: float, tolerance: float) -> None:
        if abs(got - want) <= tolerance:
            self.passed += 1
        else:
            self.failures.append(f"{name}: got {got}, want {want} (tolerance {tolerance})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, adapter: Path | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "domainlm", "serve", "--model", str(base), "--port", str(port)]
    if adapter is not None:
        cmd += ["--adapter", f"lora={adapter}"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"`domainlm serve` exited ({process.returncode}):\n"
                            f"{process.stdout.read() if process.stdout else ''}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise UserError("`domainlm serve` did not answer /health within 300 s")


def local_models(base: Path, adapter: Path | None) -> dict[str, torch.nn.Module]:
    models = {default_name(base): load_model(base)}
    if adapter is not None:
        with_adapter = load_model(base)
        load_lora(with_adapter, adapter, "lora")
        models["lora"] = with_adapter
    return models


def check_openai(checks: Checks, port: int, base: Path, adapter: Path | None) -> None:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                           max_retries=0, timeout=600)
    sp, tokenizer_dir = load_tokenizer(base)
    template = chat_template(tokenizer_dir)
    models = local_models(base, adapter)
    checks.equal("models", [m.id for m in client.models.list().data], list(models))
    for name, model in models.items():
        for prompt in PROMPTS:
            want = complete(model, sp, sp.encode(prompt), SamplingParams(24))
            r = client.completions.create(model=name, prompt=prompt, max_tokens=24,
                                          temperature=0, n=3, logprobs=2)
            for c in r.choices:
                checks.equal(f"{name} completion {prompt!r} choice {c.index}",
                             (c.text, c.finish_reason), (want.text, want.finish_reason))
            streamed = client.completions.create(model=name, prompt=prompt, max_tokens=24,
                                                 temperature=0, stream=True)
            checks.equal(f"{name} streamed completion {prompt!r}",
                         "".join(c.choices[0].text for c in streamed if c.choices), want.text)
            lp = r.choices[0].logprobs
            ids = (sp.encode(prompt) or [2]) + [
                sp.piece_to_id(t if t.startswith("<") else t.replace(" ", "\u2581"))
                for t in lp.tokens]
            with torch.no_grad():
                logp = model(torch.tensor([ids]))[0][0].float().log_softmax(-1)
            start = len(ids) - len(lp.tokens) - 1
            for i, value in enumerate(lp.token_logprobs):
                checks.close(f"{name} logprob {prompt!r} token {i}", value,
                             float(logp[start + i, ids[start + i + 1]]), 1e-3)
                checks.equal(f"{name} greedy is top {prompt!r} token {i}",
                             max(lp.top_logprobs[i].values()), value)
        sampled = client.completions.create(model=name, prompt="The", max_tokens=16, n=2,
                                            temperature=1.0, seed=7)
        second = client.completions.create(model=name, prompt="The", max_tokens=16,
                                           temperature=1.0, seed=8)
        checks.equal(f"{name} n=2 choice 1 samples with seed + 1", sampled.choices[1].text,
                     second.choices[0].text)
        text = template.render(MESSAGES, add_generation_prompt=True)
        stops = [template.stop] if template.stop else []
        want = complete(model, sp, sp.encode(text), SamplingParams(32, stop=stops))
        chat = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=32,
                                              temperature=0, logprobs=True, top_logprobs=1)
        checks.equal(f"{name} chat", chat.choices[0].message.content, want.text)
        chunks = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=32,
                                                temperature=0, stream=True)
        checks.equal(f"{name} streamed chat", "".join(
            c.choices[0].delta.content or "" for c in chunks if c.choices), want.text)
        checks.equal(f"{name} chat logprobs count", len(chat.choices[0].logprobs.content),
                     chat.usage.completion_tokens)


def tiny_tasks(folder: Path, documents: list[str], seed: int = 0) -> list[str]:
    """A multiple-choice task (which 4 words follow this context?) and a rolling
    log-likelihood task, as lm-eval YAML files over local JSON lines."""
    rng = random.Random(seed)
    words = [d.split() for d in documents if len(d.split()) >= 20]
    if len(words) < 4:
        raise UserError("the run's validation split has fewer than 4 documents of 20 words")
    mc = []
    for i, w in enumerate(words[:16]):
        others = [o for j, o in enumerate(words) if j != i]
        wrong = [" " + " ".join(o[8:12]) for o in rng.sample(others, 3)]
        choices = [" " + " ".join(w[8:12]), *wrong]
        mc.append({"context": " ".join(w[:8]), "choices": choices, "label": 0})
    rolling = [{"text": " ".join(w[:80])} for w in words[:8]]
    for name, rows in (("mc", mc), ("rolling", rolling)):
        (folder / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: server_check_mc\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'mc.jsonl'}\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "rolling.yaml").write_text(
        f"task: server_check_rolling\n{common}dataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'rolling.jsonl'}\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n")
    return ["server_check_mc", "server_check_rolling"]


def check_lm_eval(checks: Checks, port: int, base: Path, adapter: Path | None,
                  documents: list[str], tolerance: float) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    # Both backends must cut long documents into the same windows: hf scores windows of
    # max_length tokens, local-completions of max_length - 2 (one for context, one for the token
    # it asks the server to generate); and the server takes prompt + 1 <= its context.
    context = load_model(base).config.max_seq_len
    window = context - 2
    with tempfile.TemporaryDirectory() as tmp:
        tasks = tiny_tasks(Path(tmp), documents)
        manager = TaskManager(include_path=tmp)
        names = {default_name(base): None, **({"lora": adapter} if adapter else {})}
        for name, peft in names.items():
            url = f"http://127.0.0.1:{port}/v1/completions"
            served = lm_eval.simple_evaluate(
                model="local-completions", tasks=tasks, task_manager=manager, log_samples=True,
                model_args=f"model={name},base_url={url},tokenizer={base},"
                f"tokenizer_backend=huggingface,max_length={window + 2}")
            hf_args = f"pretrained={base},device=cpu,dtype=float32,max_length={window}"
            local = lm_eval.simple_evaluate(
                model="hf", tasks=tasks, task_manager=manager, log_samples=True,
                model_args=hf_args + (f",peft={peft}" if peft else ""))
            for task in tasks:
                got, want = served["samples"][task], local["samples"][task]
                checks.equal(f"lm-eval {name} {task} samples", len(got), len(want))
                for a, b in zip(got, want, strict=False):
                    checks.compared += len(a["resps"])
                    for i, (ra, rb) in enumerate(zip(a["resps"], b["resps"], strict=True)):
                        va, vb = ra[0], rb[0]
                        if isinstance(va, (list, tuple)):
                            checks.equal(f"lm-eval {name} {task} doc {a['doc_id']} req {i} "
                                         "is_greedy", va[1], vb[1])
                            va, vb = va[0], vb[0]
                        checks.close(f"lm-eval {name} {task} doc {a['doc_id']} req {i}",
                                     float(va), float(vb), tolerance)
            checks.equal(f"lm-eval {name} accuracy",
                         served["results"]["server_check_mc"]["acc,none"],
                         local["results"]["server_check_mc"]["acc,none"])


def validation_documents(recipe_path: str | None) -> list[str]:
    if recipe_path is None:
        raise UserError("give --recipe: the task is built from the run's validation split")
    corpus = load_recipe(recipe_path).layout.corpus
    files = sorted(corpus.glob("val-*.parquet"))
    if not files:
        raise UserError(f"no validation split under {corpus}: run `make corpus` first")
    return [t for f in files for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="the run: its pretrain/model, sft/lora/model, corpus")
    parser.add_argument("--model", type=Path, help="the base folder (default: the run's)")
    parser.add_argument("--adapter", type=Path, help="a LoRA folder (default: the run's)")
    parser.add_argument("--tolerance", type=float, default=2e-3,
                        help="largest difference of a log-likelihood between the backends")
    args = parser.parse_args(argv)
    try:
        base, adapter = args.model, args.adapter
        if args.recipe:
            layout = load_recipe(args.recipe).layout
            base = base or layout.pretrain_model
            lora = layout.sft_model("lora")
            adapter = adapter or (lora if (lora / "adapter_config.json").is_file() else None)
        if base is None or not (Path(base) / "config.json").is_file():
            raise UserError(f"no model folder at {base}: run `make pretrain` or pass --model")
        documents = validation_documents(args.recipe)
        port = free_port()
        server = start_server(base, adapter, port)
        checks = Checks()
        try:
            check_openai(checks, port, base, adapter)
            check_lm_eval(checks, port, base, adapter, documents, args.tolerance)
        finally:
            server.terminate()
            server.wait(timeout=30)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for failure in checks.failures:
        print(f"MISMATCH {failure}", file=sys.stderr)
    print(f"check_server: {checks.passed} checks passed, {len(checks.failures)} failed; "
          f"{checks.compared} lm-eval requests compared (base {base}, adapter {adapter})")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
