"""Tokens benchmark: `make tokens` throughput (parquet to token files) as a ratio to raw
SentencePiece batch encoding of the same texts, already in memory, on the same cores."""

from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import sentencepiece as spm
import yaml

from bench.common import commit, machine, table, write_section
from bench.corpus import generate
from domainlm.corpus.pipeline import build_corpus
from domainlm.recipe import Recipe, load_recipe
from domainlm.tokenizer.encode import available_cores
from domainlm.tokenizer.tokens import encode_tokens
from domainlm.tokenizer.train import train_tokenizer

WORK = Path("build/bench/tokens")
VOCAB = 4096  # the generated text draws on 6,000 words: larger vocabularies cannot be trained


def prepare(target_mb: float, cores: int) -> Recipe:
    """A corpus of about target_mb generated MB and a tokenizer, built once and then reused."""
    name = f"gen{target_mb:g}mb"
    shards, done = WORK / "shards" / name, WORK / "shards" / f"{name}.done"
    if not done.exists():
        generate(shards, target_mb, seed=1)
        done.write_text("")
    path = WORK / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "name": name,
        "build_dir": str(WORK / "build"),
        "corpus": {"sources": [{"name": "generated", "path": str(shards)}], "workers": cores,
                   "val_fraction": 0.01},
        "tokenizer": {"vocab_size": VOCAB, "sample_docs": 5000},
    }
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    recipe = load_recipe(path)
    with contextlib.redirect_stdout(io.StringIO()):
        build_corpus(recipe, progress=False)
        train_tokenizer(recipe, progress=False)
    return recipe


def corpus_texts(recipe: Recipe) -> list[str]:
    files = sorted(recipe.layout.corpus.glob("train-*.parquet"))
    files += sorted(recipe.layout.corpus.glob("val-*.parquet"))
    return [t for f in files for t in pq.read_table(f, columns=["text"])["text"].to_pylist()]


def measure(
    variants: dict[str, Callable[[], object]], runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU seconds of each variant, interleaved run by run so that a busy spell on a
    shared machine slows every variant alike rather than one of them."""
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for k, fn in variants.items():
            t, c = time.perf_counter(), time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):
                fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


RAW_LISTS = "raw `sp.encode(texts, num_threads)`, ids as lists"
RAW_NUMPY = "raw `sp.encode(texts, num_threads)`, ids as numpy"
OURS = "`make tokens` (threads, the default)"


def run(quick: bool = False) -> str:
    cores = available_cores()
    runs = 3 if quick else 7
    target = 20 if quick else 50
    recipe = prepare(target, cores)
    sp = spm.SentencePieceProcessor(
        model_file=str(recipe.layout.tokenizer_model)
    )
    texts = corpus_texts(recipe)
    with contextlib.redirect_stdout(io.StringIO()):
        m = encode_tokens(recipe, progress=False)
    c = m["counts"]
    n_tokens = c["train"]["tokens"] + c["val"]["tokens"]
    n_docs = c["train"]["docs"] + c["val"]["docs"]
    mb = (c["train"]["bytes"] + c["val"]["bytes"]) / 1e6
    # The pool needs several chunks per worker to keep every core busy: give it 4 each.
    pool_rows = max(1, -(-n_docs // (4 * cores)))
    pool = f"`make tokens` (process pool, chunks of {pool_rows} rows)"

    def stage(method: str, chunk_rows: int | None = None) -> Callable[[], object]:
        return lambda: encode_tokens(
            recipe, force=True, progress=False, method=method, workers=cores,
            chunk_rows=chunk_rows,
        )

    variants: dict[str, Callable[[], object]] = {
        RAW_LISTS: lambda: sp.encode(texts, add_eos=True, num_threads=cores, out_type=int),
        RAW_NUMPY: lambda: sp.encode(
            texts, add_eos=True, num_threads=cores, return_type="numpy"
        ),
        OURS: stage("threads"),
        pool: stage("processes", pool_rows),
    }
    load_before = os.getloadavg()[0]
    wall, cpu = measure(variants, runs)
    load = (load_before + os.getloadavg()[0]) / 2
    shared = f" (more than {cores}: other work shared the cores)" if load > cores else ""
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    raw = min(med[RAW_LISTS], med[RAW_NUMPY])
    rows = [
        [k, f"{v:.2f}", f"{med_cpu[k]:.2f}", f"{n_tokens / v / 1e6:.2f}", f"{mb / v:.1f}",
         f"{med[RAW_LISTS] / v:.2f}", f"{med[RAW_NUMPY] / v:.2f}"]
        for k, v in med.items()
    ]
    ours = med[OURS]
    header = (
        f"## Tokens (`make tokens`)\n\nMachine: {machine()}. Commit {commit()}. "
        f"Command: `python -m bench tokens{' --quick' if quick else ''}` "
        f"(median of {runs} runs, interleaved, {time.strftime('%Y-%m-%d')}). Load average "
        f"around the runs: {load:.1f}{shared}.\n"
    )
    body = [
        f"Generated corpus: {mb:.1f} MB of text in {n_docs:,} documents, {n_tokens:,} tokens "
        f"(unigram, {sp.get_piece_size()} pieces), {cores} cores. Raw calls encode the same "
        "texts, already in memory, with eos added; `make tokens` is the whole stage (up-to-date "
        "check, read Parquet, encode, append to the arrays, index, meta, manifest).\n",
        table(
            ["variant", "median wall s", "median CPU s", "M tokens/s", "MB/s",
             "ratio to raw (lists)", "ratio to raw (numpy)"],
            rows,
        ),
        f"\nThroughput of `make tokens` as a ratio to the faster raw call: "
        f"**{raw / ours:.2f}** (target >= 0.8). CPU seconds count every thread of this "
        "process (the pool's workers are other processes, so its CPU column is the parent's).\n",
    ]
    return header + "\n" + "\n".join(body)


def main(quick: bool = False) -> None:
    body = run(quick)
    write_section("tokens", body)
    print(body)
