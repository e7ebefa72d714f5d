"""Scoring a fine-tuned model: greedy answers to held-out instructions (ROUGE-L, exact match)
and the perplexity on the pretraining validation split (how much it forgot)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from domainlm.eval.metrics import exact_match, rouge
from domainlm.tokenizer.special import EOS_ID


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
    """Greedy continuations of each prompt, cut at `stop` (the template's end of turn) or eos."""
    model.eval()
    limit = _max_len(model)
    out = []
    for prompt in prompts:
        ids = sp.encode(prompt)[-(limit - max_new_tokens) :]
        gen = model.generate(torch.tensor([ids]), max_new_tokens, temperature=0.0, eos_id=EOS_ID)
        new = [i for i in gen[0, len(ids) :].tolist() if i != EOS_ID]
        text = sp.decode(new)
        if stop and stop in text:
            text = text[: text.index(stop)]
        out.append(text.strip())
    return out


def _max_len(model: nn.Module) -> int:
    """Positions left for prompt + answer (a prompt-tuned model spends some on its prompt)."""
    config = getattr(model, "config", None) or model.base.config
    return config.max_seq_len - int(getattr(model, "n_virtual", 0) or 0)


@torch.no_grad()
def perplexity(model: nn.Module, windows, micro_batch: int = 16) -> float:
    from domainlm.train.finish import evaluate

    return math.exp(evaluate(model, windows, micro_batch, torch.device("cpu")))


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
