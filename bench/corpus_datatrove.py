"""datatrove's pipeline doing the corpus stage's work, for `python -m bench corpus`: Gopher
quality and repetition rules, the same language-id backend, PII, and MinHash dedup in its
four stages (signatures, buckets, clusters, filter). A bench-only dependency (`.[bench]`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from domainlm.corpus.langid import DEFAULT_BACKEND, MIN_SCORE, detect_language


def _patch_xxhash() -> None:
    # datatrove 0.10.1 hands str to xxhash, which xxhash 4 refuses ("Strings must be encoded
    # before hashing"): encode it, which is the hash datatrove means.
    import xxhash
    from datatrove.utils.hashes import xxhash as dt_xxhash

    def xxh32(data):
        return xxhash.xxh32_intdigest(data.encode() if isinstance(data, str) else data)

    def xxh64(data):
        return xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)

    dt_xxhash.xxhash32, dt_xxhash.xxhash64 = xxh32, xxh64


_patch_xxhash()


class SameLanguageFilter(BaseFilter):
    """English only, decided by the backend `make corpus` uses (datatrove's own LanguageFilter
    downloads a fastText model, which this machine cannot)."""

    name = "language (domainlm's backend)"

    def filter(self, doc: Document) -> bool:
        lang, score = detect_language(doc.text, 1000, DEFAULT_BACKEND)
        return lang == "en" and score >= MIN_SCORE[DEFAULT_BACKEND]


def _run(pipeline: list, tasks: int, workers: int, logs: Path) -> None:
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers,
                          logging_dir=str(logs), skip_completed=False).run()


def run_pipeline(shards: Path, work: Path, workers: int, tasks: int) -> int:
    """The whole pipeline on the JSONL shards in `shards`; returns the documents written."""
    shutil.rmtree(work, ignore_errors=True)
    cfg = MinhashConfig()  # datatrove's defaults: 5-grams, 14 buckets of 8 hashes
    _run([
        JsonlReader(str(shards), glob_pattern="*.jsonl"),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        SameLanguageFilter(),
        PIIFormatter(),
        JsonlWriter(str(work / "filtered")),  # passes the documents on to the signatures
        MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg),
    ], tasks, workers, work / "logs1")
    _run([MinhashDedupBuckets(input_folder=str(work / "sigs"),
                              output_folder=str(work / "buckets"), config=cfg)],
         cfg.num_buckets, workers, work / "logs2")
    _run([MinhashDedupCluster(input_folder=str(work / "buckets"),
                              output_folder=str(work / "remove"), config=cfg)],
         1, 1, work / "logs3")
    _run([
        JsonlReader(str(work / "filtered")),
        MinhashDedupFilter(input_folder=str(work / "remove")),
        JsonlWriter(str(work / "out")),
    ], tasks, workers, work / "logs4")
    return sum(_count_lines(p) for p in (work / "out").glob("*.jsonl.gz"))


def _count_lines(path: Path) -> int:
    import gzip

    with gzip.open(path, "rb") as f:
        return sum(1 for _ in f)


def dedup_pairs(texts: list[str], work: Path) -> list[tuple[int, int]]:
    """datatrove's MinHash dedup alone on `texts` (in order): (kept, removed) index pairs,
    the kept document being the one its cluster keeps."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    with open(work / "in" / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    cfg = MinhashConfig()
    _run([JsonlReader(str(work / "in")),
          MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg)],
         1, 1, work / "l1")
    _run([MinhashDedupBuckets(input_folder=str(work / "sigs"),
                              output_folder=str(work / "buckets"), config=cfg)],
         cfg.num_buckets, 1, work / "l2")
    _run([MinhashDedupCluster(input_folder=str(work / "buckets"),
                              output_folder=str(work / "remove"), config=cfg,
                              save_cluster_id=True)], 1, 1, work / "l3")
    _run([JsonlReader(str(work / "in")),
          MinhashDedupFilter(input_folder=str(work / "remove"), load_cluster_ids=True,
                             exclusion_writer=JsonlWriter(str(work / "removed"))),
          JsonlWriter(str(work / "kept"))], 1, 1, work / "l4")
    cluster_of_kept: dict[int, int] = {}
    for doc in _read_docs(work / "kept"):
        cid = doc["metadata"].get("minhash_cluster_id", -1)
        if cid != -1:
            cluster_of_kept[cid] = int(doc["id"])
    pairs = []
    for doc in _read_docs(work / "removed"):
        cid = doc["metadata"].get("minhash_cluster_id", -1)
        if cid in cluster_of_kept:
            pairs.append((cluster_of_kept[cid], int(doc["id"])))
    return pairs


def _read_docs(folder: Path) -> list[dict]:
    import gzip

    out = []
    for p in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(p, "rt", encoding="utf-8") as f:
            out += [json.loads(line) for line in f]
    return out
