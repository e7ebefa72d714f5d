"""Tests for text normalization: each transformation, what must be kept, and idempotence."""

from __future__ import annotations

import random
import re
import unicodedata

import pytest

from domainlm.corpus.normalize import normalize


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("cafe\u0301", "caf\u00e9"),  # NFC composes e + combining acute
        ("a\r\nb\rc\n", "a\nb\nc"),
        ("a\x00b\x07c\x1bd\x7fe\x85f", "abcdef"),
        ("tab\tkept\nnewline kept", "tab\tkept\nnewline kept"),
        ("zero\u200bwidth\u200c\u200d\u2060\ufeffgone", "zerowidthgone"),
        ("\ufeffBOM at start", "BOM at start"),
        (
            "no\u00a0break\u2003em\u202fnarrow\u205fmath\u3000ideographic",
            "no break em narrow math ideographic",
        ),
        ("\u2000\u2001\u200a x", "    x"),  # leading exotic spaces: indentation, kept
        ("trailing   \nspaces\t \t\nhere  ", "trailing\nspaces\nhere"),
        ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # more than two blank lines become two
        ("a\n\n\nb", "a\n\n\nb"),  # two blank lines stay
        ("a\n \n\t\n  \n \nb", "a\n\n\nb"),  # whitespace-only lines are blank lines
        ("\n\n  \nbody\n\n \n", "body"),
        ("", ""),
        ("   \n\t\n", ""),
    ],
)
def test_normalize_examples(raw: str, expected: str) -> None:
    assert normalize(raw) == expected


def test_exotic_spaces_become_plain_spaces() -> None:
    spaces = "\u00a0" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u202f\u205f\u3000"
    assert normalize(f"a{spaces}b") == "a" + " " * len(spaces) + "b"


def test_indentation_and_inner_runs_of_spaces_are_kept() -> None:
    code = "def f(x):\n    if x:\n        return  1\n\treturn 2"
    assert normalize(code) == code
    table = "name      value    unit\nalpha     1.0      m\nbeta      22.5     kg"
    assert normalize(table) == table
    assert normalize("\n\n    indented first line\n  second") == "    indented first line\n  second"


def test_crlf_document_with_trailing_whitespace() -> None:
    raw = "Title  \r\n\r\n\r\n\r\n\r\n  body line\t\r\n"
    assert normalize(raw) == "Title\n\n\n  body line"


def test_zero_width_char_between_letter_and_mark_composes_in_one_call() -> None:
    # The zero-width space hides the combining mark from NFC until it is removed.
    once = normalize("e\u200b\u0301")
    assert once == "\u00e9"
    assert normalize(once) == once


_ALPHABET = [
    "a", "b", "Z", "é", "e", "\u0301", "\u0308", "ñ", "n", "\u0303", "ß", "字", "😀",
    " ", "  ", "\t", "\n", "\n\n", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x1f", "\x7f", "\x85",
    "\u00a0", "\u2000", "\u2001", "\u2002", "\u2009", "\u200a", "\u200b", "\u200c", "\u200d",
    "\u2060", "\ufeff", "\u202f", "\u205f", "\u3000", "\u2028", "\u212b", "\u2126", "#", ".",
    "-", "•", "\u1100", "\u1161", "\u11a8",  # Hangul jamo compose under NFC
]  # fmt: skip


def _random_text(rng: random.Random) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 60)))


def test_normalize_is_idempotent_on_random_text() -> None:
    rng = random.Random(1234)
    for _ in range(5000):
        raw = _random_text(rng)
        once = normalize(raw)
        assert normalize(once) == once, repr(raw)


def test_normalized_text_has_the_promised_properties() -> None:
    rng = random.Random(99)
    forbidden = re.compile(
        "[\r\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff"
        "\u00a0\u2000-\u200a\u202f\u205f\u3000]"
    )
    for _ in range(3000):
        out = normalize(_random_text(rng))
        assert unicodedata.is_normalized("NFC", out)
        assert not forbidden.search(out), repr(out)
        assert "\n\n\n\n" not in out
        assert not out.startswith("\n") and not out.endswith("\n")
        for line in out.split("\n"):
            assert line == line.rstrip(" \t"), repr(out)


def test_non_whitespace_content_survives() -> None:
    rng = random.Random(7)
    words = ["alpha", "beta", "x=1", "   y", "中文", "naïve"]
    for _ in range(500):
        raw = "".join(rng.choice(words + [" ", "\n", "\r\n", "\t"]) for _ in range(30))
        assert normalize(raw).split() == raw.split()
