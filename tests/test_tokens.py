"""`make tokens` on a tiny corpus and tokenizer: round trip, eos, dtype, counts, resume,
determinism and idempotence."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
from click.testing import CliRunner
from textgen import document

from domainlm.cli import main as cli
from domainlm.errors import UserError
from domainlm.files import hash_file, write_json
from domainlm.tokenizer import encode as encode_mod
from domainlm.tokenizer.arrays import TokenArrays
from domainlm.tokenizer.encode import choose_dtype
from domainlm.tokenizer.special import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from domainlm.tokenizer.tokens import encode_tokens

OUTPUTS = ["train.bin", "val.bin", "train.idx.npy", "val.idx.npy", "meta.json"]
COLUMNS = ["id", "text", "source", "origin", "license", "created", "meta"]


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = [document(rng, rng.randint(5, 60)) for _ in range(n)]
    # Characters the tokenizer has never seen go through byte fallback; newlines, an empty
    # document and doubled spaces check that nothing is normalized away.
    out[3] = "Prix: 12,50 € — café déjà vu.\nZeile zwei: naïve 東京 🙂"
    out[7] = ""
    out[11] = "two  spaces\n\nand a blank line"
    return out


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(99, 200)),
        model_prefix=str(d / "tokenizer"),
        vocab_size=320,
        model_type="unigram",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",  # so decoding gives the text back exactly
        remove_extra_whitespaces=False,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        num_threads=1,
        minloglevel=2,
    )
    return d / "tokenizer.model"


def _write_split(out: Path, split: str, files: list[tuple[list[str], list[int]]]) -> dict:
    listed = {}
    for k, (texts, copies) in enumerate(files):
        n = len(texts)
        table = pa.table(
            {
                "id": pa.array([f"{split}{k}-{i}" for i in range(n)], type=pa.string()),
                "text": pa.array(texts, type=pa.string()),
                **{c: pa.array(["x"] * n, type=pa.string()) for c in COLUMNS[2:]},
                "copy": pa.array(copies, type=pa.int32()),
            }
        )
        path = out / f"{split}-{k:05d}.parquet"
        # Small row groups, so that the tiny corpus still has several chunks.
        pq.write_table(table, path, row_group_size=16)
        listed[path.name] = {"rows": n, "hash": hash_file(path)}
    return listed


def _build_inputs(recipe, sp_model: Path) -> dict[str, list[str]]:
    """A corpus stage output (two train files with up-sampled repeats, one val file) and a
    finished tokenizer stage; returns the texts of each split in order."""
    out = recipe.layout.corpus
    out.mkdir(parents=True)
    a, b, v = _texts(1, 40), _texts(2, 25), _texts(3, 12)
    # Repeats of earlier documents, as the mixer writes them (`copy` 1 and 2).
    b_rows = b + [a[0], a[5], a[5]]
    b_copy = [0] * len(b) + [1, 1, 2]
    listed = _write_split(out, "train", [(a, [0] * len(a)), (b_rows, b_copy)])
    listed.update(_write_split(out, "val", [(v, [0] * len(v))]))
    write_json(out / "manifest.json", {"stage": "corpus", "outputs": listed})
    tok = recipe.layout.tokenizer
    tok.mkdir(parents=True)
    shutil.copy(sp_model, tok / "tokenizer.model")
    write_json(tok / "manifest.json", {"stage": "tokenizer"})
    return {"train": a + b_rows, "val": v, "train_unique": a + b}


@pytest.fixture
def setup(make_recipe, sp_model, tmp_path):
    def make(name: str = "t"):
        recipe = make_recipe(
            {"corpus": {"sources": [{"name": "s", "path": str(tmp_path)}]}}, name=name
        )
        return recipe, _build_inputs(recipe, sp_model)

    return make


def _outputs(recipe) -> dict[str, bytes]:
    out = recipe.layout.tokens
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_arrays_decode_back_to_the_documents_with_eos_between(setup, sp_model):
    recipe, texts = setup()
    m = encode_tokens(recipe, progress=False, chunk_rows=10)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    eos = sp.eos_id()
    assert m["parameters"]["eos_id"] == eos == EOS_ID
    for split in ("train", "val"):
        arr = TokenArrays.from_recipe(recipe, split)
        assert arr.dtype == np.dtype("<u2") and arr.tokens.dtype == np.uint16
        assert len(arr) == len(texts[split])
        assert arr.offsets[0] == 0 and arr.offsets[-1] == arr.num_tokens
        # Exactly one eos per document, at its end.
        assert int((arr.tokens == eos).sum()) == arr.num_docs
        assert all(arr.document(i, eos=True)[-1] == eos for i in range(arr.num_docs))
        for i, text in enumerate(texts[split]):
            assert sp.decode(arr.document(i).tolist()) == text
    raw = np.fromfile(recipe.layout.tokens / "val.bin", dtype="<u2")
    assert raw.tolist() == TokenArrays.from_recipe(recipe, "val").tokens.tolist()


def test_meta_counts(setup, sp_model):
    recipe, texts = setup()
    m = encode_tokens(recipe, progress=False, chunk_rows=10)
    out = recipe.layout.tokens
    meta = json.loads((out / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == sp.get_piece_size() == 320
    assert meta["eos_id"] == sp.eos_id()

    def n_tokens(docs: list[str]) -> int:
        return sum(len(ids) + 1 for ids in sp.encode(docs))

    train, val = meta["train"], meta["val"]
    assert train["docs"] == len(texts["train"]) == 68
    assert train["tokens"] == n_tokens(texts["train"])
    assert train["tokens"] * 2 == (out / "train.bin").stat().st_size
    assert train["bytes"] == sum(len(t.encode()) for t in texts["train"])
    # Up-sampled repeats are in the array (the mixture) but not in the unique counts.
    assert train["unique_docs"] == len(texts["train_unique"]) == 65
    assert train["unique_tokens"] == n_tokens(texts["train_unique"]) < train["tokens"]
    assert train["unique_bytes"] == sum(len(t.encode()) for t in texts["train_unique"])
    assert val["tokens"] == val["unique_tokens"] == n_tokens(texts["val"])
    assert val["docs"] == val["unique_docs"] == 12
    assert m["counts"] == {s: {k: v for k, v in meta[s].items() if k not in ("file", "index")}
                           for s in ("train", "val")}
    assert len(np.load(out / "train.idx.npy")) == train["docs"] + 1
    assert np.load(out / "train.idx.npy").dtype == np.int64
    assert m["run"]["chunks"] == {"total": 11, "encoded": 11, "reused": 0}
    for name in ("train.bin", "val.bin", "train.idx.npy", "meta.json"):
        assert m["outputs"][name]["hash"] == hash_file(out / name)
    assert not (out / ".partial").exists()  # the unfinished-run folder is cleaned up


def test_an_empty_validation_split(make_recipe, tmp_path, sp_model):
    recipe = make_recipe({"corpus": {"sources": [{"name": "s", "path": str(tmp_path)}]}})
    _build_inputs(recipe, sp_model)
    corpus = recipe.layout.corpus
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["outputs"].update(_write_split(corpus, "val", [([], [])]))
    write_json(corpus / "manifest.json", manifest)
    m = encode_tokens(recipe, progress=False)
    assert m["counts"]["val"]["docs"] == m["counts"]["val"]["tokens"] == 0
    val = TokenArrays.from_recipe(recipe, "val")
    assert val.num_tokens == val.num_docs == 0 and val.offsets.tolist() == [0]


def test_dtype_choice_and_the_uint32_path(setup):
    assert choose_dtype(256) == np.dtype("<u2")
    assert choose_dtype(65536) == np.dtype("<u2")  # ids 0..65535 fit
    assert choose_dtype(65537) == np.dtype("<u4")
    assert choose_dtype(250_000) == np.dtype("<u4")
    recipe, texts = setup()
    encode_tokens(recipe, progress=False)
    small = TokenArrays.from_recipe(recipe).tokens.tolist()
    m = encode_tokens(recipe, progress=False, dtype="uint32")
    assert m["parameters"]["dtype"] == "uint32"
    arr = TokenArrays.from_recipe(recipe)
    assert arr.tokens.dtype == np.dtype("<u4") and arr.tokens.tolist() == small
    assert (recipe.layout.tokens / "train.bin").stat().st_size == 4 * len(small)


class _Interrupt(Exception):
    pass


_KILL_AFTER_THREE = """
import os, signal, sys
from domainlm.recipe import load_recipe
from domainlm.tokenizer.tokens import encode_tokens

done = []

def kill(chunk):
    done.append(chunk)
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)

encode_tokens(load_recipe(sys.argv[1]), progress=False, chunk_rows=10, on_chunk=kill)
"""


@pytest.mark.parametrize("how", ["exception-threads", "exception-processes", "kill-9"])
def test_resume_after_interruption_equals_an_uninterrupted_run(setup, how, monkeypatch):
    # Batches smaller than chunks, so that chunks are assembled from several reads.
    monkeypatch.setattr(encode_mod, "BATCH_ROWS", 3)
    recipe, _ = setup("a")
    method = "processes" if how.endswith("processes") else "threads"
    if how == "kill-9":
        res = subprocess.run([sys.executable, "-c", _KILL_AFTER_THREE, str(recipe.path)])
        assert res.returncode == -signal.SIGKILL
    else:
        done = []

        def stop_after_three(chunk) -> None:
            done.append(chunk)
            if len(done) == 3:
                raise _Interrupt

        with pytest.raises(_Interrupt):
            encode_tokens(recipe, progress=False, chunk_rows=10, method=method, workers=2,
                          on_chunk=stop_after_three)
    out = recipe.layout.tokens
    assert not (out / "manifest.json").exists()
    (progress,) = (out / ".partial").glob("*/progress.json")
    # The three chunks reported done, and any already queued for writing when it stopped.
    recorded = json.loads(progress.read_text())["train"]["chunks"]
    assert 3 <= recorded < 9
    # A run killed while appending leaves bytes beyond its progress record: they are cut off.
    for name in ("train.bin", "train.len"):
        with open(progress.parent / name, "ab") as f:
            f.write(b"\x07" * 24)
    m = encode_tokens(recipe, progress=False, chunk_rows=10, method=method, workers=2)
    assert m["run"]["chunks"] == {"total": 11, "encoded": 11 - recorded, "reused": recorded}

    fresh, _ = setup("b")
    m2 = encode_tokens(fresh, progress=False, chunk_rows=10, method="threads", workers=1)
    assert m2["run"]["chunks"]["reused"] == 0
    assert _outputs(recipe) == _outputs(fresh)
    assert m["fingerprint"] == m2["fingerprint"]


def test_deterministic_across_runs_methods_workers_and_batches(setup, monkeypatch):
    recipe, _ = setup("a")
    encode_tokens(recipe, progress=False, chunk_rows=10, method="threads", workers=2)
    first = _outputs(recipe)
    encode_tokens(recipe, force=True, progress=False, chunk_rows=10, method="threads", workers=1)
    assert _outputs(recipe) == first
    other, _ = setup("b")
    encode_tokens(other, progress=False, chunk_rows=10, method="processes", workers=2)
    assert _outputs(other) == first
    monkeypatch.setattr(encode_mod, "BATCH_ROWS", 4)
    encode_tokens(other, force=True, progress=False, chunk_rows=10, method="threads")
    assert _outputs(other) == first
    # The chunking changes the fingerprint (it names the parts), never the arrays.
    encode_tokens(other, progress=False, chunk_rows=7)
    assert _outputs(other) == first


def test_idempotent_and_reencodes_when_an_input_changes(setup, capsys, sp_model):
    recipe, _ = setup()
    m1 = encode_tokens(recipe, progress=False)
    out = recipe.layout.tokens
    stamp = (out / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    m2 = encode_tokens(recipe, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert m2 == m1 and (out / "train.bin").stat().st_mtime_ns == stamp
    # A changed tokenizer is a new input.
    tok = recipe.layout.tokenizer_model
    model = spm.SentencePieceProcessor(model_file=str(tok))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_texts(5, 100)), model_prefix=str(tok.with_suffix("")),
        vocab_size=400, byte_fallback=True, eos_id=EOS_ID, pad_id=PAD_ID, num_threads=1,
        minloglevel=2,
    )
    assert spm.SentencePieceProcessor(model_file=str(tok)).serialized_model_proto() != (
        model.serialized_model_proto()
    )
    m3 = encode_tokens(recipe, progress=False)
    assert m3["fingerprint"] != m1["fingerprint"] and m3["run"]["chunks"]["encoded"] > 0
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 400
    # --force re-encodes even when nothing changed.
    m4 = encode_tokens(recipe, force=True, progress=False)
    assert m4["fingerprint"] == m3["fingerprint"] and m4["run"]["chunks"]["reused"] == 0
    # A deleted output is rebuilt.
    (out / "val.bin").unlink()
    m5 = encode_tokens(recipe, progress=False)
    assert m5["run"]["chunks"]["encoded"] > 0 and (out / "val.bin").exists()


def test_missing_inputs_name_the_make_target(make_recipe, tmp_path, sp_model):
    recipe = make_recipe({"corpus": {"sources": [{"name": "s", "path": str(tmp_path)}]}})
    with pytest.raises(UserError, match="make corpus"):
        encode_tokens(recipe, progress=False)
    _build_inputs(recipe, sp_model)
    (recipe.layout.tokenizer / "manifest.json").unlink()
    with pytest.raises(UserError, match="make tokenizer"):
        encode_tokens(recipe, progress=False)
    # A model without eos, or with eos elsewhere, cannot separate documents as training expects.
    write_json(recipe.layout.tokenizer / "manifest.json", {"stage": "tokenizer"})
    prefix = str(recipe.layout.tokenizer / "tokenizer")
    for eos in (-1, 5):
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_texts(5, 100)), model_prefix=prefix, vocab_size=400,
            byte_fallback=True, eos_id=eos, num_threads=1, minloglevel=2,
        )
        with pytest.raises(UserError, match="make tokenizer"):
            encode_tokens(recipe, progress=False)
    shutil.rmtree(recipe.layout.tokenizer)
    with pytest.raises(UserError, match="make tokenizer"):
        encode_tokens(recipe, progress=False)
    # A corpus file changed behind the corpus stage's back.
    corpus = recipe.layout.corpus
    pq.write_table(pa.table({"text": ["edited"]}), corpus / "val-00000.parquet")
    with pytest.raises(UserError, match="make corpus"):
        encode_tokens(recipe, progress=False)
    with pytest.raises(UserError, match="make tokens"):
        TokenArrays.from_recipe(recipe)


def test_cli(setup):
    recipe, texts = setup()
    res = CliRunner().invoke(cli, ["tokens", "--recipe", str(recipe.path)])
    assert res.exit_code == 0, res.output
    assert "tokens: train" in res.output
    assert TokenArrays.from_recipe(recipe).num_docs == len(texts["train"])
    res = CliRunner().invoke(cli, ["tokens", "--recipe", str(recipe.path)])
    assert res.exit_code == 0 and "up to date" in res.output
    shutil.rmtree(recipe.layout.corpus)
    res = CliRunner().invoke(cli, ["tokens", "--recipe", str(recipe.path)])
    assert res.exit_code == 2 and "make corpus" in res.output
