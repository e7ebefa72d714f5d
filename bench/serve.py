"""Server throughput on this CPU: generated tokens/s of `domainlm serve` with 1, 4 and 16
concurrent clients, continuous batching against one-at-a-time decoding (max_batch 1, what the
server did before) measured in the same run; and two ways to batch requests for different LoRA
adapters (one mixed batch, or one batch per adapter stepped in turn)."""

from __future__ import annotations

import copy
import dataclasses
import http.client
import io
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import sentencepiece as spm
import torch

from bench.common import commit, load_note, machine, table, write_section
from domainlm.model.hf import save_hf_folder
from domainlm.model.llama import Llama
from domainlm.model.peft.lora import LoRALinear, add_lora, save_lora
from domainlm.recipe import TokenizerConfig
from domainlm.recipe.finetune import LoRAConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.serve.engine import Engine
from domainlm.serve.server import make_server
from domainlm.tokenizer.train import trainer_options

SIZES = {
    # The demo's planned shape (vocab 2048, 6 layers, d_model 64), and a 7M-parameter model.
    "demo (0.45M)": LlamaConfig(2048, 6, 64, 1, 1, 192, max_seq_len=256),
    "7M": LlamaConfig(8192, 6, 256, 4, 4, 704, max_seq_len=256),
}
PROMPT = "Return the absolute value of a number. The argument may be an integer"
LORA = LoRAConfig(r=8, alpha=16.0, dropout=0.0, target_modules=["q_proj", "v_proj"])


def _tokenizer(folder: Path, vocab: int) -> Path:
    """A SentencePiece model trained with the tokenizer stage's options on the standard
    library's pydoc topics (text every Python install has)."""
    from pydoc_data.topics import topics

    lines = [line for text in topics.values() for line in text.splitlines() if line.strip()]
    options = {**trainer_options(TokenizerConfig(), vocab, threads=2), "hard_vocab_limit": False}
    writer = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, **options)
    path = folder / "tokenizer.model"
    path.write_bytes(writer.getvalue())
    return path


def _folders(root: Path, name: str, config: LlamaConfig) -> tuple[Path, dict[str, Path]]:
    """A random model of this shape (its vocabulary the trained tokenizer's) and two LoRA
    adapters for it."""
    tokenizer = _tokenizer(root, config.vocab_size)
    vocab = spm.SentencePieceProcessor(model_file=str(tokenizer)).get_piece_size()
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(config, vocab_size=vocab)).eval()
    base = save_hf_folder(model, tokenizer, root / name / "base")
    adapters = {}
    for i, adapter in enumerate(("a", "b")):
        tuned = copy.deepcopy(model)
        add_lora(tuned, LORA, adapter)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for m in tuned.modules():
                if isinstance(m, LoRALinear):
                    w = m.lora_B[adapter].weight
                    w.copy_(torch.randn(w.shape, generator=g) * 0.05)
        adapters[adapter] = save_lora(tuned, adapter, root / name / adapter, LORA, str(base))
    return base, adapters


def _load(port: int, clients: int, requests: int, tokens: int, models: list[str]) -> float:
    """Generated tokens per second with `clients` threads, each sending `requests` requests of
    `tokens` tokens one after another (client i asks for models[i % len(models)])."""
    done = [0] * clients
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        body = json.dumps({"model": models[i % len(models)], "prompt": PROMPT,
                           "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
        start.wait()
        for _ in range(requests):
            conn.request("POST", "/v1/completions", body,
                         {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
            done[i] += answer["usage"]["completion_tokens"]
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


def _measure(engine: Engine, clients: int, requests: int, tokens: int, models: list[str],
             runs: int) -> tuple[float, float]:
    """(median tokens/s over runs, mean rows per decoding step)."""
    server = make_server(engine, workers=64)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        _load(server.server_address[1], 1, 1, 4, models[:1])  # warm-up
        stats = engine.scheduler.stats
        steps, rows = stats.steps, stats.rows
        rates = [_load(server.server_address[1], clients, requests, tokens, models)
                 for _ in range(runs)]
        batch = (stats.rows - rows) / max(stats.steps - steps, 1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    return statistics.median(rates), batch


def main(quick: bool = False) -> None:
    runs, tokens, requests = (1, 16, 1) if quick else (3, 64, 2)
    t0 = time.time()
    load_start = os.getloadavg()[0]
    rows, adapter_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in SIZES.items():
            base, adapters = _folders(Path(tmp), name.split()[0], config)
            batched = Engine(base, adapters, name="base")
            serial = Engine(base, adapters, name="base", max_batch=1)
            one = None
            for clients in (1, 4, 16):
                # Interleaved: the baseline and the batched server see the same machine load.
                s_rate, _ = _measure(serial, clients, requests, tokens, ["base"], runs)
                b_rate, batch = _measure(batched, clients, requests, tokens, ["base"], runs)
                one = one or b_rate
                rows.append([name, clients, f"{s_rate:,.0f}", f"{b_rate:,.0f}",
                             f"{b_rate / s_rate:.2f}x", f"{b_rate / one:.2f}x", f"{batch:.1f}"])
            if name.startswith("demo"):
                grouped = Engine(base, adapters, name="base", mix_adapters=False)
                for label, engine in (("one batch, adapters mixed", batched),
                                      ("one batch per adapter", grouped)):
                    rate, batch = _measure(engine, 16, requests, tokens, ["base", "a", "b"],
                                           runs)
                    adapter_rows.append([label, f"{rate:,.0f}", f"{batch:.1f}"])
    body = (
        "## Serving throughput (CPU)\n\n"
        f"Machine: {machine()}. Commit {commit()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; at the start, {load_note(load_start)}; at "
        f"the end, {load_note()}. Command: `python -m bench serve`{' --quick' if quick else ''} "
        f"({time.time() - t0:.0f} s).\n\n"
        f"`domainlm serve`'s HTTP server in this process, on loopback; each client sends "
        f"{requests} completion request(s) one after another, {tokens} tokens each "
        f"(`ignore_eos`, greedy) after a {len(PROMPT)}-character prompt; tokens/s is every "
        f"client's generated tokens over the wall time, median of {runs} run(s) after a "
        "warm-up; random weights of the given shape. \"One at a time\" is the same server "
        "with max_batch 1 (each request decodes alone, as before continuous batching); "
        "\"mean batch\" is the sequences advanced per decoding step.\n\n"
        + table(["model", "clients", "tokens/s one at a time", "tokens/s batched",
                 "batched / one at a time", "vs 1 client", "mean batch"], rows)
        + "\n\nLoRA adapters under batching: 16 clients, a third each on the base and two "
        "adapters (r 8 on q_proj, v_proj), demo-sized model.\n\n"
        + table(["policy", "tokens/s", "mean batch"], adapter_rows)
    )
    write_section("serve", body)
    print(body)
