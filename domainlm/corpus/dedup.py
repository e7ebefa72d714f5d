"""Exact and near (MinHash LSH) deduplication of documents, built on datasketch."""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

_WORD = re.compile(r"\w+")

# datasketch 2.0's default scheme: a bijective affine permutation over 32-bit hashes. Stored hash
# values carry no trace of their scheme, so signatures() and find_near_duplicates() must agree.
SCHEME = "affine32"

# LSH errs towards recall: every candidate is verified against the signatures afterwards, so a
# false positive costs one comparison while a false negative is a duplicate left in the corpus.
LSH_WEIGHTS = (0.3, 0.7)

# zlib.crc32 is a deterministic 32-bit hash in C, passed without a Python wrapper: signatures
# run ~2.3x faster than with datasketch's default (sha1 + struct; measured 9-11 vs ~4 MB/s on
# 3 KB documents), as fast as xxhash's xxh32, and with no extra dependency. The scheme's
# MurmurHash3 pre-mix spreads CRC's linear structure; the planted-set test guards accuracy.
HASHFUNC = zlib.crc32


def exact_key(text: str) -> str:
    """A key shared by texts that differ only in case and whitespace."""
    normalized = " ".join(text.casefold().split())
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).hexdigest()


def words(text: str) -> list[str]:
    """Lowercase word tokens, the unit of shingles and of decontamination n-grams."""
    return _WORD.findall(text.lower())


def shingles(text: str, k: int) -> list[bytes]:
    """Word k-shingles as UTF-8 bytes; a text shorter than k words is one shingle of all of them."""
    if k < 1:
        raise ValueError(f"shingle size must be at least 1, got {k}")
    encoded = list(map(str.encode, words(text)))
    if len(encoded) <= k:
        return [b" ".join(encoded)]
    return list(map(b" ".join, zip(*(encoded[i:] for i in range(k)), strict=False)))


def signatures(texts: list[str], shingle: int, num_perm: int, seed: int) -> np.ndarray:
    """MinHash signatures of the texts' shingle sets, one row per text, shape (n, num_perm)."""
    out = np.empty((len(texts), num_perm), dtype=np.uint64)
    shingle_sets = (shingles(t, shingle) for t in texts)
    for row, mh in enumerate(_minhashes(shingle_sets, num_perm, seed)):
        out[row] = mh.hashvalues
    return out


def _minhashes(sets: Iterable[list[bytes]], num_perm: int, seed: int) -> Iterable[MinHash]:
    # MinHash.generator builds the permutations once and copies them per document.
    return MinHash.generator(sets, num_perm=num_perm, seed=seed, hashfunc=HASHFUNC, scheme=SCHEME)


@dataclass
class NearDup:
    key: str  # the document found to be a near-duplicate
    duplicate_of: str  # the earlier kept document it matches
    similarity: float  # estimated Jaccard (MinHash)


def find_near_duplicates(
    keys: list[str], sigs: np.ndarray, threshold: float, num_perm: int
) -> list[NearDup]:
    """Greedy near-duplicate removal in the given order; each duplicate names its earliest match."""
    if sigs.shape != (len(keys), num_perm):
        raise ValueError(f"signatures have shape {sigs.shape}, expected ({len(keys)}, {num_perm})")
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=LSH_WEIGHTS)
    # Positions, not keys, go into the index: they are unique even if keys repeat, and the
    # smallest verified position is the earliest kept document.
    lookup = np.ascontiguousarray(sigs, dtype=np.uint32)
    dups: list[NearDup] = []
    for pos, key in enumerate(keys):
        mh = LeanMinHash(seed=0, hashvalues=lookup[pos], scheme=SCHEME)
        candidates = lsh.query(mh)
        if candidates:
            cand = np.fromiter(sorted(candidates), dtype=np.int64, count=len(candidates))
            sims = (lookup[cand] == lookup[pos]).mean(axis=1)
            verified = np.flatnonzero(sims >= threshold)
            if verified.size:
                first = verified[0]
                dups.append(NearDup(key, keys[int(cand[first])], float(sims[first])))
                continue
        lsh.insert(pos, mh, check_duplication=False)
    return dups


def duplicate_clusters(dups: list[NearDup]) -> dict[str, list[str]]:
    """Kept document -> the documents removed as its duplicates, in the order they were found."""
    parent = {d.key: d.duplicate_of for d in dups}
    clusters: dict[str, list[str]] = {}
    for d in dups:
        root = d.duplicate_of
        seen = {d.key}
        # Results merged from several passes may point at a document that is itself a duplicate.
        while root in parent and root not in seen:
            seen.add(root)
            root = parent[root]
        clusters.setdefault(root, []).append(d.key)
    return clusters
