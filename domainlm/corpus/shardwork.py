"""Per-shard work, cached by content: read, normalize, filter, redact, then hash and sign."""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from domainlm.corpus import python_docs
from domainlm.corpus.decontaminate import Decontaminator
from domainlm.corpus.dedup import exact_key, signatures
from domainlm.corpus.filters import QualityFilter
from domainlm.corpus.normalize import normalize
from domainlm.corpus.pii import redact
from domainlm.corpus.readers import ShardError, read_shard
from domainlm.corpus.records import FILTER, QUARANTINE, Doc, Rejected, clip
from domainlm.files import atomic_dir, hash_json, write_json
from domainlm.recipe import PIIConfig, QualityFilters

# Bump when the per-shard results change for the same inputs and settings.
CACHE_VERSION = 1

DOC_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("origin", pa.string()),
        ("license", pa.string()),
        ("created", pa.string()),
        ("meta", pa.string()),
        ("key", pa.string()),  # exact-dedup key of the final text
        ("contaminated", pa.string()),  # "<eval file>: <detail>" or null
    ]
)


@dataclass(frozen=True)
class ShardTask:
    """One unit of parallel work: a shard file, or the built-in python-docs source."""

    source: str
    kind: str  # "file" | "python-docs"
    path: str  # the file to read ("" for python-docs)
    rel: str  # the display path that prefixes every origin
    content_hash: str
    size: int
    settings: dict[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        return hash_json([CACHE_VERSION, self.kind, self.rel, self.content_hash, self.settings])


@dataclass
class ShardResult:
    """What a worker reports back: the counts, and the shard-level error if it could not be read."""

    task_key: str
    stats: dict[str, Any]
    error: str | None = None


@lru_cache(maxsize=4)
def _decontaminator(files: tuple[str, ...], ngram: int, max_overlap: float) -> Decontaminator:
    # One per process: loading the eval n-grams is the costly part.
    return Decontaminator(list(files), ngram, max_overlap)


def _records(task: ShardTask, max_record_bytes: int):
    if task.kind == "python-docs":
        part, parts = (int(x) for x in task.path.split("/"))
        for name, text in python_docs.iter_documents(part=part, parts=parts):
            origin = f"{task.source}/{name}:1"
            yield Doc(id=origin, text=text, source=task.source, origin=origin, license="PSF-2.0")
    else:
        yield from read_shard(Path(task.path), task.source, task.rel, max_record_bytes)


def process_shard(task: ShardTask, cache_root: Path) -> ShardResult:
    """Process one shard into `cache_root/<task.key>/` (docs.parquet, sigs.npy, rejected.jsonl,
    stats.json). Runs in a worker process; everything it needs is in the task."""
    t0 = time.perf_counter()
    s = task.settings
    qfilter = QualityFilter(QualityFilters(**s["filters"]))
    pii_cfg = PIIConfig(**s["pii"])
    decon = None
    if s["decontaminate"]["files"]:
        d = s["decontaminate"]
        decon = _decontaminator(tuple(d["files"]), d["ngram"], d["max_overlap"])

    docs: list[Doc] = []
    rejected: list[Rejected] = []
    languages: Counter[str] = Counter()
    pii_counts: Counter[str] = Counter()
    # Seconds per step, for `make bench`'s per-stage throughput (perf_counter is cheap).
    secs = dict.fromkeys(["read", "normalize", "filter", "pii", "decontaminate", "minhash"], 0.0)
    clock = time.perf_counter
    n_in = chars_in = 0
    records = _records(task, s["max_record_bytes"])
    try:
        while True:
            t = clock()
            rec = next(records, None)
            secs["read"] += clock() - t
            if rec is None:
                break
            n_in += 1
            if isinstance(rec, Rejected):
                rejected.append(rec)
                continue
            chars_in += len(rec.text)
            t = clock()
            text = normalize(rec.text)
            t2 = clock()
            verdict = qfilter.check(text)
            t3 = clock()
            secs["normalize"] += t2 - t
            secs["filter"] += t3 - t2
            if qfilter.last_language is not None:
                languages[qfilter.last_language] += 1
            if verdict is not None:
                rule, detail = verdict
                rejected.append(
                    Rejected(rec.origin, rec.source, f"{FILTER}:{rule}", detail, clip(text), rec.id)
                )
                continue
            text, counts = redact(text, pii_cfg)
            secs["pii"] += clock() - t3
            pii_counts.update(counts)
            rec.text = text
            docs.append(rec)
    except ShardError as e:
        return ShardResult(task.key, {}, error=str(e))

    keys = [exact_key(d.text) for d in docs]
    t = clock()
    contaminated = []
    for d in docs:
        hit = decon.check(d.text) if decon is not None else None
        contaminated.append(None if hit is None else f"{hit[0]}: {hit[1]}")
    secs["decontaminate"] += clock() - t
    sigs = None
    t = clock()
    if s["dedup"]["near"] and docs:
        sigs = signatures(
            [d.text for d in docs], s["dedup"]["shingle"], s["dedup"]["num_perm"], s["seed"]
        )
    secs["minhash"] += clock() - t

    by_reason = Counter(r.reason for r in rejected)
    stats = {
        "source": task.source,
        "rel": task.rel,
        "bytes": task.size,
        "in": n_in,
        "passed": len(docs),
        "quarantined": {k: v for k, v in sorted(by_reason.items()) if k.startswith(QUARANTINE)},
        "filtered": {k: v for k, v in sorted(by_reason.items()) if k.startswith(FILTER)},
        "chars_in": chars_in,
        "chars_passed": sum(len(d.text) for d in docs),
        "languages": dict(sorted(languages.items())),
        "pii": dict(sorted(pii_counts.items())),
        "seconds": round(time.perf_counter() - t0, 3),
        "stage_seconds": {k: round(v, 4) for k, v in secs.items()},
    }
    with atomic_dir(cache_root / task.key) as tmp:
        table = pa.table(
            {
                "id": [d.id for d in docs],
                "text": [d.text for d in docs],
                "source": [d.source for d in docs],
                "origin": [d.origin for d in docs],
                "license": [d.license for d in docs],
                "created": [d.created for d in docs],
                "meta": [d.meta for d in docs],
                "key": keys,
                "contaminated": contaminated,
            },
            schema=DOC_SCHEMA,
        )
        pq.write_table(table, tmp / "docs.parquet", compression="zstd")
        if sigs is not None:
            np.save(tmp / "sigs.npy", sigs)
        with open(tmp / "rejected.jsonl", "w", encoding="utf-8") as f:
            for r in rejected:
                f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
        write_json(tmp / "stats.json", stats)
    return ShardResult(task.key, stats)


def load_cached(cache_root: Path, key: str) -> tuple[pa.Table, np.ndarray | None, list[dict]]:
    """A processed shard from the cache: its documents, their signatures, its rejected records."""
    d = cache_root / key
    table = pq.read_table(d / "docs.parquet", schema=DOC_SCHEMA)
    sigs = np.load(d / "sigs.npy") if (d / "sigs.npy").exists() else None
    with open(d / "rejected.jsonl", encoding="utf-8") as f:
        rejected = [json.loads(line) for line in f]
    return table, sigs, rejected


def cached_stats(cache_root: Path, key: str) -> dict[str, Any] | None:
    p = cache_root / key / "stats.json"
    if not p.exists():
        return None
    return json.loads(p.read_text(encoding="utf-8"))
