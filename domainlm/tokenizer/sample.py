"""Sampling the corpus for the tokenizer: documents picked by a seeded hash of their origin
(never by file order), read back in order, written as training lines SentencePiece accepts."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.compute as pc
import pyarrow.parquet as pq

from domainlm.recipe import Recipe
from domainlm.tokenizer.report import Doc

# SentencePiece skips training sentences longer than max_sentence_length bytes; long lines are
# cut into chunks of at most this many characters (4 bytes each at most) so none is lost.
LINE_CHUNK_CHARS = 4096
MAX_SENTENCE_BYTES = 4 * LINE_CHUNK_CHARS
_SCAN_BATCH = 8192


class _Row(NamedTuple):
    key: tuple[int, str]  # seeded hash of the origin, then the origin (ties)
    file: int
    row: int
    chars: int


def key(seed: int, salt: str, origin: str) -> tuple[int, str]:
    # A keyed hash, not a random stream: a document's fate depends only on itself and the seed,
    # never on file order or on which other documents exist.
    digest = hashlib.blake2b(f"{seed}\0{salt}\0{origin}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big"), origin


def scan(paths: list[Path], seed: int, salt: str) -> Iterator[_Row]:
    """Every original document (copy 0) with its sampling key and length; text is not kept."""
    for f, path in enumerate(paths):
        pf = pq.ParquetFile(path)
        has_copy = "copy" in pf.schema_arrow.names
        columns = ["origin", "text"] + (["copy"] if has_copy else [])
        base = 0
        for batch in pf.iter_batches(batch_size=_SCAN_BATCH, columns=columns):
            origins = batch.column("origin").to_pylist()
            lengths = pc.utf8_length(batch.column("text")).to_pylist()
            copies = batch.column("copy").to_pylist() if has_copy else [0] * len(origins)
            for i, (origin, n, copy) in enumerate(zip(origins, lengths, copies, strict=True)):
                if copy == 0:  # upsampled repeats would weight the sample like the mixture
                    yield _Row(key(seed, salt, origin or ""), f, base + i, n or 0)
            base += batch.num_rows


def pick(
    rows: Iterable[_Row], max_docs: int, max_chars: int | None
) -> tuple[dict[tuple[int, int], int], int]:
    """The first documents in key order within both caps, as (file, row) -> characters to use,
    and the number of documents there were to choose from.

    Only max_docs rows are held at a time, so a corpus of any size fits in memory. The document
    that crosses the character cap is cut to fit, so the cap is used exactly.
    """
    seen = 0

    def counted() -> Iterator[_Row]:
        nonlocal seen
        for r in rows:
            seen += 1
            yield r

    picked: dict[tuple[int, int], int] = {}
    total = 0
    for r in heapq.nsmallest(max_docs, counted(), key=lambda r: r.key):
        if max_chars is not None and total >= max_chars:
            break
        take = r.chars if max_chars is None else min(r.chars, max_chars - total)
        picked[(r.file, r.row)] = take
        total += take
    return picked, seen


def read(paths: list[Path], picked: dict[tuple[int, int], int]) -> Iterator[tuple[int, int, Doc]]:
    """The picked documents, cut to their length, in file and row order."""
    for f, path in enumerate(paths):
        rows = {row for (ff, row) in picked if ff == f}
        if not rows:
            continue
        base = 0
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=_SCAN_BATCH, columns=["origin", "source", "text"]):
            wanted = [i for i in range(batch.num_rows) if base + i in rows]
            if wanted:
                cols = batch.select(["origin", "source", "text"]).take(wanted).to_pydict()
                for i, o, s, t in zip(
                    wanted, cols["origin"], cols["source"], cols["text"], strict=True
                ):
                    yield f, base + i, Doc(o or "", s or "", (t or "")[: picked[(f, base + i)]])
            base += batch.num_rows


def write_sample(paths: list[Path], picked: dict[tuple[int, int], int], out: Path) -> dict:
    """Write the sample as SentencePiece sentences: every line of every document, one per line.

    SentencePiece trains on lines and never sees a newline; the newline pieces are reserved
    instead (special.WHITESPACE_PIECES), which is what makes documents with newlines round-trip.
    """
    docs = chars = lines = 0
    with open(out, "wb") as f:
        for _, _, doc in read(paths, picked):
            docs += 1
            chars += len(doc.text)
            for line in doc.text.split("\n"):
                for k in range(0, len(line), LINE_CHUNK_CHARS):
                    f.write(line[k : k + LINE_CHUNK_CHARS].encode("utf-8") + b"\n")
                    lines += 1
    return {"docs": docs, "chars": chars, "lines": lines}


def sentences(path: Path) -> Iterator[str]:
    # Binary lines split at b"\n" only; text mode would also split at "\r" and U+2028.
    with open(path, "rb") as f:
        for raw in f:
            yield raw[:-1].decode("utf-8")


def pick_eval_docs(
    recipe: Recipe, val_paths: list[Path], train_paths: list[Path]
) -> tuple[list[Doc], str]:
    """Up to eval_docs validation documents, by hash; training documents if val is empty."""
    n = recipe.tokenizer.eval_docs
    paths, split = val_paths, "validation"
    picked, _ = pick(scan(val_paths, recipe.seed, "tokenizer-eval"), n, None)
    if not picked:
        # No held-out split (val_fraction: 0): measure on training text, and say so.
        paths, split = train_paths, "training (no validation split)"
        picked, _ = pick(scan(train_paths, recipe.seed, "tokenizer-eval"), n, None)
    return [doc for _, _, doc in read(paths, picked)], split
