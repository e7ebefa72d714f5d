"""`make tokenizer`: sampling, reserved pieces, exact round trips, auto vocabulary size,
idempotence, determinism and user errors, on tiny corpora and on the demo corpus."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import yaml
from builders import CODE, HARD_TEXTS, row, tiny_corpus, write_corpus, write_split
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.files import hash_file, read_json
from domainlm.recipe import load_recipe
from domainlm.tokenizer import special
from domainlm.tokenizer.report import Doc, evaluate
from domainlm.tokenizer.sample import pick, scan
from domainlm.tokenizer.train import train_tokenizer

_recipe_numbers = itertools.count()


def recipe_file(folder: Path, build_dir: Path, tokenizer: dict, name: str = "tiny") -> Path:
    data = {
        "name": name,
        "seed": 5,
        "build_dir": str(build_dir),
        "corpus": {"sources": [{"name": "news", "path": str(folder / "shards")}]},
        "tokenizer": {"vocab_size": 384, "threads": 2, **tokenizer},
    }
    path = folder / f"{name}-{next(_recipe_numbers)}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny corpus in a build folder, and a function that makes recipes pointing at it."""
    root = tmp_path_factory.mktemp("tiny")
    write_corpus(root / "build" / "tiny" / "corpus", *tiny_corpus())

    def make(build_dir: Path | None = None, **tokenizer):
        return load_recipe(recipe_file(root, build_dir or root / "build", tokenizer))

    return make


@pytest.fixture(scope="module")
def trained(tiny):
    recipe = tiny()
    manifest = train_tokenizer(recipe, progress=False)
    return recipe, manifest


def _sp(recipe) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(
        model_file=str(recipe.layout.tokenizer_model)
    )


# ----------------------------------------------------------------------------- outputs, checks


def test_outputs_manifest_and_report(trained):
    recipe, manifest = trained
    out = recipe.layout.tokenizer
    for name in ("tokenizer.model", "tokenizer.vocab", "report.json", "report.md"):
        assert (out / name).exists()
        assert manifest["outputs"][name]["hash"] == hash_file(out / name)
    assert read_json(out / "manifest.json") == manifest
    assert not (out / ".work").exists()
    assert manifest["vocab_size"] == 384
    train = recipe.layout.corpus / "train-00000.parquet"
    assert manifest["inputs"]["corpus/train-00000.parquet"]["hash"] == hash_file(train)
    assert manifest["options"]["normalization_rule_name"] == "identity"
    assert manifest["versions"]["sentencepiece"] == spm.__version__
    assert set(manifest["run"]["seconds"]) >= {"sample", "train", "evaluate", "total"}

    report = read_json(out / "report.json")
    # 70 originals; the two copy=1 repeats are not documents to sample.
    assert report["sample"]["available_docs"] == 70 and report["sample"]["docs"] == 70
    ev = report["eval"]
    assert ev["split"] == "validation" and ev["docs"] == len(HARD_TEXTS) + 6
    assert ev["round_trip"] == {"checked": ev["docs"], "failures": 0, "examples": []}
    assert ev["unknown"]["tokens"] == 0
    assert set(ev["sources"]) == {"news", "code", "hard"}
    for s in ev["sources"].values():
        assert s["bytes_per_token"] > 0 and s["tokens_per_word"] > 0
    # Trained on that kind of text (384 pieces: 256 bytes, 11 reserved, few merges).
    assert ev["sources"]["news"]["bytes_per_token"] > 1.5
    b = ev["baseline"]
    assert b["tokens"] == ev["total"]["bytes"] and b["bits"] == 8 * ev["total"]["bytes"]
    assert 0 < b["bits_ratio"] < 1
    md = (out / "report.md").read_text()
    assert "0 failures" in md and "byte-level baseline" in md and "\\|user\\|" in md

    vocab_lines = (out / "tokenizer.vocab").read_text(encoding="utf-8").splitlines()
    assert len(vocab_lines) == 384
    assert vocab_lines[special.UNK_ID].startswith("<unk>\t")
    assert vocab_lines[manifest["special_tokens"]["whitespace"]["\n"]].startswith("\\n\t")


def test_round_trip_is_exact_on_hard_text(trained):
    sp = _sp(trained[0])
    for text in HARD_TEXTS + [CODE.format(n=1), " ", "", "\n"]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert special.UNK_ID not in ids  # byte fallback, never <unk>


def test_reserved_pieces_digits_and_whitespace(trained):
    recipe, manifest = trained
    sp = _sp(recipe)
    chat = recipe.tokenizer.special_tokens
    ids = special.SpecialTokens.from_model(sp, chat)
    assert (ids.unk_id, ids.bos_id, ids.eos_id, ids.pad_id) == (0, 1, 2, 3)
    assert sp.unk_id() == 0 and sp.bos_id() == 1 and sp.eos_id() == 2 and sp.pad_id() == 3
    assert ids.chat == {t: 4 + i for i, t in enumerate(chat)}
    assert manifest["special_tokens"] == ids.as_dict()
    assert special.SpecialTokens.from_model(sp) == ids  # chat pieces found without the recipe
    for piece, i in special.expected_ids(chat).items():
        assert sp.piece_to_id(piece) == i
    assert sp.encode("<|user|>") == [ids.chat["<|user|>"]]  # never split
    assert sp.encode("\n") == [ids.newline_id]
    assert sp.encode("\n\n") == [ids.whitespace["\n\n"]]
    assert sp.encode("\t") == [ids.whitespace["\t"]]
    assert sp.encode("20240131", out_type=str) == list("20240131")  # digits split
    assert sp.encode("é漢", out_type=str)[-1].startswith("<0x")  # byte fallback


def test_special_tokens_module():
    chat = ["<|a|>", "<|b|>"]
    assert special.user_symbols(chat) == ["<|a|>", "<|b|>", "\n", "\n\n", "\t"]
    assert special.expected_ids(chat) == {
        "<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3,
        "<|a|>": 4, "<|b|>": 5, "\n": 6, "\n\n": 7, "\t": 8,
    }  # fmt: skip
    assert list(special.DEFAULT_CHAT_TOKENS) == list(load_default_chat())
    for bad in (["<|a|>", "<|a|>"], ["<s>"], ["<| a |>"], [""]):
        with pytest.raises(UserError):
            special.check_chat_tokens(bad)


def load_default_chat() -> list[str]:
    from domainlm.recipe import TokenizerConfig

    return TokenizerConfig().special_tokens


def test_round_trip_failures_are_counted_with_examples(trained):
    # SentencePiece writes a space as U+2581 ("▁"), so that character itself decodes to a
    # space: the one known way to fail the round trip, and the report must show it.
    sp = _sp(trained[0])
    docs = [Doc("ok:0", "s", "fine text"), Doc("bad:1", "s", "a\u2581b"), Doc("e:2", "t", "")]
    measured = evaluate(sp, docs, threads=1)
    rt = measured["round_trip"]
    assert rt["checked"] == 3 and rt["failures"] == 1
    assert rt["examples"] == [
        {"origin": "bad:1", "source": "s", "position": 1, "expected": "a\u2581b", "decoded": "a b"}
    ]
    assert set(measured["sources"]) == {"s", "t"} and measured["sources"]["t"]["tokens"] == 0


def test_model_with_other_chat_pieces_is_refused(trained):
    sp = _sp(trained[0])
    with pytest.raises(UserError, match="run `make tokenizer` again"):
        special.SpecialTokens.from_model(sp, ["<|other|>"])


# ----------------------------------------------------------------------------- sampling


def test_sample_is_by_hash_capped_and_skips_copies(tmp_path):
    rows = [row(f"doc {i} " + "x" * i, "s", f"s/f.jsonl:{i}") for i in range(100)]
    rows += [row("repeat", "s", "s/f.jsonl:3", copy=2)]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_split(a, rows[:50])
    write_split(b, rows[50:])

    def origins(paths, max_docs, max_chars, seed=1):
        picked, seen = pick(scan(paths, seed, "t"), max_docs, max_chars)
        table = [pq.read_table(p).to_pylist() for p in paths]
        return {table[f][r]["origin"]: n for (f, r), n in picked.items()}, seen

    all_docs, seen = origins([a, b], 1000, None)
    assert seen == 100 and len(all_docs) == 100  # the copy=2 row is not a document
    ten, _ = origins([a, b], 10, None)
    assert len(ten) == 10
    assert origins([b, a], 10, None)[0] == ten  # by hash of origin, not by file order
    assert origins([a, b], 10, None, seed=2)[0] != ten  # the seed chooses another sample
    capped, _ = origins([a, b], 1000, 500)
    assert sum(capped.values()) == 500  # the last document is cut to the character cap
    assert set(capped) < set(all_docs)


# ----------------------------------------------------------------------------- re-runs


def test_rerun_is_up_to_date_and_changes_retrain(tiny, trained, capsys):
    recipe, manifest = trained
    out = recipe.layout.tokenizer
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    again = train_tokenizer(recipe)
    assert "up to date" in capsys.readouterr().out
    assert again == manifest
    assert before == {p: p.stat().st_mtime_ns for p in out.iterdir()}

    # Another build folder, so the shared model above stays as it is.
    other = tiny(build_dir=out.parent.parent / "other")
    shutil.copytree(recipe.layout.corpus, other.layout.corpus)
    first = train_tokenizer(other, progress=False)
    changed = tiny(build_dir=other.build_dir, split_digits=False)
    second = train_tokenizer(changed, progress=False)
    assert second["fingerprint"] != first["fingerprint"]
    forced = train_tokenizer(changed, force=True, progress=False)
    assert forced["fingerprint"] == second["fingerprint"]
    assert forced["outputs"] == second["outputs"]  # retrained, to the same bytes


def test_two_builds_give_byte_identical_models(tiny, trained, tmp_path):
    recipe, manifest = trained
    other = tiny(build_dir=tmp_path / "elsewhere")
    shutil.copytree(recipe.layout.corpus, other.layout.corpus)
    again = train_tokenizer(other, progress=False)
    a, b = recipe.layout.tokenizer, other.layout.tokenizer
    for name in ("tokenizer.model", "tokenizer.vocab", "report.json", "report.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert again["fingerprint"] == manifest["fingerprint"]


# ----------------------------------------------------------------------------- vocabulary size


def test_auto_vocab_chooses_fewest_bits_and_skips_unreachable(tiny, tmp_path, capsys):
    recipe = tiny(build_dir=tmp_path, vocab_size="auto", candidates=[320, 384, 448, 60032, 65536])
    shutil.copytree(tiny().layout.corpus, recipe.layout.corpus)
    manifest = train_tokenizer(recipe)
    printed = capsys.readouterr().out
    assert "[1/5] training" in printed and "chose vocab" in printed
    report = read_json(recipe.layout.tokenizer / "report.json")
    curve = {c["vocab_size"]: c for c in report["vocab_curve"]}
    assert [c["status"] for c in report["vocab_curve"]] == [
        "trained", "trained", "trained", "skipped", "skipped",
    ]  # fmt: skip
    assert "too high" in curve[60032]["reason"] and "too high" in curve[65536]["reason"]
    trained_sizes = [v for v, c in curve.items() if c["status"] == "trained"]
    best = min(trained_sizes, key=lambda v: curve[v]["bits"])
    assert [v for v, c in curve.items() if c.get("chosen")] == [best]
    assert manifest["vocab_size"] == report["model"]["vocab_size"] == best
    for v in trained_sizes:
        c = curve[v]
        assert c["bits"] == round(c["tokens"] * math.log2(v))
        assert c["bytes_per_token"] == round(c["bytes"] / c["tokens"], 4)
    assert report["eval"]["round_trip"]["failures"] == 0
    assert "Vocabulary size" in (recipe.layout.tokenizer / "report.md").read_text()


def test_bpe_trains_and_round_trips(tiny, tmp_path):
    recipe = tiny(build_dir=tmp_path, type="bpe", vocab_size=448)
    shutil.copytree(tiny().layout.corpus, recipe.layout.corpus)
    manifest = train_tokenizer(recipe, progress=False)
    assert manifest["vocab_size"] == 448
    assert manifest["counts"]["round_trip_failures"] == 0
    sp = _sp(recipe)
    for text in HARD_TEXTS:
        assert sp.decode(sp.encode(text)) == text


# ----------------------------------------------------------------------------- user errors


def test_missing_corpus_is_one_line_error(tiny, tmp_path):
    recipe = tiny(build_dir=tmp_path / "empty")
    res = CliRunner().invoke(main, ["tokenizer", "train", "--recipe", str(recipe.path)])
    assert res.exit_code == 2
    assert "make corpus" in res.output and "Traceback" not in res.output


def test_bad_vocab_sizes_are_user_errors(tiny, tmp_path):
    recipe = tiny(build_dir=tmp_path)
    shutil.copytree(tiny().layout.corpus, recipe.layout.corpus)
    recipe.tokenizer.vocab_size = 1000  # the loader refuses this; code-built recipes too
    with pytest.raises(UserError, match="multiple of 64"):
        train_tokenizer(recipe, progress=False)
    recipe.tokenizer.vocab_size = 60032
    with pytest.raises(UserError, match=r"vocab_size: 60032 is too high.*at most \d+"):
        train_tokenizer(recipe, progress=False)
    assert not (recipe.layout.tokenizer / "manifest.json").exists()


# ----------------------------------------------------------------------------- the demo corpus


def test_demo_corpus_every_validation_document_round_trips(demo_corpus):
    root, data = demo_corpus
    # A small vocabulary and sample keep this fast; the round trip does not depend on them.
    data = {**data, "name": "demo", "tokenizer": {"vocab_size": 1024, "sample_docs": 300}}
    path = root / "demo-tok.yaml"
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    manifest = train_tokenizer(recipe, progress=False)
    report = read_json(recipe.layout.tokenizer / "report.json")
    val_docs = sum(
        pq.read_metadata(p).num_rows for p in recipe.layout.corpus.glob("val-*.parquet")
    )
    ev = report["eval"]
    assert ev["docs"] == val_docs > 10  # every validation document (fewer than eval_docs)
    assert ev["round_trip"]["failures"] == 0 and ev["unknown"]["tokens"] == 0
    assert ev["total"]["bytes_per_token"] > 2.0  # 2.26 measured with 1024 pieces
    assert ev["baseline"]["bits_ratio"] < 0.6
    assert set(ev["sources"]) == {"python-docs"}
    assert manifest["counts"]["sample"]["docs"] == 300
    sp = _sp(recipe)
    # Indentation is learnt as whitespace-only pieces, not one piece per space.
    assert len(sp.encode("        return None")) <= 4
    for doc in pq.read_table(recipe.layout.corpus / "train-00000.parquet").to_pylist()[:50]:
        assert sp.decode(sp.encode(doc["text"])) == doc["text"]
    assert json.loads((recipe.layout.tokenizer / "report.json").read_text()) == report
