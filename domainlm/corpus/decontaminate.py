"""Decontamination: find documents that share word n-grams with evaluation sets."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from itertools import repeat
from pathlib import Path

import numpy as np

from domainlm.corpus.dedup import words
from domainlm.errors import UserError

# An eval text shorter than the n-gram is matched as a whole, but one- or two-word answers
# ("B", "yes", "Paris") and fields such as a chat role ("user") would then flag every document
# that uses the word. Shorter texts than this are counted in `skipped_short` and not matched.
MIN_SHORT_WORDS = 8

# A window's hash is a polynomial over its words' 64-bit hashes (mod 2^64, numpy's wraparound),
# so each document's windows come from one vectorized pass over its tokens instead of one
# blake2b call per window. The multiplier is odd, hence invertible mod 2^64: two different
# windows collide with probability ~2^-64 given random word hashes.
_MULT = np.uint64(0x9E3779B97F4A7C15)
# Words absent from every eval text share this hash: no window holding one can match, so a
# document's words need no hashing of their own, only a dictionary look-up.
_UNKNOWN = 0
# Bits of the prefilter per eval gram: a window passes it falsely with probability <= 1/8, so
# the binary search runs on few windows; the bitmap costs 2 to 4 bytes a gram.
_BITS_PER_GRAM = 16
_EXAMPLE_CHARS = 80


class Decontaminator:
    """Checks documents against the word n-grams of evaluation files (JSONL or plain text)."""

    def __init__(self, files: list[str], ngram: int, max_overlap: float):
        if ngram < 1:
            raise UserError(f"corpus.decontam.ngram must be at least 1, got {ngram}")
        if not 0.0 <= max_overlap <= 1.0:
            raise UserError(f"corpus.decontam.max_overlap must be in [0, 1], got {max_overlap}")
        self.files = list(files)
        self.ngram = ngram
        self.max_overlap = max_overlap
        self.eval_texts = 0
        self.skipped_short = 0  # eval texts too short to match (see MIN_SHORT_WORDS)
        self._vocab: dict[str, int] = {}  # word of the eval texts -> its 64-bit hash
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps(["v1", ngram, max_overlap, MIN_SHORT_WORDS]).encode())
        # Gram length -> (window hashes, file index) per eval text. Lengths below `ngram` come
        # from short eval texts, matched as a whole.
        parts: dict[int, list[tuple[np.ndarray, int]]] = {}
        for index, name in enumerate(self.files):
            data = _read(name)
            digest.update(name.encode() + b"\0" + hashlib.blake2b(data).digest())
            count = 0
            for text in _eval_texts(name, data):
                count += 1
                tokens = words(text)
                if len(tokens) < min(ngram, MIN_SHORT_WORDS):
                    self.skipped_short += 1
                    continue
                for w in tokens:
                    if w not in self._vocab:
                        self._vocab[w] = _word_hash(w)
                n = min(ngram, len(tokens))
                parts.setdefault(n, []).append((_windows(self._hashes(tokens), n), index))
            if count == 0:
                raise UserError(
                    f"{name}: no eval text in it; give a JSONL file of records with string "
                    "fields (question, answer, text, ...) or a .txt file, or remove it from "
                    "corpus.decontam.files"
                )
            self.eval_texts += count
        self._fingerprint = digest.hexdigest()
        self._tables = {
            n: _Table(
                np.concatenate([h for h, _ in p]),
                np.concatenate([np.full(len(h), i, dtype=np.int64) for h, i in p]),
            )
            for n, p in sorted(parts.items(), reverse=True)  # full-length grams first
        }

    @property
    def fingerprint(self) -> str:
        """Hash of the eval files' names and contents and of the parameters."""
        return self._fingerprint

    @property
    def num_grams(self) -> int:
        return sum(len(t.hashes) for t in self._tables.values())

    def check(self, text: str) -> tuple[str, str] | None:
        """(eval file, detail) when the text overlaps the evals more than allowed, else None."""
        tokens = words(text)
        total = max(1, len(tokens) - self.ngram + 1)
        hashes = self._hashes(tokens)
        # (gram length, start positions, owning files) of the shared grams, full length first.
        hits: list[tuple[int, np.ndarray, np.ndarray]] = []
        for n, table in self._tables.items():
            if len(tokens) >= n:
                starts, owners = table.lookup(_windows(hashes, n))
                if starts.size:
                    hits.append((n, starts, owners))
        matched = sum(len(starts) for _, starts, _ in hits)
        if matched == 0 or min(1.0, matched / total) <= self.max_overlap:
            return None
        per_file = sum(np.bincount(owners, minlength=len(self.files)) for _, _, owners in hits)
        worst = int(np.argmax(per_file))
        n, starts, owners = next(h for h in hits if (h[2] == worst).any())
        start = int(starts[np.argmax(owners == worst)])
        shown = " ".join(tokens[start : start + n])
        if len(shown) > _EXAMPLE_CHARS:
            shown = shown[: _EXAMPLE_CHARS - 3] + "..."
        name = self.files[worst]
        return name, f"shares {matched} of {total} {self.ngram}-grams with {name} (e.g. '{shown}')"

    def _hashes(self, tokens: list[str]) -> np.ndarray:
        get = self._vocab.get
        return np.fromiter(map(get, tokens, repeat(_UNKNOWN)), dtype=np.uint64, count=len(tokens))


class _Table:
    """The grams of one length: sorted hashes and the file of each, behind a bitmap prefilter."""

    def __init__(self, hashes: np.ndarray, owners: np.ndarray):
        # np.unique keeps the first occurrence, so a gram belongs to the earliest file.
        self.hashes, first = np.unique(hashes, return_index=True)
        self.owners = owners[first]
        bits = max(6, int(np.ceil(np.log2(len(self.hashes) * _BITS_PER_GRAM))))
        self.shift = np.uint64(64 - bits)
        slots = self.hashes >> self.shift
        self.bitmap = np.zeros(1 << (bits - 3), dtype=np.uint8)
        np.bitwise_or.at(
            self.bitmap, slots >> np.uint64(3), np.left_shift(1, slots & 7, dtype=np.uint8)
        )

    def lookup(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the windows found in the table, and the file index of each."""
        slots = windows >> self.shift
        maybe = np.flatnonzero((self.bitmap[slots >> np.uint64(3)] >> (slots & 7)) & 1)
        if not maybe.size:
            return maybe, maybe
        pos = np.searchsorted(self.hashes, windows[maybe])
        pos[pos == len(self.hashes)] = 0
        found = self.hashes[pos] == windows[maybe]
        return maybe[found], self.owners[pos[found]]


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _windows(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hashes of every run of n consecutive words, in order (n <= len(hashes))."""
    count = len(hashes) - n + 1
    out = hashes[:count].copy()
    for j in range(1, n):
        out *= _MULT
        out += hashes[j : j + count]
    return out


def _read(name: str) -> bytes:
    path = Path(name)
    if not path.is_file():
        raise UserError(
            f"{name}: eval file not found; fix the path in corpus.decontam.files (paths are "
            "relative to the directory you run domainlm from)"
        )
    if path.suffix not in (".jsonl", ".txt"):
        raise UserError(
            f"{name}: eval files must be .jsonl (one JSON object a line) or .txt; convert it "
            "or remove it from corpus.decontam.files"
        )
    return path.read_bytes()


def _eval_texts(name: str, data: bytes) -> Iterator[str]:
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{name}: not UTF-8 text (byte {e.start}); re-save it as UTF-8") from e
    if name.endswith(".txt"):
        if content.strip():
            yield content
        return
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which
    # splitlines() would treat as line ends and so misnumber the lines after them.
    for lineno, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{name}:{lineno}: not valid JSON ({e.msg}); each line of an eval JSONL file "
                "must be one JSON object"
            ) from e
        yield from (s for s in _strings(record) if s.strip())


def _strings(value: object) -> Iterator[str]:
    """Every string value in a JSON value (nested objects and lists too, e.g. chat messages)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
