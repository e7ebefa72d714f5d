"""Read contributed shards (JSONL, gzip/zstd JSONL, Parquet, plain text) into Docs and Rejecteds."""

from __future__ import annotations

import datetime as dt
import glob
import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from domainlm.corpus.records import MAX_REJECTED_TEXT, QUARANTINE, Doc, Rejected, clip
from domainlm.errors import UserError

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".txt")

# Longest suffix first, so "a.jsonl.gz" is gzip and not plain JSONL.
_FORMATS = (
    (".jsonl.gz", "jsonl.gz"),
    (".jsonl.zst", "jsonl.zst"),
    (".jsonl", "jsonl"),
    (".parquet", "parquet"),
    (".txt", "txt"),
)

_SNIFF_BYTES = 8 * 1024  # binary / UTF-16 detection looks at this much of the (decoded) start
_BUFFER_BYTES = 1 << 20  # read buffer of the line reader
_SKIP_CHUNK = 1 << 20  # an over-long line is skipped this much at a time
# zstd input is fed this much at a time: 256 bytes can expand to at most ~8 MiB (RLE blocks),
# which bounds memory on a pathological line; smaller feeds cost nothing measurable.
_ZSTD_INPUT_BYTES = 256
_PARQUET_BATCH_ROWS = 2048
_UTF8_BOM = b"\xef\xbb\xbf"

# Reading errors of a stream after its first bytes: a cut or damaged file, not a bad record.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)

INVALID_UTF8 = f"{QUARANTINE}:invalid_utf8"
INVALID_JSON = f"{QUARANTINE}:invalid_json"
NOT_AN_OBJECT = f"{QUARANTINE}:not_an_object"
MISSING_TEXT = f"{QUARANTINE}:missing_text"
TEXT_NOT_STRING = f"{QUARANTINE}:text_not_string"
EMPTY_TEXT = f"{QUARANTINE}:empty_text"
BAD_FIELD = f"{QUARANTINE}:bad_field"
TOO_LONG = f"{QUARANTINE}:too_long"
TRUNCATED = f"{QUARANTINE}:truncated"

_ICONV_FIX = (
    "convert the file to UTF-8 with `iconv -f <encoding> -t UTF-8 in > out` "
    "(often the encoding is WINDOWS-1252 or LATIN1)"
)


class ShardError(UserError):
    """A shard that cannot be used at all; the message names the file and the fix.

    Raised by `read_shard` before it yields anything, so a caller can skip the whole shard.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        # Both parts travel in args so the exception pickles across worker processes.
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


# --------------------------------------------------------------------------------------------
# Finding shards.


def shard_format(path: str | Path) -> str | None:
    """The shard format a file name says ("jsonl", "jsonl.gz", ...), or None if unsupported."""
    name = Path(path).name.lower()
    for suffix, fmt in _FORMATS:
        if name.endswith(suffix) and len(name) > len(suffix):
            return fmt
    return None


def find_shards(spec: str | Path) -> list[Path]:
    """Shard files named by a file, a folder (searched recursively) or a glob, sorted.

    Hidden files and folders (names starting with '.') and unsupported suffixes are left out of
    folder and glob searches. A named file with an unsupported suffix, or a path that does not
    exist and is not a glob, raises ShardError; a glob matching nothing gives [].
    """
    text = str(spec)
    path = Path(spec)
    if path.is_file():
        if shard_format(path) is None:
            raise ShardError(path, _unsupported(path))
        return [path]
    if path.is_dir():
        return sorted(_walk(path))
    if any(c in text for c in "*?["):
        found: set[Path] = set()
        for match in glob.glob(text, recursive=True):
            m = Path(match)
            if m.is_dir():
                found.update(_walk(m))
            elif m.is_file() and shard_format(m) and not m.name.startswith("."):
                found.add(m)
        return sorted(found)
    raise ShardError(path, "no such file or folder; give a shard file, a folder or a glob")


def _walk(folder: Path) -> Iterator[Path]:
    # Symlinked folders are followed (teams often link their data in); `seen` stops cycles.
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and shard_format(name):
                p = Path(root, name)
                if p.is_file():
                    yield p


def _unsupported(path: Path) -> str:
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
        raise ShardError(rel, _unsupported(path))
    if path.is_dir():
        raise ShardError(rel, "is a folder, not a shard file")
    if fmt == "parquet":
        yield from _read_parquet(path, source, rel, max_record_bytes)
    elif fmt == "txt":
        yield from _read_txt(path, source, rel, max_record_bytes)
    else:
        yield from _read_jsonl(path, fmt, source, rel, max_record_bytes)


def _open(path: Path, rel: str) -> BinaryIO:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise ShardError(rel, "no such file") from None
    except OSError as e:
        problem = f"cannot open the file ({e.strerror}); check its permissions"
        raise ShardError(rel, problem) from None


class _ZstdFrames(io.RawIOBase):
    """Decompress concatenated zstd frames; raise EOFError when the last frame is cut off.

    zstandard's stream_reader (even with read_across_frames=True) reports a truncated file as
    a normal end of stream, which would drop the tail silently; decompressobj exposes `eof`
    per frame, so we drive it ourselves.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # the decompressobj of the frame in progress, if any
        self._out = memoryview(b"")
        self._error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._out:
            if self._error is not None:
                raise self._error
            data = self._raw.read(_ZSTD_INPUT_BYTES)
            if not data:
                if self._frame is not None:
                    raise EOFError("the zstd stream ends in the middle of a frame")
                return 0
            self._out = memoryview(self._feed(data))
        n = min(len(buffer), len(self._out))
        buffer[:n] = self._out[:n]
        self._out = self._out[n:]
        return n

    def _feed(self, data: bytes) -> bytes:
        parts = []
        try:
            while data:
                if self._frame is None:
                    self._frame = self._dctx.decompressobj()
                parts.append(self._frame.decompress(data))
                if self._frame.eof:
                    data = self._frame.unused_data
                    self._frame = None
                else:
                    data = b""
        except zstandard.ZstdError as e:
            # Hand out what decoded cleanly before the damage first; fail on the next read.
            if not parts:
                raise
            self._error = e
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()


class _Prefixed(io.RawIOBase):
    """The bytes already read for sniffing, then the rest of the stream (or its read error).

    `read(n)` must return what one underlying read gives (gzip's read1, not read): a read
    that loops to fill n bytes loses everything it decoded when the stream turns out cut.
    """

    def __init__(
        self, head: bytes, read: Callable[[int], bytes], error: BaseException | None
    ) -> None:
        self._head = memoryview(head)
        self._read = read
        self._error = error

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            data: Any = self._head[: len(buffer)]
            self._head = self._head[len(data) :]
        elif self._error is not None:
            raise self._error
        else:
            data = self._read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n


def _read_head(
    read: Callable[[int], bytes], fmt: str, rel: str
) -> tuple[bytes, BaseException | None]:
    """Up to _SNIFF_BYTES of decoded content; a failure on the very first read is a ShardError."""
    parts: list[bytes] = []
    got = 0
    while got < _SNIFF_BYTES:
        try:
            chunk = read(_SNIFF_BYTES - got)
        except _STREAM_ERRORS as e:
            if got == 0:
                raise ShardError(rel, _first_read_fix(fmt, rel, e)) from None
            return b"".join(parts), e
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts), None


def _first_read_fix(fmt: str, rel: str, err: BaseException) -> str:
    name = Path(rel).name
    if fmt == "jsonl.gz":
        return (
            f"cannot be read as gzip ({err}); if the file is not compressed, rename it to "
            f"*.jsonl, otherwise re-export it (`gzip -t {name}` checks a gzip file)"
        )
    if fmt == "jsonl.zst":
        return (
            f"cannot be read as zstd ({err}); if the file is not compressed, rename it to "
            f"*.jsonl, otherwise re-export it (`zstd -t {name}` checks a zstd file)"
        )
    return f"cannot be read ({err}); check the file and its permissions"


_MAGIC_HINTS = (
    (b"\x1f\x8b", "it is gzip-compressed: name it *.jsonl.gz (JSONL) or decompress it"),
    (b"\x28\xb5\x2f\xfd", "it is zstd-compressed: name it *.jsonl.zst (JSONL) or decompress it"),
    (b"PAR1", "it is a Parquet file: name it *.parquet"),
    (b"PK\x03\x04", "it is a zip archive: unzip it and add the files inside"),
)


def _sniff(head: bytes, rel: str) -> None:
    """Refuse files that are not UTF-8 text at all (so each line is not quarantined alone)."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        raise ShardError(rel, "is UTF-32 text; convert it with `iconv -f UTF-32 -t UTF-8 in > out`")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ShardError(rel, "is UTF-16 text; convert it with `iconv -f UTF-16 -t UTF-8 in > out`")
    for magic, hint in _MAGIC_HINTS:
        if head.startswith(magic):
            raise ShardError(rel, f"is not text: {hint}")
    if b"\x00" in head:
        # UTF-16 without a byte order mark: every other byte of ASCII text is NUL.
        even, odd = head[0::2], head[1::2]
        if odd and odd.count(0) > len(odd) // 3:
            enc = "UTF-16LE"
        elif even and even.count(0) > len(even) // 3:
            enc = "UTF-16BE"
        else:
            raise ShardError(
                rel,
                "is a binary file (NUL bytes in its first 8 KiB), not UTF-8 text; "
                "export the data as UTF-8 JSONL, Parquet or plain text",
            )
        raise ShardError(
            rel, f"looks like {enc} text; convert it with `iconv -f {enc} -t UTF-8 in > out`"
        )


def _read_jsonl(
    path: Path, fmt: str, source: str, rel: str, limit: int
) -> Iterator[Doc | Rejected]:
    raw = _open(path, rel)
    try:
        if fmt == "jsonl.gz":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif fmt == "jsonl.zst":
            stream = _ZstdFrames(io.BufferedReader(raw, 1 << 16))
        else:
            stream = raw
    except BaseException:
        raw.close()
        raise
    read = stream.read1 if fmt == "jsonl.gz" else stream.read
    with stream, raw:
        head, error = _read_head(read, fmt, rel)
        _sniff(head, rel)
        if head.startswith(_UTF8_BOM):
            head = head[len(_UTF8_BOM) :]
        lines = io.BufferedReader(_Prefixed(head, read, error), _BUFFER_BYTES)
        yield from _jsonl_records(lines, source, rel, limit)


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _jsonl_records(
    lines: io.BufferedReader, source: str, rel: str, limit: int
) -> Iterator[Doc | Rejected]:
    # The hot loop: bytes lines, one decode and one json.loads per record, no copies.
    cap = limit + 1
    readline = lines.readline
    n = 0
    while True:
        try:
            line = readline(cap)
        except _STREAM_ERRORS as e:
            yield _truncated(rel, n, source, e, "line")
            return
        if not line:
            return
        n += 1
        origin = f"{rel}:{n}"
        if len(line) == cap and line[-1] != 0x0A:
            try:
                rest, ended = _skip_line(lines)
            except _STREAM_ERRORS as e:
                yield _too_long(origin, source, line, None, limit, "line")
                yield _truncated(rel, n, source, e, "line")
                return
            yield _too_long(origin, source, line, len(line) + rest - ended, limit, "line")
            continue
        if line.isspace():
            continue
        try:
            text = line.decode()
        except UnicodeDecodeError as e:
            detail = (
                f"byte {e.start} of the line (0x{line[e.start]:02X}) is not valid UTF-8; "
                f"{_ICONV_FIX}"
            )
            yield Rejected(origin, source, INVALID_UTF8, detail, text=_raw(line))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, or e.g. a 5000-digit number
            detail = _json_error(text)
            yield Rejected(origin, source, INVALID_JSON, detail, text=clip(text.rstrip("\r\n")))
            continue
        if type(obj) is not dict:
            detail = _not_object_detail(obj)
            yield Rejected(origin, source, NOT_AN_OBJECT, detail, text=clip(text.rstrip("\r\n")))
            continue
        doc = _to_doc(obj, origin, source)
        if type(doc) is Doc and b"\\u" in line and _SURROGATE_ESCAPE.search(line):
            doc = _check_surrogates(doc)
        if type(doc) is Doc:
            yield doc
        else:
            reason, detail, rid = doc
            yield Rejected(origin, source, reason, detail, text=clip(text.rstrip("\r\n")), id=rid)


def _json_error(text: str) -> str:
    # Parsed again without the line end, so an unterminated string is named as such rather
    # than as an "invalid control character" (the newline).
    try:
        json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as e:
        at = "" if e.msg.endswith(" at") else " at"
        return f"not valid JSON: {e.msg}{at} column {e.colno}"
    except RecursionError:
        return "cannot be read: the JSON is nested too deeply; flatten the record"
    except ValueError as e:
        return f"cannot be read: {e}"
    return "not valid JSON: the line ends inside a value"


def _skip_line(lines: io.BufferedReader) -> tuple[int, int]:
    """Skip the rest of an over-long line in bounded chunks: (bytes skipped, 1 if it ended)."""
    skipped = 0
    while True:
        chunk = lines.readline(_SKIP_CHUNK)
        skipped += len(chunk)
        if not chunk:
            return skipped, 0
        if chunk[-1] == 0x0A:
            return skipped, 1


def _raw(data: bytes) -> str | None:
    return clip(data.decode("utf-8", "replace").rstrip("\r\n"))


def _too_long(
    origin: str, source: str, data: bytes, size: int | None, limit: int, unit: str
) -> Rejected:
    size_text = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    detail = (
        f"the {unit} is {size_text}, over the limit of {limit:,} bytes "
        "(corpus.max_record_bytes); split the document into smaller records or raise the limit"
    )
    # Only the start is kept: the original file and line are named in `origin`.
    text = data[:MAX_REJECTED_TEXT].decode("utf-8", "replace")
    text += f"\n[... cut: {size_text} in all]"
    return Rejected(origin, source, TOO_LONG, detail, text=text)


def _truncated(rel: str, n: int, source: str, err: BaseException, unit: str) -> Rejected:
    detail = (
        f"the file is cut off or damaged after {unit} {n} ({type(err).__name__}: {err}); "
        f"the records before it were read; re-export the file and replace this one"
    )
    return Rejected(f"{rel}:{n + 1}", source, TRUNCATED, detail)


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    type(None): "null",
}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _not_object_detail(obj: Any) -> str:
    detail = f'each line must be one JSON object like {{"text": "..."}}, got {_json_type(obj)}'
    if isinstance(obj, list) and obj and isinstance(obj[0], dict):
        detail += "; write one object per line instead of an array (e.g. `jq -c '.[]'`)"
    return detail


# Fields other exporters use for the document; naming them turns "missing text" into a fix.
_TEXT_LIKE = ("content", "contents", "body", "document", "raw_content", "article", "passage")
_TEXT_LIKE += ("paragraph", "markdown", "html", "message", "sentence", "Text", "TEXT")

_ISO_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})"
    r"(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?)?)?"
)

_Problem = tuple[str, str, "str | None"]  # (reason, detail, the record's id if known)


def _to_doc(rec: dict, origin: str, source: str) -> Doc | _Problem:
    """Check one record's fields; a Doc, or (reason, detail, id) saying what is wrong."""
    text = rec.get("text")
    if type(text) is not str:
        return _text_problem(rec)
    rid = rec.get("id")
    if rid is None:
        doc_id = origin
    elif type(rid) is str and rid.strip():
        doc_id = rid
    elif type(rid) is int:
        doc_id = str(rid)
    else:
        return _bad_field("id", "a non-empty string or an integer", rid, None)
    if not text or text.isspace():
        detail = "`text` is empty or only whitespace; leave such records out"
        return EMPTY_TEXT, detail, doc_id
    license_ = rec.get("license")
    if license_ is not None and type(license_) is not str:
        return _bad_field("license", 'a string (e.g. "CC-BY-4.0")', license_, doc_id)
    created = rec.get("created")
    if created is not None and (type(created) is not str or not _is_iso_date(created)):
        expected = 'an ISO date string (e.g. "2024-03-31" or "2024-03-31T09:30:00Z")'
        return _bad_field("created", expected, created, doc_id)
    meta = rec.get("meta")
    meta_text = None
    if meta is not None:
        if type(meta) is not dict:
            return _bad_field("meta", 'a JSON object (e.g. {"url": "..."})', meta, doc_id)
        # default=str: Parquet struct values can be dates or bytes, which JSON has no type for.
        meta_text = json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str)
    return Doc(
        id=doc_id,
        text=text,
        source=source,
        origin=origin,
        license=license_,
        created=created,
        meta=meta_text,
    )


def _text_problem(rec: dict) -> _Problem:
    rid = rec.get("id")
    rid = str(rid) if type(rid) in (str, int) else None
    if "text" not in rec:
        fields = ", ".join(repr(k) for k in list(rec)[:12]) or "none"
        detail = f"the record has no `text` field (its fields: {fields})"
        alt = next((k for k in _TEXT_LIKE if k in rec), None)
        if alt is not None:
            detail += f"; if {alt!r} holds the document, rename it to 'text'"
        return MISSING_TEXT, detail, rid
    text = rec["text"]
    if text is None:
        return MISSING_TEXT, "`text` is null; leave such records out", rid
    detail = f"`text` must be a string, got {_json_type(text)}"
    if isinstance(text, list) and all(isinstance(t, str) for t in text):
        detail += "; join the pieces into one string"
    return TEXT_NOT_STRING, detail, rid


def _bad_field(name: str, expected: str, value: Any, rid: str | None) -> _Problem:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return BAD_FIELD, f"`{name}` must be {expected}, got {_json_type(value)} {shown}", rid


def _is_iso_date(value: str) -> bool:
    m = _ISO_DATE.fullmatch(value)
    if m is None:
        return False
    year, month, day = m.group(1), m.group(2), m.group(3)
    try:
        dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError:
        return False
    return True


def _check_surrogates(doc: Doc) -> Doc | _Problem:
    # A "\udXXX" escape without its pair parses to a string UTF-8 cannot hold; writing it
    # later would crash the corpus writer, so the record is quarantined here.
    for name in ("text", "id", "license", "created", "meta"):
        value = getattr(doc, name)
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            detail = (
                f"`{name}` contains an unpaired surrogate escape (\\u{ord(value[e.start]):04x}), "
                "which is not valid Unicode; fix the exporter (it split an emoji or similar)"
            )
            return INVALID_UTF8, detail, doc.id
    return doc


# --------------------------------------------------------------------------------------------
# Plain text: one document per file.


def _read_txt(path: Path, source: str, rel: str, limit: int) -> Iterator[Doc | Rejected]:
    f = _open(path, rel)
    with f:
        try:
            head = f.read(_SNIFF_BYTES)
        except OSError as e:
            raise ShardError(rel, _first_read_fix("txt", rel, e)) from None
        if not head:
            return
        _sniff(head, rel)
        bom = len(_UTF8_BOM) if head.startswith(_UTF8_BOM) else 0
        # Read one byte past the limit, never the whole of an enormous file.
        want = limit + bom + 1 - len(head)
        try:
            data = head + f.read(want) if want > 0 else head
        except OSError as e:
            raise ShardError(rel, _first_read_fix("txt", rel, e)) from None
        data = data[bom:]
        origin = f"{rel}:1"
        if len(data) > limit:
            size = os.fstat(f.fileno()).st_size - bom
            yield _too_long(origin, source, data, size, limit, "file")
            return
        try:
            text = data.decode()
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            detail = (
                f"byte {e.start} of the file (0x{data[e.start]:02X}, on line {line}) is not "
                f"valid UTF-8; {_ICONV_FIX}"
            )
            yield Rejected(origin, source, INVALID_UTF8, detail, text=_raw(data))
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
                yield _truncated(rel, n, source, e, "row")
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
                    yield _too_long(origin, source, value, sizes[i], limit, "row's text")
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


def _parquet_record(rec: dict, origin: str, source: str) -> Doc | _Problem:
    text = rec.get("text")
    if isinstance(text, bytes):
        try:
            rec["text"] = text.decode()
        except UnicodeDecodeError as e:
            detail = f"byte {e.start} of `text` is not valid UTF-8; {_ICONV_FIX}"
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
    doc = _to_doc(rec, origin, source)
    return doc


def _row_text(rec: dict) -> str | None:
    text = rec.get("text")
    if isinstance(text, str):
        return clip(text)
    if isinstance(text, bytes):
        return _raw(text)
    return clip(json.dumps(rec, ensure_ascii=False, default=str))
