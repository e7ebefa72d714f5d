"""Read JSONL shards (plain, gzip, zstd) line by line into parsed objects and line rejections."""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from domainlm.corpus.records import MAX_REJECTED_TEXT, QUARANTINE, Rejected, clip
from domainlm.corpus.streams import Prefixed, ZstdFrames
from domainlm.errors import UserError

SNIFF_BYTES = 8 * 1024  # binary / UTF-16 detection looks at this much of the (decoded) start
UTF8_BOM = b"\xef\xbb\xbf"
_BUFFER_BYTES = 1 << 20  # read buffer of the line reader
_SKIP_CHUNK = 1 << 20  # an over-long line is skipped this much at a time
# Reading errors of a stream after its first bytes: a cut or damaged file, not a bad record.
_STREAM_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)

# Line-level reasons, shared by every reader of line files so their rejected files read alike.
INVALID_UTF8 = f"{QUARANTINE}:invalid_utf8"
INVALID_JSON = f"{QUARANTINE}:invalid_json"
NOT_AN_OBJECT = f"{QUARANTINE}:not_an_object"
TOO_LONG = f"{QUARANTINE}:too_long"
TRUNCATED = f"{QUARANTINE}:truncated"

ICONV_FIX = (
    "convert the file to UTF-8 with `iconv -f <encoding> -t UTF-8 in > out` "
    "(often the encoding is WINDOWS-1252 or LATIN1)"
)


class ShardError(UserError):
    """A shard that cannot be used at all; the message names the file and the fix.

    Raised by the readers before they yield anything, so a caller can skip the whole shard.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        # Both parts travel in args so the exception pickles across worker processes.
        super().__init__(str(path), problem)
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


# --------------------------------------------------------------------------------------------
# The lines of a JSONL file.


def json_objects(
    path: Path,
    rel: str,
    limit: int,
    *,
    source: str = "",
    not_object: Callable[[Any], str] | None = None,
    name_byte: bool = True,
) -> Iterator[tuple[str, str, dict] | Rejected]:
    """Yield (origin, line, object) for every line holding a JSON object, in file order.

    `line` is the decoded line, line end included. Every other non-blank line is a Rejected
    (with `source`): over `limit` bytes, not UTF-8, not JSON, not an object (its detail is
    `not_object(value)`; `name_byte` puts the bad byte's value in invalid-UTF-8 details). A
    file cut off or damaged part-way ends with one Rejected quarantine:truncated. A file that
    cannot be used at all (missing, unreadable compression, not UTF-8 text) raises ShardError
    at the first next(). The compression comes from the name: *.gz gzip, *.zst zstd.
    """
    name = path.name.lower()
    fmt = "jsonl.gz" if name.endswith(".gz") else "jsonl.zst" if name.endswith(".zst") else ""
    raw = open_shard(path, rel)
    try:
        if fmt == "jsonl.gz":
            stream: Any = gzip.GzipFile(fileobj=raw, mode="rb")
        elif fmt == "jsonl.zst":
            stream = ZstdFrames(io.BufferedReader(raw, 1 << 16))
        else:
            stream = raw
    except BaseException:
        raw.close()
        raise
    read = stream.read1 if fmt == "jsonl.gz" else stream.read
    with stream, raw:
        head, error = _read_head(read, fmt, rel)
        sniff(head, rel)
        if head.startswith(UTF8_BOM):
            head = head[len(UTF8_BOM) :]
        lines = io.BufferedReader(Prefixed(head, read, error), _BUFFER_BYTES)
        yield from _objects(lines, rel, limit, source, not_object or _not_object, name_byte)


def _objects(
    lines: io.BufferedReader,
    rel: str,
    limit: int,
    source: str,
    not_object: Callable[[Any], str],
    name_byte: bool,
) -> Iterator[tuple[str, str, dict] | Rejected]:
    # The hot loop: bytes lines, one decode and one json.loads per record, no copies.
    cap = limit + 1
    readline = lines.readline
    n = 0
    while True:
        try:
            line = readline(cap)
        except _STREAM_ERRORS as e:
            yield truncated(rel, n, source, e, "line")
            return
        if not line:
            return
        n += 1
        origin = f"{rel}:{n}"
        if len(line) == cap and line[-1] != 0x0A:
            try:
                rest, ended = _skip_line(lines)
            except _STREAM_ERRORS as e:
                yield too_long(origin, source, line, None, limit, "line")
                yield truncated(rel, n, source, e, "line")
                return
            yield too_long(origin, source, line, len(line) + rest - ended, limit, "line")
            continue
        if line.isspace():
            continue  # blank lines are not records, but they have a number
        try:
            text = line.decode()
        except UnicodeDecodeError as e:
            byte = f" (0x{line[e.start]:02X})" if name_byte else ""
            detail = f"byte {e.start} of the line{byte} is not valid UTF-8; {ICONV_FIX}"
            yield Rejected(origin, source, INVALID_UTF8, detail, text=raw_text(line))
            continue
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError):  # JSONDecodeError, or e.g. a 5000-digit number
            detail = _json_error(text)
            yield Rejected(origin, source, INVALID_JSON, detail, text=clip(text.rstrip("\r\n")))
            continue
        if type(obj) is not dict:
            detail = not_object(obj)
            yield Rejected(origin, source, NOT_AN_OBJECT, detail, text=clip(text.rstrip("\r\n")))
            continue
        yield origin, text, obj


def _not_object(obj: Any) -> str:
    return f"each line must be one JSON object, got {json_type(obj)}"


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


_JSON_TYPES = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    type(None): "null",
}


def json_type(value: Any) -> str:
    """What a parsed JSON value is, for a person: "an object", "an array", "null", ..."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------
# Rejections every shard format shares.


def raw_text(data: bytes) -> str | None:
    """Bytes that are not (all) UTF-8, as text to keep in a Rejected: bad bytes replaced."""
    return clip(data.decode("utf-8", "replace").rstrip("\r\n"))


def too_long(
    origin: str, source: str, data: bytes, size: int | None, limit: int, unit: str
) -> Rejected:
    """A record over `limit` bytes (`size` in all, None if unknown); only its start is kept."""
    size_text = f"{size:,} bytes" if size is not None else f"more than {limit:,} bytes"
    detail = (
        f"the {unit} is {size_text}, over the limit of {limit:,} bytes "
        "(corpus.max_record_bytes); split the document into smaller records or raise the limit"
    )
    # Only the start is kept: the original file and line are named in `origin`.
    text = data[:MAX_REJECTED_TEXT].decode("utf-8", "replace")
    text += f"\n[... cut: {size_text} in all]"
    return Rejected(origin, source, TOO_LONG, detail, text=text)


def truncated(rel: str, n: int, source: str, err: BaseException, unit: str) -> Rejected:
    """The file ends in damage after `unit` (line, row) number `n`."""
    detail = (
        f"the file is cut off or damaged after {unit} {n} ({type(err).__name__}: {err}); "
        f"the records before it were read; re-export the file and replace this one"
    )
    return Rejected(f"{rel}:{n + 1}", source, TRUNCATED, detail)


# --------------------------------------------------------------------------------------------
# Opening a file and checking that it is UTF-8 text.


def open_shard(path: Path, rel: str) -> BinaryIO:
    """The file, unbuffered; ShardError (named `rel`) when it is missing or not readable."""
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise ShardError(rel, "no such file") from None
    except OSError as e:
        problem = f"cannot open the file ({e.strerror}); check its permissions"
        raise ShardError(rel, problem) from None


def first_read_fix(fmt: str, rel: str, err: BaseException) -> str:
    """The ShardError problem for a file whose first read fails: what to check or rename."""
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


def sniff(head: bytes, rel: str) -> None:
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
        elif is_binary(head):
            raise ShardError(
                rel,
                "is a binary file (NUL bytes, and no line of UTF-8 text in its first 8 KiB), "
                "not UTF-8 text; export the data as UTF-8 JSONL, Parquet or plain text",
            )
        else:
            return  # a stray NUL byte: only the line that holds it is quarantined
        raise ShardError(
            rel, f"looks like {enc} text; convert it with `iconv -f {enc} -t UTF-8 in > out`"
        )


def is_binary(head: bytes) -> bool:
    """Whether most of `head` is outside lines of UTF-8 text without NUL bytes.

    One NUL byte in a JSONL file is one bad line, not a binary file: the file is refused as a
    whole only when less than half of its first bytes are good text lines.
    """
    lines = head.split(b"\n")
    if len(head) >= SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last line is cut off by the sniff window
    good = 0
    for line in lines:
        if b"\x00" in line:
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            continue
        good += len(line) + 1
    return good * 2 < sum(len(line) + 1 for line in lines)


def _read_head(
    read: Callable[[int], bytes], fmt: str, rel: str
) -> tuple[bytes, BaseException | None]:
    """Up to SNIFF_BYTES of decoded content; a failure on the very first read is a ShardError."""
    parts: list[bytes] = []
    got = 0
    while got < SNIFF_BYTES:
        try:
            chunk = read(SNIFF_BYTES - got)
        except _STREAM_ERRORS as e:
            if got == 0:
                raise ShardError(rel, first_read_fix(fmt, rel, e)) from None
            return b"".join(parts), e
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts), None
