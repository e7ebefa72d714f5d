"""Corpus benchmark: `make corpus`'s pipeline against datatrove's doing the same work, per core,
dedup precision and recall for both, and peak memory per worker as the corpus and a shard grow."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.common import commit, load_note, machine, table, write_section
from domainlm.corpus.dedup import shingles
from domainlm.corpus.neardup import dedup_texts
from domainlm.corpus.planted import SHINGLE, dedup_scores, jaccard, planted_set

THRESHOLD = 0.8

WORK = Path("build/bench/corpus")


def _vocabulary() -> tuple[list[str], list[int]]:
    """English words and their frequencies from the standard library's pydoc topics."""
    from pydoc_data.topics import topics

    words = Counter(w.lower() for t in topics.values() for w in re.findall(r"[A-Za-z]+", t))
    common = [(w, n) for w, n in words.most_common(6000) if len(w) > 1 or w in "ai"]
    return [w for w, _ in common], [n for _, n in common]


def generate(root: Path, target_mb: float, seed: int = 0, shard_mb: float = 4.0) -> dict:
    """Write JSONL shards of English-like documents: mostly good, with planted exact and near
    duplicates, short and symbol-heavy junk, PII and a few malformed lines."""
    rng = random.Random(seed)
    vocab, freq = _vocabulary()
    root.mkdir(parents=True, exist_ok=True)
    written = 0
    shard = 0
    recent: list[str] = []
    plan = Counter()
    while written < target_mb * 1e6:
        lines = []
        size = 0
        while size < shard_mb * 1e6:
            r = rng.random()
            if r < 0.03 and recent:
                text, kind = rng.choice(recent), "exact"
            elif r < 0.06 and recent:
                words = rng.choice(recent).split(" ")
                for _ in range(max(1, len(words) // 60)):
                    words[rng.randrange(len(words))] = rng.choice(vocab)
                text, kind = " ".join(words), "near"
            elif r < 0.08:
                text, kind = " ".join(rng.choices(vocab, freq, k=8)), "short"
            elif r < 0.09:
                text, kind = "# " * 200 + "... " * 50, "symbols"
            else:
                sents = []
                for _ in range(rng.randint(15, 40)):
                    s = " ".join(rng.choices(vocab, freq, k=rng.randint(8, 20)))
                    sents.append(s.capitalize() + ".")
                if rng.random() < 0.05:
                    sents.append(f"Contact jane.doe{rng.randint(1, 999)}@example.org today.")
                text, kind = " ".join(sents), "good"
                recent = (recent + [text])[-200:]
            plan[kind] += 1
            line = json.dumps({"text": text}) if rng.random() > 0.001 else '{"text": "cut'
            lines.append(line)
            size += len(line) + 1
        (root / f"part-{shard:04d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        written += size
        shard += 1
    return {"bytes": written, "shards": shard, "docs": dict(plan)}


# --------------------------------------------------------------------------------------------
# Measured runs (each in a fresh process: bench/corpus_run.py) and the report.


def _measure(*args: str) -> dict:
    """One run of bench/corpus_run.py in a fresh process; its JSON."""
    res = subprocess.run([sys.executable, "-m", "bench.corpus_run", *args], capture_output=True,
                         text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    line = next((x for x in res.stdout.splitlines() if x.startswith("BENCH-RESULT ")), None)
    if res.returncode != 0 or line is None:
        raise RuntimeError(f"bench run {args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def _dedup_quality(texts: list[str], true: set, work: Path) -> list[tuple]:
    """(precision, recall, recall at J >= threshold + 0.05) for ours and datatrove's."""
    from bench.corpus_datatrove import dedup_pairs

    sets = [set(shingles(t, SHINGLE)) for t in texts]
    clear = {p for p in true if jaccard(sets[p[0]], sets[p[1]]) >= THRESHOLD + 0.05}
    ours = [(d.duplicate_of, d.doc) for d in dedup_texts(texts, work / "ours", THRESHOLD)]
    with _quiet():
        theirs = dedup_pairs(texts, work / "datatrove")
    rows = []
    for name, pred in (("domainlm", ours), ("datatrove 0.10 (14 x 8)", theirs)):
        p, r = dedup_scores(texts, pred, true, THRESHOLD)
        _, rc = dedup_scores(texts, pred, clear, THRESHOLD)
        rows.append((name, len(pred), p, r, rc))
    return rows


class _quiet:
    """datatrove logs every step to stderr; the benchmark prints its own tables."""

    def __enter__(self):
        from loguru import logger

        logger.remove()

    def __exit__(self, *exc):
        return False


def near_copies(n_base: int, seed: int) -> tuple[list[str], set[tuple[int, int]]]:
    """The generator's near copies (one word in 60 replaced, J ~0.85-0.87) and exact copies
    of web-like documents, and the index pairs whose true Jaccard is >= THRESHOLD."""
    rng = random.Random(seed)
    vocab, freq = _vocabulary()
    texts, groups = [], []
    for _ in range(n_base):
        sents = [" ".join(rng.choices(vocab, freq, k=rng.randint(8, 20))).capitalize() + "."
                 for _ in range(rng.randint(15, 40))]
        texts.append(" ".join(sents))
        groups.append([len(texts) - 1])
    for _ in range(n_base // 2):
        g = rng.randrange(n_base)
        words = texts[g].split(" ")
        for _ in range(max(1, len(words) // 60)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        texts.append(" ".join(words) if rng.random() < 0.9 else texts[g])
        groups[g].append(len(texts) - 1)
    sets = [set(shingles(t, SHINGLE)) for t in texts]
    true = {(i, j) for g in groups for i in g for j in g
            if i < j and jaccard(sets[i], sets[j]) >= THRESHOLD}
    return texts, true


def _tiny_shard(path: Path, n: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(0, n, 1000):
            f.write("".join(f'{{"text": "w{k % 97}"}}\n' for k in range(i, min(n, i + 1000))))


def run(quick: bool = False) -> str:
    runs = 1 if quick else 3
    base_mb = 3 if quick else 12
    started = time.time()
    WORK.mkdir(parents=True, exist_ok=True)
    shards = WORK / "generated"
    shutil.rmtree(shards, ignore_errors=True)
    gen = generate(shards, base_mb, shard_mb=2.0)
    mb = gen["bytes"] / 1e6

    # Side by side, interleaved: ours and datatrove's, 1 and 2 workers, `runs` rounds.
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(runs):
        for workers in (1, 2):
            for kind in ("ours", "datatrove"):
                r = _measure(kind, str(shards), str(WORK / f"{kind}-w{workers}"), str(workers))
                results.setdefault((kind, workers), []).append(r)
    rows, per_core = [], {}
    for workers in (1, 2):
        for kind, label in (("ours", "domainlm"), ("datatrove", "datatrove 0.10")):
            rs = results[(kind, workers)]
            wall = statistics.median(r["seconds"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            per_core[(kind, workers)] = (mb / wall / workers, mb / cpu)
            # CPU seconds are counted only in one process (datatrove's pool workers are not
            # all waited for, so their CPU time would be lost).
            rows.append([label, workers, f"{wall:.1f}", f"{mb / wall:.2f}",
                         f"{mb / wall / workers:.2f}", f"{mb / cpu:.2f}" if workers == 1 else "-",
                         rs[0]["docs_out"]])
    ratio_rows = [[w, f"{per_core[('ours', w)][0] / per_core[('datatrove', w)][0]:.1f}",
                   f"{per_core[('ours', w)][1] / per_core[('datatrove', w)][1]:.1f}"
                   if w == 1 else "-"]
                  for w in (1, 2)]
    ours1 = results[("ours", 1)][0]
    blocks = sorted(ours1["blocks"].items(), key=lambda kv: -kv[1])
    block_rows = [[k, f"{v:.2f}", f"{mb / v:.1f}" if v else "-"] for k, v in blocks]

    # Dedup quality, the same documents through both.
    texts, true, _ = planted_set(300, seed=0, threshold=THRESHOLD)
    q_planted = _dedup_quality(texts, true, WORK / "dq-planted")
    texts, true = near_copies(200 if quick else 400, seed=1)
    q_bench = _dedup_quality(texts, true, WORK / "dq-bench")

    # Memory per worker as the corpus grows: 1x and 10x the shards (2 workers).
    big = WORK / "generated-10x"
    shutil.rmtree(big, ignore_errors=True)
    big.mkdir()
    for k in range(2 if quick else 10):
        for p in sorted(shards.glob("*.jsonl")):
            (big / f"{k:02d}-{p.name}").write_bytes(p.read_bytes())
    mem_rows = []
    for label, folder in (("1x", shards), ("2x" if quick else "10x", big)):
        size = sum(p.stat().st_size for p in folder.glob("*.jsonl")) / 1e6
        r = _measure("ours", str(folder), str(WORK / f"mem-{label}"), "2", "--memory")
        mem_rows.append([label, f"{size:.0f}", r["counts"]["in"], f"{r['seconds']:.1f}",
                         f"{r['maxrss_children'] / 2**20:.0f}", f"{r['maxrss_self'] / 2**20:.0f}"])

    # One shard of tiny records (the 5 MB .jsonl.gz), one worker's peak memory.
    shard_rows = []
    for n in ([10**5] if quick else [10**5, 10**6, 10**7]):
        f = WORK / "tiny" / f"tiny-{n}.jsonl.gz"
        if not f.exists():
            f.parent.mkdir(parents=True, exist_ok=True)
            _tiny_shard(f, n)
        r = _measure("shard", str(f), str(WORK / f"tiny-work-{n}"), "--memory")
        shard_rows.append([f"{n:,}", f"{f.stat().st_size / 1e6:.1f}", f"{r['seconds']:.0f}",
                           f"{r['maxrss_self'] / 2**20:.0f}"])
        shutil.rmtree(WORK / f"tiny-work-{n}", ignore_errors=True)

    return _render(locals())


def _render(v: dict) -> str:
    mb, gen, runs = v["mb"], v["gen"], v["runs"]
    per_core = v["per_core"]
    ours_core = min(per_core[("ours", 1)])  # 1 worker: wall or CPU seconds, whichever is less
    ratio = min(per_core[("ours", 1)][1] / per_core[("datatrove", 1)][1],
                per_core[("ours", 2)][0] / per_core[("datatrove", 2)][0])
    quality_ok = all(o[2] >= t[2] and o[4] >= t[4] for o, t in (v["q_planted"], v["q_bench"]))
    q_header = ["pipeline", "pairs found", "precision", "recall", "recall, J >= 0.85"]

    def q(rows):
        return table(q_header, [[n, k, f"{p:.3f}", f"{r:.3f}", f"{rc:.3f}"]
                                for n, k, p, r, rc in rows])

    out = [
        "## Corpus (`make corpus`)\n",
        f"Machine: {machine()}. Commit {commit()}. Command: `python -m bench corpus` (part of "
        f"`make bench`), {time.strftime('%Y-%m-%d')}, {time.time() - v['started']:.0f} s. Each "
        f"run is a fresh process; medians of {runs} interleaved round(s). At the end, "
        f"{load_note()}. MB per CPU-second counts only the measured call's own CPU time (this "
        "process and the workers it waited for, imports excluded).\n",
        f"### Whole pipeline against datatrove ({mb:.0f} MB, {gen['shards']} JSONL shards)\n",
        "The same generated web-like shards through both. domainlm: `make corpus`'s pipeline "
        "(normalize, Gopher/C4 quality and repetition rules, language id with the default "
        "`cascade` backend, PII, exact and MinHash near dedup, split, Parquet and rejected "
        "records). datatrove: JsonlReader, GopherRepetitionFilter, GopherQualityFilter, a "
        "filter calling the same `cascade` backend, PIIFormatter, then MinHash in its four "
        "stages (signatures, buckets, clusters, filter) and JsonlWriter "
        "(bench/corpus_datatrove.py).\n",
        f"Planted: {json.dumps(gen['docs'], sort_keys=True)}.\n",
        table(["pipeline", "workers", "median wall s", "MB/s", "MB/s per core (wall)",
               "MB per CPU-second", "documents out"], v["rows"]),
        "\nPer core, domainlm over datatrove:\n",
        table(["workers", "x (wall, per core)", "x (CPU seconds)"], v["ratio_rows"]),
        f"\nTargets: the whole pipeline >= 2.5 MB/s per core: {ours_core:.2f} (1 worker), "
        f"**{'met' if ours_core >= 2.5 else 'not met'}** (2 workers: "
        f"{per_core[('ours', 2)][0]:.2f} per core, the corpus-wide steps after the per-shard "
        "work (the near-dedup join, the split, Parquet) run in one process); >= 10x datatrove per "
        f"core: {ratio:.1f}x, **{'met' if ratio >= 10 else 'not met'}**; dedup precision and "
        f"recall equal or better (below): **{'met' if quality_ok else 'not met'}**.\n",
        "Where domainlm's time goes (1 worker, the blocks' own clocks, seconds over the "
        "whole corpus):\n",
        table(["block", "seconds", "MB/s"], v["block_rows"]),
        "\n### Near-dedup quality (the same documents through both)\n",
        "Threshold 0.8 (5-word shingles). A found pair counts as right when its true Jaccard "
        "is at least 0.8; a true pair counts as found when both documents end up in one "
        "cluster. domainlm: 21 bands of 6 rows (a pair at J = 0.8 is a candidate with "
        "probability 0.998), candidates verified with the exact Jaccard of their shingle "
        "sets. datatrove: its defaults, 14 buckets of 8 hashes, no verification, clusters "
        "joined through any chain of bucket matches.\n",
        "Planted set (`domainlm/corpus/planted.py`: copies at J 0.865-1.0, and pairs at "
        "0.3-0.65 that must not be joined):\n",
        q(v["q_planted"]),
        "\nThe bench's near copies (one word in 60 replaced, J ~0.85-0.87, and exact "
        "copies):\n",
        q(v["q_bench"]),
        "\n### Memory\n",
        "Peak resident memory as the corpus grows 10x (the same shards copied; 2 workers). "
        "A worker holds one batch of documents (1,000 documents or 8 MB of text); the "
        "driver holds the corpus-wide decisions (one row of metadata and text per kept "
        "document, for the split and the mix) and grows with the corpus.\n",
        table(["corpus", "MB", "records", "wall s", "peak MB per worker", "peak MB driver"],
              v["mem_rows"]),
        "\nOne shard of tiny records (`{\"text\": \"w1\"}` a line, gzip; every record is "
        "filtered by `min_words`, so every one becomes a rejected row), the per-shard work "
        "alone in one process. Before this change a 5 MB `.jsonl.gz` of such records took "
        "a worker past 6 GB.\n",
        table(["records", "file MB", "seconds", "peak MB"], v["shard_rows"]),
    ]
    return "\n".join(out)


def main(quick: bool = False) -> None:
    body = run(quick)
    write_section("corpus", body)
    print(body)
