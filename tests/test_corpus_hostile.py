"""Hostile team folders (issue 12): files the tests write themselves with bad encodings, bytes,
compression, Parquet schemas, links, permissions and names. Each test checks that the counts
add up, that every good record survives, and that nothing is dropped silently."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from conftest import write_jsonl
from textgen import document

from domainlm.cli import main as cli
from domainlm.corpus import report as report_module
from domainlm.corpus.assemble import balanced
from domainlm.corpus.pipeline import build_corpus
from domainlm.corpus.shardwork import ShardTask, process_shard
from domainlm.errors import UserError
from domainlm.recipe import RecipeError

GOOD = [document(random.Random(i), 80) for i in range(12)]


def _data(path: Path, **corpus) -> dict:
    return {"corpus": {"sources": [{"name": "team", "path": str(path)}], "workers": 1,
                       "val_fraction": 0.0, "dedup": {"near": False}, **corpus}}


def _texts(recipe) -> set[str]:
    out = recipe.layout.corpus
    return {r["text"] for p in out.glob("*.parquet") for r in pq.read_table(p).to_pylist()}


def _rejected(recipe, cat: str = "quarantine") -> list[dict]:
    path = recipe.layout.corpus / "rejected" / f"{cat}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_counts(m: dict, n_in: int) -> dict:
    total = m["counts"]["total"]
    assert total["in"] == n_in
    assert balanced(total) and all(balanced(c) for c in m["counts"]["sources"].values())
    return total


# --------------------------------------------------------------------------------------------
# Encodings: a lone surrogate, anywhere in a record.


def test_lone_surrogate_is_quarantined_and_validate_and_add_agree(tmp_path, make_recipe):
    folder = tmp_path / "export"
    lines = [
        json.dumps({"id": "ok-1", "text": GOOD[0]}),
        '{"id": "a\\udc00", "text": "hello world"}',  # the line
        json.dumps({"id": "ok-2", "text": GOOD[1]}),
        '{"id": "b", "text": "' + GOOD[2][:40] + '\\ud83d tail", "meta": {"k": 1}}',
        '{"id": "c", "text": "' + GOOD[3][:40] + '", "meta": {"k\\udfff": "v"}}',
        json.dumps({"id": "ok-3", "text": GOOD[4]}),
    ]
    shard = write_jsonl(folder / "s.jsonl", lines)

    runner = CliRunner()
    res = runner.invoke(cli, ["corpus", "validate", str(shard)])
    assert res.exit_code == 1
    flagged = {ln.split(": ")[0] for ln in res.output.splitlines() if "invalid_utf8" in ln}
    assert flagged == {f"{shard}:2", f"{shard}:4", f"{shard}:5"}

    res = runner.invoke(cli, ["corpus", "add", "--team", "t", "--shards-dir",
                              str(tmp_path / "shards"), "--force", str(shard)])
    assert res.exit_code == 0, res.output
    recipe = make_recipe(_data(tmp_path / "shards"))
    m = build_corpus(recipe, progress=False)  # crashed with UnicodeEncodeError before
    total = _check_counts(m, 6)
    assert total["kept"] == 3 and total["quarantined"] == 3
    rows = _rejected(recipe)
    assert {r["origin"] for r in rows} == {"team/t/s.jsonl:2", "team/t/s.jsonl:4",
                                           "team/t/s.jsonl:5"}
    assert all(r["reason"] == "quarantine:invalid_utf8" for r in rows)
    assert next(r for r in rows if r["origin"].endswith(":2"))["id"] == "a\udc00"
    assert {GOOD[0], GOOD[1], GOOD[4]} <= _texts(recipe)


# --------------------------------------------------------------------------------------------
# Bytes: NUL bytes, and files refused as a whole.


@pytest.mark.parametrize("name", ["s.jsonl", "s.jsonl.gz"])
def test_a_nul_byte_quarantines_its_line_only(tmp_path, make_recipe, name):
    good = [json.dumps({"text": t}).encode() for t in GOOD[:8]]
    data = b"\n".join([good[0], b'{"text": "nul \x00 inside"}', good[1], b"\x00\x00\x00", good[2],
                       *good[3:6], b'{"text": "late\x00"}', *good[6:]]) + b"\n"
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert data.index(b"\x00") < 8192  # in the first 8 KiB: "binary file" before
    recipe = make_recipe(_data(folder))
    m = build_corpus(recipe, progress=False)
    total = _check_counts(m, 11)
    assert total["kept"] == 8 and total["quarantined"] == 3
    assert m["shards"]["bad"] == []
    assert set(GOOD[:8]) == _texts(recipe)
    assert {r["origin"].rsplit(":", 1)[1] for r in _rejected(recipe)} == {"2", "4", "9"}


def test_files_refused_whole_count_the_records_they_hold(tmp_path, make_recipe):
    folder = tmp_path / "s"
    folder.mkdir()
    records = "".join(json.dumps({"text": t}) + "\n" for t in GOOD[:5])
    (folder / "a-utf16.jsonl").write_bytes(records.encode("utf-16"))  # 5 records
    (folder / "b-utf16le.jsonl").write_bytes(("\n" + records).encode("utf-16-le"))  # 5
    (folder / "c-gzip.jsonl").write_bytes(gzip.compress(records.encode()))  # 5
    pq.write_table(pa.table({"body": GOOD[:4]}), folder / "d-schema.parquet")  # 4 rows
    (folder / "e-binary.jsonl").write_bytes(bytes(range(256)) * 40)  # cannot be counted
    write_jsonl(folder / "f-good.jsonl", [{"text": t} for t in GOOD[5:9]])
    recipe = make_recipe(_data(folder, on_bad_shard="skip"))
    m = build_corpus(recipe, progress=False)
    bad = {Path(b["path"]).name: b["records"] for b in m["shards"]["bad"]}
    assert bad == {"a-utf16.jsonl": 5, "b-utf16le.jsonl": 5, "c-gzip.jsonl": 5,
                   "d-schema.parquet": 4, "e-binary.jsonl": None}
    total = _check_counts(m, 5 + 5 + 5 + 4 + 1 + 4)
    assert total["quarantined"] == 20 and total["kept"] == 4
    details = {Path(r["origin"]).name: r["detail"] for r in _rejected(recipe)}
    assert "holds 5 record(s)" in details["a-utf16.jsonl:0"]
    assert "cannot be counted" in details["e-binary.jsonl:0"]
    assert set(GOOD[5:9]) == _texts(recipe)


# --------------------------------------------------------------------------------------------
# Sizes: memory stays flat as a shard grows, and progress shows inside a shard.


def _tiny_shard(path: Path, n: int) -> None:
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        for i in range(n):
            f.write(f'{{"text": "w{i % 97}"}}\n')


def _settings(recipe) -> dict:
    from domainlm.corpus.pipeline import _settings

    return _settings(recipe, 0, None)


def test_memory_is_one_batch_whatever_the_shard_size(tmp_path, make_recipe):
    # The case: a small .jsonl.gz of tiny records, every one of them filtered.
    shard = tmp_path / "s" / "tiny.jsonl.gz"
    shard.parent.mkdir()
    _tiny_shard(shard, 30_000)
    recipe = make_recipe(_data(shard.parent))
    task = ShardTask("team", "file", str(shard), "team/tiny.jsonl.gz", "x", shard.stat().st_size,
                     _settings(recipe))
    calls: list[int] = []
    tracemalloc.start()
    try:
        res = process_shard(task, tmp_path / "cache", progress=calls.append)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.error is None and res.stats["in"] == 30_000
    assert res.stats["filtered"] == {"filter:min_words": 30_000}
    # Every record was held until the shard ended before: ~1.2 KB each, 36 MB here.
    print(f"peak {peak / 1e6:.1f} MB")
    assert peak < 12e6, peak
    assert len(calls) > 10 and sum(calls) == 30_000  # progress inside the shard


# --------------------------------------------------------------------------------------------
# Links, permissions, names: nothing outside the folder is read, nothing is silently absent.


def test_links_out_of_the_folder_are_refused_and_reported(tmp_path, make_recipe):
    outside = tmp_path / "outside"
    write_jsonl(outside / "secret.jsonl", [{"text": "SECRET " + GOOD[9]}])
    folder = tmp_path / "s"
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in GOOD[:3]])
    (folder / "inner").mkdir()
    os.symlink(folder / "a.jsonl", folder / "inner" / "same.jsonl")  # inside: fine
    os.symlink(outside / "secret.jsonl", folder / "link.jsonl")
    os.symlink(outside, folder / "linked-dir")
    os.symlink(tmp_path / "missing.jsonl", folder / "broken.jsonl")
    recipe = make_recipe(_data(folder, on_bad_shard="skip"))
    m = build_corpus(recipe, progress=False)
    bad = {b["path"]: b["error"] for b in m["shards"]["bad"]}
    assert set(bad) == {"team/link.jsonl", "team/linked-dir", "team/broken.jsonl"}
    assert "outside the source's folder" in bad["team/link.jsonl"]
    total = _check_counts(m, 3 + 3 + 3)
    assert total["quarantined"] == 3 and total["duplicates"]["exact"] == 3
    assert not any("SECRET" in t for t in _texts(recipe))
    assert "SECRET" not in (recipe.layout.corpus / "rejected" / "quarantine.jsonl").read_text()
    with pytest.raises(UserError, match="link.jsonl"):
        build_corpus(make_recipe(_data(folder), name="strict"), progress=False)
    # `corpus validate` refuses the same entries, so a team sees them before contributing.
    res = CliRunner().invoke(cli, ["corpus", "validate", str(folder)])
    assert res.exit_code == 1
    refused = {ln.split(": ")[0] for ln in res.output.splitlines() if ": refused: " in ln}
    assert refused == {f"{folder / n}:0" for n in ("link.jsonl", "linked-dir", "broken.jsonl")}


def _as_nobody(fn) -> dict:
    """Run fn() -> dict in a forked child as an unprivileged user when we are root (CI is)."""
    if os.geteuid() != 0:
        return fn()
    fd, out = tempfile.mkstemp()
    os.close(fd)
    os.chmod(out, 0o666)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            Path(out).write_text(json.dumps(fn()))
            code = 0
        except BaseException as e:  # noqa: BLE001
            Path(out).write_text(json.dumps({"error": repr(e)}))
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    assert os.waitstatus_to_exitcode(status) == 0, result
    return result


def test_unreadable_files_and_folders_are_reported(make_recipe):
    root = Path(tempfile.mkdtemp())
    try:
        os.chmod(root, 0o777)
        folder = root / "s"
        write_jsonl(folder / "a.jsonl", [{"text": t} for t in GOOD[:3]])
        write_jsonl(folder / "locked.jsonl", [{"text": GOOD[4]}])
        write_jsonl(folder / "closed" / "b.jsonl", [{"text": GOOD[5]}])
        for p in [folder, folder / "a.jsonl", folder / "closed"]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        os.chmod(folder / "locked.jsonl", 0o000)
        os.chmod(folder / "closed", 0o000)
        recipe = make_recipe(_data(folder, on_bad_shard="skip"), build_dir=root / "build")

        def build() -> dict:
            return build_corpus(recipe, progress=False)

        m = _as_nobody(build)
        bad = {b["path"]: b["error"] for b in m["shards"]["bad"]}
        assert set(bad) == {"team/locked.jsonl", "team/closed"}
        assert "Permission denied" in bad["team/locked.jsonl"]
        assert "cannot list the folder" in bad["team/closed"]
        total = _check_counts(m, 3 + 1 + 1)
        assert total["kept"] == 3 and total["quarantined"] == 2
    finally:
        for p in root.rglob("*"):
            if not p.is_symlink():
                os.chmod(p, 0o755)
        shutil.rmtree(root)


def test_hostile_names(tmp_path, make_recipe):
    folder = tmp_path / "s"
    names = ["with space.jsonl", "new\nline.jsonl", "ünïcödé.jsonl", "-dash.jsonl"]
    for i, n in enumerate(names):
        write_jsonl(folder / n, [{"text": GOOD[i]}])
    bad_name = os.fsencode(str(folder)) + b"/caf\xe9.jsonl"  # not UTF-8
    with open(bad_name, "w") as f:
        f.write(json.dumps({"text": GOOD[6]}) + "\n")
    recipe = make_recipe(_data(folder))
    m = build_corpus(recipe, progress=False)
    _check_counts(m, 5)
    assert set(GOOD[:4]) | {GOOD[6]} == _texts(recipe)
    origins = {r["origin"] for p in recipe.layout.corpus.glob("*.parquet")
               for r in pq.read_table(p).to_pylist()}
    assert "team/caf\\xe9.jsonl:1" in origins


# --------------------------------------------------------------------------------------------
# Settings and sources checked before anything is touched.


def test_a_source_that_matches_nothing_is_an_error(tmp_path, make_recipe):
    (tmp_path / "empty").mkdir()
    write_jsonl(tmp_path / "s" / "a.jsonl", [{"text": GOOD[0]}])
    for spec in [str(tmp_path / "empty"), str(tmp_path / "s" / "*.parquet")]:
        with pytest.raises(UserError, match=r"holds no shard file.*allow_empty"):
            build_corpus(make_recipe(_data(spec)), progress=False)
    data = _data(tmp_path / "empty")
    data["corpus"]["sources"].append({"name": "b", "path": str(tmp_path / "s")})
    data["corpus"]["sources"][0]["allow_empty"] = True
    m = build_corpus(make_recipe(data), progress=False)
    assert m["counts"]["sources"]["team"]["in"] == 0


def test_max_record_bytes_zero_is_refused_at_load(tmp_path, make_recipe):
    with pytest.raises(RecipeError, match=r"test.yaml:\d+: corpus\.max_record_bytes: must be"):
        make_recipe(_data(tmp_path, max_record_bytes=0))


def test_same_size_and_mtime_but_new_content_is_rebuilt(tmp_path, make_recipe):
    shard = write_jsonl(tmp_path / "s" / "a.jsonl", [{"text": GOOD[0]}])
    recipe = make_recipe(_data(shard.parent))
    build_corpus(recipe, progress=False)
    st = shard.stat()
    new = json.dumps({"text": GOOD[0].swapcase()}) + "\n"
    assert len(new.encode()) == st.st_size
    shard.write_text(new, encoding="utf-8")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    m = build_corpus(recipe, progress=False)
    assert m["run"]["processed"] == ["team/a.jsonl"]
    assert _texts(recipe) == {GOOD[0].swapcase()}


def test_a_failure_half_way_leaves_the_previous_outputs(tmp_path, make_recipe, monkeypatch):
    folder = tmp_path / "s"
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in GOOD[:4]])
    recipe = make_recipe(_data(folder))
    build_corpus(recipe, progress=False)
    out = recipe.layout.corpus
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    write_jsonl(folder / "b.jsonl", [{"text": t} for t in GOOD[4:8]])

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "render_report", boom)  # after the splits are written
    with pytest.raises(RuntimeError, match="disk full"):
        build_corpus(recipe, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before
    assert not recipe.layout.manifest("corpus").exists()  # clearly incomplete
    monkeypatch.undo()

    (folder / "c.jsonl").write_bytes(b"\xff\xfe" + "x".encode("utf-16-le"))
    with pytest.raises(UserError, match="c.jsonl"):  # on_bad_shard: fail
        build_corpus(recipe, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before
    (folder / "c.jsonl").unlink()
    m = build_corpus(recipe, progress=False)
    assert m["counts"]["total"]["kept"] == 8 and len(_texts(recipe)) == 8
