"""Generation speed on this CPU: tokens/s of greedy decoding for fp32, bf16, int8 and int4 weights,
with and without the KV cache, through the serving path (`domainlm.model.decode`)."""

from __future__ import annotations

import copy
import os
import time

import torch

from bench.common import commit, machine, median_time, table, write_section
from domainlm.model.decode import SamplingParams, stream
from domainlm.model.llama import Llama
from domainlm.model.quantized import model_bytes, quantize_model
from domainlm.recipe.model import LlamaConfig

SIZES = {
    # The demo's planned shape (vocab 2048, 6 layers, d_model 64), and a 7M-parameter model.
    "demo (0.45M)": LlamaConfig(2048, 6, 64, 1, 1, 192, max_seq_len=256),
    "7M": LlamaConfig(8192, 6, 256, 4, 4, 704, max_seq_len=256),
}


class _Ids:
    """A stand-in tokenizer: the benchmark times the model, not SentencePiece's decode."""

    def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)


def _tokens_per_s(model, prompt: list[int], new: int, cache: bool, runs: int) -> float:
    params = SamplingParams(max_new_tokens=new, use_cache=cache, stop=[])

    def run() -> int:
        n = 0
        for _ in stream(model, _Ids(), prompt, params):
            n += 1
        return n

    run()  # warm-up
    seconds, _ = median_time(run, runs)
    return new / seconds


def main(quick: bool = False) -> None:
    runs, new = (1, 16) if quick else (3, 64)
    torch.manual_seed(0)
    t0 = time.time()
    rows = []
    for name, config in SIZES.items():
        base = Llama(config).eval()
        prompt = torch.randint(3, config.vocab_size, (32,)).tolist()
        # int8/int4 keep the embedding, norms and head in bf16 too, so the activations are
        # bf16 in every row and the quantized matmuls take torch's CPU kernels.
        variants = {
            "fp32": copy.deepcopy(base),
            "bf16": copy.deepcopy(base).to(torch.bfloat16),
            "int8": quantize_model(base, 8, 64).to(torch.bfloat16),
            "int4": quantize_model(base, 4, 64).to(torch.bfloat16),
        }
        ref = None
        for label, model in variants.items():
            with torch.no_grad():
                cached = _tokens_per_s(model, prompt, new, True, runs)
                full = _tokens_per_s(model, prompt, new, False, runs)
            ref = ref or cached
            rows.append(
                [
                    name,
                    label,
                    f"{model_bytes(model) / 1e6:.2f} MB",
                    f"{cached:,.0f}",
                    f"{full:,.0f}",
                    f"{cached / full:.2f}x",
                    f"{cached / ref:.2f}x",
                ]
            )
    body = (
        "## Generation (CPU)\n\n"
        f"Machine: {machine()}. Commit {commit()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} at the start. "
        f"Command: `python -m bench generate`{' --quick' if quick else ''} "
        f"({time.time() - t0:.0f} s).\n\n"
        f"Greedy decoding of {new} tokens after a 32-token prompt, batch 1, through "
        "`domainlm.model.decode.stream` (the path `domainlm serve` uses), median of "
        f"{runs} run(s) after a warm-up; random weights of the given shape. \"No cache\" "
        "recomputes the whole context at every step. int8/int4 are weight-only (bf16 "
        "activations use torch's int8/int4 CPU matmul kernels).\n\n"
        + table(
            ["model", "weights", "weight bytes", "tokens/s (KV cache)", "tokens/s (no cache)",
             "cache speed-up", "vs fp32 (cache)"],
            rows,
        )
    )
    write_section("generate", body)
    print(body)
