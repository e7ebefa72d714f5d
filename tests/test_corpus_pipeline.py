"""`domainlm corpus build` end to end on small real shards: counts, bad input, incremental,
determinism, mixing and decontamination."""

from __future__ import annotations

import gzip
import json
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl
from textgen import document

from domainlm.corpus.assemble import balanced
from domainlm.corpus.pipeline import build_corpus
from domainlm.errors import UserError


def _docs(seed: int, n: int, words: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [document(rng, words) for _ in range(n)]


def _shards(root: Path, seed: int = 0) -> dict[str, Path]:
    """Two teams' shards with good records, duplicates, filter failures and bad lines."""
    docs = _docs(seed, 40)
    fin = root / "finance"
    a = write_jsonl(fin / "a.jsonl", [{"id": f"a{i}", "text": t} for i, t in enumerate(docs[:20])])
    b_records = [{"text": t, "meta": {"k": i}} for i, t in enumerate(docs[20:30])]
    b_records.append({"text": docs[0]})  # exact duplicate of a.jsonl:1
    b_records.append({"text": docs[1].upper()})  # exact (case-insensitive) duplicate
    near = docs[2].split(" ")
    near[10] = "substituted"
    b_records.append({"text": " ".join(near)})  # near duplicate of a.jsonl:3
    b_records.append({"text": "too short"})  # filtered: min_words
    b_records.append('{"text": "broken json')  # quarantined
    b_records.append({"no_text": 1})  # quarantined
    b = write_jsonl(fin / "b.jsonl", b_records)
    news = root / "news"
    news.mkdir(parents=True)
    c = news / "c.jsonl.gz"
    with gzip.open(c, "wt", encoding="utf-8") as f:
        for t in docs[30:]:
            f.write(json.dumps({"text": t}) + "\n")
    return {"a": a, "b": b, "c": c}


def _recipe_data(shards: Path, **corpus) -> dict:
    return {
        "seed": 3,
        "corpus": {
            "sources": [
                {"name": "finance", "path": str(shards / "finance")},
                {"name": "news", "path": str(shards / "news")},
            ],
            "workers": 1,
            "val_fraction": 0.1,
            **corpus,
        },
    }


def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("*.parquet")) + sorted((out / "rejected").glob("*.jsonl"))
    files.append(out / "report.md")
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def _stable_manifest(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    m.pop("run")
    m.pop("seconds")
    return m


def test_counts_add_up_and_every_drop_is_recorded(tmp_path, make_recipe):
    _shards(tmp_path / "shards")
    recipe = make_recipe(_recipe_data(tmp_path / "shards"))
    m = build_corpus(recipe, progress=False)
    total = m["counts"]["total"]
    assert total["in"] == 20 + 16 + 10
    assert total["duplicates"] == {"exact": 2, "near": 1}
    assert total["quarantined"] == 2
    assert total["filtered"].get("min_words") == 1
    assert total["kept"] == 40  # 40 distinct documents, each kept once
    for cs in [total, *m["counts"]["sources"].values()]:
        assert balanced(cs)
    out = recipe.layout.corpus
    dup = [json.loads(x) for x in (out / "rejected" / "duplicate.jsonl").read_text().splitlines()]
    assert {(d["origin"], d["duplicate_of"]) for d in dup} == {
        ("finance/b.jsonl:11", "finance/a.jsonl:1"),
        ("finance/b.jsonl:12", "finance/a.jsonl:2"),
        ("finance/b.jsonl:13", "finance/a.jsonl:3"),
    }
    quarantined = (out / "rejected" / "quarantine.jsonl").read_text()
    assert "finance/b.jsonl:15" in quarantined and "finance/b.jsonl:16" in quarantined
    train = pq.read_table(sorted(out.glob("train-*.parquet"))).to_pylist()
    val = pq.read_table(sorted(out.glob("val-*.parquet"))).to_pylist()
    assert len(train) + len(val) == total["kept"]
    assert {r["origin"] for r in train}.isdisjoint({r["origin"] for r in val})
    assert any(r["meta"] == '{"k": 0}' for r in train + val)
    report = (out / "report.md").read_text()
    assert "| **total** | 46 | 40 |" in report


def test_output_loads_with_datasets(tmp_path, make_recipe):
    from datasets import load_dataset

    _shards(tmp_path / "shards")
    recipe = make_recipe(_recipe_data(tmp_path / "shards"))
    build_corpus(recipe, progress=False)
    out = recipe.layout.corpus
    ds = load_dataset(
        "parquet",
        data_files={"train": str(out / "train-*.parquet"), "val": str(out / "val-*.parquet")},
        cache_dir=str(tmp_path / "hf"),
    )
    assert ds["train"].num_rows + ds["val"].num_rows == 40
    assert set(ds["train"].column_names) >= {"id", "text", "source", "origin"}


def test_second_run_does_nothing(tmp_path, make_recipe, capsys):
    _shards(tmp_path / "shards")
    recipe = make_recipe(_recipe_data(tmp_path / "shards"))
    build_corpus(recipe, progress=False)
    out = recipe.layout.corpus
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    build_corpus(recipe, progress=False)
    assert "up to date" in capsys.readouterr().out
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_two_builds_from_scratch_are_byte_identical(tmp_path, make_recipe):
    _shards(tmp_path / "shards")
    r1 = make_recipe(_recipe_data(tmp_path / "shards"), build_dir=tmp_path / "b1")
    r2 = make_recipe(_recipe_data(tmp_path / "shards", workers=2), build_dir=tmp_path / "b2")
    build_corpus(r1, progress=False)
    build_corpus(r2, progress=False)
    o1, o2 = r1.layout.corpus, r2.layout.corpus
    assert _outputs(o1) == _outputs(o2)
    assert _stable_manifest(o1) == _stable_manifest(o2)


def test_incremental_add_and_remove_equal_from_scratch(tmp_path, make_recipe):
    shards = tmp_path / "shards"
    paths = _shards(shards)
    extra = write_jsonl(
        shards / "finance" / "a2.jsonl",
        [{"text": t} for t in _docs(99, 8)] + [{"text": _docs(0, 40)[5]}],  # one duplicate
    )
    moved = tmp_path / "held_back.jsonl"
    shutil.move(extra, moved)

    inc = make_recipe(_recipe_data(shards), build_dir=tmp_path / "inc")
    build_corpus(inc, progress=False)
    shutil.move(moved, extra)  # a team contributes a new shard
    m = build_corpus(inc, progress=False)
    assert m["run"]["processed"] == ["finance/a2.jsonl"]
    assert sorted(m["run"]["reused"]) == ["finance/a.jsonl", "finance/b.jsonl", "news/c.jsonl.gz"]
    assert m["counts"]["total"]["duplicates"]["exact"] == 3

    scratch = make_recipe(_recipe_data(shards), build_dir=tmp_path / "scratch")
    build_corpus(scratch, progress=False)
    assert _outputs(inc.layout.corpus) == _outputs(scratch.layout.corpus)

    paths["b"].unlink()  # a shard is withdrawn: its documents leave the corpus
    m = build_corpus(inc, progress=False)
    assert m["run"]["processed"] == []
    origins = {
        r["origin"]
        for p in inc.layout.corpus.glob("*.parquet")
        for r in pq.read_table(p).to_pylist()
    }
    assert not any(o.startswith("finance/b.jsonl") for o in origins)
    scratch2 = make_recipe(_recipe_data(shards), build_dir=tmp_path / "scratch2")
    build_corpus(scratch2, progress=False)
    assert _outputs(inc.layout.corpus) == _outputs(scratch2.layout.corpus)


def _bad_shards(root: Path) -> None:
    good = _docs(5, 3)
    d = root / "team"
    write_jsonl(d / "mixed.jsonl", [{"text": good[0]}, '{"text": 5}', "[1, 2]", {"text": good[1]}])
    (d / "latin1.jsonl").write_bytes(
        json.dumps({"text": good[2]}).encode() + b"\n" + '{"text": "caf\xe9"}\n'.encode("latin-1")
    )
    (d / "empty.jsonl").write_bytes(b"")
    (d / "binary.jsonl").write_bytes(bytes(range(256)) * 40)
    payload = gzip.compress(
        "".join(json.dumps({"text": t}) + "\n" for t in _docs(6, 5)).encode()
    )
    (d / "cut.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    (d / "huge.jsonl").write_bytes(
        b'{"text": "' + b"x" * 3_000_000 + b'"}\n' + json.dumps({"text": good[0]}).encode() + b"\n"
    )


def test_bad_input_is_quarantined_not_fatal(tmp_path, make_recipe):
    _bad_shards(tmp_path / "shards")
    data = {
        "corpus": {
            "sources": [{"name": "team", "path": str(tmp_path / "shards")}],
            "on_bad_shard": "skip",
            "max_record_bytes": 1_000_000,
            "workers": 1,
        }
    }
    recipe = make_recipe(data)
    m = build_corpus(recipe, progress=False)
    total = m["counts"]["total"]
    assert balanced(total)
    assert [b["path"] for b in m["shards"]["bad"]] == ["team/team/binary.jsonl"]
    assert m["shards"]["empty"] == ["team/team/empty.jsonl"]
    rows = [
        json.loads(x)
        for x in (recipe.layout.corpus / "rejected" / "quarantine.jsonl")
        .read_text()
        .splitlines()
    ]
    reasons = {r["origin"]: r["reason"] for r in rows}
    assert reasons["team/team/mixed.jsonl:2"] == "quarantine:text_not_string"
    assert reasons["team/team/mixed.jsonl:3"] == "quarantine:not_an_object"
    assert reasons["team/team/latin1.jsonl:2"] == "quarantine:invalid_utf8"
    assert reasons["team/team/huge.jsonl:1"] == "quarantine:too_long"
    assert reasons["team/team/binary.jsonl:0"] == "quarantine:unreadable_shard"
    assert any(r == "quarantine:truncated" for o, r in reasons.items() if "cut.jsonl.gz" in o)
    assert all(len(r["text"] or "") <= 70_000 for r in rows)

    data["corpus"]["on_bad_shard"] = "fail"
    with pytest.raises(UserError, match="binary.jsonl"):
        build_corpus(make_recipe(data, name="strict"), progress=False)


def test_mixing_reaches_target_weights(tmp_path, make_recipe):
    fin = write_jsonl(tmp_path / "s" / "fin" / "x.jsonl", [{"text": t} for t in _docs(1, 60)])
    gen = write_jsonl(tmp_path / "s" / "gen" / "y.jsonl", [{"text": t} for t in _docs(2, 20)])
    data = {
        "corpus": {
            "sources": [
                {"name": "fin", "path": str(fin.parent), "weight": 0.5},
                {"name": "gen", "path": str(gen.parent), "weight": 0.5},
            ],
            "val_fraction": 0.0,
            "workers": 1,
        }
    }
    recipe = make_recipe(data)
    m = build_corpus(recipe, progress=False)
    rows = pq.read_table(sorted(recipe.layout.corpus.glob("train-*.parquet"))).to_pylist()
    chars = {"fin": 0, "gen": 0}
    for r in rows:
        chars[r["source"]] += len(r["text"])
    share = chars["gen"] / sum(chars.values())
    assert 0.4 < share < 0.6  # 25% before mixing
    assert m["mix"]["gen"]["factor"] > 1 > m["mix"]["fin"]["factor"]
    assert max(r["copy"] for r in rows if r["source"] == "gen") >= 1
    assert m["counts"]["total"]["filtered"].get("mix_downsampled", 0) > 0
    assert balanced(m["counts"]["total"])


def test_decontamination_drops_documents_sharing_eval_ngrams(tmp_path, make_recipe):
    docs = _docs(4, 10)
    src = write_jsonl(tmp_path / "s" / "t" / "x.jsonl", [{"text": t} for t in docs])
    words = docs[3].split()
    evals = write_jsonl(tmp_path / "evals.jsonl", [{"question": " ".join(words[20:40])}])
    data = {
        "corpus": {
            "sources": [{"name": "t", "path": str(src.parent)}],
            "decontaminate": {"files": [str(evals)]},
            "workers": 1,
        }
    }
    recipe = make_recipe(data)
    m = build_corpus(recipe, progress=False)
    assert m["counts"]["total"]["decontaminated"] == 1
    rej = (recipe.layout.corpus / "rejected" / "decontaminated.jsonl").read_text()
    assert "t/x.jsonl:4" in rej and "evals.jsonl" in rej


def test_missing_source_folder_is_one_clear_error(tmp_path, make_recipe):
    recipe = make_recipe({"corpus": {"sources": [{"name": "x", "path": str(tmp_path / "nope")}]}})
    with pytest.raises(UserError, match=r"corpus.sources\[0\].path: .*nope does not exist"):
        build_corpus(recipe, progress=False)


def test_per_source_thresholds_and_pii_redaction(tmp_path, make_recipe):
    short_code = ["def f(x):\n    return x + 1", "SELECT a, b FROM t WHERE c > 2;"]
    code = write_jsonl(tmp_path / "s" / "code" / "c.jsonl", [{"text": t} for t in short_code])
    prose = _docs(8, 3)
    prose[0] += "\n\nWrite to jane.doe@example.org or call +44 20 7946 0958 about card "
    prose[0] += "4111 1111 1111 1111 from host 192.168.10.20."
    web = write_jsonl(
        tmp_path / "s" / "web" / "w.jsonl", [{"text": t} for t in prose + short_code]
    )
    data = {
        "corpus": {
            "sources": [
                # Code: no prose rules, no language id; only the length bounds apply.
                {"name": "code", "path": str(code.parent),
                 "filters": {"min_words": 1, "min_mean_word_length": None,
                             "max_symbol_word_ratio": None, "min_alpha_words": None,
                             "min_stop_words": None, "languages": None}},
                {"name": "web", "path": str(web.parent)},
            ],
            "val_fraction": 0.0,
            "workers": 1,
        }
    }
    recipe = make_recipe(data)
    m = build_corpus(recipe, progress=False)
    assert m["counts"]["sources"]["code"]["kept"] == 2
    assert m["counts"]["sources"]["web"]["kept"] == 3
    assert m["counts"]["sources"]["web"]["filtered"] == {"min_words": 2}
    rows = pq.read_table(sorted(recipe.layout.corpus.glob("train-*.parquet"))).to_pylist()
    text = next(r["text"] for r in rows if r["origin"] == "web/w.jsonl:1")
    for secret in ["jane.doe@example.org", "7946 0958", "4111 1111", "192.168.10.20"]:
        assert secret not in text
    for placeholder in ["<EMAIL>", "<PHONE>", "<CARD>", "<IP>"]:
        assert placeholder in text
    assert any("    return x + 1" in r["text"] for r in rows)  # indentation survives
    report = (recipe.layout.corpus / "report.md").read_text()
    assert "| email | 1 |" in report and "| card | 1 |" in report
