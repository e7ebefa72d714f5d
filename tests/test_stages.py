"""The stage runner's contract, on the real first stages of a run (corpus → tokenizer → tokens):
manifests list their inputs by content hash; touching an input changes nothing; changing one
byte of it, even behind an unchanged size and modification time, reruns that stage and every
stage after it."""

from __future__ import annotations

import os
import random

import pytest
from conftest import write_jsonl
from textgen import document

from domainlm.corpus.pipeline import build_corpus
from domainlm.files import hash_file, read_json
from domainlm.tokenizer.tokens import encode_tokens
from domainlm.tokenizer.train import train_tokenizer

pytestmark = pytest.mark.slow  # end-to-end stages; `make test-fast` skips them

STAGES = ("corpus", "tokenizer", "tokens")


def build(recipe, capsys) -> dict[str, bool]:
    """Run the three stages; which of them did work (rather than say up to date)."""
    capsys.readouterr()
    build_corpus(recipe, progress=False)
    train_tokenizer(recipe, progress=False)
    encode_tokens(recipe, progress=False)
    out = capsys.readouterr().out
    return {s: f"{s}: up to date" not in out for s in STAGES}


def test_touch_does_nothing_and_one_byte_reruns_the_chain(tmp_path, make_recipe, capsys):
    rng = random.Random(5)
    shard = write_jsonl(
        tmp_path / "shards" / "team" / "a.jsonl",
        [{"text": document(rng, 120)} for _ in range(60)],
    )
    recipe = make_recipe(
        {
            "corpus": {
                "sources": [{"name": "team", "path": str(tmp_path / "shards")}],
                "workers": 1,
                "val_fraction": 0.1,
            },
            "tokenizer": {"vocab_size": 320, "threads": 1},
        }
    )
    assert build(recipe, capsys) == dict.fromkeys(STAGES, True)

    # Every manifest lists what it read, each with the hash of the file's content.
    layout = recipe.layout
    for stage in STAGES:
        inputs = read_json(layout.manifest(stage))["inputs"]
        assert inputs
        for entry in inputs.values():
            assert entry["hash"] == hash_file(entry["path"])
    manifests = {s: layout.manifest(s).read_bytes() for s in STAGES}

    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build(recipe, capsys) == dict.fromkeys(STAGES, False)
    assert {s: layout.manifest(s).read_bytes() for s in STAGES} == manifests

    # One byte of one document changes; size and modification time are put back as they were.
    st = shard.stat()
    data = shard.read_bytes()
    at = data.index(b" the ") + 1
    shard.write_bytes(data[:at] + b"T" + data[at + 1 :])
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size
    assert build(recipe, capsys) == dict.fromkeys(STAGES, True)
    assert read_json(layout.manifest("corpus"))["run"]["processed"] == ["team/team/a.jsonl"]
