"""Generation metrics by their reference implementations: ROUGE (rouge-score), BLEU and chrF
(sacrebleu), and exact match, every one on the same 0-1 scale."""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=4)
def _scorer(types: tuple[str, ...]):
    from rouge_score import rouge_scorer

    # Stemming as in the ROUGE papers and most reported numbers; the tokenizer is the
    # package's own (lowercased alphanumeric words), so its numbers compare with others'.
    return rouge_scorer.RougeScorer(list(types), use_stemmer=True)


def rouge(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure over pairs (0-1), as rouge-score computes each pair."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    types = ("rouge1", "rouge2", "rougeL")
    totals = dict.fromkeys(types, 0.0)
    for ref, pred in zip(references, predictions, strict=True):
        scores = _scorer(types).score(ref, pred)
        for t in types:
            totals[t] += scores[t].fmeasure
    n = max(len(references), 1)
    return {t: totals[t] / n for t in types}


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, surrounding punctuation and quotes stripped."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .,;:!?`'\"")


def exact_match(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Share of predictions equal to their reference after `normalize` (0-1)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    hits = sum(normalize(r) == normalize(p) for r, p in zip(references, predictions, strict=True))
    return hits / max(len(references), 1)


def bleu(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Corpus BLEU as sacrebleu computes it (default 13a tokenizer), on 0-1 like the others:
    sacrebleu's 0-100 score divided by 100."""
    import sacrebleu

    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score / 100.0


def chrf(reference: str, prediction: str) -> float:
    """Sentence chrF (character n-gram F-score, sacrebleu's defaults) of one answer, 0-1: it
    still tells two answers apart when neither shares a whole word with the reference."""
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score / 100.0


def all_metrics(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """BLEU, ROUGE-1/2/L F-measure and exact match of prediction/reference pairs, all 0-1."""
    return {
        "bleu": bleu(references, predictions),
        **rouge(references, predictions),
        "exact_match": exact_match(references, predictions),
    }
