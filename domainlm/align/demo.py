"""The demo's preference data, labeled by a program that stands in for people: the
instruction-tuned model's own samples for the demo's instructions, ranked by ROUGE-L against
the reference answer (ties broken by chrF); the reference is ranked first among them, or
(align.rank_reference false) kept as the record's `reference` for the judge only."""

from __future__ import annotations

import json
import random
from pathlib import Path

from torch import nn

from domainlm.align.sampling import fits, prompt_ids, sample_texts
from domainlm.corpus.mix import unit_hash
from domainlm.files import atomic_path
from domainlm.finetune.demo import python_docs_examples
from domainlm.finetune.records import Example
from domainlm.metrics import chrf, rouge
from domainlm.recipe import AlignConfig
from domainlm.tokenizer.templates import Template


def judge(reference: str, prediction: str) -> tuple[float, float]:
    """The demo's programmatic judge and labeler: ROUGE-L F-measure of one answer against the
    reference (0-1), ties broken by chrF (0-1). Compared as a pair, so word overlap decides and
    characters speak only where the words are equal (a small model's answers often share no
    whole word with the reference, and ROUGE-L alone calls most of them ties)."""
    return rouge([reference], [prediction])["rougeL"], chrf(reference, prediction)


def dense_ranks(scores: list) -> list[int]:
    """Rank 1 for the highest score; equal scores share a rank (a tie)."""
    distinct = sorted(set(scores), reverse=True)
    return [distinct.index(s) + 1 for s in scores]


def label(reference: str, samples: list[str], rank_reference: bool = True,
          others: list[str] = ()) -> dict:
    """One ranked record's completions and ranking: the samples (and `others`, replies to
    other questions) ranked by the judge against the reference. rank_reference: the reference
    is ranked too (first, it scores best); otherwise it is the record's `reference` only (the
    judge's, never paired), so every pair is between the model's own samples."""
    completions = [reference, *samples] if rank_reference else list(samples)
    completions += others
    out = {"completions": completions,
           "ranking": dense_ranks([judge(reference, c) for c in completions])}
    return out if rank_reference else {**out, "reference": reference}


def demo_examples(seed: int, heldout_fraction: float) -> tuple[list[Example], list[Example]]:
    """The instruction set of `make finetune`'s demo with its split (held-out modules), so the
    held-out prompts are about modules neither fine-tuning nor alignment trained on."""
    return python_docs_examples(heldout_fraction=heldout_fraction, seed=seed)


def choose(examples: list[Example], count: int, seed: int, salt: str) -> list[Example]:
    """`count` examples chosen by a seeded hash, in source order."""
    ranked = sorted(range(len(examples)),
                    key=lambda i: unit_hash(salt, seed, examples[i].task, examples[i].origin))
    return [examples[i] for i in sorted(ranked[:count])]


def other_answers(examples: list[Example], k: int, seed: int) -> list[list[str]]:
    """For each example, the reference answers of k other examples of the list (seeded): the
    right answer to another question, which the judge ranks like any reply. A reward model that
    sees only the model's own samples never sees an answer of the wrong kind (prose for a
    signature), and PPO finds that corner; these teach it that the reply must fit the prompt."""
    if k <= 0 or len(examples) < 2:
        return [[] for _ in examples]
    rng = random.Random(f"align-others-{seed}")
    k = min(k, len(examples) - 1)
    picks = [[j + (j >= i) for j in rng.sample(range(len(examples) - 1), k)]
             for i in range(len(examples))]
    return [[examples[j].messages[-1]["content"] for j in js] for js in picks]


def write_labeled(model: nn.Module, sp, template: Template, examples: list[Example],
                  cfg: AlignConfig, seed: int, out: Path) -> int:
    """Sample cfg.samples completions of each example's question, label them, and write ranked
    records to `out` (the format a labeling team returns); returns the records written."""
    usable = [e for e in examples
              if fits(model, prompt_ids(sp, template, e.messages[:-1]), cfg.max_new_tokens)]
    samples = sample_texts(model, sp, template, [e.messages[:-1] for e in usable], cfg.samples,
                           max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=seed)
    others = other_answers(usable, cfg.other_answers, seed)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for e, texts, wrong in zip(usable, samples, others, strict=True):
            record = {"prompt": e.messages[-2]["content"],
                      **label(e.messages[-1]["content"], texts, cfg.rank_reference, wrong),
                      "origin": e.origin, "task": e.task}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return len(usable)
