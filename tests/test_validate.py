"""Tests for `domainlm corpus validate` and `domainlm corpus add`, run through the CLI."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from domainlm.cli import main
from domainlm.corpus.validate import run_add, run_validate

GOOD = b'{"id": 1, "text": "A clean record."}\n{"id": 2, "text": "Another one."}\n'


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def cli(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


# ------------------------------------------------------------------------------ validate


def test_validate_clean_file(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jsonl", GOOD)
    result = cli("corpus", "validate", good)
    assert result.exit_code == 0, result.output
    assert f"{good}: 2 records ok, 0 problems, 0 exact duplicates" in result.output
    assert "all clean" in result.output


def test_validate_names_each_problem_by_file_and_line(tmp_path: Path) -> None:
    bad = write(
        tmp_path / "bad.jsonl",
        b'{"text": "fine"}\n{"text": "broken\n\n{"nope": 1}\n{"text": "caf\xe9"}\n',
    )
    result = cli("corpus", "validate", bad)
    assert result.exit_code == 1
    out = result.output
    assert f"{bad}: 1 record ok, 3 problems" in out
    assert f"{bad}:2: invalid_json: not valid JSON" in out
    assert f"{bad}:4: missing_text:" in out
    assert f"{bad}:5: invalid_utf8: byte 13" in out and "iconv" in out
    assert "3 problems in 1 file" in out


def test_validate_duplicates(tmp_path: Path) -> None:
    dup_text = write(
        tmp_path / "dt.jsonl",
        b'{"text": "same words"}\n{"text": "other"}\n{"text": "  same words\\n"}\n',
    )
    result = cli("corpus", "validate", dup_text)
    # Duplicate texts are reported with both places but only warned about: dedup drops them.
    assert result.exit_code == 0, result.output
    assert f"{dup_text}:3: duplicate_text: same text as {dup_text}:1" in result.output
    assert "1 exact duplicate," in result.output

    dup_id = write(tmp_path / "di.jsonl", b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    result = cli("corpus", "validate", dup_id)
    assert result.exit_code == 1
    assert f"{dup_id}:2: duplicate_id: id 'a' is also used at {dup_id}:1" in result.output


def test_validate_empty_file_is_a_problem(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.jsonl.gz", gzip.compress(b"\n\n"))
    result = cli("corpus", "validate", empty)
    assert result.exit_code == 1
    assert f"{empty}:0: empty:" in result.output


def test_validate_unusable_and_unsupported_files(tmp_path: Path) -> None:
    binary = write(tmp_path / "bin.txt", b"\x00\x01\x02" * 100)
    csv = write(tmp_path / "data.csv", b"text\nhello\n")
    result = cli("corpus", "validate", binary, csv, tmp_path / "missing.jsonl")
    assert result.exit_code == 1
    out = result.output
    assert f"{binary}:0: bad_shard: is a binary file" in out
    assert f"{csv}:0: bad_shard: unsupported file type" in out
    assert f"{tmp_path / 'missing.jsonl'}:0: bad_shard: no such file" in out


def test_validate_folder_finds_nested_shards_and_warns_about_other_files(tmp_path: Path) -> None:
    team = tmp_path / "finance"
    write(team / "2024" / "a.jsonl", GOOD)
    write(team / "b.txt", b"A plain text document.\n")
    write(team / "export.json", b"{}")
    write(team / ".partial" / "c.jsonl", b"not json")
    result = cli("corpus", "validate", team)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"{team / '2024' / 'a.jsonl'}: 2 records ok" in out
    assert f"{team / 'b.txt'}: 1 record ok" in out
    assert f"{team / 'export.json'}: ignored (warning)" in out
    assert "c.jsonl" not in out
    assert "all clean: 2 files, 3 records" in out


def test_validate_folder_without_shards(tmp_path: Path) -> None:
    (tmp_path / "none").mkdir()
    assert run_validate([tmp_path / "none"], max_record_bytes=1000) == 1


def test_validate_max_record_bytes_option(tmp_path: Path) -> None:
    long = write(tmp_path / "long.jsonl", b'{"text": "' + b"z" * 500 + b'"}\n')
    assert cli("corpus", "validate", long).exit_code == 0
    result = cli("corpus", "validate", "--max-record-bytes", "100", long)
    assert result.exit_code == 1
    assert f"{long}:1: too_long: the line is 512 bytes" in result.output


def test_validate_shows_a_bounded_number_of_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import domainlm.corpus.validate as validate

    monkeypatch.setattr(validate, "MAX_SHOWN", 3)
    bad = write(tmp_path / "many.jsonl", b"oops\n" * 10)
    assert run_validate([bad], max_record_bytes=1000) == 1
    out = capsys.readouterr().out
    assert out.count("invalid_json: not valid JSON") == 3
    assert "... and 7 more not shown (all: invalid_json x10)" in out


# ------------------------------------------------------------------------------ add


def test_add_copies_a_good_file(tmp_path: Path) -> None:
    good = write(tmp_path / "in" / "q1.jsonl", GOOD)
    shards = tmp_path / "shards"
    result = cli("corpus", "add", "--team", "finance", "--shards-dir", shards, good)
    assert result.exit_code == 0, result.output
    dest = shards / "finance" / "q1.jsonl"
    assert dest.read_bytes() == GOOD
    assert f"copied {good} -> {dest}" in result.output
    assert [p.name for p in (shards / "finance").iterdir()] == ["q1.jsonl"]  # no temp files

    again = cli("corpus", "add", "--team", "finance", "--shards-dir", shards, good)
    assert again.exit_code == 0
    assert "already there" in again.output


def test_add_refuses_a_bad_file_unless_forced(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.jsonl", GOOD + b"{oops\n")
    shards = tmp_path / "shards"
    result = cli("corpus", "add", "--team", "law", "--shards-dir", shards, bad)
    assert result.exit_code == 1
    assert f"{bad}:3: invalid_json" in result.output
    assert "nothing copied" in result.output
    assert not (shards / "law" / "bad.jsonl").exists()

    forced = cli("corpus", "add", "--team", "law", "--shards-dir", shards, "--force", bad)
    assert forced.exit_code == 0, forced.output
    assert (shards / "law" / "bad.jsonl").read_bytes() == bad.read_bytes()


def test_add_never_copies_unusable_files_even_forced(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    binary = write(tmp_path / "bin.jsonl", b"\x00" * 64)
    code = run_add("law", [binary], shards_dir=shards, force=True)
    assert code == 1
    assert not (shards / "law").exists()


def test_add_refuses_to_overwrite_different_content(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    old = write(shards / "finance" / "q1.jsonl", b'{"text": "the old shard"}\n')
    new = write(tmp_path / "new" / "q1.jsonl", GOOD)
    other = write(tmp_path / "new" / "q2.jsonl", b'{"text": "a second shard"}\n')
    result = cli("corpus", "add", "--team", "finance", "--shards-dir", shards, new, other)
    assert result.exit_code == 1
    assert f"refusing to overwrite {old}" in result.output
    assert old.read_bytes() == b'{"text": "the old shard"}\n'
    assert not (shards / "finance" / "q2.jsonl").exists()  # all or nothing


def test_add_rejects_bad_team_names_and_clashing_names(tmp_path: Path) -> None:
    good = write(tmp_path / "a" / "x.jsonl", GOOD)
    result = cli("corpus", "add", "--team", "../etc", "--shards-dir", tmp_path / "s", good)
    assert result.exit_code == 2
    assert "letters, digits, '-' and '_'" in result.output
    twin = write(tmp_path / "b" / "x.jsonl", json.dumps({"text": "other"}).encode())
    assert run_add("t", [good, twin], shards_dir=tmp_path / "s", force=False) == 1
    assert not (tmp_path / "s").exists()
