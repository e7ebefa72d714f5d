"""Per-shard work, cached by content: stream the shard's records in batches through the
pipeline blocks, count and time every block, and write as it goes (bounded memory)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from domainlm.corpus import python_docs
from domainlm.corpus.blocks import BlockStats, build_blocks
from domainlm.corpus.dedup import band_hashes, lsh_bands
from domainlm.corpus.neardup import band_file
from domainlm.corpus.readers import ShardError, read_shard
from domainlm.corpus.records import FILTER, QUARANTINE, Doc, Rejected, rejected_line
from domainlm.corpus.scan import count_records
from domainlm.files import atomic_dir, hash_json, read_json, write_json

# Bump when the per-shard results change for the same inputs and settings.
CACHE_VERSION = 2
# A batch closes at this many documents or characters, whichever comes first: the memory of
# a worker is a batch, whatever the shard's size or compression ratio.
BATCH_DOCS = 1000
BATCH_CHARS = 8 << 20
# The rejected categories a shard writes (the corpus-wide pass adds duplicates and the rest).
SHARD_CATEGORIES = (QUARANTINE, FILTER)

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
    """One unit of parallel work: a shard file, the built-in python-docs source, or an entry
    the source scan refused (a link out of the folder, an unreadable file or folder)."""

    source: str
    kind: str  # "file" | "python-docs" | "refused"
    path: str  # the file to read ("<part>/<parts>" for python-docs, the problem if refused)
    rel: str  # the display path that prefixes every origin
    content_hash: str
    size: int
    settings: dict[str, Any] = field(hash=False, compare=False)

    @property
    def key(self) -> str:
        return hash_json([CACHE_VERSION, self.kind, self.rel, self.content_hash, self.settings])


@dataclass
class ShardResult:
    """What a worker reports back: the counts, and the shard-level error if it could not be read
    (with the number of records the file holds, when they can be counted)."""

    task_key: str
    stats: dict[str, Any]
    error: str | None = None
    records: int | None = None


Progress = Callable[[int], None]  # called with the number of records just read


def _records(task: ShardTask, max_record_bytes: int) -> Iterator[Doc | Rejected]:
    if task.kind == "python-docs":
        part, parts = (int(x) for x in task.path.split("/"))
        for name, text in python_docs.iter_documents(part=part, parts=parts):
            origin = f"{task.source}/{name}:1"
            yield Doc(id=origin, text=text, source=task.source, origin=origin, license="PSF-2.0")
    else:
        yield from read_shard(Path(task.path), task.source, task.rel, max_record_bytes)


class _Writer:
    """The shard's cache files, appended batch by batch."""

    def __init__(self, folder: Path, dedup: dict[str, Any], threshold_bands: tuple[int, int]):
        self.folder = folder
        self.docs = pq.ParquetWriter(folder / "docs.parquet", DOC_SCHEMA, compression="zstd")
        self.rejected = {c: open(folder / f"rejected-{c}.jsonl", "w", encoding="utf-8")
                         for c in SHARD_CATEGORIES}
        self.near = dedup["near"]
        self.bands, self.rows = threshold_bands
        self.sets = self.offsets = None
        self.band_files: list[Any] = []
        if self.near:
            self.sets = open(folder / "sets.u32", "wb")
            self.offsets = open(folder / "sets-offsets.i64", "wb")
            self.offsets.write(np.zeros(1, dtype=np.int64).tobytes())
            self.band_files = [open(band_file(folder, b), "wb") for b in range(self.bands)]
        self.n_values = 0

    def reject(self, items: list[Rejected]) -> None:
        for r in items:
            self.rejected[r.category].write(rejected_line(r.to_dict()))

    def write_docs(self, docs: list[Doc]) -> None:
        if not docs:
            return
        cols = {name: [getattr(d, name) for d in docs] for name in DOC_SCHEMA.names}
        self.docs.write_table(pa.table(cols, schema=DOC_SCHEMA))
        if self.near:
            sizes = np.array([d.shingles.size for d in docs], dtype=np.int64)
            ends = self.n_values + np.cumsum(sizes)
            self.n_values = int(ends[-1])
            self.sets.write(np.concatenate([d.shingles for d in docs]).tobytes())
            self.offsets.write(ends.tobytes())
            bands = band_hashes(np.stack([d.sig for d in docs]), self.bands, self.rows)
            for b, f in enumerate(self.band_files):
                f.write(bands[b].tobytes())

    def close(self) -> None:
        self.docs.close()
        for f in [*self.rejected.values(), self.sets, self.offsets, *self.band_files]:
            if f is not None:
                f.close()


def process_shard(
    task: ShardTask, cache_root: Path, progress: Progress | None = None
) -> ShardResult:
    """Process one shard into `cache_root/<task.key>/` (docs.parquet, rejected-*.jsonl, the
    dedup files, stats.json). Runs in a worker; everything it needs is in the task."""
    if task.kind == "refused":
        return ShardResult(task.key, {}, error=f"{task.rel}: {task.path}", records=None)
    t0 = time.perf_counter()
    s = task.settings
    blocks = build_blocks(s)
    secs: dict[str, float] = dict.fromkeys(["read", *(b.name for b in blocks)], 0.0)
    counts: Counter[str] = Counter()
    stats = BlockStats()
    clock = time.perf_counter
    n_in = chars_in = chars_passed = passed = 0
    records = _records(task, s["max_record_bytes"])
    bands = lsh_bands(s["dedup"]["threshold"], s["dedup"]["num_perm"])
    try:
        with atomic_dir(cache_root / task.key) as tmp:
            out = _Writer(tmp, s["dedup"], bands)
            try:
                done = False
                while not done:
                    batch: list[Doc] = []
                    # Rejections are written in record order, whichever block made them.
                    rejections: list[tuple[int, Rejected]] = []
                    seq: dict[str, int] = {}
                    size = 0
                    t = clock()
                    n_read = 0
                    while len(batch) < BATCH_DOCS and size < BATCH_CHARS:
                        rec = next(records, None)
                        if rec is None:
                            done = True
                            break
                        n_read += 1
                        if type(rec) is Rejected:
                            rejections.append((n_read, rec))
                            continue
                        seq[rec.origin] = n_read
                        batch.append(rec)
                        size += len(rec.text)
                    secs["read"] += clock() - t
                    n_in += n_read
                    chars_in += size
                    for block in blocks:
                        if not batch:
                            break
                        t = clock()
                        batch, rejected = block.process(batch, stats)
                        secs[block.name] += clock() - t
                        rejections += ((seq.get(r.origin, n_read), r) for r in rejected)
                    rejections.sort(key=lambda sr: sr[0])
                    counts.update(r.reason for _, r in rejections)
                    out.reject([r for _, r in rejections])
                    passed += len(batch)
                    chars_passed += sum(len(d.text) for d in batch)
                    out.write_docs(batch)
                    if progress is not None and n_read:
                        progress(n_read)
            finally:
                out.close()
            result = {
                "source": task.source,
                "rel": task.rel,
                "bytes": task.size,
                "in": n_in,
                "passed": passed,
                "quarantined": {k: v for k, v in sorted(counts.items())
                                if k.startswith(QUARANTINE)},
                "filtered": {k: v for k, v in sorted(counts.items()) if k.startswith(FILTER)},
                "chars_in": chars_in,
                "chars_passed": chars_passed,
                "languages": dict(sorted(stats.languages.items())),
                "pii": dict(sorted(stats.pii.items())),
                "seconds": round(time.perf_counter() - t0, 3),
                "stage_seconds": {k: round(v, 4) for k, v in secs.items()},
            }
            write_json(tmp / "stats.json", result)
    except ShardError as e:
        return ShardResult(task.key, {}, error=str(e), records=count_records(Path(task.path)))
    return ShardResult(task.key, result)


def cached_stats(cache_root: Path, key: str) -> dict[str, Any] | None:
    p = cache_root / key / "stats.json"
    if not p.exists():
        return None
    try:
        return read_json(p)
    except (OSError, ValueError):
        return None


def cached_docs(cache_root: Path, key: str) -> pa.Table:
    return pq.read_table(cache_root / key / "docs.parquet", schema=DOC_SCHEMA)
