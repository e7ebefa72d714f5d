"""Generation metrics equal the reference package's numbers, and exact match normalizes."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

from domainlm.metrics import exact_match, normalize, rouge

PAIRS = [
    ("the cat sat on the mat", "the cat lay on the mat"),
    ("Return the absolute value of x.", "Return absolute values."),
    ("os.path", "os.path"),
    ("a completely different sentence", "nothing in common here"),
]


def test_rouge_equals_rouge_score_pair_by_pair_mean():
    refs, preds = zip(*PAIRS, strict=True)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    expected = {t: 0.0 for t in ("rouge1", "rouge2", "rougeL")}
    for r, p in PAIRS:
        s = scorer.score(r, p)
        for t in expected:
            expected[t] += s[t].fmeasure / len(PAIRS)
    got = rouge(list(refs), list(preds))
    for t in expected:
        assert got[t] == pytest.approx(expected[t], abs=1e-12)


def test_rouge_l_by_hand():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6 words each way.
    assert rouge(["the cat sat on the mat"], ["the cat lay on the mat"])["rougeL"] == (
        pytest.approx(5 / 6)
    )
    assert rouge(["abc"], ["xyz"])["rougeL"] == 0.0


def test_exact_match_normalizes_case_space_and_surrounding_punctuation():
    assert normalize("  `Os.Path`. ") == "os.path"
    assert exact_match(["os.path", "json", "re"], ["`os.path`", "JSON.", "sre"]) == (
        pytest.approx(2 / 3)
    )
    with pytest.raises(ValueError):
        exact_match(["a"], [])


def test_bleu_equals_sacrebleu_corpus_bleu():
    import sacrebleu

    from domainlm.metrics import bleu

    refs, preds = zip(*PAIRS, strict=True)
    expected = sacrebleu.corpus_bleu(list(preds), [list(refs)]).score
    assert bleu(list(refs), list(preds)) == pytest.approx(expected / 100, abs=1e-12)
    same = "return the absolute value of a number"
    assert bleu([same], [same]) == pytest.approx(1.0)


def test_eval_metrics_cli_prints_the_reference_packages_numbers():
    import json

    import sacrebleu
    from click.testing import CliRunner

    from domainlm.cli import main

    ref, pred = PAIRS[1]
    result = CliRunner().invoke(
        main, ["eval", "metrics", "--reference", ref, "--prediction", pred, "--json"]
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.output)
    scores = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True).score(
        ref, pred
    )
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu([pred], [[ref]]).score / 100)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(scores[key].fmeasure)
    assert all(0 <= v <= 1 for v in got.values())  # one scale for every metric
    unpaired = CliRunner().invoke(main, ["eval", "metrics", "-r", "a", "-r", "b", "-p", "a"])
    assert unpaired.exit_code == 2 and "in pairs" in unpaired.output
