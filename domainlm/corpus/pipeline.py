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
from domainlm.files import HashCache, hash_json, read_json, versions, write_json
from domainlm.recipe import Recipe, merged, section_dict

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


def build_corpus(
    recipe: Recipe, force: bool = False, workers: int | None = None, progress: bool = True
) -> dict[str, Any]:
    """Build build/<run>/corpus/ from the recipe; returns the manifest."""
    t_start = time.perf_counter()
    c = recipe.corpus
    out = recipe.stage_dir("corpus")
    cache_root = out / ".cache"
    shard_cache = cache_root / "shards"
    hashes = HashCache(cache_root / "hashes.json")
    tasks = plan_tasks(recipe, hashes)
    global_settings = {
        "dedup": section_dict(c.dedup),
        "val_fraction": c.val_fraction,
        "weights": {s.name: s.weight for s in c.sources},
        "sources": [s.name for s in c.sources],
        "docs_per_output_shard": c.docs_per_output_shard,
        "on_bad_shard": c.on_bad_shard,
        "seed": recipe.seed,
    }
    fingerprint = hash_json(
        [ASSEMBLE_VERSION, CACHE_VERSION, [t.key for t in tasks], global_settings]
    )
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint:
            hashes.save()
            click.echo(f"corpus: up to date ({manifest_path}); nothing to do")
            return old
    if manifest_path.exists():
        manifest_path.unlink()  # the stage is incomplete until a new manifest is written

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

    manifest = {
        "stage": "corpus",
        "recipe": str(recipe.path),
        "fingerprint": fingerprint,
        "inputs": [
            {"source": t.source, "path": t.rel, "hash": t.content_hash, "bytes": t.size}
            for t in tasks
        ],
        "parameters": {"seed": recipe.seed, "corpus": section_dict(c)},
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
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    hashes.save()
    _collect_garbage(shard_cache, {t.key for t in tasks})
    _summary(manifest, out)
    return manifest


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
    p = recipe.stage_dir("corpus") / "manifest.json"
    if not p.exists():
        raise UserError(f"{p} is missing: run `make corpus RECIPE={recipe.path}` first")
    return json.loads(p.read_text(encoding="utf-8"))

