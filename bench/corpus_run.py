"""One measured run of the corpus benchmark, in a fresh process so that its time and peak
memory are its own: `python -m bench.corpus_run ours|datatrove|shard ...` prints JSON.

  ours SHARDS WORK WORKERS        `make corpus`'s pipeline (build_corpus) on the shards
  datatrove SHARDS WORK WORKERS   datatrove's equivalent pipeline (bench/corpus_datatrove.py)
  shard FILE WORK                 the per-shard work alone on one shard (one worker's memory)
  --memory                        also sample peak memory (off in the throughput runs: the
                                  sampler's own CPU time would count as the pipeline's)

Wall and CPU seconds are those of the measured call alone (imports excluded); CPU seconds are
this process's and its waited-for children's. Peak memory is sampled every 20 ms (resident
set size, by psutil): of this process (the driver, and the worker when there is one) and of
the largest of its child processes (the pool's workers). ru_maxrss cannot be used: Linux
carries it over from the process that started this one.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml


def _recipe(work: Path, shards: Path, workers: int):
    from domainlm.recipe import load_recipe

    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.yaml"
    data = {"name": "bench", "build_dir": str(work / "build"),
            "corpus": {"sources": [{"name": "generated", "path": str(shards)}],
                       "workers": workers}}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return load_recipe(path)


def ours(shards: Path, work: Path, workers: int) -> dict:
    from domainlm.corpus.pipeline import build_corpus

    recipe = _recipe(work, shards, workers)
    t, c = time.perf_counter(), _cpu()
    m = build_corpus(recipe, force=True, progress=False)
    seconds, cpu = time.perf_counter() - t, _cpu() - c
    cache = recipe.layout.corpus / ".cache" / "shards"
    blocks: dict[str, float] = {}
    for p in cache.glob("*/stats.json"):
        for k, v in json.loads(p.read_text())["stage_seconds"].items():
            blocks[k] = blocks.get(k, 0.0) + v
    total = m["counts"]["total"]
    return {"seconds": seconds, "cpu": cpu, "docs_out": total["kept"], "counts": total,
            "blocks": blocks, "run_seconds": m["run"]["seconds"]}


def datatrove(shards: Path, work: Path, workers: int) -> dict:
    from bench.corpus_datatrove import run_pipeline

    tasks = len(list(shards.glob("*.jsonl")))
    t, c = time.perf_counter(), _cpu()
    n = run_pipeline(shards, work, workers, tasks)
    return {"seconds": time.perf_counter() - t, "cpu": _cpu() - c, "docs_out": n}


def shard(file: Path, work: Path) -> dict:
    from domainlm.corpus.pipeline import _settings
    from domainlm.corpus.shardwork import ShardTask, process_shard

    recipe = _recipe(work, file.parent, 1)
    task = ShardTask("generated", "file", str(file), file.name, "bench", file.stat().st_size,
                     _settings(recipe, 0, None))
    t, c = time.perf_counter(), _cpu()
    res = process_shard(task, work / "cache")
    return {"seconds": time.perf_counter() - t, "cpu": _cpu() - c, "records": res.stats["in"]}


def _cpu() -> float:
    self, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return self.ru_utime + self.ru_stime + kids.ru_utime + kids.ru_stime


class _PeakMemory(threading.Thread):
    """Peak RSS of this process and of its largest descendant, sampled."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.me = psutil.Process()
        self.self_peak = self.child_peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.self_peak = max(self.self_peak, self.me.memory_info().rss)
                for c in self.me.children(recursive=True):
                    self.child_peak = max(self.child_peak, c.memory_info().rss)
            except psutil.Error:
                pass


def main(argv: list[str]) -> None:
    memory = "--memory" in argv
    argv = [a for a in argv if a != "--memory"]
    kind = argv[0]
    peak = _PeakMemory()
    if memory:  # the sampler costs CPU time of its own: on only where memory is measured
        peak.start()
    if kind == "shard":
        out = shard(Path(argv[1]), Path(argv[2]))
    else:
        fn = ours if kind == "ours" else datatrove
        out = fn(Path(argv[1]), Path(argv[2]), int(argv[3]))
    peak.done.set()
    if memory:
        peak.join()
    out["maxrss_self"] = peak.self_peak
    out["maxrss_children"] = peak.child_peak
    print("BENCH-RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
