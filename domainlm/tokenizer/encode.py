"""`make tokens`: encode the corpus splits into memory-mapped token arrays, resumably."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing as mp
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm
from tqdm import tqdm

from domainlm.errors import UserError
from domainlm.files import (
    HashCache,
    atomic_path,
    hash_file,
    hash_json,
    read_json,
    versions,
    write_json,
)
from domainlm.recipe import Recipe
from domainlm.tokenizer.special import EOS_ID

# Bump when the arrays written for the same inputs change (layout, eos placement, order).
ENCODE_VERSION = 1
SPLITS = ("train", "val")
# A chunk is the unit of resumption: at most this many rows (the corpus stage writes row
# groups of 10,000 rows, so by default a chunk is a row group) ...
CHUNK_ROWS = 10_000
CHUNK_BYTES = 64 << 20  # ... and about this much text at most, to bound memory
# Rows are read and encoded in batches of about this much text per encoder thread (at most
# BATCH_ROWS rows): small enough that encoding starts at once and the last write is short,
# large enough that starting the encoder's threads for each batch costs nothing.
BATCH_BYTES_PER_THREAD = 1 << 20
BATCH_ROWS = 4000
# Chosen by measurement (bench/tokens.py, docs/tokens.md): SentencePiece's own C++ threads
# use every core on any corpus; a process pool needs as many chunks as cores to do so.
DEFAULT_METHOD = "threads"
TOKENS_FILE = "{split}.bin"
INDEX_FILE = "{split}.idx.npy"
STAT_KEYS = ("docs", "bytes", "unique_docs", "unique_bytes", "unique_tokens")


def choose_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned little-endian integer that holds every id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of one row group of one corpus file."""

    split: str
    index: int  # position within the split
    path: str
    row_group: int
    start: int
    stop: int
    batch_rows: int  # rows read and encoded at a time

    @property
    def rows(self) -> int:
        return self.stop - self.start


# ------------------------------------------------------------------------------------ inputs


def _make(target: str, recipe: Recipe) -> str:
    return f"`make {target} RECIPE={recipe.path}`" if recipe.path else f"`make {target}`"


def _corpus_inputs(recipe: Recipe, hashes: HashCache) -> dict[str, list[dict[str, Any]]]:
    """The corpus stage's split files, as its manifest lists them, checked against the disk."""
    out = recipe.stage_dir("corpus")
    manifest = out / "manifest.json"
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


def _tokenizer_input(recipe: Recipe) -> tuple[Path, str]:
    out = recipe.stage_dir("tokenizer")
    model, manifest = out / "tokenizer.model", out / "manifest.json"
    # The tokenizer stage is complete only once its manifest exists (a killed training may
    # leave a model file behind).
    for p in (model, manifest):
        if not p.exists():
            raise UserError(f"{p} is missing: run {_make('tokenizer', recipe)} first")
    return model, hash_file(model)


def load_processor(model: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(model))
    except (OSError, RuntimeError) as e:
        raise UserError(f"{model} is not a SentencePiece model ({e}): run `make tokenizer`") from e


# ------------------------------------------------------------------------------------ reading


def plan_chunks(
    split: str,
    paths: list[Path],
    chunk_rows: int = CHUNK_ROWS,
    chunk_bytes: int = CHUNK_BYTES,
    batch_bytes: int = 2 * BATCH_BYTES_PER_THREAD,
) -> list[Chunk]:
    """Cut a split's files into chunks from the Parquet metadata alone (no data is read)."""
    chunks: list[Chunk] = []
    for path in paths:
        f = pq.ParquetFile(path)
        col = f.schema_arrow.get_field_index("text")
        for rg in range(f.metadata.num_row_groups):
            meta = f.metadata.row_group(rg)
            n = meta.num_rows
            # Rows per chunk and per batch from the row group's uncompressed text size.
            size = max(meta.column(col).total_uncompressed_size, 1)
            rows = max(1, min(chunk_rows, -(-n * chunk_bytes // size)))
            batch = max(1, min(BATCH_ROWS, -(-n * batch_bytes // size)))
            for start in range(0, n, rows):
                stop = min(start + rows, n)
                chunks.append(Chunk(split, len(chunks), str(path), rg, start, stop, batch))
    return chunks


@dataclass
class Batch:
    """Consecutive rows of one chunk: their texts, counts, and which are originals."""

    texts: list[str]
    stats: dict[str, int]
    original: np.ndarray  # False for up-sampled repeats (copy > 0)


def _batch(rows: pa.RecordBatch) -> Batch:
    text = rows.column("text")
    nbytes = pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64)
    if "copy" in rows.schema.names:
        original = rows.column("copy").to_numpy(zero_copy_only=False) == 0
    else:  # a corpus written before up-sampling existed: every row is an original
        original = np.ones(len(nbytes), dtype=bool)
    stats = {
        "docs": len(nbytes),
        "bytes": int(nbytes.sum()),
        "unique_docs": int(original.sum()),
        "unique_bytes": int(nbytes[original].sum()),
    }
    return Batch(text.to_pylist(), stats, original)


def read_batches(chunks: list[Chunk]) -> Iterator[tuple[Chunk, Batch, bool]]:
    """The rows of the chunks, in order, as (chunk, batch, last batch of the chunk).

    Parquet is decoded page by page in small batches, so encoding starts after the first
    batch rather than after a whole row group; chunks of one row group share one pass.
    """
    for (path, rg), group_it in itertools.groupby(chunks, key=lambda c: (c.path, c.row_group)):
        group = list(group_it)
        f = pq.ParquetFile(path)
        cols = ["text", "copy"] if "copy" in f.schema_arrow.names else ["text"]
        batches = f.iter_batches(
            batch_size=group[0].batch_rows, row_groups=[rg], columns=cols, use_threads=False
        )
        ci, pos = 0, 0  # the next chunk to fill; the row (in the row group) the batch starts at
        for rows in batches:
            end = pos + rows.num_rows
            while ci < len(group) and group[ci].start < end:
                c = group[ci]
                lo, hi = max(c.start, pos), min(c.stop, end)
                if hi > lo:
                    yield c, _batch(rows.slice(lo - pos, hi - lo)), hi == c.stop
                if c.stop > end:
                    break
                ci += 1
            pos = end
            if ci == len(group):
                break
        if ci != len(group):
            raise RuntimeError(f"{path}: row group {rg} ended before row {group[ci].stop}")


# ------------------------------------------------------------------------------------ encoding

_numpy_ids: bool | None = None  # does this sentencepiece return ids as buffers (>= 0.2.1)?


def encode_batch(sp: spm.SentencePieceProcessor, texts: list[str], threads: int) -> list[Any]:
    """Each text's ids followed by eos: numpy int32 arrays, or lists on older sentencepiece.

    SentencePiece's batch call runs on its own C++ threads without the GIL; asking for numpy
    buffers skips building a Python int per token (1.4x faster, measured).
    """
    global _numpy_ids
    if not texts:
        return []
    if _numpy_ids is not False:
        try:
            ids = sp.encode(texts, add_eos=True, num_threads=threads, return_type="numpy")
            _numpy_ids = True
            return ids
        except (TypeError, ValueError):
            _numpy_ids = False
    return sp.encode(texts, add_eos=True, num_threads=threads, out_type=int)


@dataclass
class Encoded:
    """One chunk, encoded: its tokens (each document followed by eos) and its counts."""

    chunk: Chunk
    tokens: np.ndarray
    lengths: np.ndarray  # tokens per document, eos included
    stats: dict[str, int]


class _ChunkBuilder:
    """Collects the encoded batches of one chunk."""

    def __init__(self, chunk: Chunk) -> None:
        self.chunk = chunk
        self.ids: list[Any] = []
        self.stats = dict.fromkeys(STAT_KEYS[:-1], 0)
        self.original: list[np.ndarray] = []

    def add(self, batch: Batch, ids: list[Any]) -> None:
        self.ids.extend(ids)
        self.original.append(batch.original)
        for k, v in batch.stats.items():
            self.stats[k] += v

    def finish(self, dtype: np.dtype) -> Encoded:
        lengths = np.fromiter(map(len, self.ids), np.int64, count=len(self.ids))
        if not self.ids:
            tokens = np.empty(0, dtype)
        elif isinstance(self.ids[0], np.ndarray):
            tokens = np.concatenate(self.ids, dtype=dtype, casting="unsafe")  # ids < vocab_size
        else:
            flat = itertools.chain.from_iterable(self.ids)
            tokens = np.fromiter(flat, dtype, count=int(lengths.sum()))
        original = np.concatenate(self.original) if self.original else np.empty(0, bool)
        stats = {**self.stats, "unique_tokens": int(lengths[original].sum())}
        return Encoded(self.chunk, tokens, lengths, stats)


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


# ------------------------------------------------------------------------------------ runners
# Both runners encode the pending chunks and hand each one, in order, to `sink`, which
# appends it, and report progress to `tick(documents, tokens)`; the bytes are the same.


def _run_threads(
    model: Path, chunks: list[Chunk], dtype: np.dtype, threads: int,
    sink: Callable[[Encoded], None], tick: Callable[[int, int], None],
) -> None:
    sp = load_processor(model)
    stream = read_batches(chunks)
    builder: _ChunkBuilder | None = None
    writes: list[Future] = []
    encoding: deque[tuple[Chunk, Batch, bool, Future]] = deque()

    def collect() -> None:
        nonlocal builder
        chunk, batch, last, future = encoding.popleft()
        ids = future.result()
        batch.texts = []  # only the counts are needed from here on
        builder = builder or _ChunkBuilder(chunk)
        builder.add(batch, ids)
        tick(len(ids), sum(map(len, ids)))
        if last:
            writes.append(writer.submit(lambda b: sink(b.finish(dtype)), builder))
            builder = None
            # Surface a failed write at once; wait only if writing falls behind.
            while writes and (writes[0].done() or len(writes) > 2):
                writes.pop(0).result()

    # A pipeline: read batch k+2, encode batches k+1 and k, write the chunks before. Two
    # batches are encoded at once so that the cores stay busy while one batch waits for its
    # slowest document; the encoder's C++ threads release the GIL. One reader and one writer
    # keep the batches and chunks in order.
    with (
        ThreadPoolExecutor(max_workers=1) as reader,
        ThreadPoolExecutor(max_workers=2) as encoder,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        next_read = reader.submit(next, stream, None)
        while (item := next_read.result()) is not None:
            next_read = reader.submit(next, stream, None)
            chunk, batch, last = item
            future = encoder.submit(encode_batch, sp, batch.texts, threads)
            encoding.append((chunk, batch, last, future))
            if len(encoding) == 2:
                collect()
        while encoding:
            collect()
        for w in writes:
            w.result()


_worker_sp: spm.SentencePieceProcessor | None = None


def _worker_init(model: str) -> None:
    global _worker_sp
    _worker_sp = load_processor(Path(model))


def _worker_encode(args: tuple[Chunk, str]) -> Encoded:
    chunk, dtype = args
    assert _worker_sp is not None
    builder = _ChunkBuilder(chunk)
    for _, batch, _ in read_batches([chunk]):
        builder.add(batch, encode_batch(_worker_sp, batch.texts, 1))
    return builder.finish(np.dtype(dtype))


def _run_processes(
    model: Path, chunks: list[Chunk], dtype: np.dtype, workers: int,
    sink: Callable[[Encoded], None], tick: Callable[[int, int], None],
) -> None:
    pool = mp.get_context("fork").Pool(workers, _worker_init, (str(model),))
    try:
        # `imap` returns the chunks in order, holding back any that finish early.
        for enc in pool.imap(_worker_encode, [(c, dtype.str) for c in chunks], chunksize=1):
            tick(len(enc.lengths), len(enc.tokens))
            sink(enc)
        pool.close()
    finally:
        pool.terminate()  # on Ctrl-C or an error, stop the workers at once
        pool.join()


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
    t_start = time.perf_counter()
    method = method or DEFAULT_METHOD
    if method not in ("threads", "processes"):
        raise ValueError(f"method must be 'threads' or 'processes', not {method!r}")
    out = recipe.stage_dir("tokens")
    hashes = HashCache(out / ".hashes.json")
    corpus_files = _corpus_inputs(recipe, hashes)
    model, model_hash = _tokenizer_input(recipe)
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
        "version": ENCODE_VERSION,
    }
    fingerprint = hash_json(
        [
            {s: [(f["path"], f["hash"]) for f in fs] for s, fs in corpus_files.items()},
            model_hash,
            parameters,
        ]
    )
    manifest_path = out / "manifest.json"
    outputs_exist = all(
        (out / name.format(split=s)).exists() for s in SPLITS for name in (TOKENS_FILE, INDEX_FILE)
    )
    if not force and manifest_path.exists() and outputs_exist:
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint:
            hashes.save()
            click.echo(f"tokens: up to date ({manifest_path}); nothing to do")
            return old
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # incomplete until the new manifest is written
    hashes.save()

    work = out / ".partial" / fingerprint
    if force:
        shutil.rmtree(work, ignore_errors=True)
    _remove_stale(out, work)
    partial = _Partial(work, np_dtype)
    n_workers = workers or recipe.tokenizer.threads or available_cores()
    batch_bytes = max(2, n_workers) * BATCH_BYTES_PER_THREAD
    chunks = {
        s: plan_chunks(
            s, [recipe.stage_dir("corpus") / f["path"] for f in fs], chunk_rows,
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
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_hash": model_hash,
        **{
            s: {**counts[s], "file": TOKENS_FILE.format(split=s),
                "index": INDEX_FILE.format(split=s)}
            for s in SPLITS
        },
    }
    write_json(out / "meta.json", meta)
    outputs["meta.json"] = {"hash": hash_file(out / "meta.json")}
    t_write = time.perf_counter() - t_write

    manifest = {
        "stage": "tokens",
        "recipe": str(recipe.path),
        "fingerprint": fingerprint,
        "inputs": {
            "corpus": corpus_files,
            "tokenizer": {"path": str(model), "hash": model_hash},
        },
        "parameters": parameters,
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
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    shutil.rmtree(work.parent, ignore_errors=True)  # nothing else lives in .partial/
    _summary(manifest, out)
    return manifest


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
            _run_processes(model, pending, dtype, min(workers, len(pending)), sink, tick)
        else:
            _run_threads(model, pending, dtype, workers, sink, tick)
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
