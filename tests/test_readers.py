"""Tests for the shard readers: every format, every quarantine reason, and unusable shards."""

from __future__ import annotations

import gzip
import json
import pickle
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from domainlm.corpus import readers
from domainlm.corpus.readers import ShardError, read_shard, shard_format
from domainlm.corpus.records import MAX_REJECTED_TEXT, Doc, Rejected
from domainlm.corpus.scan import find_shards
from domainlm.errors import UserError

LIMIT = 1 << 20

RECORDS = [
    {"id": 7, "text": "First document.", "meta": {"url": "https://x/1", "a": [1, 2]}},
    {"text": "Second document, no id.", "source": "ignored", "license": "CC-BY-4.0"},
    {"id": "doc-3", "text": "Third – ünïcode ✓", "created": "2024-03-31", "meta": None},
]


def jsonl_bytes(records: list, bom: bool = False, blank_after_first: bool = True) -> bytes:
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_after_first:
        lines.insert(1, "   ")  # a blank line: skipped, not counted, but it has a number
    data = ("\n".join(lines) + "\n").encode()
    return b"\xef\xbb\xbf" + data if bom else data


def compress(data: bytes, fmt: str) -> bytes:
    if fmt == "jsonl.gz":
        return gzip.compress(data)
    if fmt == "jsonl.zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read(path: Path, limit: int = LIMIT) -> list[Doc | Rejected]:
    return list(read_shard(path, "src", path.name, limit))


def one_rejected(tmp_path: Path, line: bytes) -> Rejected:
    path = write(tmp_path, "one.jsonl", b'{"text": "good"}\n' + line + b"\n")
    items = read(path)
    assert isinstance(items[0], Doc)
    assert len(items) == 2 and isinstance(items[1], Rejected)
    assert items[1].origin == "one.jsonl:2"
    return items[1]


# ------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst"])
def test_jsonl_formats_round_trip(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, f"data.{fmt}", compress(jsonl_bytes(RECORDS, bom=True), fmt))
    items = read(path)
    assert all(isinstance(d, Doc) for d in items)
    rel = path.name
    assert [d.origin for d in items] == [f"{rel}:1", f"{rel}:3", f"{rel}:4"]
    assert [d.id for d in items] == ["7", f"{rel}:3", "doc-3"]
    assert [d.text for d in items] == [r["text"] for r in RECORDS]
    assert {d.source for d in items} == {"src"}  # the recipe source, not the record's field
    assert items[0].meta == '{"a": [1, 2], "url": "https://x/1"}'
    assert items[1].meta is None and items[1].license == "CC-BY-4.0"
    assert items[2].created == "2024-03-31" and items[2].meta is None


def test_parquet_round_trip_with_row_numbers_across_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "_PARQUET_BATCH_ROWS", 2)
    table = pa.table(
        {
            "text": ["one", "two", "three", "four", "five"],
            "id": [10, 11, 12, 13, 14],
            "meta": [{"k": "a"}, {"k": "b"}, None, {"k": "d"}, {"k": "e"}],
            "other": [1, 2, 3, 4, 5],
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    items = read(path)
    assert [d.origin for d in items] == [f"p.parquet:{i}" for i in range(1, 6)]
    assert [d.id for d in items] == ["10", "11", "12", "13", "14"]
    assert items[0].meta == '{"k": "a"}' and items[2].meta is None
    assert items[4].text == "five"


def test_parquet_bad_rows_are_quarantined(tmp_path: Path) -> None:
    table = pa.table({"text": ["fine", "", None, "x" * 300], "id": [1, 2, 3, 4]})
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    items = read(path, limit=100)
    assert isinstance(items[0], Doc)
    reasons = [getattr(i, "reason", None) for i in items[1:]]
    assert reasons == ["quarantine:empty_text", "quarantine:missing_text", "quarantine:too_long"]
    assert items[3].origin == "p.parquet:4"


def test_parquet_binary_text_column_with_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok bytes", b"caf\xe9"], pa.binary())}), path)
    items = read(path)
    assert isinstance(items[0], Doc) and items[0].text == "ok bytes"
    assert items[1].reason == "quarantine:invalid_utf8"


def test_parquet_without_text_column_or_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "nt.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(ShardError, match="no `text` column.*'body'"):
        read(path)
    junk = write(tmp_path, "junk.parquet", b"this is not parquet at all")
    with pytest.raises(ShardError, match="cannot be opened as Parquet"):
        read(junk)


def test_txt_is_one_document(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", "\ufeffLine one.\nLine two ✓\n".encode())
    (doc,) = read(path)
    assert isinstance(doc, Doc)
    assert doc.origin == "notes.txt:1" and doc.id == "notes.txt:1"
    assert doc.text == "Line one.\nLine two ✓\n"


def test_txt_problems(tmp_path: Path) -> None:
    (bad,) = read(write(tmp_path, "a.txt", b"ok\ncaf\xe9\n"))
    assert bad.reason == "quarantine:invalid_utf8" and "line 2" in bad.detail
    (blank,) = read(write(tmp_path, "b.txt", b"  \n\n"))
    assert blank.reason == "quarantine:empty_text"
    (big,) = read(write(tmp_path, "c.txt", b"word " * 1000), limit=100)
    assert big.reason == "quarantine:too_long" and "5,000 bytes" in big.detail


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("e.jsonl", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("e.jsonl.gz", gzip.compress(b"")),
        ("e0.jsonl.gz", b""),
        ("e.jsonl.zst", zstandard.ZstdCompressor().compress(b"")),
        ("e0.jsonl.zst", b""),
        ("e.txt", b""),
    ],
)
def test_empty_files_yield_nothing(tmp_path: Path, name: str, data: bytes) -> None:
    assert read(write(tmp_path, name, data)) == []


def test_empty_parquet_yields_nothing(tmp_path: Path) -> None:
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    assert read(path) == []


# ------------------------------------------------------------------------------ bad records


@pytest.mark.parametrize(
    ("line", "reason", "in_detail"),
    [
        (b'{"text": "unterminated', "quarantine:invalid_json", "column"),
        (b'{"text": "caf\xe9"}', "quarantine:invalid_utf8", "iconv -f"),
        (b'{"body": "hello"}', "quarantine:missing_text", "rename it to 'text'"),
        (b'{"text": null}', "quarantine:missing_text", "null"),
        (b'{"text": ["a", "b"]}', "quarantine:text_not_string", "an array"),
        (b'{"text": 12}', "quarantine:text_not_string", "an integer"),
        (b'[{"text": "a"}]', "quarantine:not_an_object", "one object per line"),
        (b'"just a string"', "quarantine:not_an_object", "a string"),
        (b'{"text": " \\n\\t "}', "quarantine:empty_text", "whitespace"),
        (b'{"text": "t", "id": 1.5}', "quarantine:bad_field", "`id` must be"),
        (b'{"text": "t", "id": true}', "quarantine:bad_field", "`id` must be"),
        (b'{"text": "t", "license": 3}', "quarantine:bad_field", "`license` must be a string"),
        (b'{"text": "t", "created": 2024}', "quarantine:bad_field", "`created` must be an ISO"),
        (b'{"text": "t", "created": "31/03/2024"}', "quarantine:bad_field", "`created`"),
        (b'{"text": "t", "meta": "x"}', "quarantine:bad_field", "`meta` must be a JSON object"),
        (b'{"text": "lone \\ud800 half"}', "quarantine:invalid_utf8", "surrogate"),
        (b'{"text": "t", "n": ' + b"9" * 5000 + b"}", "quarantine:invalid_json", "digits"),
        (b"[" * 5_000 + b"]" * 5_000, "quarantine:invalid_json", "nested too deeply"),
    ],
)
def test_bad_records(tmp_path: Path, line: bytes, reason: str, in_detail: str) -> None:
    rejected = one_rejected(tmp_path, line)
    assert rejected.reason == reason
    assert in_detail in rejected.detail
    assert rejected.source == "src"
    assert rejected.text == line.decode("utf-8", "replace")


def test_invalid_utf8_detail_names_the_byte_offset(tmp_path: Path) -> None:
    rejected = one_rejected(tmp_path, b'{"text": "caf\xe9"}')
    assert rejected.detail.startswith("byte 13 of the line (0xE9)")


def test_good_records_with_escapes_and_dates_pass(tmp_path: Path) -> None:
    lines = [
        b'{"text": "emoji \\ud83d\\ude00 pair", "created": "2024-03-31T09:30:00Z"}',
        b'{"text": "t", "created": "2024-03"}',
        b'{"text": "t", "created": "2024-02-29 10:00:00+01:00", "id": 0}',
    ]
    items = read(write(tmp_path, "ok.jsonl", b"\n".join(lines)))
    assert all(isinstance(i, Doc) for i in items), items
    assert items[0].text == "emoji \U0001f600 pair"
    assert items[2].id == "0"


# ------------------------------------------------------------------------------ damaged files


def many_lines(n: int) -> bytes:
    pad = b"x" * 50
    return b"".join(b'{"id": %d, "text": "record number %d %s"}\n' % (i, i, pad) for i in range(n))


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_truncated_stream_keeps_records_before_the_cut(tmp_path: Path, fmt: str) -> None:
    full = compress(many_lines(20_000), fmt)
    cut = full[: len(full) // 2]
    path = write(tmp_path, f"cut.{fmt}", cut)
    # Every complete line that can be decoded from the cut file must come out.
    if fmt == "jsonl.gz":
        decodable = zlib.decompressobj(zlib.MAX_WBITS | 16).decompress(cut)
    else:
        decodable = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    items = read(path)
    docs = [i for i in items if isinstance(i, Doc)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert 0 < len(docs) == decodable.count(b"\n") < 20_000
    assert [d.id for d in docs] == [str(i) for i in range(len(docs))]
    assert len(rejected) == 1 and items[-1] is rejected[0]
    assert rejected[0].reason == "quarantine:truncated"
    assert rejected[0].origin == f"cut.{fmt}:{len(docs) + 1}"
    assert f"after line {len(docs)}" in rejected[0].detail
    assert "re-export" in rejected[0].detail


def test_zstd_multiple_frames_are_read(tmp_path: Path) -> None:
    data = compress(many_lines(10), "jsonl.zst") + compress(many_lines(5), "jsonl.zst")
    items = read(write(tmp_path, "two.jsonl.zst", data))
    assert len(items) == 15 and all(isinstance(i, Doc) for i in items)
    assert items[-1].origin == "two.jsonl.zst:15"


@pytest.mark.parametrize("fmt", ["jsonl.gz", "jsonl.zst"])
def test_not_compressed_at_all_is_a_shard_error(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, f"plain.{fmt}", jsonl_bytes(RECORDS))
    with pytest.raises(ShardError, match="rename it to \\*.jsonl"):
        read(path)


def test_binary_file_is_a_shard_error(tmp_path: Path) -> None:
    path = write(tmp_path, "bin.jsonl", b'{"text": "a"}\n' + bytes(range(256)) * 4)
    with pytest.raises(ShardError, match="binary file") as info:
        read(path)
    assert info.value.path == "bin.jsonl"
    assert isinstance(info.value, UserError)


def test_compressed_file_with_the_wrong_name_is_a_shard_error(tmp_path: Path) -> None:
    path = write(tmp_path, "packed.jsonl", gzip.compress(jsonl_bytes(RECORDS)))
    with pytest.raises(ShardError, match=r"name it \*\.jsonl\.gz"):
        read(path)


@pytest.mark.parametrize(
    ("encoding", "bom"),
    [("utf-16", True), ("utf-16-le", False), ("utf-32", True)],
)
def test_utf16_and_utf32_files_are_shard_errors(tmp_path: Path, encoding: str, bom: bool) -> None:
    data = '{"text": "hello"}\n'.encode(encoding)
    assert data.startswith((b"\xff\xfe", b"\xfe\xff")) == bom
    for name in ("w.jsonl", "w.txt"):
        path = write(tmp_path, name, data)
        with pytest.raises(ShardError, match="iconv -f UTF-(16|32)"):
            read(path)


def test_missing_and_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no such file"):
        read(tmp_path / "gone.jsonl")
    with pytest.raises(ShardError, match="no such file"):
        read(tmp_path / "gone.parquet")
    with pytest.raises(ShardError, match="rename it to .jsonl"):
        read(write(tmp_path, "x.json", b"{}"))


def test_shard_error_pickles_for_worker_processes() -> None:
    err = pickle.loads(pickle.dumps(ShardError("a/b.jsonl", "is broken; fix it")))
    assert str(err) == "a/b.jsonl: is broken; fix it"
    assert err.path == "a/b.jsonl" and err.problem == "is broken; fix it"


# ------------------------------------------------------------------------------ long lines


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz"])
def test_enormous_line_is_too_long_and_reading_goes_on(tmp_path: Path, fmt: str) -> None:
    huge = b'{"text": "' + b"a" * (5 << 20) + b'"}'
    data = b'{"text": "before"}\n' + huge + b'\n{"text": "after"}\n\n{"text": "last"}\n'
    path = write(tmp_path, f"big.{fmt}", compress(data, fmt))
    items = read(path, limit=1 << 20)
    assert [type(i).__name__ for i in items] == ["Doc", "Rejected", "Doc", "Doc"]
    too_long = items[1]
    assert too_long.reason == "quarantine:too_long"
    assert too_long.origin == f"big.{fmt}:2"
    assert f"{len(huge):,} bytes" in too_long.detail and "1,048,576" in too_long.detail
    assert len(too_long.text) < MAX_REJECTED_TEXT + 100
    assert too_long.text.startswith('{"text": "aaa')
    assert items[2].text == "after" and items[2].origin == f"big.{fmt}:3"
    assert items[3].origin == f"big.{fmt}:5"


def test_line_exactly_at_the_limit_is_kept(tmp_path: Path) -> None:
    line = b'{"text": "' + b"b" * 80 + b'"}'
    path = write(tmp_path, "edge.jsonl", line + b"\n" + line + b"c\n")
    items = read(path, limit=len(line))
    assert isinstance(items[0], Doc)
    assert items[1].reason == "quarantine:too_long"


# ------------------------------------------------------------------------------ finding shards


def test_shard_format() -> None:
    assert shard_format(Path("a.jsonl")) == "jsonl"
    assert shard_format(Path("a.JSONL.GZ")) == "jsonl.gz"
    assert shard_format(Path("dir/a.jsonl.zst")) == "jsonl.zst"
    assert shard_format(Path("a.parquet")) == "parquet"
    assert shard_format(Path("a.txt")) == "txt"
    assert shard_format(Path("a.json")) is None
    assert shard_format(Path("a.gz")) is None


def test_find_shards_folder_glob_and_file(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    for name in [
        "fin/b.jsonl",
        "fin/a.jsonl.gz",
        "fin/deep/c.parquet",
        "fin/deep/d.txt",
        "fin/notes.csv",
        "fin/.hidden.jsonl",
        "fin/.cache/e.jsonl",
        "law/f.jsonl.zst",
    ]:
        write(root, name, b"")
    found = find_shards(root)
    rel = [p.relative_to(root).as_posix() for p in found]
    assert rel == [
        "fin/a.jsonl.gz",
        "fin/b.jsonl",
        "fin/deep/c.parquet",
        "fin/deep/d.txt",
        "law/f.jsonl.zst",
    ]
    globbed = find_shards(str(root / "*" / "*.jsonl*"))
    assert [p.name for p in globbed] == ["a.jsonl.gz", "b.jsonl", "f.jsonl.zst"]
    assert find_shards(root / "fin" / "b.jsonl") == [root / "fin" / "b.jsonl"]
    assert find_shards(str(root / "nothing-*.jsonl")) == []
    with pytest.raises(ShardError, match="unsupported file type"):
        find_shards(root / "fin" / "notes.csv")
    with pytest.raises(ShardError, match="no such file or folder"):
        find_shards(tmp_path / "absent")


def test_parquet_dates_maps_and_json_text_meta(tmp_path: Path) -> None:
    import datetime as dt

    path = tmp_path / "typed.parquet"
    table = pa.table(
        {
            "text": ["a", "b"],
            "created": pa.array([dt.date(2024, 1, 2), None], pa.date32()),
            "meta": pa.array([[("k", "v")], None], pa.map_(pa.string(), pa.string())),
        }
    )
    pq.write_table(table, path)
    first, second = read(path)
    assert first.created == "2024-01-02" and first.meta == '{"k": "v"}'
    assert second.created is None and second.meta is None

    path = tmp_path / "jsonmeta.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "meta": ['{"z": 1, "a": 2}', "not json"]}), path)
    good, bad = read(path)
    assert good.meta == '{"a": 2, "z": 1}'
    assert bad.reason == "quarantine:bad_field" and "`meta`" in bad.detail
