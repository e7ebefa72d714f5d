"""The Ray executor: the same corpus, byte for byte, as the local process pool, with a local
Ray instance of two workers on 127.0.0.1."""

from __future__ import annotations

import json

import pytest
import ray
from test_corpus_pipeline import _outputs, _recipe_data, _shards

from domainlm.corpus.pipeline import build_corpus


@pytest.mark.slow
def test_ray_executor_outputs_are_byte_identical_to_local(tmp_path, make_recipe):
    shards = tmp_path / "shards"
    _shards(shards)
    data = _recipe_data(shards, workers=2, dedup={"threshold": 0.7})
    local = make_recipe(data, name="run", build_dir=tmp_path / "local")
    on_ray = make_recipe({**data, "corpus": {**data["corpus"], "executor": "ray"}}, name="run",
                         build_dir=tmp_path / "ray")
    m_local = build_corpus(local, progress=False)
    assert not ray.is_initialized()
    m_ray = build_corpus(on_ray, progress=False)
    assert m_ray["run"]["executor"] == "ray" and m_local["run"]["executor"] == "local"
    assert not ray.is_initialized()  # the instance it started is shut down again
    assert _outputs(local.layout.corpus) == _outputs(on_ray.layout.corpus)
    assert m_ray["counts"] == m_local["counts"]
    assert m_ray["counts"]["total"]["duplicates"]["near"] >= 1
    # The executor is not a setting of the corpus: both manifests have one fingerprint.
    assert m_ray["fingerprint"] == m_local["fingerprint"]
    dup = (on_ray.layout.corpus / "rejected" / "duplicate.jsonl").read_text().splitlines()
    assert all(json.loads(x)["duplicate_of"] for x in dup)
