"""The per-document half of dedup: exact keys, shingle hash sets, MinHash signatures, LSH bands.

Our own MinHash rather than datasketch's: the per-shard work signs a whole batch of documents
in a few numpy calls (datasketch signs one document per Python call, which made MinHash the
costliest step after language id), and the near-duplicate search is partitioned by band
(corpus/neardup.py), which datasketch's in-memory LSH index cannot be.
"""

from __future__ import annotations

import hashlib
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_MASK64 = (1 << 64) - 1
# Odd multipliers (golden ratio, and MurmurHash3's fmix64 constants): invertible mod 2^64.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_EMPTY = np.uint64(0x5BD1E9955BD1E995)  # the one shingle of a text without words
# A recall floor for choosing bands: the chance that a pair exactly at the threshold becomes
# a candidate. Candidates are verified with the exact Jaccard, so a false candidate costs one
# comparison, while a missed one is a duplicate left in the corpus.
LSH_RECALL_AT_THRESHOLD = 0.995


def exact_key(text: str) -> str:
    """A key shared by texts that differ only in case and whitespace."""
    normalized = " ".join(text.casefold().split())
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def words(text: str) -> list[str]:
    """Lowercase word tokens, the unit of shingles and of decontamination n-grams."""
    return _WORD.findall(text.lower())


def shingles(text: str, k: int) -> list[bytes]:
    """Word k-shingles as UTF-8 bytes; a text shorter than k words is one shingle of all of them.

    The reference definition (tests and the planted set measure Jaccard with it);
    `shingle_set` computes the same set as 32-bit hashes, far faster.
    """
    if k < 1:
        raise ValueError(f"shingle size must be at least 1, got {k}")
    encoded = list(map(str.encode, words(text)))
    if len(encoded) <= k:
        return [b" ".join(encoded)]
    return list(map(b" ".join, zip(*(encoded[i:] for i in range(k)), strict=False)))


def _fmix64(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX1
    h = h ^ (h >> np.uint64(33))
    h = h * _FMIX2
    return h ^ (h >> np.uint64(33))


def shingle_set(text: str, k: int) -> np.ndarray:
    """The text's word k-shingles as sorted, distinct 32-bit hashes (uint32).

    A shingle's hash is a polynomial over its words' CRC-32s, mixed with MurmurHash3's
    finalizer, so no shingle string is ever built. Two different shingles share a hash with
    probability 2^-32: on a pair of 1,000-shingle documents that moves the Jaccard by about
    0.001 once in 4,000 pairs, which is why `exact Jaccard` in these docs means "of these sets".
    """
    ws = _WORD.findall(text.lower())
    if not ws:
        return np.array([_EMPTY >> np.uint64(32)], dtype=np.uint32)
    h = np.fromiter(map(zlib.crc32, map(str.encode, ws)), dtype=np.uint64, count=len(ws))
    n = len(ws) - k + 1 if len(ws) > k else 1
    width = min(k, len(ws))
    with np.errstate(over="ignore"):
        acc = h[:n].copy()
        for j in range(1, width):
            acc *= _GOLDEN
            acc += h[j : j + n]
        acc = _fmix64(acc + np.uint64(width))
    return np.unique((acc >> np.uint64(32)).astype(np.uint32))


def shingle_hashes(texts: list[str], k: int) -> list[np.ndarray]:
    """The shingle hashes of every text (as `shingle_set`, but in text order and with
    repeats: the MinHash minimum does not need them sorted), for a whole batch at once."""
    per_doc = [_WORD.findall(t.lower()) for t in texts]
    lengths = [len(ws) for ws in per_doc]
    out: list[np.ndarray] = []
    words_all = [w for ws, n in zip(per_doc, lengths, strict=True) if n > k for w in ws]
    # Each distinct word is hashed once (words repeat: a batch has ~10x fewer distinct ones).
    vocab = {w: zlib.crc32(w.encode()) for w in set(words_all)}
    h = np.fromiter(map(vocab.__getitem__, words_all), dtype=np.uint64, count=len(words_all))
    n_win = max(0, len(h) - k + 1)
    with np.errstate(over="ignore"):
        acc = h[:n_win].copy()
        for j in range(1, k):
            acc *= _GOLDEN
            acc += h[j : j + n_win]
        values = (_fmix64(acc + np.uint64(k)) >> np.uint64(32)).astype(np.uint32)
    start = 0
    for text, n in zip(texts, lengths, strict=True):
        if n <= k:  # one shingle of all the words (or none)
            out.append(shingle_set(text, k))
            continue
        # Windows from `start` that stay inside this document; the ones that run into the
        # next document are skipped.
        out.append(values[start : start + n - k + 1])
        start += n
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of the sets of two arrays of shingle hashes."""
    a, b = np.unique(a), np.unique(b)
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


@dataclass(frozen=True)
class MinHasher:
    """MinHash over 32-bit shingle hashes: permutation p maps x to a_p * x + b_p (mod 2^32).

    With odd a_p that is a bijection of the 32-bit values, and the shingle hashes are already
    mixed, so the minimum under each permutation is a fair sample of the set (the planted-set
    test measures the estimates).
    """

    num_perm: int
    seed: int

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0x6D696E68])
        a = rng.integers(0, 2**32, self.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
        b = rng.integers(0, 2**32, self.num_perm, dtype=np.uint64).astype(np.uint32)
        return a, b

    def sign(self, sets: list[np.ndarray]) -> np.ndarray:
        """Signatures of the sets, shape (len(sets), num_perm), uint32."""
        out = np.empty((len(sets), self.num_perm), dtype=np.uint32)
        if not sets:
            return out
        a, b = self.params()
        # Chunks of about 8K shingles: one numpy call per chunk, and the num_perm x 8K scratch
        # (4 MB) stays in cache; 64K-shingle chunks (32 MB) ran three times slower.
        start = 0
        while start < len(sets):
            stop, total = start, 0
            while stop < len(sets) and (total == 0 or total + sets[stop].size <= 8192):
                total += sets[stop].size
                stop += 1
            x = np.concatenate(sets[start:stop])
            # Permutations along rows: each row is contiguous, so reduceat runs at memory speed.
            with np.errstate(over="ignore"):
                permuted = a[:, None] * x[None, :]
                permuted += b[:, None]
            offsets = np.cumsum([0] + [s.size for s in sets[start : stop - 1]])
            out[start:stop] = np.minimum.reduceat(permuted, offsets, axis=1).T
            start = stop
        return out


def signatures(texts: list[str], shingle: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures of the texts' shingle sets, one row per text, shape (n, num_perm)."""
    return MinHasher(num_perm, seed).sign(shingle_hashes(texts, shingle))


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for the LSH: the most rows per band (the fewest false candidates) with
    which a pair at the threshold still becomes a candidate with LSH_RECALL_AT_THRESHOLD.

    For threshold 0.8 and 128 permutations: 21 bands of 6 rows, an S-curve centred near
    J = 0.6; a pair at 0.85 is missed with probability ~1e-6, at 0.8 ~2e-3.
    """
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= LSH_RECALL_AT_THRESHOLD:
            return bands, rows
    return num_perm, 1


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """The chance that a pair of Jaccard j shares at least one band."""
    return 1 - (1 - j**rows) ** bands


def lsh_threshold(bands: int, rows: int) -> float:
    """Where the S-curve is steepest: the usual (1/b)^(1/r) approximation."""
    return math.pow(1 / bands, 1 / rows)


def band_hashes(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit hash per (band, document): shape (bands, n), uint64."""
    n = sigs.shape[0]
    out = np.empty((bands, n), dtype=np.uint64)
    s = sigs.astype(np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            acc = np.full(n, np.uint64(b + 1), dtype=np.uint64)
            for r in range(rows):
                acc = acc * _GOLDEN + s[:, b * rows + r]
            out[b] = _fmix64(acc)
    return out
