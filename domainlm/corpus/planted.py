"""A synthetic corpus with planted near-duplicates of known Jaccard similarity, for dedup tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import combinations, combinations_with_replacement

from domainlm.corpus.dedup import shingles

SHINGLE = 5
# Pairs this close to the threshold are ambiguous: MinHash's estimate (std ~0.035 at 128
# permutations) can land on either side, so they would measure luck rather than the method.
MARGIN = 0.05
# Planted levels relative to the threshold (for 0.8: 0.865, 0.9, 0.95, 1.0 and 0.65, 0.5,
# 0.3), each with the half-width of the window a copy's true Jaccard must land in.
POSITIVE = [(0.065, 0.015), (0.1, 0.02), (0.15, 0.02)]
NEGATIVE = [(-0.15, 0.025), (-0.3, 0.03), (-0.5, 0.03)]
SUPPORTED = (0.6, 0.82)
MAX_TRIES = 400


def jaccard(a: set[bytes], b: set[bytes]) -> float:
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def planted_set(
    n_base: int, seed: int, threshold: float
) -> tuple[list[str], set[tuple[int, int]], set[tuple[int, int]]]:
    """Texts, the index pairs whose true 5-shingle Jaccard is >= threshold, and all planted pairs.

    Bases come first (in order), their copies after them in a shuffled order, so a greedy
    dedup that keeps the first document of each group keeps the base. Pairs are (i, j), i < j.
    Every pair inside a group is planted, and no planted pair lies within MARGIN of threshold.
    """
    if not SUPPORTED[0] <= threshold <= SUPPORTED[1]:
        raise ValueError(f"planted_set supports thresholds in {SUPPORTED}, got {threshold}")
    levels = {threshold + off: tol for off, tol in POSITIVE + NEGATIVE} | {1.0: 0.0}
    clusters = _clusters(sorted(levels), threshold)
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 4000)
    base_words = [[rng.choice(vocab) for _ in range(rng.randint(200, 400))] for _ in range(n_base)]
    texts = [_render(w, rng) for w in base_words]
    copies: list[tuple[int, str]] = []  # (base index, text)
    for b, words in enumerate(base_words):
        if rng.random() < 0.25:
            continue  # bases without copies: the unrelated background
        group = [set(shingles(texts[b], SHINGLE))]
        for level in rng.choice(clusters):
            text = _planted_copy(words, level, levels[level], group, threshold, vocab, rng)
            group.append(set(shingles(text, SHINGLE)))
            copies.append((b, text))
    rng.shuffle(copies)

    members: dict[int, list[int]] = {b: [b] for b in range(n_base)}
    for b, text in copies:
        members[b].append(len(texts))
        texts.append(text)
    sets = [set(shingles(t, SHINGLE)) for t in texts]
    planted: set[tuple[int, int]] = set()
    true: set[tuple[int, int]] = set()
    for group in members.values():
        for i, j in combinations(sorted(group), 2):
            planted.add((i, j))
            if jaccard(sets[i], sets[j]) >= threshold:
                true.add((i, j))
    return texts, true, planted


def _clusters(levels: list[float], threshold: float) -> list[tuple[float, ...]]:
    """Copy levels to plant for one base: one copy, or two or three that stay clear of each other.

    Copies of one base are compared with each other too. An exact copy (1.0) has the base's
    shingle set; two edited copies break about x_a + x_b of the base's shingles between them,
    where a copy at Jaccard J breaks x = (1 - J) / (1 + J) of them. Combinations predicted to
    land near the threshold are left out instead of being regenerated forever.
    """

    def cross(a: float, b: float) -> float:
        if 1.0 in (a, b):
            return min(a, b)
        x = (1 - a) / (1 + a) + (1 - b) / (1 + b)
        return (1 - x) / (1 + x)

    pairs = [(a, b) for a, b in combinations_with_replacement(levels, 2) if a != 1.0 or b != 1.0]
    clear = [p for p in pairs if abs(cross(*p) - threshold) >= MARGIN + 0.03]
    return [(lv,) for lv in levels] + clear + [(1.0, max(levels[:-1]), min(levels))]


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 10))))
    return sorted(vocab)


def _render(words: list[str], rng: random.Random) -> str:
    """Words as prose: sentences of random length, capitalized, with punctuation."""
    out: list[str] = []
    start = True
    for w in words:
        out.append(w.capitalize() if start else w)
        start = rng.random() < 0.08
        if start:
            out[-1] += rng.choice([".", ".", "?", "!"])
        elif rng.random() < 0.05:
            out[-1] += ","
    return " ".join(out) + "."


def _planted_copy(
    words: list[str],
    level: float,
    tolerance: float,
    group: list[set[bytes]],
    threshold: float,
    vocab: list[str],
    rng: random.Random,
) -> str:
    """A copy of `words` whose Jaccard with the base is `level` (within `tolerance`)."""
    # One edit away from the document ends replaces ~SHINGLE shingles, so J ~ (S-5m)/(S+5m).
    n_shingles = len(words) - SHINGLE + 1
    edits = round(n_shingles * (1 - level) / (SHINGLE * (1 + level)))
    for _ in range(MAX_TRIES):
        copy = _edit(words, edits, vocab, rng) if level < 1.0 else words
        text = _render(copy, rng)
        sims = [jaccard(set(shingles(text, SHINGLE)), other) for other in group]
        if abs(sims[0] - level) > tolerance:
            # Edits that fall close together overlap in the shingles they break; step the
            # number of edits towards the target and try again.
            edits = max(1, edits + (1 if sims[0] > level else -1))
            continue
        if all(abs(s - threshold) >= MARGIN - 1e-9 for s in sims):
            return text
    raise RuntimeError(f"could not plant a copy at Jaccard {level} in {MAX_TRIES} tries")


def _edit(words: list[str], n: int, vocab: list[str], rng: random.Random) -> list[str]:
    out = list(words)
    ops: list[Callable[[int], None]] = [
        lambda i: out.__setitem__(i, rng.choice(vocab)),
        lambda i: out.insert(i, rng.choice(vocab)),
        lambda i: out.__delitem__(i),
    ]
    for _ in range(n):
        rng.choice(ops)(rng.randrange(len(out)))
    return out


def dedup_scores(
    texts: list[str],
    predicted: list[tuple[int, int]],
    true: set[tuple[int, int]],
    threshold: float,
) -> tuple[float, float]:
    """Precision and recall of found (kept, duplicate) index pairs against the true pairs.

    A predicted pair is correct when its true Jaccard is >= threshold. A true pair is found
    when both documents end up in one cluster: the greedy pass keeps one document per cluster,
    so two copies of one base meet through it rather than as a direct pair.
    """
    sets: dict[int, set[bytes]] = {}

    def shingle_set(i: int) -> set[bytes]:
        if i not in sets:
            sets[i] = set(shingles(texts[i], SHINGLE))
        return sets[i]

    correct = sum(jaccard(shingle_set(i), shingle_set(j)) >= threshold for i, j in predicted)
    precision = correct / len(predicted) if predicted else 1.0
    parent = list(range(len(texts)))

    def root(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in predicted:
        parent[root(j)] = root(i)
    recall = sum(root(i) == root(j) for i, j in true) / len(true) if true else 1.0
    return precision, recall
