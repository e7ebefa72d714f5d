"""Corpus benchmark: throughput per stage and per core on the demo corpus and a generated
corpus of at least 100 MB, plus near-dedup precision and recall on a planted set."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import yaml

from bench.common import commit, machine, median_time, table, write_section
from domainlm.corpus.dedup import find_near_duplicates, signatures
from domainlm.corpus.pipeline import build_corpus
from domainlm.corpus.planted import dedup_scores, planted_set
from domainlm.recipe import load_recipe

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


def _recipe(path: Path, shards: Path, workers: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "name": path.stem,
        "build_dir": str(WORK / "build"),
        "corpus": {
            "sources": [{"name": "generated", "path": str(shards)}],
            "workers": workers,
        },
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _raw_read(shards: Path) -> int:
    n = 0
    for p in sorted(shards.glob("*.jsonl")):
        with open(p, "rb") as f:
            for line in f:
                try:
                    json.loads(line)
                except ValueError:
                    pass
                n += 1
    return n


def _stage_rows(recipe_path: Path) -> list[list[object]]:
    """Per-stage single-core throughput from the shard workers' own clocks."""
    recipe = load_recipe(recipe_path)
    cache = recipe.layout.corpus / ".cache" / "shards"
    secs: Counter[str] = Counter()
    nbytes = docs = 0
    for st in cache.glob("*/stats.json"):
        s = json.loads(st.read_text())
        secs.update(s["stage_seconds"])
        nbytes += s["bytes"]
        docs += s["in"]
    return [
        [k, f"{v:.2f}", f"{nbytes / v / 1e6:.1f}", f"{docs / v:,.0f}"]
        for k, v in secs.items()
        if v > 0
    ]


def run(quick: bool = False) -> str:
    runs = 1 if quick else 3
    out = []
    # The demo corpus (python-docs) as the user's first `make corpus` builds it.
    demo = load_recipe("recipes/demo.yaml")
    demo.build_dir = str(WORK / "build")
    demo_t, _ = median_time(lambda: build_corpus(demo, force=True, progress=False), runs)
    m = build_corpus(demo, progress=False)
    chars = sum(s["chars_in"] for s in _shard_stats(demo))
    docs = m["counts"]["total"]["in"]
    out.append("### Demo corpus (python-docs)\n")
    out.append(
        table(
            ["documents", "MB", "median wall s", "MB/s", "docs/s"],
            [[docs, f"{chars / 1e6:.2f}", f"{demo_t:.2f}", f"{chars / 1e6 / demo_t:.2f}",
              f"{docs / demo_t:,.0f}"]],
        )
    )

    shards = WORK / "generated"
    target = 20 if quick else 105
    if shards.exists():
        shutil.rmtree(shards)
    gen = generate(shards, target)
    mb = gen["bytes"] / 1e6
    base_t, _ = median_time(lambda: _raw_read(shards), runs)
    rows = []
    for workers in (1, 2):
        rp = _recipe(WORK / f"gen-w{workers}.yaml", shards, workers)
        recipe = load_recipe(rp)
        t, times = median_time(lambda r=recipe: build_corpus(r, force=True, progress=False), runs)
        m = build_corpus(recipe, progress=False)
        n = m["counts"]["total"]["in"]
        rows.append(
            [workers, f"{t:.1f}", f"{mb / t:.2f}", f"{mb / t / workers:.2f}", f"{n / t:,.0f}",
             f"{n / t / workers:,.0f}", f"{(mb / t) / (mb / base_t):.3f}"]
        )
        if workers == 2:
            stage_rows = _stage_rows(rp)
            counts = m["counts"]["total"]
    out.append(f"\n### Generated corpus ({mb:.0f} MB, {gen['shards']} JSONL shards)\n")
    out.append(f"Planted: {json.dumps(gen['docs'], sort_keys=True)}. Result: "
               f"{counts['kept']} kept, {json.dumps(counts['filtered'], sort_keys=True)} "
               f"filtered, {counts['duplicates']} duplicates, {counts['quarantined']} "
               "quarantined.\n")
    out.append(
        table(
            ["workers", "median wall s", "MB/s", "MB/s per core", "docs/s", "docs/s per core",
             "ratio to raw JSON read"],
            rows,
        )
    )
    out.append(f"\nBaseline in the same run: reading and `json.loads` of every line, one core: "
               f"{mb / base_t:.1f} MB/s.\n")
    out.append("Per stage, one core (the workers' own clocks, 2-worker run):\n")
    out.append(table(["stage", "core-seconds", "MB/s", "docs/s"], stage_rows))

    texts, positives, planted = planted_set(300, seed=0, threshold=0.8)
    sig_t, _ = median_time(lambda: signatures(texts, 5, 128, 1), runs)
    sigs = signatures(texts, 5, 128, 1)
    found = find_near_duplicates([str(i) for i in range(len(texts))], sigs, 0.8, 128)
    pred = [(int(d.duplicate_of), int(d.key)) for d in found]
    precision, recall = dedup_scores(texts, pred, positives, 0.8)
    out.append("\n### Near-dedup quality (planted set)\n")
    out.append(
        table(
            ["documents", "planted pairs", "true pairs (J >= 0.8)", "found", "precision",
             "recall", "MinHash docs/s"],
            [[len(texts), len(planted), len(positives), len(pred), f"{precision:.3f}",
              f"{recall:.3f}", f"{len(texts) / sig_t:,.0f}"]],
        )
    )
    header = (
        f"## Corpus (`make corpus`)\n\nMachine: {machine()}. Commit {commit()}. "
        f"Command: `make bench` (median of {runs} run(s), {time.strftime('%Y-%m-%d')}). "
        f"Load average at the end: {os.getloadavg()[0]:.1f} (above the core count means other "
        "jobs shared the machine and the figures are pessimistic).\n"
    )
    return header + "\n" + "\n".join(out)


def _shard_stats(recipe) -> list[dict]:
    cache = recipe.layout.corpus / ".cache" / "shards"
    return [json.loads(p.read_text()) for p in cache.glob("*/stats.json")]


def main(quick: bool = False) -> None:
    body = run(quick)
    write_section("corpus", body)
    print(body)



