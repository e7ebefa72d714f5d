"""`make corpus`: find the shards, process the changed ones in parallel, deduplicate by
partitions, assemble, write."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from domainlm.corpus import python_docs
from domainlm.corpus.assemble import assemble, balanced, totals
from domainlm.corpus.blocks import block_fingerprint
from domainlm.corpus.decontaminate import Decontaminator
from domainlm.corpus.dedup import lsh_bands
from domainlm.corpus.executor import count_progress, make_executor
from domainlm.corpus.neardup import ShardDedupFiles, partitions, run_partition
from domainlm.corpus.report import write_outputs
from domainlm.corpus.scan import is_glob, scan
from domainlm.corpus.shardwork import (
    CACHE_VERSION,
    ShardResult,
    ShardTask,
    cached_docs,
    cached_stats,
    process_shard,
)
from domainlm.errors import UserError
from domainlm.files import HashCache, hash_bytes, hash_file
from domainlm.recipe import Recipe, merged, section_dict
from domainlm.stage import Stage, run_stage

# Bump when the corpus-wide steps change their output for the same inputs.
ASSEMBLE_VERSION = 2
# The built-in source is split into this many tasks so that its parsing uses every core.
PYTHON_DOCS_PARTS = 4


def _settings(recipe: Recipe, source_index: int, decon_fp: str | None) -> dict[str, Any]:
    c = recipe.corpus
    s = c.sources[source_index]
    d = c.dedup
    blocks = [{**b, "code": block_fingerprint(b["use"])} for b in [*c.blocks, *s.blocks]]
    return {
        "filters": section_dict(merged(c.filters, s.filters)),
        "pii": section_dict(merged(c.pii, s.pii)),
        "blocks": blocks,
        "dedup": {"near": d.near, "shingle": d.shingle, "num_perm": d.num_perm,
                  "threshold": d.threshold},
        "decontaminate": {**section_dict(c.decontaminate), "fingerprint": decon_fp},
        "max_record_bytes": c.max_record_bytes,
        "seed": recipe.seed,
    }


def plan_tasks(recipe: Recipe, hashes: HashCache) -> list[ShardTask]:
    """The shard tasks of every source, in canonical order (recipe order, then path).

    Everything that can be checked before any work is checked here, before the stage touches
    its previous outputs: sources that do not exist or hold no shard, the eval sets, the
    blocks. Entries the scan refuses (links out of the folder, unreadable files and folders)
    become tasks that fail, so `on_bad_shard` decides about them like any bad shard.
    """
    c = recipe.corpus
    decon_fp = None
    if c.decontaminate.files:
        decon_fp = Decontaminator(
            c.decontaminate.files, c.decontaminate.ngram, c.decontaminate.max_overlap
        ).fingerprint
    tasks = []
    for i, s in enumerate(c.sources):
        settings = _settings(recipe, i, decon_fp)
        if s.kind == "python-docs":
            fp = python_docs.fingerprint()
            for k in range(PYTHON_DOCS_PARTS):
                part = f"{k}/{PYTHON_DOCS_PARTS}"
                rel = f"{s.name}/part-{k}"
                tasks.append(ShardTask(s.name, "python-docs", part, rel, fp, 0, settings))
            continue
        where = f"{recipe.path}: corpus.sources[{i}].path"
        if not is_glob(s.path) and not Path(s.path).exists():
            raise UserError(
                f"{where}: {s.path} does not exist; create it or point `path` at the folder "
                "holding the shards"
            )
        found = scan(s.path)
        if not found.files and not found.refused and not s.allow_empty:
            raise UserError(
                f"{where}: {s.path} holds no shard file (looked for .jsonl, .jsonl.gz, "
                ".jsonl.zst, .parquet, .txt); fix the path or glob, or set "
                f"`corpus.sources[{i}].allow_empty: true` if the folder is filled later"
            )
        entries = sorted([(f, None) for f in found.files] + list(found.refused),
                         key=lambda e: e[0])
        for f, problem in entries:
            rel = f"{s.name}/{_printable(Path(os.path.relpath(f, found.root)).as_posix())}"
            if problem is None:
                try:
                    # A name that is not UTF-8 cannot go into the JSON hash cache as it is.
                    digest = hashes.get(f) if _printable(str(f)) == str(f) else hash_file(f)
                    size = f.stat().st_size
                except OSError as e:
                    problem = f"cannot be read ({e.strerror}); check its permissions"
            if problem is not None:
                digest = "refused:" + hash_bytes(problem.encode())
                tasks.append(ShardTask(s.name, "refused", problem, rel, digest, 0, settings))
            else:
                tasks.append(ShardTask(s.name, "file", str(f), rel, digest, size, settings))
    return tasks


def _printable(name: str) -> str:
    """A file name as text UTF-8 can hold: bytes that are not UTF-8 written as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _stage(recipe: Recipe, tasks: list[ShardTask]) -> Stage:
    """The corpus stage for the runner: every shard (and eval set) by content, and the settings."""
    c = recipe.corpus
    inputs: dict[str, Path | str] = {
        t.rel: (Path(t.path) if t.kind == "file" and _printable(t.path) == t.path
                else t.content_hash)
        for t in tasks
    }
    inputs |= {f"decontaminate/{i}": Path(f) for i, f in enumerate(c.decontaminate.files)}
    # Every setting but where the work runs, which changes the speed, never the bytes.
    corpus = {k: v for k, v in section_dict(c).items() if k not in ("workers", "executor")}
    # The code of the domain teams' blocks counts too: editing a filter rebuilds.
    code = sorted({b["code"] for t in tasks for b in t.settings["blocks"]})
    params = {"seed": recipe.seed, "corpus": corpus, "cache_version": CACHE_VERSION}
    if code:
        params["blocks_code"] = code
    return Stage(
        "corpus",
        recipe.layout.manifest("corpus"),
        inputs,
        params,
        ASSEMBLE_VERSION,
        hashes=recipe.layout.hashes,
    )


def build_corpus(
    recipe: Recipe,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    executor: str | None = None,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Build build/<run>/corpus/ from the recipe; returns the manifest."""
    hashes = HashCache(recipe.layout.hashes)
    tasks = plan_tasks(recipe, hashes)
    hashes.save()
    c = recipe.corpus
    n_workers = workers if workers is not None else (c.workers or os.cpu_count() or 1)
    name = executor or c.executor
    stage = _stage(recipe, tasks)

    def work(_fingerprint: str) -> dict[str, Any]:
        ex = make_executor(name, n_workers, ray_address)
        try:
            return _build(recipe, tasks, force, ex, n_workers, progress)
        finally:
            ex.close()

    return run_stage(stage, work, force=force)


def _run_shards(tasks: list[ShardTask], cache_root: Path, ex, progress: bool) -> list[ShardResult]:
    work = partial(process_shard, cache_root=cache_root, progress=count_progress)
    # Largest first, so one big shard does not start last and hold up the whole pool.
    ordered = sorted(tasks, key=lambda t: -t.size)
    bar = tqdm(unit=" records", desc="corpus", disable=not progress, unit_scale=True)
    results: list[ShardResult] = []

    def tick() -> None:
        bar.update(ex.records_read() - bar.n)
        bar.set_postfix(shards=f"{len(results)}/{len(tasks)}")

    try:
        for _, res in ex.map(work, ordered, tick=tick):
            results.append(res)
            if ex.records_read() == 0:  # Ray: no shared counter, count finished shards
                bar.update(res.stats.get("in", 0))
            tick()
    finally:
        bar.close()
    return results


def _near_pairs(recipe: Recipe, tasks: list[ShardTask], cache_root: Path, bad: set[str],
                ex) -> np.ndarray:
    """Verified near-duplicate pairs over every shard, by partitions (neardup.py)."""
    d = recipe.corpus.dedup
    shards, first = [], 0
    for t in tasks:
        if t.key in bad:
            continue
        n = cached_stats(cache_root, t.key)["passed"]
        shards.append(ShardDedupFiles(str(cache_root / t.key), first, n))
        first += n
    alive = None
    if d.exact:
        # Exact duplicates take no part (one byte per document, memory-mapped by the tasks):
        # the first of each exact key in canonical order, as the corpus-wide pass decides.
        seen: set[str] = set()
        flags = np.zeros(first, dtype=np.uint8)
        for s in shards:
            keys = pq.read_table(Path(s.folder) / "docs.parquet", columns=["key"])["key"]
            for i, k in enumerate(keys.to_pylist()):
                if k not in seen:
                    seen.add(k)
                    flags[s.first + i] = 1
        alive = str(cache_root.parent / "alive.u8")
        flags.tofile(alive)
        del seen, flags
    bands, _ = lsh_bands(d.threshold, d.num_perm)
    parts = partitions(shards, bands, d.threshold, alive=alive)
    found = [pairs for _, pairs in ex.map(run_partition, parts) if pairs.size]
    return np.concatenate(found) if found else np.empty((0, 3), dtype=np.int64)


def _build(recipe: Recipe, tasks: list[ShardTask], force: bool, ex, n_workers: int,
           progress: bool) -> dict[str, Any]:
    """The stage's work: process the pending shards, assemble, write; the manifest's entries."""
    t_start = time.perf_counter()
    c = recipe.corpus
    out = recipe.layout.corpus
    shard_cache = out / ".cache" / "shards"
    pending = [t for t in tasks if force or cached_stats(shard_cache, t.key) is None]
    reused = [t for t in tasks if t not in pending]
    t_shards = time.perf_counter()
    results = {r.task_key: r for r in _run_shards(pending, shard_cache, ex, progress)}
    t_shards = time.perf_counter() - t_shards

    bad = [(t, results[t.key]) for t in pending if results[t.key].error]
    if bad and c.on_bad_shard == "fail":
        lines = "\n".join(f"  {r.error}" for _, r in bad)
        raise UserError(
            f"{len(bad)} shard(s) cannot be used:\n{lines}\n"
            "Fix or remove them, or set `corpus.on_bad_shard: skip` in the recipe to build "
            "without them (each is then listed in rejected/quarantine.jsonl). The previous "
            "corpus files were not touched."
        )
    bad_keys = {t.key for t, _ in bad}

    t_dedup = time.perf_counter()
    pairs = _near_pairs(recipe, tasks, shard_cache, bad_keys, ex) if c.dedup.near else None
    t_dedup = time.perf_counter() - t_dedup

    t_assemble = time.perf_counter()
    tables, stats, shard_parts = [], [], []
    for t in tasks:
        if t.key in bad_keys:
            st, row = _bad_shard(t, results[t.key])
            stats.append(st)
            shard_parts.append(row)
            continue
        tables.append(cached_docs(shard_cache, t.key))
        stats.append(cached_stats(shard_cache, t.key))
        shard_parts.append(shard_cache / t.key)
    result = assemble(recipe, tables, pairs, stats)
    t_assemble = time.perf_counter() - t_assemble

    total = totals(result.counts)
    counts = {"total": total, "sources": result.counts}
    for name, cs in [("total", total), *result.counts.items()]:
        if not balanced(cs):  # a bug, not a user error: refuse to write a corpus that lost records
            raise RuntimeError(f"corpus counts do not add up for {name}: {cs}")

    t_write = time.perf_counter()
    outputs = write_outputs(recipe, out, result, shard_parts, stats, counts)
    t_write = time.perf_counter() - t_write

    entries = {
        "shard_bytes": {t.rel: t.size for t in tasks if t.kind == "file"},
        "counts": counts,
        "mix": {k: dataclasses.asdict(v) for k, v in result.mix.items()},
        "shards": {
            "bad": [{"path": t.rel, "error": r.error, "records": r.records} for t, r in bad],
            "empty": [st["rel"] for st in stats if st.get("in") == 0],
        },
        "outputs": outputs,
        "run": {
            "processed": [t.rel for t in pending],
            "reused": [t.rel for t in reused],
            "workers": n_workers,
            "executor": ex.name,
            "seconds": {
                "shards": round(t_shards, 3),
                "near_dedup": round(t_dedup, 3),
                "assemble": round(t_assemble, 3),
                "write": round(t_write, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
        },
    }
    _collect_garbage(shard_cache, {t.key for t in tasks})
    _summary(entries, out)
    return entries


def _bad_shard(t: ShardTask, res: ShardResult) -> tuple[dict[str, Any], dict[str, Any]]:
    """The counts and the rejected row of a shard refused as a whole: it counts as the records
    it holds when they can be counted, else as one (and says so)."""
    n = res.records if res.records else 1
    if res.records:
        held = f"; it holds {res.records:,} record(s), none read"
    elif res.records == 0:
        held = "; it holds no record"
    else:
        held = "; its records cannot be counted, so it counts as one"
    stats = {
        "source": t.source,
        "rel": t.rel,
        "bytes": t.size,
        "in": n,
        "passed": 0,
        "quarantined": {"quarantine:unreadable_shard": n},
        "filtered": {},
        "chars_in": 0,
        "chars_passed": 0,
        "languages": {},
        "pii": {},
        "unreadable": True,
    }
    row = {
        "origin": f"{t.rel}:0",
        "source": t.source,
        "reason": "quarantine:unreadable_shard",
        "detail": res.error + held,
        "text": None,
        "id": None,
        "duplicate_of": None,
    }
    return stats, row


def _collect_garbage(shard_cache: Path, live: set[str]) -> None:
    """Drop cached shards no longer in the corpus (a removed shard, changed settings)."""
    if not shard_cache.exists():
        return
    for d in shard_cache.iterdir():
        if d.name not in live:
            shutil.rmtree(d, ignore_errors=True)


def _summary(manifest: dict[str, Any], out: Path) -> None:
    t = manifest["counts"]["total"]
    run = manifest["run"]
    click.echo(
        f"corpus: {t['in']} records in, {t['kept']} kept, "
        f"{sum(t['filtered'].values())} filtered, "
        f"{t['duplicates']['exact']}+{t['duplicates']['near']} duplicates (exact+near), "
        f"{t['decontaminated']} decontaminated, {t['quarantined']} quarantined "
        f"[{len(run['processed'])} shard(s) processed, {len(run['reused'])} reused, "
        f"{run['seconds']['total']:.1f}s]"
    )
    click.echo(f"corpus: wrote {out}/ (report.md, manifest.json, rejected/)")


def load_manifest(recipe: Recipe) -> dict[str, Any]:
    p = recipe.layout.manifest("corpus")
    if not p.exists():
        raise UserError(f"{p} is missing: run `make corpus RECIPE={recipe.path}` first")
    return json.loads(p.read_text(encoding="utf-8"))
