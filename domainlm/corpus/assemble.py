"""Corpus-wide steps over processed shards: exact and near dedup, decontamination, split, mix."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from domainlm.corpus.mix import SourceMix, copies, is_val, mix_factors, shuffle_key
from domainlm.corpus.neardup import resolve
from domainlm.corpus.records import DECONTAM, DUPLICATE, FILTER, QUARANTINE, clip
from domainlm.recipe import Recipe


@dataclass
class Assembled:
    """The corpus decided: which rows go where, and every record that was dropped, with why."""

    table: pa.Table  # every document that passed the per-shard steps, in canonical order
    train: list[tuple[int, int]]  # (row in table, copy number), in training order
    val: list[int]  # rows in table, canonical order
    rejected: list[dict[str, Any]]  # corpus-wide rejections (duplicates, contamination, mixing)
    counts: dict[str, dict[str, Any]]  # per source, the manifest's counts
    mix: dict[str, SourceMix]
    clusters: list[dict[str, Any]] = field(default_factory=list)  # largest duplicate clusters


def empty_counts() -> dict[str, Any]:
    return {
        "in": 0,
        "kept": 0,
        "filtered": {},
        "duplicates": {"exact": 0, "near": 0},
        "decontaminated": 0,
        "quarantined": 0,
    }


def _add(counter: dict[str, int], key: str, n: int = 1) -> None:
    counter[key] = counter.get(key, 0) + n


def assemble(
    recipe: Recipe,
    tables: list[pa.Table],
    near_pairs: np.ndarray | None,
    shard_stats: list[dict[str, Any]],
) -> Assembled:
    """Apply the corpus-wide steps to the shards' survivors, given in canonical order.

    Every decision depends only on the documents and their order, never on which shards were
    processed in this run, so an incremental build equals a build from scratch.
    """
    c = recipe.corpus
    sources = [s.name for s in c.sources]
    counts = {s: empty_counts() for s in sources}
    for st in shard_stats:
        cs = counts[st["source"]]
        cs["in"] += st["in"]
        cs["quarantined"] += sum(st["quarantined"].values())
        for reason, n in st["filtered"].items():
            _add(cs["filtered"], reason.split(":", 1)[1], n)

    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        mix = mix_factors({s: 0 for s in sources}, {}, {s.name: s.weight for s in c.sources})
        return Assembled(table or _empty_table(), [], [], [], counts, mix)

    keys = table["key"].to_pylist()
    origins = table["origin"].to_pylist()
    src = table["source"].to_pylist()
    ids = table["id"].to_pylist()
    contaminated = table["contaminated"].to_pylist()
    n = table.num_rows
    alive = np.ones(n, dtype=bool)
    rejected: list[dict[str, Any]] = []

    def reject(i: int, reason: str, detail: str, duplicate_of: str | None = None) -> None:
        alive[i] = False
        rejected.append(
            {
                "origin": origins[i],
                "source": src[i],
                "reason": reason,
                "detail": detail,
                "text": clip(table["text"][i].as_py()),
                "id": ids[i],
                "duplicate_of": duplicate_of,
            }
        )

    clusters: dict[str, list[str]] = defaultdict(list)
    if c.dedup.exact:
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k in first:
                kept = origins[first[k]]
                reject(i, f"{DUPLICATE}:exact", f"same text as {kept}", kept)
                counts[src[i]]["duplicates"]["exact"] += 1
                clusters[kept].append(origins[i])
            else:
                first[k] = i
    if c.dedup.near and near_pairs is not None:
        # Rows of `table` are the global document numbers the dedup partitions used.
        for d in resolve(near_pairs, alive.copy()):
            i, kept = d.doc, origins[d.duplicate_of]
            detail = f"near-duplicate of {kept} (Jaccard {d.similarity:.2f})"
            reject(i, f"{DUPLICATE}:near", detail, kept)
            counts[src[i]]["duplicates"]["near"] += 1
            clusters[kept].append(origins[i])
    for i in np.flatnonzero(alive):
        if contaminated[i] is not None:
            reject(i, f"{DECONTAM}:eval_overlap", contaminated[i])
            counts[src[i]]["decontaminated"] += 1

    alive_idx = [int(i) for i in np.flatnonzero(alive)]
    val = [i for i in alive_idx if is_val(keys[i], recipe.seed, c.val_fraction)]
    val_set = set(val)
    train_idx = [i for i in alive_idx if i not in val_set]

    lengths = pc.utf8_length(table["text"]).to_numpy()
    chars: Counter[str] = Counter({s: 0 for s in sources})
    docs: Counter[str] = Counter()
    for i in train_idx:
        chars[src[i]] += int(lengths[i])
        docs[src[i]] += 1
    mix = mix_factors(dict(chars), dict(docs), {s.name: s.weight for s in c.sources})
    train: list[tuple[int, int]] = []
    for i in train_idx:
        m = mix[src[i]]
        k = copies(m.factor, recipe.seed, origins[i])
        if k == 0:
            reject(i, f"{FILTER}:mix_downsampled", f"sampled out to reach weight {m.weight}")
            _add(counts[src[i]]["filtered"], "mix_downsampled")
            m.dropped += 1
            continue
        m.docs_after += k
        m.chars_after += k * int(lengths[i])
        train.extend((i, j) for j in range(k))
    train.sort(key=lambda rc: shuffle_key(recipe.seed, origins[rc[0]], rc[1]))

    for i in val:
        counts[src[i]]["kept"] += 1
    for i, j in train:
        if j == 0:
            counts[src[i]]["kept"] += 1
    top = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:10]
    cluster_list = [{"kept": k, "size": 1 + len(v), "duplicates": v[:5]} for k, v in top]
    return Assembled(table, train, val, rejected, counts, mix, cluster_list)


def _empty_table() -> pa.Table:
    from domainlm.corpus.shardwork import DOC_SCHEMA

    return DOC_SCHEMA.empty_table()


def totals(counts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = empty_counts()
    for cs in counts.values():
        for k in ("in", "kept", "decontaminated", "quarantined"):
            out[k] += cs[k]
        for k in ("exact", "near"):
            out["duplicates"][k] += cs["duplicates"][k]
        for reason, n in cs["filtered"].items():
            _add(out["filtered"], reason, n)
    out["filtered"] = dict(sorted(out["filtered"].items()))
    return out


def balanced(c: dict[str, Any]) -> bool:
    """`in` equals the sum of the rest: the manifest's promise that nothing was lost."""
    rest = c["kept"] + sum(c["filtered"].values()) + sum(c["duplicates"].values())
    return c["in"] == rest + c["decontaminated"] + c["quarantined"]


__all__ = ["Assembled", "assemble", "totals", "balanced", "QUARANTINE"]
