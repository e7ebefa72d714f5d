"""Deterministic train/validation split and source mixing by down- and up-sampling."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


def unit_hash(*parts: object) -> float:
    """A number in [0, 1) fixed by its inputs: the coin every sampling decision uses."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def is_val(content_key: str, seed: int, val_fraction: float) -> bool:
    """Split by the document's content hash, so renaming a shard never moves a document."""
    return val_fraction > 0 and unit_hash("split", seed, content_key) < val_fraction


@dataclass
class SourceMix:
    """How one source was sampled to reach its target share of training characters."""

    source: str
    docs: int
    chars: int
    weight: float | None
    share_before: float
    target_share: float
    factor: float  # expected copies per document (<1 down-samples, >1 up-samples)
    chars_after: int = 0
    docs_after: int = 0  # rows written, copies included
    dropped: int = 0  # documents sampled out (factor < 1)


def mix_factors(
    chars: dict[str, int], docs: dict[str, int], weights: dict[str, float | None]
) -> dict[str, SourceMix]:
    """Sampling factors that give each source its weight's share of the training characters.

    The total stays the size of the unmixed corpus, as BloombergGPT's fixed token budget:
    a source with more weight than data is repeated, one with less is sampled down.
    Without weights every factor is 1 (the natural mixture).
    """
    total = sum(chars.values())
    named = {s: w for s, w in weights.items() if w is not None}
    wsum = sum(named.values())
    out = {}
    for s, n in chars.items():
        if not named or wsum == 0:
            share = n / total if total else 0.0
            factor = 1.0
        else:
            share = named.get(s, 0.0) / wsum
            factor = share * total / n if n else 0.0
        before = n / total if total else 0.0
        out[s] = SourceMix(s, docs.get(s, 0), n, weights.get(s), before, share, factor)
    return out


def copies(factor: float, seed: int, origin: str) -> int:
    """How many times a training document appears: floor(factor), plus one with the remainder's
    probability (a seeded coin per document, so the choice is the same on every run)."""
    whole = math.floor(factor)
    return whole + (1 if unit_hash("mix", seed, origin) < factor - whole else 0)


def shuffle_key(seed: int, origin: str, copy: int) -> bytes:
    """The order of training rows: a seeded hash, so copies of a document are spread out."""
    key = f"order\x1f{seed}\x1f{origin}\x1f{copy}".encode()
    return hashlib.blake2b(key, digest_size=8).digest()
