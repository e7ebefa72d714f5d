"""Tests of decontamination against JSONL and text eval files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from domainlm.corpus.decontaminate import Decontaminator
from domainlm.errors import UserError

QUESTION = (
    "Which clause of the master agreement governs the early termination payment when the "
    "defaulting party is the counterparty under section six"
)
RNG = random.Random(0)
FILLER = " ".join(f"word{RNG.randrange(5000)}" for _ in range(400))
OTHER = " ".join(f"other{RNG.randrange(5000)}" for _ in range(400))


def _jsonl(path: Path, records: list[object]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def evals(tmp_path: Path) -> list[str]:
    qa = _jsonl(
        tmp_path / "test.jsonl",
        [
            {"id": 1, "question": QUESTION, "answer": "B"},
            {"messages": [{"role": "user", "content": "Summarize the filing " + FILLER[:300]}]},
        ],
    )
    txt = tmp_path / "passage.txt"
    txt.write_text("The quarterly report showed revenue growth across all segments.\n")
    return [qa, str(txt)]


def test_document_sharing_an_ngram_is_flagged(evals: list[str]):
    d = Decontaminator(evals, ngram=13, max_overlap=0.0)
    doc = " ".join(OTHER.split()[:200] + [QUESTION.upper() + "?"] + OTHER.split()[200:])
    hit = d.check(doc)
    assert hit is not None
    name, detail = hit
    assert name == evals[0]
    shared = len(QUESTION.split()) - 13 + 1
    windows = 400 + len(QUESTION.split()) - 13 + 1
    assert detail.startswith(f"shares {shared} of {windows} 13-grams with {name} (e.g. 'which ")
    assert d.check(OTHER) is None
    assert d.check("") is None


def test_nested_string_values_count(evals: list[str]):
    d = Decontaminator(evals, ngram=13, max_overlap=0.0)
    # A window spanning text of the chat message's content.
    assert d.check("intro " + FILLER[:200] + " outro") is not None


def test_short_eval_text_matches_whole(evals: list[str]):
    d = Decontaminator(evals, ngram=13, max_overlap=0.0)
    hit = d.check("Analysts said the quarterly report showed revenue growth across all segments.")
    assert hit is not None and hit[0] == evals[1]
    assert "quarterly report showed revenue growth across all segments" in hit[1]
    # Word order matters; a partial match of a short text does not count.
    assert d.check("the quarterly report showed revenue growth across some segments") is None
    # The answer "B" and the role "user" are too short to match; they are counted, not lost.
    assert d.skipped_short == 2
    assert d.check("Plan B was chosen.") is None


def test_max_overlap_fraction(tmp_path: Path):
    words = [f"t{i}" for i in range(100)]
    ev = tmp_path / "ev.txt"
    ev.write_text(" ".join(words[:30]))
    doc = " ".join(words)  # 96 windows of 5, of which 26 are in the eval text
    assert Decontaminator([str(ev)], ngram=5, max_overlap=0.25).check(doc) is not None
    assert Decontaminator([str(ev)], ngram=5, max_overlap=0.30).check(doc) is None
    name, detail = Decontaminator([str(ev)], ngram=5, max_overlap=0.0).check(doc)
    assert detail.startswith(f"shares 26 of 96 5-grams with {ev}")


def test_bad_json_line_names_file_and_line(tmp_path: Path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "fine"}\n\n{"question": oops}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON"):
        Decontaminator([str(bad)], ngram=13, max_overlap=0.0)


def test_missing_and_unsupported_files(tmp_path: Path):
    with pytest.raises(UserError, match="not found"):
        Decontaminator([str(tmp_path / "nope.jsonl")], ngram=13, max_overlap=0.0)
    csv = tmp_path / "evals.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserError, match=r"\.jsonl .* or \.txt"):
        Decontaminator([str(csv)], ngram=13, max_overlap=0.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no eval text"):
        Decontaminator([str(empty)], ngram=13, max_overlap=0.0)


def test_fingerprint_tracks_contents_and_params(evals: list[str], tmp_path: Path):
    fp = Decontaminator(evals, 13, 0.0).fingerprint
    assert fp == Decontaminator(evals, 13, 0.0).fingerprint
    assert fp != Decontaminator(evals, 8, 0.0).fingerprint
    assert fp != Decontaminator(evals, 13, 0.1).fingerprint
    assert fp != Decontaminator(evals[:1], 13, 0.0).fingerprint
    Path(evals[1]).write_text("A different passage entirely, with other words in it.\n")
    assert fp != Decontaminator(evals, 13, 0.0).fingerprint


def test_many_documents_are_checked_quickly(evals: list[str]):
    d = Decontaminator(evals, ngram=13, max_overlap=0.0)
    docs = [" ".join(f"word{RNG.randrange(5000)}" for _ in range(500)) for _ in range(200)]
    flagged = [d.check(doc) for doc in docs]
    # Random documents share no 13-gram with the evals (a hash collision would show here).
    assert flagged == [None] * len(docs)
