"""Scoring a fine-tuned model: greedy answers to held-out instructions (ROUGE-L, exact match)
and the perplexity on the pretraining validation split (how much it forgot)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from domainlm.metrics import exact_match, rouge
from domainlm.model.decode import SamplingParams, complete
from domainlm.model.evaluate import evaluate_windows


@dataclass
class Scores:
    name: str
    rouge_l: float
    exact_match: float
    pretrain_ppl: float | None
    trainable: int | None = None
    total: int | None = None
    seconds: float | None = None
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rougeL": self.rouge_l,
            "exact_match": self.exact_match,
            "pretrain_ppl": self.pretrain_ppl,
            "trainable": self.trainable,
            "total": self.total,
            "seconds": self.seconds,
            "samples": self.samples,
        }


@torch.no_grad()
def answers(model: nn.Module, sp, prompts: list[str], max_new_tokens: int, stop: str) -> list[str]:
    """Greedy continuations of each prompt, cut at `stop` (the template's end of turn) or eos:
    the serving path's decoding, so what is scored is what `domainlm serve` would answer."""
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop=[stop] if stop else [])
    return [complete(model, sp, sp.encode(p), params).text.strip() for p in prompts]


def perplexity(model: nn.Module, windows, micro_batch: int = 16) -> float:
    return evaluate_windows(model, windows, micro_batch).ppl


def score(
    name: str,
    model: nn.Module,
    sp,
    prompts: list[str],
    references: list[str],
    *,
    max_new_tokens: int,
    stop: str,
    windows=None,
    samples: int = 3,
) -> Scores:
    t = time.perf_counter()
    predictions = answers(model, sp, prompts, max_new_tokens, stop)
    r = rouge(references, predictions)["rougeL"] if prompts else float("nan")
    em = exact_match(references, predictions) if prompts else float("nan")
    ppl = perplexity(model, windows) if windows is not None and len(windows) else None
    shown = [
        {"prompt": p, "reference": ref, "prediction": pred}
        for p, ref, pred in list(zip(prompts, references, predictions, strict=True))[:samples]
    ]
    s = Scores(name, r, em, ppl, samples=shown)
    s.seconds = round(time.perf_counter() - t, 1)
    return s
