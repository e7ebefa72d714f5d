"""`make tokens`: encode the corpus splits into memory-mapped token arrays, resumably."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from domainlm.errors import UserError
from domainlm.files import HashCache, atomic_path, hash_file, read_json, write_json
from domainlm.recipe import Recipe
from domainlm.stage import Stage, file_inputs, run_stage
from domainlm.tokenizer.encode import (
    BATCH_BYTES_PER_THREAD,
    CHUNK_BYTES,
    CHUNK_ROWS,
    DEFAULT_METHOD,
    ENCODE_VERSION,
    INDEX_FILE,
    SPLITS,
    STAT_KEYS,
    TOKENS_FILE,
    Chunk,
    Encoded,
    available_cores,
    choose_dtype,
    load_processor,
    plan_chunks,
    run_processes,
    run_threads,
)
from domainlm.tokenizer.special import EOS_ID

# ------------------------------------------------------------------------------------ inputs


def _make(target: str, recipe: Recipe) -> str:
    return f"`make {target} RECIPE={recipe.path}`" if recipe.path else f"`make {target}`"


def _corpus_inputs(recipe: Recipe, hashes: HashCache) -> dict[str, list[dict[str, Any]]]:
    """The corpus stage's split files, as its manifest lists them, checked against the disk."""
    out = recipe.layout.corpus
    manifest = recipe.layout.manifest("corpus")
    if not manifest.exists():
        raise UserError(f"{manifest} is missing: run {_make('corpus', recipe)} first")
    listed = read_json(manifest).get("outputs", {})
    files: dict[str, list[dict[str, Any]]] = {}
    for split in SPLITS:
        entries = []
        names = [n for n in listed if n.startswith(f"{split}-") and n.endswith(".parquet")]
        for name in sorted(names):
            path = out / name
            if not path.exists():
                raise UserError(
                    f"{path} is listed in {manifest} but missing: run "
                    f"{_make('corpus', recipe)} again"
                )
            digest = hashes.get(path)
            if listed[name].get("hash") not in (None, digest):
                raise UserError(
                    f"{path} changed after `make corpus` wrote it: run "
                    f"{_make('corpus', recipe)} again"
                )
            entries.append({"path": name, "hash": digest, "rows": listed[name].get("rows")})
        files[split] = entries
    if not files["train"]:
        raise UserError(f"{manifest} lists no train-*.parquet: run {_make('corpus', recipe)}")
    return files


def _tokenizer_input(recipe: Recipe) -> Path:
    model, manifest = recipe.layout.tokenizer_model, recipe.layout.manifest("tokenizer")
    # The tokenizer stage is complete only once its manifest exists (a killed training may
    # leave a model file behind).
    for p in (model, manifest):
        if not p.exists():
            raise UserError(f"{p} is missing: run {_make('tokenizer', recipe)} first")
    return model


# ------------------------------------------------------------------------------------ writing


class _Partial:
    """The arrays of an unfinished run, in .partial/<fingerprint>/: <split>.bin and
    <split>.len (tokens per document, int64) grow chunk by chunk, in order, and progress.json,
    rewritten atomically after each chunk, says how much of them is complete. A killed run
    leaves at most one chunk beyond that mark, which the next run cuts off and redoes.

    Appending (rather than writing parts and concatenating them) writes every token once and
    never holds two copies of the arrays on disk.
    """

    def __init__(self, work: Path, dtype: np.dtype):
        self.work = work
        self.dtype = dtype
        work.mkdir(parents=True, exist_ok=True)
        path = work / "progress.json"
        self.progress: dict[str, dict[str, int]] = read_json(path) if path.exists() else {}
        for split in SPLITS:
            self.progress.setdefault(split, {"chunks": 0, "tokens": 0, **_zeros()})
        if not all(self._fits(split) for split in SPLITS):
            # Files shorter than their record: not ours to trust. Start this run over.
            self.progress = {split: {"chunks": 0, "tokens": 0, **_zeros()} for split in SPLITS}
        self.hashers: dict[str, Any] = {}
        for split in SPLITS:
            p = self.progress[split]
            tokens, lengths = self.files(split)
            # Cut off what a killed run appended after its last recorded chunk.
            with open(tokens, "ab") as f:
                f.truncate(p["tokens"] * dtype.itemsize)
            with open(lengths, "ab") as f:
                f.truncate(p["docs"] * 8)
            # The output's hash grows with it (the digest of files.hash_file, without a re-read).
            h = hashlib.blake2b(digest_size=16)
            with open(tokens, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            self.hashers[split] = h

    def _fits(self, split: str) -> bool:
        p = self.progress[split]
        tokens, lengths = self.files(split)
        size = tokens.stat().st_size if tokens.exists() else 0
        nlen = lengths.stat().st_size if lengths.exists() else 0
        return size >= p["tokens"] * self.dtype.itemsize and nlen >= p["docs"] * 8

    def files(self, split: str) -> tuple[Path, Path]:
        return self.work / f"{split}.bin", self.work / f"{split}.len"

    def done(self, split: str) -> int:
        """Chunks of the split already complete."""
        return self.progress[split]["chunks"]

    def append(self, enc: Encoded) -> None:
        split = enc.chunk.split
        p = self.progress[split]
        if enc.chunk.index != p["chunks"]:
            raise RuntimeError(f"{split}: chunk {enc.chunk.index} arrived before {p['chunks']}")
        tokens, lengths = self.files(split)
        buf = memoryview(np.ascontiguousarray(enc.tokens, dtype=self.dtype)).cast("B")
        with open(tokens, "ab") as f:
            f.write(buf)
        with open(lengths, "ab") as f:
            f.write(memoryview(np.ascontiguousarray(enc.lengths, dtype="<i8")).cast("B"))
        self.hashers[split].update(buf)
        p["chunks"] += 1
        p["tokens"] += len(enc.tokens)
        for k in STAT_KEYS:
            p[k] += enc.stats[k]
        write_json(self.work / "progress.json", self.progress)

    def publish(self, out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """Move the finished arrays into `out` and write their indexes: (counts, outputs)."""
        counts, outputs = {}, {}
        for split in SPLITS:
            p = self.progress[split]
            tokens, lengths = self.files(split)
            offsets = np.zeros(p["docs"] + 1, dtype=np.int64)
            np.cumsum(np.fromfile(lengths, dtype="<i8"), out=offsets[1:])
            size = tokens.stat().st_size
            if offsets[-1] != p["tokens"] or size != p["tokens"] * self.dtype.itemsize:
                raise RuntimeError(f"{split}: the arrays disagree with {self.work}/progress.json")
            idx_path = out / INDEX_FILE.format(split=split)
            with atomic_path(idx_path) as tmp, open(tmp, "wb") as f:
                np.save(f, offsets)
            bin_path = out / TOKENS_FILE.format(split=split)
            os.replace(tokens, bin_path)  # same file system: a rename, no copy
            counts[split] = {k: v for k, v in p.items() if k != "chunks"}
            outputs[bin_path.name] = {
                "bytes": bin_path.stat().st_size, "hash": self.hashers[split].hexdigest()
            }
            outputs[idx_path.name] = {"bytes": idx_path.stat().st_size, "hash": hash_file(idx_path)}
        return counts, outputs


def _zeros() -> dict[str, int]:
    return dict.fromkeys(STAT_KEYS, 0)


# ------------------------------------------------------------------------------------ the stage


def encode_tokens(
    recipe: Recipe,
    force: bool = False,
    progress: bool = True,
    *,
    workers: int | None = None,
    method: str | None = None,
    chunk_rows: int | None = None,
    dtype: str | None = None,
    on_chunk: Callable[[Chunk], None] | None = None,
) -> dict[str, Any]:
    """Encode build/<run>/corpus/ with build/<run>/tokenizer/ into build/<run>/tokens/.

    Returns the manifest. `workers` (default: recipe.tokenizer.threads, 0 = every core) and
    `method` ("threads" or "processes") change the speed, never the bytes written. `dtype`
    overrides `choose_dtype`; `on_chunk` is called after each chunk is recorded (tests use it
    to interrupt a run).
    """
    method = method or DEFAULT_METHOD
    if method not in ("threads", "processes"):
        raise ValueError(f"method must be 'threads' or 'processes', not {method!r}")
    out = recipe.layout.tokens
    corpus_files = _corpus_inputs(recipe, HashCache(recipe.layout.hashes))
    model = _tokenizer_input(recipe)
    sp = load_processor(model)
    vocab_size, eos_id = sp.get_piece_size(), sp.eos_id()
    if eos_id != EOS_ID:
        # Later stages (training, export) take eos from special.py: the arrays must agree.
        found = "no eos piece" if eos_id < 0 else f"eos at id {eos_id}"
        raise UserError(
            f"{model} has {found}, domainlm expects eos at id {EOS_ID} to separate documents: "
            f"retrain it with {_make('tokenizer', recipe)}"
        )
    chunk_rows = chunk_rows or CHUNK_ROWS
    np_dtype = np.dtype(dtype).newbyteorder("<") if dtype else choose_dtype(vocab_size)
    if np.iinfo(np_dtype).max < vocab_size - 1:
        raise ValueError(f"dtype {dtype} cannot hold ids of a {vocab_size}-piece vocabulary")
    parameters = {
        "dtype": np_dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "chunk_rows": chunk_rows,
        "chunk_bytes": CHUNK_BYTES,
    }
    corpus_paths = [recipe.layout.corpus / f["path"] for fs in corpus_files.values() for f in fs]
    stage = Stage(
        "tokens",
        recipe.layout.manifest("tokens"),
        file_inputs([*corpus_paths, model], recipe.layout.root),
        parameters,
        ENCODE_VERSION,
        outputs=[out / name.format(split=s) for s in SPLITS for name in (TOKENS_FILE, INDEX_FILE)],
        hashes=recipe.layout.hashes,
    )

    def work(fingerprint: str) -> dict[str, Any]:
        return _encode(
            recipe, fingerprint, corpus_files, model, np_dtype, parameters, force, progress,
            workers, method, on_chunk,
        )

    return run_stage(stage, work, force=force)


def _encode(
    recipe: Recipe,
    fingerprint: str,
    corpus_files: dict[str, list[dict[str, Any]]],
    model: Path,
    np_dtype: np.dtype,
    parameters: dict[str, Any],
    force: bool,
    progress: bool,
    workers: int | None,
    method: str,
    on_chunk: Callable[[Chunk], None] | None,
) -> dict[str, Any]:
    """The stage's work: encode the chunks not done yet, append, publish, count."""
    t_start = time.perf_counter()
    out = recipe.layout.tokens
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".partial" / fingerprint
    if force:
        shutil.rmtree(work, ignore_errors=True)
    _remove_stale(out, work)
    partial = _Partial(work, np_dtype)
    n_workers = workers or recipe.tokenizer.threads or available_cores()
    batch_bytes = max(2, n_workers) * BATCH_BYTES_PER_THREAD
    chunks = {
        s: plan_chunks(
            s, [recipe.layout.corpus / f["path"] for f in fs], parameters["chunk_rows"],
            batch_bytes=batch_bytes,
        )
        for s, fs in corpus_files.items()
    }
    every = [c for s in SPLITS for c in chunks[s]]
    pending = [c for c in every if c.index >= partial.done(c.split)]

    t_encode = time.perf_counter()
    encoded = _encode_pending(
        model, pending, every, partial, np_dtype, n_workers, method, progress, on_chunk
    )
    t_encode = time.perf_counter() - t_encode

    t_write = time.perf_counter()
    counts, outputs = partial.publish(out)
    meta = {
        "dtype": np_dtype.name,
        "byte_order": "little",
        "vocab_size": parameters["vocab_size"],
        "eos_id": parameters["eos_id"],
        "tokenizer_hash": hash_file(model),
        **{
            s: {**counts[s], "file": TOKENS_FILE.format(split=s),
                "index": INDEX_FILE.format(split=s)}
            for s in SPLITS
        },
    }
    write_json(out / "meta.json", meta)
    outputs["meta.json"] = {"hash": hash_file(out / "meta.json")}
    t_write = time.perf_counter() - t_write

    entries = {
        "counts": counts,
        "outputs": outputs,
        "run": {
            "method": method,
            "workers": n_workers,
            "chunks": {
                "total": len(every),
                "encoded": len(pending),
                "reused": len(every) - len(pending),
            },
            "tokens_per_s": round(encoded / t_encode) if encoded else None,
            "seconds": {
                "encode": round(t_encode, 3),
                "write": round(t_write, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
        },
    }
    shutil.rmtree(work.parent, ignore_errors=True)  # nothing else lives in .partial/
    _summary(entries, out)
    return entries


def _remove_stale(out: Path, keep: Path) -> None:
    """Drop unfinished runs of other inputs and temporary files a killed run left behind."""
    for p in out.glob(".*.tmp"):
        p.unlink(missing_ok=True)
    root = out / ".partial"
    if root.exists():
        for d in root.iterdir():
            if d != keep:
                shutil.rmtree(d, ignore_errors=True)
    if keep.exists():
        for p in keep.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def _encode_pending(
    model: Path,
    pending: list[Chunk],
    every: list[Chunk],
    partial: _Partial,
    dtype: np.dtype,
    workers: int,
    method: str,
    progress: bool,
    on_chunk: Callable[[Chunk], None] | None,
) -> int:
    """Encode and append the pending chunks; returns the number of tokens encoded."""
    total_docs = sum(c.rows for c in every)
    bar = tqdm(
        total=total_docs,
        initial=total_docs - sum(c.rows for c in pending),
        unit="doc",
        desc="tokens",
        disable=not progress,
        smoothing=0.1,
    )
    n_tokens = 0
    t0 = time.perf_counter()

    def tick(docs: int, tokens: int) -> None:
        nonlocal n_tokens
        n_tokens += tokens
        bar.update(docs)
        bar.set_postfix(tok_per_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f}")

    def sink(enc: Encoded) -> None:
        partial.append(enc)
        if on_chunk is not None:
            on_chunk(enc.chunk)

    try:
        if not pending:
            pass
        elif method == "processes" and workers > 1 and len(pending) > 1:
            run_processes(model, pending, dtype, min(workers, len(pending)), sink, tick)
        else:
            run_threads(model, pending, dtype, workers, sink, tick)
    finally:
        bar.close()
    return n_tokens


def _summary(manifest: dict[str, Any], out: Path) -> None:
    c, run = manifest["counts"], manifest["run"]
    click.echo(
        f"tokens: train {c['train']['tokens']:,} tokens in {c['train']['docs']:,} documents "
        f"({c['train']['unique_tokens']:,} in originals, without up-sampled repeats), "
        f"val {c['val']['tokens']:,} tokens [{run['chunks']['encoded']} chunk(s) encoded, "
        f"{run['chunks']['reused']} reused, {run['seconds']['total']:.1f}s]"
    )
    click.echo(f"tokens: wrote {out}/ (train.bin, val.bin, *.idx.npy, meta.json, manifest.json)")
