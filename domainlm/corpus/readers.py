"""Read contributed shards (JSONL, gzip/zstd JSONL, Parquet, plain text) into Docs and Rejecteds."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from domainlm.corpus.fields import (
    EMPTY_TEXT,
    Problem,
    check_surrogates,
    not_object_detail,
    to_doc,
)
from domainlm.corpus.jsonlines import (
    ICONV_FIX,
    INVALID_UTF8,
    SNIFF_BYTES,
    UTF8_BOM,
    ShardError,
    first_read_fix,
    json_objects,
    open_shard,
    raw_text,
    sniff,
    too_long,
    truncated,
)
from domainlm.corpus.records import MAX_REJECTED_TEXT, Doc, Rejected, clip

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")

# Longest suffix first, so "a.jsonl.gz" is gzip and not plain JSONL.
_FORMATS = (
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
    (".txt", "txt"),
)

_PARQUET_BATCH_ROWS = 2048


# --------------------------------------------------------------------------------------------
# Shard formats.


def shard_format(path: str | Path) -> str | None:
    """The shard format a file name says ("jsonl", "jsonl.gz", ...), or None if unsupported."""
    name = Path(path).name.lower()
    for suffix, fmt in _FORMATS:
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def unsupported(path: Path) -> str:
    name = path.name.lower()
    supported = ", ".join(SUPPORTED_SUFFIXES)
    if name.endswith((".json", ".ndjson")):
        hint = "if it holds one JSON object per line, rename it to .jsonl"
    elif name.endswith((".gz", ".zst")):
        hint = "a compressed shard must be JSONL named like data.jsonl.gz or data.jsonl.zst"
    elif name.endswith((".csv", ".tsv", ".xlsx")):
        hint = "convert it to JSONL or Parquet with a `text` column"
    else:
        hint = "convert it to one of these"
    return f"unsupported file type (shards are {supported}); {hint}"


# --------------------------------------------------------------------------------------------
# Reading one shard.


def read_shard(
    path: Path, source: str, rel: str, max_record_bytes: int
) -> Iterator[Doc | Rejected]:
    """Yield a Doc for every good record and a Rejected for every bad one, in file order.

    `rel` is the file's display path: each item's origin is "<rel>:<line or row>". A shard
    that cannot be used at all raises ShardError at the first next(), before anything is
    yielded. A file that is cut off or damaged part-way yields the records before the damage
    and then one Rejected with reason quarantine:truncated.
    """
    path = Path(path)
    fmt = shard_format(path)
    if fmt is None:
        raise ShardError(rel, unsupported(path))
    if path.is_dir():
        raise ShardError(rel, "is a folder, not a shard file")
    if fmt == "parquet":
        yield from _read_parquet(path, source, rel, max_record_bytes)
    elif fmt == "txt":
        yield from _read_txt(path, source, rel, max_record_bytes)
    else:
        yield from _read_jsonl(path, source, rel, max_record_bytes)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _read_jsonl(path: Path, source: str, rel: str, limit: int) -> Iterator[Doc | Rejected]:
    for item in json_objects(path, rel, limit, source=source, not_object=not_object_detail):
        if type(item) is Rejected:
            yield item
            continue
        origin, text, obj = item
        doc = to_doc(obj, origin, source)
        if type(doc) is Doc and "\\u" in text and _SURROGATE_ESCAPE.search(text):
            doc = check_surrogates(doc)
        if type(doc) is Doc:
            yield doc
        else:
            reason, detail, rid = doc
            yield Rejected(origin, source, reason, detail, text=clip(text.rstrip("\r\n")), id=rid)


# --------------------------------------------------------------------------------------------
# Plain text: one document per file.


def _read_txt(path: Path, source: str, rel: str, limit: int) -> Iterator[Doc | Rejected]:
    f = open_shard(path, rel)
    with f:
        try:
            head = f.read(SNIFF_BYTES)
        except OSError as e:
            raise ShardError(rel, first_read_fix("txt", rel, e)) from None
        if not head:
            return
        sniff(head, rel)
        bom = len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0
        # Read one byte past the limit, never the whole of an enormous file.
        want = limit + bom + 1 - len(head)
        try:
            data = head + f.read(want) if want > 0 else head
        except OSError as e:
            raise ShardError(rel, first_read_fix("txt", rel, e)) from None
        data = data[bom:]
        origin = f"{rel}:1"
        if len(data) > limit:
            size = os.fstat(f.fileno()).st_size - bom
            yield too_long(origin, source, data, size, limit, "file")
            return
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            detail = (
                f"byte {e.start} of the file (0x{data[e.start]:02X}, on line {line}) is not "
                f"valid UTF-8; {ICONV_FIX}"
            )
            yield Rejected(origin, source, INVALID_UTF8, detail, text=raw_text(data))
            return
        if text.isspace():
            detail = "the file holds only whitespace; leave it out"
            yield Rejected(origin, source, EMPTY_TEXT, detail, text=clip(text))
            return
        yield Doc(id=origin, text=text, source=source, origin=origin)


# --------------------------------------------------------------------------------------------
# Parquet: one record per row, read a batch of rows at a time.

_PARQUET_FIELDS = ("text", "id", "license", "created", "meta")


def _read_parquet(path: Path, source: str, rel: str, limit: int) -> Iterator[Doc | Rejected]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except FileNotFoundError:
        raise ShardError(rel, "no such file") from None
    except (pa.ArrowException, OSError) as e:
        raise ShardError(
            rel,
            f"cannot be opened as Parquet ({e}); re-export it (e.g. pandas "
            "`df.to_parquet(path)`) and check the copy is complete",
        ) from None
    with pf:
        names = pf.schema_arrow.names
        if "text" not in names:
            cols = ", ".join(repr(c) for c in names[:12]) or "none"
            raise ShardError(
                rel,
                f"has no `text` column (its columns: {cols}); "
                "name the column that holds the documents `text`",
            )
        columns = [c for c in _PARQUET_FIELDS if c in names]
        n = 0
        batches = pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as e:
                yield truncated(rel, n, source, e, "row")
                return
            if batch is None:
                return
            text_col = batch.column("text")
            t = text_col.type
            sizes = None
            if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
                sizes = pc.binary_length(text_col).to_pylist()
            values = {c: _pylist(batch.column(c), pa) for c in columns}
            for i in range(batch.num_rows):
                n += 1
                origin = f"{rel}:{n}"
                if sizes is not None and sizes[i] is not None and sizes[i] > limit:
                    value = values["text"][i]
                    if isinstance(value, str):
                        value = value[:MAX_REJECTED_TEXT].encode("utf-8", "surrogatepass")
                    yield too_long(origin, source, value, sizes[i], limit, "row's text")
                    continue
                rec = {c: values[c][i] for c in columns}
                item = _parquet_record(rec, origin, source)
                if type(item) is Doc:
                    yield item
                else:
                    reason, detail, rid = item
                    yield Rejected(origin, source, reason, detail, text=_row_text(rec), id=rid)


def _pylist(col: Any, pa: Any) -> list:
    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        # Invalid UTF-8 inside a string column: read the bytes, so only the bad rows are
        # quarantined (as invalid_utf8) instead of the whole batch.
        binary = pa.large_binary() if pa.types.is_large_string(col.type) else pa.binary()
        return col.view(binary).to_pylist()


def _parquet_record(rec: dict, origin: str, source: str) -> Doc | Problem:
    text = rec.get("text")
    if isinstance(text, bytes):
        try:
            rec["text"] = text.decode()
        except UnicodeDecodeError as e:
            detail = f"byte {e.start} of `text` is not valid UTF-8; {ICONV_FIX}"
            return INVALID_UTF8, detail, None
    created = rec.get("created")
    if isinstance(created, (dt.date, dt.datetime)):
        rec["created"] = created.isoformat()
    meta = rec.get("meta")
    if isinstance(meta, list) and all(isinstance(kv, tuple) and len(kv) == 2 for kv in meta):
        rec["meta"] = dict(meta)  # a Parquet map column
    elif isinstance(meta, str):
        # Many writers store an object column as JSON text; accept it when it is an object.
        try:
            parsed = json.loads(meta)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict):
            rec["meta"] = parsed
    doc = to_doc(rec, origin, source)
    return doc


def _row_text(rec: dict) -> str | None:
    text = rec.get("text")
    if isinstance(text, str):
        return clip(text)
    if isinstance(text, bytes):
        return raw_text(text)
    return clip(json.dumps(rec, ensure_ascii=False, default=str))
