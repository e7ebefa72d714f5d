"""Tests of exact keys, shingles, MinHash signatures and near-duplicate finding on a planted set."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from domainlm.corpus.dedup import (
    NearDup,
    duplicate_clusters,
    exact_key,
    find_near_duplicates,
    shingles,
    signatures,
)
from domainlm.corpus.planted import MARGIN, dedup_scores, jaccard, planted_set

THRESHOLD = 0.8
NUM_PERM = 128


def test_exact_key_ignores_case_and_whitespace_only():
    a = exact_key("The  quick\tbrown\n fox ")
    assert a == exact_key("the quick BROWN fox")
    assert a == exact_key("\n\nTHE QUICK BROWN FOX")
    assert a != exact_key("the quick brown fox.")
    assert a != exact_key("the quick brown")
    assert len(a) == 32 and int(a, 16) >= 0


def test_shingles():
    assert shingles("A b, C d!", 2) == [b"a b", b"b c", b"c d"]
    assert shingles("one two", 5) == [b"one two"]
    assert shingles("", 5) == [b""]
    assert shingles("Grüße aus Köln", 3) == ["grüße aus köln".encode()]


def _planted_scores(seed: int) -> tuple[float, float, int, int]:
    texts, true, planted = planted_set(300, seed, THRESHOLD)
    sets = [set(shingles(t, 5)) for t in texts]
    truth = {pair: jaccard(sets[pair[0]], sets[pair[1]]) for pair in planted}

    # The generator's promises: the planted pairs are where intended, none is ambiguous.
    assert all(abs(j - THRESHOLD) >= MARGIN - 1e-9 for j in truth.values())
    assert true == {p for p, j in truth.items() if j >= THRESHOLD}
    # Bases come first, so (i, j) with i < 300 is a base and one of its copies.
    windows = [(0.85, 0.88), (0.88, 0.92), (0.93, 0.97), (1.0, 1.0), (0.625, 0.675),
               (0.47, 0.53), (0.27, 0.33)]  # fmt: skip
    per_window = dict.fromkeys(windows, 0)
    for (i, _), j in truth.items():
        if i < 300:
            window = next(w for w in windows if w[0] - 1e-9 <= j <= w[1] + 1e-9)
            per_window[window] += 1
    assert min(per_window.values()) >= 10, per_window
    assert len(true) > 100 and len(planted) - len(true) > 100

    keys = [f"doc{i}" for i in range(len(texts))]
    sigs = signatures(texts, 5, NUM_PERM, seed=7)
    dups = find_near_duplicates(keys, sigs, THRESHOLD, NUM_PERM)
    index = {k: i for i, k in enumerate(keys)}
    predicted = [(index[d.duplicate_of], index[d.key]) for d in dups]
    assert all(i < j for i, j in predicted)
    precision, recall = dedup_scores(texts, predicted, true, THRESHOLD)
    return precision, recall, len(predicted), len(true)


def test_planted_set_precision_and_recall():
    precision, recall, n_pred, n_true = _planted_scores(seed=0)
    print(
        f"planted set: precision {precision:.3f} recall {recall:.3f} "
        f"({n_pred} predicted pairs, {n_true} true pairs)"
    )
    assert precision >= 0.95
    assert recall >= 0.95


def test_signatures_shape_and_similarity():
    base = " ".join(f"w{i}" for i in range(200))
    near = base.replace("w100 ", "changed ")
    other = " ".join(f"x{i}" for i in range(200))
    sigs = signatures([base, near, other, ""], 5, 64, seed=1)
    assert sigs.shape == (4, 64) and sigs.dtype == np.uint64
    assert (sigs[0] == sigs[1]).mean() > 0.8
    assert (sigs[0] == sigs[2]).mean() < 0.2
    assert not np.array_equal(sigs, signatures([base, near, other, ""], 5, 64, seed=2))


def _child_signatures(texts: list[str]) -> np.ndarray:
    return signatures(texts, 5, NUM_PERM, seed=3)


def test_signatures_are_the_same_in_another_process():
    texts = ["the cat sat on the mat today", "Ein völlig anderer Text, mit Umlauten äöü.", ""]
    here = signatures(texts, 5, NUM_PERM, seed=3)
    # spawn starts a fresh interpreter, with its own hash() salt, so only a deterministic
    # hash function gives the same signatures there.
    with mp.get_context("spawn").Pool(1) as pool:
        there = pool.apply(_child_signatures, (texts,))
    assert np.array_equal(here, there)


def test_first_in_order_is_kept():
    words = [f"w{i}" for i in range(300)]
    a = " ".join(words)
    b = " ".join(words[:150] + ["edit"] + words[151:])
    c = " ".join(f"z{i}" for i in range(300))
    sigs = signatures([a, b, c], 5, NUM_PERM, seed=1)
    dups = find_near_duplicates(["a", "b", "c"], sigs, THRESHOLD, NUM_PERM)
    assert [(d.key, d.duplicate_of) for d in dups] == [("b", "a")]
    assert 0.8 <= dups[0].similarity <= 1.0
    swapped = find_near_duplicates(["b", "a", "c"], sigs[[1, 0, 2]], THRESHOLD, NUM_PERM)
    assert [(d.key, d.duplicate_of) for d in swapped] == [("a", "b")]


def test_duplicate_of_the_earliest_verified_document():
    # Signatures made by hand: C matches kept A (0.90) and kept B (0.85), while A and B
    # (0.75 apart) are both kept. The first 11 positions agree, so every pair shares an LSH
    # band and is a candidate whatever the banding.
    rng = np.random.default_rng(0)
    c = rng.integers(0, 2**32 - 1, NUM_PERM, dtype=np.uint64)
    a, b = c.copy(), c.copy()
    a[11:24] += 1  # 13 of 128 differ from C
    b[24:43] += 1  # 19 of 128
    sigs = np.stack([b, a, c])
    dups = find_near_duplicates(["B", "A", "C"], sigs, THRESHOLD, NUM_PERM)
    assert [(d.key, d.duplicate_of) for d in dups] == [("C", "B")]
    assert dups[0].similarity == pytest.approx(109 / 128)
    dups = find_near_duplicates(["A", "B", "C"], sigs[[1, 0, 2]], THRESHOLD, NUM_PERM)
    assert [(d.key, d.duplicate_of) for d in dups] == [("C", "A")]
    assert dups[0].similarity == pytest.approx(115 / 128)


def test_short_and_empty_documents():
    texts = ["Hello world", "hello,  WORLD!", "hello there", "", "   "]
    sigs = signatures(texts, 5, NUM_PERM, seed=1)
    dups = find_near_duplicates([str(i) for i in range(5)], sigs, THRESHOLD, NUM_PERM)
    assert [(d.key, d.duplicate_of) for d in dups] == [("1", "0"), ("4", "3")]


def test_find_near_duplicates_checks_shape():
    sigs = signatures(["a b c"], 5, 64, seed=1)
    with pytest.raises(ValueError, match="shape"):
        find_near_duplicates(["a", "b"], sigs, THRESHOLD, 64)


def test_duplicate_clusters():
    dups = [
        NearDup("b", "a", 0.9),
        NearDup("c", "a", 0.85),
        NearDup("e", "d", 1.0),
        NearDup("f", "b", 0.9),
    ]
    assert duplicate_clusters(dups) == {"a": ["b", "c", "f"], "d": ["e"]}
    assert duplicate_clusters([]) == {}
