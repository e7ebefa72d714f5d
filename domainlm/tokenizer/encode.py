"""Encoding corpus rows into token ids: chunks planned from the Parquet metadata, batches read
page by page, SentencePiece batch encoding on threads or processes, in order."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sentencepiece as spm

from domainlm.errors import UserError

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


# ------------------------------------------------------------------------------------ runners
# Both runners encode the pending chunks and hand each one, in order, to `sink`, which
# appends it, and report progress to `tick(documents, tokens)`; the bytes are the same.


def run_threads(
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


def run_processes(
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


