"""`make corpus`: find the shards, process the changed ones in parallel, assemble, write."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from domainlm.corpus import python_docs
from domainlm.corpus.assemble import assemble, balanced, totals
from domainlm.corpus.decontaminate import Decontaminator
from domainlm.corpus.readers import find_shards
from domainlm.corpus.report import write_outputs
from domainlm.corpus.shardwork import (
    CACHE_VERSION,
    ShardResult,
    ShardTask,
    cached_stats,
    load_cached,
    process_shard,
)
from domainlm.errors import UserError
from domainlm.files import HashCache
from domainlm.recipe import Recipe, merged, section_dict
from domainlm.stage import Stage, run_stage

# Bump when the corpus-wide steps change their output for the same inputs.
ASSEMBLE_VERSION = 1
# The built-in source is split into this many tasks so that its parsing uses every core.
PYTHON_DOCS_PARTS = 4


def _settings(recipe: Recipe, source_index: int, decon_fp: str | None) -> dict[str, Any]:
    c = recipe.corpus
    s = c.sources[source_index]
    return {
        "filters": section_dict(merged(c.filters, s.filters)),
        "pii": section_dict(merged(c.pii, s.pii)),
        "dedup": {"near": c.dedup.near, "shingle": c.dedup.shingle, "num_perm": c.dedup.num_perm},
        "decontaminate": {**section_dict(c.decontaminate), "fingerprint": decon_fp},
        "max_record_bytes": c.max_record_bytes,
        "seed": recipe.seed,
    }


def plan_tasks(recipe: Recipe, hashes: HashCache) -> list[ShardTask]:
    """The shard tasks of every source, in canonical order (recipe order, then path)."""
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
        root = _source_root(s.path)
        if not any(ch in s.path for ch in "*?[") and not Path(s.path).exists():
            raise UserError(
                f"{recipe.path}: corpus.sources[{i}].path: {s.path} does not exist; "
                "create it or point `path` at the folder holding the shards"
            )
        for f in find_shards(s.path):
            rel = f"{s.name}/{Path(os.path.relpath(f, root)).as_posix()}"
            tasks.append(
                ShardTask(s.name, "file", str(f), rel, hashes.get(f), f.stat().st_size, settings)
            )
    return tasks


def _source_root(spec: str) -> Path:
    """The folder that origins are relative to: the path itself, or a glob's fixed prefix."""
    p = Path(spec)
    fixed = []
    for part in p.parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    root = Path(*fixed) if fixed else Path(".")
    return root.parent if root.is_file() else root


def _run_tasks(
    tasks: list[ShardTask], cache_root: Path, workers: int, progress: bool
) -> list[ShardResult]:
    work = partial(process_shard, cache_root=cache_root)
    # Largest first, so one big shard does not start last and hold up the whole pool.
    ordered = sorted(tasks, key=lambda t: -t.size)
    results = []
    # Counted in shards (a built-in source has no file size); rates in the postfix.
    bar = tqdm(total=len(tasks), unit="shard", desc="corpus shards", disable=not progress)
    docs = nbytes = 0
    t0 = time.perf_counter()
    if workers <= 1 or len(tasks) <= 1:
        it = map(work, ordered)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(min(workers, len(tasks)))
        it = pool.imap_unordered(work, ordered, chunksize=1)
    try:
        for task, res in zip(ordered, it, strict=True) if pool is None else _pair(ordered, it):
            results.append(res)
            docs += res.stats.get("in", 0)
            nbytes += task.size
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(docs_s=f"{docs / elapsed:.0f}", MB_s=f"{nbytes / elapsed / 1e6:.1f}")
    except BaseException:
        if pool is not None:  # Ctrl-C: stop the workers now; finished shards stay cached
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    return results


def _pair(tasks: list[ShardTask], results):
    by_key = {t.key: t for t in tasks}
    for res in results:
        yield by_key[res.task_key], res


def _stage(recipe: Recipe, tasks: list[ShardTask]) -> Stage:
    """The corpus stage for the runner: every shard (and eval set) by content, and the settings."""
    c = recipe.corpus
    inputs: dict[str, Path | str] = {
        t.rel: (Path(t.path) if t.kind == "file" else t.content_hash) for t in tasks
    }
    inputs |= {f"decontaminate/{i}": Path(f) for i, f in enumerate(c.decontaminate.files)}
    # Every setting but the number of processes, which changes the speed, never the bytes.
    corpus = {k: v for k, v in section_dict(c).items() if k != "workers"}
    params = {"seed": recipe.seed, "corpus": corpus, "cache_version": CACHE_VERSION}
    return Stage(
        "corpus",
        recipe.layout.manifest("corpus"),
        inputs,
        params,
        ASSEMBLE_VERSION,
        hashes=recipe.layout.hashes,
    )


def build_corpus(
    recipe: Recipe, force: bool = False, workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build build/<run>/corpus/ from the recipe; returns the manifest."""
    hashes = HashCache(recipe.layout.hashes)
    tasks = plan_tasks(recipe, hashes)
    hashes.save()
    return run_stage(
        _stage(recipe, tasks),
        lambda _: _build(recipe, tasks, force, workers, progress),
        force=force,
    )


def _build(
    recipe: Recipe, tasks: list[ShardTask], force: bool, workers: int | None, progress: bool
) -> dict[str, Any]:
    """The stage's work: process the pending shards, assemble, write; the manifest's entries."""
    t_start = time.perf_counter()
    c = recipe.corpus
    out = recipe.layout.corpus
    shard_cache = out / ".cache" / "shards"
    pending = [t for t in tasks if force or cached_stats(shard_cache, t.key) is None]
    reused = [t for t in tasks if t not in pending]
    n_workers = workers if workers is not None else (c.workers or os.cpu_count() or 1)
    t_shards = time.perf_counter()
    results = {r.task_key: r for r in _run_tasks(pending, shard_cache, n_workers, progress)}
    t_shards = time.perf_counter() - t_shards

    bad = [(t, results[t.key].error) for t in pending if results[t.key].error]
    if bad and c.on_bad_shard == "fail":
        lines = "\n".join(f"  {t.rel}: {err}" for t, err in bad)
        raise UserError(
            f"{len(bad)} shard(s) cannot be read:\n{lines}\n"
            "Fix or remove them, or set `corpus.on_bad_shard: skip` in the recipe to build "
            "without them (each is then listed in rejected/quarantine.jsonl)."
        )
    bad_keys = {t.key for t, _ in bad}

    t_assemble = time.perf_counter()
    tables, sigs, stats, shard_rejected = [], [], [], []
    for t in tasks:
        if t.key in bad_keys:
            err = results[t.key].error
            stats.append(_bad_shard_stats(t))
            shard_rejected.append(
                [
                    {
                        "origin": f"{t.rel}:0",
                        "source": t.source,
                        "reason": "quarantine:unreadable_shard",
                        "detail": err,
                        "text": None,
                        "id": None,
                        "duplicate_of": None,
                    }
                ]
            )
            continue
        table, sig, rej = load_cached(shard_cache, t.key)
        tables.append(table)
        sigs.append(sig)
        stats.append(cached_stats(shard_cache, t.key))
        shard_rejected.append(rej)
    result = assemble(recipe, tables, sigs, stats)
    t_assemble = time.perf_counter() - t_assemble

    total = totals(result.counts)
    counts = {"total": total, "sources": result.counts}
    for name, cs in [("total", total), *result.counts.items()]:
        if not balanced(cs):  # a bug, not a user error: refuse to write a corpus that lost records
            raise RuntimeError(f"corpus counts do not add up for {name}: {cs}")

    t_write = time.perf_counter()
    rejected = [r for rs in shard_rejected for r in rs] + result.rejected
    outputs = write_outputs(recipe, out, result, rejected, stats, counts, tasks)
    t_write = time.perf_counter() - t_write

    entries = {
        "shard_bytes": {t.rel: t.size for t in tasks if t.kind == "file"},
        "counts": counts,
        "mix": {k: dataclasses.asdict(v) for k, v in result.mix.items()},
        "shards": {
            "bad": [{"path": t.rel, "error": e} for t, e in bad],
            "empty": [st["rel"] for st in stats if st.get("in") == 0],
        },
        "outputs": outputs,
        "run": {
            "processed": [t.rel for t in pending],
            "reused": [t.rel for t in reused],
            "workers": n_workers,
            "seconds": {
                "shards": round(t_shards, 3),
                "assemble": round(t_assemble, 3),
                "write": round(t_write, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
        },
    }
    _collect_garbage(shard_cache, {t.key for t in tasks})
    _summary(entries, out)
    return entries


def _bad_shard_stats(t: ShardTask) -> dict[str, Any]:
    return {
        "source": t.source,
        "rel": t.rel,
        "bytes": t.size,
        "in": 1,
        "passed": 0,
        "quarantined": {"quarantine:unreadable_shard": 1},
        "filtered": {},
        "chars_in": 0,
        "chars_passed": 0,
        "languages": {},
        "pii": {},
        "unreadable": True,
    }


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

