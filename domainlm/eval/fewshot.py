"""Few-shot classification by label likelihood: k seeded examples from train, then the test
text, and the label whose words the model finds most likely as the continuation wins."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TEMPLATE = "{text}\nSentiment: {label}\n\n"


def _context_limit(model: nn.Module) -> int | None:
    """How many tokens one forward pass may hold (prompt tuning's virtual tokens take some)."""
    base = getattr(model, "base", model)
    config = getattr(base, "config", None)
    limit = getattr(config, "max_seq_len", None)
    return None if limit is None else limit - int(getattr(model, "n_virtual", 0))


def continuation_ids(sp, context: str, label: str) -> tuple[list[int], int]:
    """(ids of context + label, index of the first continuation token).

    The two are encoded together, as the model would read them; the continuation is what
    follows the longest common prefix with the context alone (so a piece that merges the
    context's trailing space with the label, like "▁positive", is scored as the label's).
    """
    full, ctx = sp.encode(context + label), sp.encode(context)
    common = 0
    while common < min(len(full), len(ctx)) and full[common] == ctx[common]:
        common += 1
    common = max(min(common, len(full) - 1), 1)  # at least one token of context to predict from
    return full, common


@torch.no_grad()
def label_logprob(model: nn.Module, sp, context: str, label: str) -> float:
    """Sum of the log-probabilities of the label's tokens after context: one forward pass.

    A sequence longer than the model's context loses its oldest tokens (the first examples).
    """
    full, start = continuation_ids(sp, context, label)
    limit = _context_limit(model)
    if limit is not None and len(full) - 1 > limit:
        cut = len(full) - 1 - limit
        if cut >= start:
            raise ValueError(f"the label {label!r} alone is longer than the model's context")
        full, start = full[cut:], start - cut
    device = next(model.parameters()).device
    ids = torch.tensor([full], device=device)
    logits = model(ids[:, :-1])[0][0].float()
    logp = F.log_softmax(logits[start - 1 :], dim=-1)
    return float(logp.gather(1, ids[0, start:, None]).sum())


def macro_f1(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> float:
    """Mean over labels of F1 = 2 TP / (2 TP + FP + FN); a label never true nor predicted
    scores 0 (as scikit-learn's f1_score(average="macro") with its zero_division default)."""
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(truth, pred, strict=True))
        fp = sum(t != label and p == label for t, p in zip(truth, pred, strict=True))
        fn = sum(t == label and p != label for t, p in zip(truth, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(len(scores), 1)


def confusion(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """{true label: {predicted label: count}} over every pair of labels."""
    counts = {t: dict.fromkeys(labels, 0) for t in labels}
    for t, p in zip(truth, pred, strict=True):
        counts[t][p] += 1
    return counts


def build_prompt(shots: Sequence[tuple[str, str]], text: str, template: str) -> str:
    """The k filled examples, then the test text with the template cut just before {label}."""
    if template.count("{label}") != 1 or "{text}" not in template:
        raise ValueError(f"the template needs {{text}} and exactly one {{label}}: {template!r}")
    head = template.split("{label}", 1)[0]
    examples = "".join(template.format(text=t, label=lab) for t, lab in shots)
    return examples + head.format(text=text)


def classify(
    model: nn.Module,
    sp,
    train: list[tuple[str, str]],
    test: list[tuple[str, str]],
    labels: list[str],
    k: int,
    seed: int,
    template: str = DEFAULT_TEMPLATE,
) -> dict:
    """Accuracy, macro F1 and confusion counts of k-shot classification of test (text, label).

    Each test text gets its own k examples, drawn without replacement from train with
    random.Random(seed); the prediction is the label of highest summed token log-probability
    (ties go to the first label in `labels`).
    """
    if not labels:
        raise ValueError("labels is empty")
    unknown = {lab for _, lab in test if lab not in labels}
    if unknown:
        raise ValueError(f"test labels {sorted(unknown)} are not among {labels}")
    if not 0 <= k <= len(train):
        raise ValueError(f"k = {k} examples but train has {len(train)}")
    model.eval()
    rng = random.Random(seed)
    truth, pred, scores = [], [], []
    for text, label in test:
        prompt = build_prompt(rng.sample(train, k), text, template)
        ll = [label_logprob(model, sp, prompt, lab) for lab in labels]
        truth.append(label)
        pred.append(labels[max(range(len(labels)), key=lambda i: (ll[i], -i))])
        scores.append(dict(zip(labels, ll, strict=True)))
    hits = sum(t == p for t, p in zip(truth, pred, strict=True))
    return {
        "k": k,
        "seed": seed,
        "n": len(test),
        "accuracy": hits / max(len(test), 1),
        "macro_f1": macro_f1(truth, pred, labels),
        "confusion": confusion(truth, pred, labels),
        "predictions": pred,
        "scores": scores,
    }
