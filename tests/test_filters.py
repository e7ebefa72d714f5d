"""Tests for the Gopher-style quality rules and language identification."""

from __future__ import annotations

import dataclasses
import multiprocessing
import re

import pytest

from domainlm.corpus.filters import QualityFilter
from domainlm.corpus.langid import _prefix, detect_language
from domainlm.recipe import QualityFilters

GOOD = """The harbour town grew slowly during the nineteenth century, when fishing boats and small
cargo ships began to arrive with timber, salt and news from the capital. Most families worked
on the water, while a few merchants opened shops near the old stone bridge.

By 1900 the railway had reached the valley, and visitors came each summer to walk along the
cliffs and eat fresh mackerel in the taverns. The local school, which had only one teacher
for decades, doubled in size within ten years. Older residents still remember that the
lighthouse keeper rang a bell whenever fog rolled in from the sea.

Today the harbour is quieter. Tourism brings most of the income, but a cooperative of
fishermen continues to sell its catch at dawn, and the museum keeps records of every
shipwreck since 1780."""

GERMAN = (
    "Die Stadt am Hafen wuchs im neunzehnten Jahrhundert nur langsam. Die meisten Familien "
    "arbeiteten auf dem Wasser, während einige Kaufleute kleine Geschäfte in der Nähe der alten "
    "Brücke eröffneten. Heute bringt der Tourismus den größten Teil des Einkommens, aber die "
    "Fischer verkaufen ihren Fang noch immer jeden Morgen im Hafen."
)
FRENCH = (
    "La ville portuaire s'est développée lentement au cours du dix-neuvième siècle. La plupart "
    "des familles travaillaient sur l'eau, tandis que quelques marchands ouvraient des boutiques "
    "près du vieux pont de pierre. Aujourd'hui, le tourisme apporte l'essentiel des revenus, "
    "mais les pêcheurs vendent encore leur poisson chaque matin."
)

SENTENCES = GOOD.replace("\n", " ").split(". ")

# Every rule switched off; each test switches on the rules it is about.
OFF = QualityFilters(
    min_chars=None,
    max_chars=None,
    min_words=None,
    max_words=None,
    min_mean_word_length=None,
    max_mean_word_length=None,
    max_symbol_word_ratio=None,
    max_bullet_lines=None,
    max_ellipsis_lines=None,
    min_alpha_words=None,
    min_stop_words=None,
    max_dup_line_fraction=None,
    max_dup_para_fraction=None,
    max_dup_line_char_fraction=None,
    max_dup_para_char_fraction=None,
    max_top_ngram_char_fraction=None,
    max_dup_ngram_char_fraction=None,
    languages=None,
)


def only(**rules: object) -> QualityFilters:
    return dataclasses.replace(OFF, **rules)


def lines_of(n: int, prefix: str = "", suffix: str = "") -> str:
    """n distinct English lines."""
    return "\n".join(f"{prefix}{SENTENCES[i % len(SENTENCES)]} {i}{suffix}" for i in range(n))


LONG_WORDS = " ".join(f"incomprehensibilities{i}" for i in range(60))
SHORT_WORDS = " ".join(["a", "an", "it", "of", "to", "is", "by", "we"] * 8)
NUMBERS = GOOD + "\n" + " ".join(str(1000 + i) for i in range(60))
NO_STOP_WORDS = " ".join(
    "Quarterly revenue rose sharply across every region; analysts expect stronger margins "
    "next year despite higher costs".split()
    * 4
)
REPEATED_LINES = "\n".join(["Click here to subscribe."] * 5 + SENTENCES[:5])
# Many distinct lines in one paragraph, and a short paragraph repeated: paragraphs repeat,
# lines hardly do.
REPEATED_PARAS = lines_of(12) + "\n\nSee above.\n\nSee above.\n\nSee above."
ONE_LONG_LINE_TWICE = "\n".join([GOOD.replace("\n", " ")] * 2 + SENTENCES)
SPAM = GOOD + " buy cheap pills now" * 30
PHRASE = "the quick brown fox jumps over the lazy dog"
PHRASE_3X = " ".join(f"{SENTENCES[i]}. {PHRASE}." for i in range(3))


@pytest.mark.parametrize(
    ("rules", "text", "rule"),
    [
        ({"min_chars": 2000}, GOOD, "min_chars"),
        ({"max_chars": 100}, GOOD, "max_chars"),
        ({"min_words": 50}, "A short note with a few words.", "min_words"),
        ({"max_words": 20}, GOOD, "max_words"),
        ({"min_mean_word_length": 3.0}, SHORT_WORDS, "min_mean_word_length"),
        ({"max_mean_word_length": 10.0}, LONG_WORDS, "max_mean_word_length"),
        ({"max_symbol_word_ratio": 0.1}, GOOD + " #tag" * 20, "max_symbol_word_ratio"),
        ({"max_symbol_word_ratio": 0.1}, GOOD + " wait…" * 20, "max_symbol_word_ratio"),
        ({"max_bullet_lines": 0.9}, lines_of(10, prefix="  • "), "max_bullet_lines"),
        ({"max_bullet_lines": 0.9}, lines_of(10, prefix="- "), "max_bullet_lines"),
        ({"max_ellipsis_lines": 0.3}, lines_of(10, suffix="..."), "max_ellipsis_lines"),
        ({"min_alpha_words": 0.8}, NUMBERS, "min_alpha_words"),
        ({"min_stop_words": 2}, NO_STOP_WORDS, "min_stop_words"),
        ({"max_dup_line_fraction": 0.3}, REPEATED_LINES, "max_dup_line_fraction"),
        ({"max_dup_para_fraction": 0.3}, REPEATED_PARAS, "max_dup_para_fraction"),
        ({"max_dup_line_char_fraction": 0.2}, ONE_LONG_LINE_TWICE, "max_dup_line_char_fraction"),
        ({"max_dup_para_char_fraction": 0.2}, f"{GOOD}\n\n{GOOD}", "max_dup_para_char_fraction"),
        ({"max_top_ngram_char_fraction": {2: 0.2}}, SPAM, "max_top_ngram_char_fraction"),
        ({"max_dup_ngram_char_fraction": {5: 0.15}}, PHRASE_3X, "max_dup_ngram_char_fraction"),
        ({"languages": ["en"]}, GERMAN, "language"),
        ({"languages": ["en"], "min_language_score": 1.01}, GOOD, "language"),
    ],
)
def test_each_rule_fails_its_document_and_none_switches_it_off(
    rules: dict, text: str, rule: str
) -> None:
    verdict = QualityFilter(only(**rules)).check(text)
    assert verdict is not None and verdict[0] == rule, verdict
    off = {k: None for k in rules if k != "min_language_score"}
    assert QualityFilter(only(**off)).check(text) is None


def test_good_document_passes_the_default_rules() -> None:
    qf = QualityFilter(QualityFilters())
    assert qf.check(GOOD) is None
    assert qf.last_language == "en"


def test_all_rules_on_rejects_each_bad_document_by_the_first_rule() -> None:
    qf = QualityFilter(QualityFilters())
    assert qf.check("")[0] == "min_chars"
    assert qf.check("A short note.")[0] == "min_words"
    assert qf.last_language is None  # language id never ran
    assert qf.check(LONG_WORDS)[0] == "max_mean_word_length"
    assert qf.check(NO_STOP_WORDS)[0] == "min_stop_words"
    assert qf.check(GOOD + "\n" + "\n".join([SENTENCES[0]] * 30))[0] == "max_dup_line_fraction"
    assert qf.check(SPAM)[0] == "max_top_ngram_char_fraction"
    assert qf.check(f"{GERMAN} {GERMAN.lower()}")[0] == "min_stop_words"  # before language
    de = QualityFilter(dataclasses.replace(QualityFilters(), min_stop_words=None))
    assert de.check(f"{GERMAN} {FRENCH}")[0] == "language"
    assert de.last_language in ("de", "fr")


def test_details_give_the_measured_value_and_the_threshold() -> None:
    _, detail = QualityFilter(only(min_words=50)).check("one two three four five six seven")
    assert detail == "7 words < 50"
    _, detail = QualityFilter(only(max_top_ngram_char_fraction={2: 0.2})).check(SPAM)
    assert "top 2-gram" in detail and detail.endswith("of characters > 0.2")
    _, detail = QualityFilter(only(languages=["en"])).check(GERMAN)
    assert detail.startswith("language 'de' (") and detail.endswith(") not in ['en']")
    _, detail = QualityFilter(only(languages=["en"], min_language_score=1.01)).check(GOOD)
    assert re.fullmatch(r"language score [01]\.\d\d < 1\.01", detail), detail
    _, detail = QualityFilter(only(max_dup_line_fraction=0.3)).check(REPEATED_LINES)
    assert detail == "4 of 10 lines are repeats = 0.40 > 0.3"


def test_measured_value_is_not_printed_equal_to_its_threshold() -> None:
    text = "\n".join(["same line"] * 4 + [f"line {i}" for i in range(6)])  # 3 of 10 repeat
    assert QualityFilter(only(max_dup_line_fraction=0.3)).check(text) is None
    # 301 of 1000 repeat: 0.301 would print as 0.30, which reads as not above 0.3.
    text = "\n".join(["same line"] * 302 + [f"line {i}" for i in range(698)])
    _, detail = QualityFilter(only(max_dup_line_fraction=0.3)).check(text)
    assert detail == "301 of 1000 lines are repeats = 0.301 > 0.3"


def test_top_ngram_rule_uses_normalized_words_and_needs_a_repeat() -> None:
    qf = QualityFilter(only(max_top_ngram_char_fraction={2: 0.2}))
    # Case and punctuation do not hide a repeat.
    assert qf.check("Spam, spam! SPAM spam. spam?")[0] == "max_top_ngram_char_fraction"
    # Two words that occur once: no repetition, however short the document.
    assert qf.check("hello world") is None


def test_documents_shorter_than_n_skip_that_ngram_rule() -> None:
    qf = QualityFilter(only(max_dup_ngram_char_fraction={5: 0.0}))
    assert qf.check("spam spam spam spam") is None
    assert qf.check("spam spam spam spam spam spam")[0] == "max_dup_ngram_char_fraction"
    assert QualityFilter(only(max_top_ngram_char_fraction={2: 0.0})).check("spam") is None


def test_duplicate_ngram_fraction_counts_each_word_once() -> None:
    # One 5-gram twice, with distinct words between: both copies count (not only the second).
    words = "alpha bravo charlie delta echo".split()
    filler = [f"filler{i:02d}" for i in range(10)]
    text = " ".join(words + filler + words)
    chars = sum(map(len, words)) * 2
    total = chars + sum(map(len, filler))
    frac = chars / total
    qf_fail = QualityFilter(only(max_dup_ngram_char_fraction={5: frac - 0.001}))
    qf_pass = QualityFilter(only(max_dup_ngram_char_fraction={5: frac + 0.001}))
    assert qf_fail.check(text)[0] == "max_dup_ngram_char_fraction"
    assert qf_pass.check(text) is None
    # Three overlapping copies: each word is still counted once, so the fraction stays <= 1.
    triple = " ".join(words * 3)
    assert QualityFilter(only(max_dup_ngram_char_fraction={5: 0.999})).check(triple)[0] == (
        "max_dup_ngram_char_fraction"
    )
    assert QualityFilter(only(max_dup_ngram_char_fraction={5: 1.0})).check(triple) is None


def test_bullet_and_ellipsis_lines_are_fractions_of_non_blank_lines() -> None:
    half = "\n\n".join([lines_of(5, prefix="* "), lines_of(5)])
    assert QualityFilter(only(max_bullet_lines=0.49)).check(half)[0] == "max_bullet_lines"
    assert QualityFilter(only(max_bullet_lines=0.5)).check(half) is None


# --- language identification -----------------------------------------------------------------


def test_detect_language_on_clear_paragraphs() -> None:
    for text, lang in [(GOOD, "en"), (GERMAN, "de"), (FRENCH, "fr")]:
        got, score = detect_language(text)
        assert got == lang
        assert 0.9 < score <= 1.0


def test_detect_language_without_features_is_unknown() -> None:
    assert detect_language("12345 678 --- !!! 3.14") == ("unknown", 0.0)
    assert detect_language("") == ("unknown", 0.0)


def test_detect_language_is_the_same_on_every_call() -> None:
    # Short, mixed text is where langdetect's random sampling would show.
    texts = ["ok ja oui si", "Hello Welt, bonjour", GOOD[:60]]
    for text in texts:
        first = detect_language(text)
        assert all(detect_language(text) == first for _ in range(5))


def test_detect_language_is_the_same_in_another_process() -> None:
    texts = [GOOD, GERMAN, FRENCH, "ok ja oui si", "Hello Welt, bonjour", "Ciao Mundo hola"]
    here = [detect_language(t) for t in texts]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pool.map(detect_language, texts)
    assert there == here


def test_prefix_is_cut_at_whitespace() -> None:
    assert _prefix("alpha beta gamma", 100) == "alpha beta gamma"
    assert _prefix("alpha beta gamma", 8) == "alpha"
    assert _prefix("alpha beta gamma", 10) == "alpha beta"
    assert _prefix("x" * 50, 10) == "x" * 10  # no whitespace: a hard cut
    assert detect_language(GERMAN + " " + GOOD, prefix_chars=len(GERMAN) + 3)[0] == "de"


def test_repetition_rules_by_count_come_before_rules_by_characters() -> None:
    long_line = GOOD.replace("\n", " ")
    # Lines: few repeats by count, but one long repeated line holds many characters.
    # Paragraphs: half of them are repeats.
    text = f"{lines_of(12)}\n{long_line}\n{long_line}" + "\n\nSee above." * 3
    rules = {
        "max_dup_line_fraction": 0.3,
        "max_dup_para_fraction": 0.3,
        "max_dup_line_char_fraction": 0.2,
        "max_dup_para_char_fraction": 0.2,
    }
    assert QualityFilter(only(**rules)).check(text)[0] == "max_dup_para_fraction"
    rules["max_dup_para_fraction"] = None
    assert QualityFilter(only(**rules)).check(text)[0] == "max_dup_line_char_fraction"
