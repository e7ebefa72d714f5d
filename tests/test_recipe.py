"""Recipe loading: defaults, validation errors that name the key, the line and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from domainlm.recipe import QualityFilters, RecipeError, load_recipe


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text, encoding="utf-8")
    return p


GOOD = """\
seed: 7
corpus:
  sources:
    - name: docs
      kind: python-docs
      filters:
        min_words: 5
"""


def test_demo_recipe_loads_with_documented_defaults():
    r = load_recipe("recipes/demo.yaml")
    assert r.name == "demo"
    assert r.layout.root == Path("build/demo")
    assert r.corpus.sources[0].kind == "python-docs"
    assert r.corpus.dedup.shingle == 5


def test_overrides_are_converted_and_name_defaults_to_stem(tmp_path):
    r = load_recipe(_write(tmp_path, GOOD))
    assert r.name == "r" and r.seed == 7
    assert r.corpus.sources[0].filters == {"min_words": 5}
    assert r.corpus.filters == QualityFilters()


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD.replace("seed: 7", "sed: 7"), "r.yaml:1: sed: unknown key; did you mean 'seed'?"),
        (
            GOOD.replace("min_words", "min_wrds"),
            "r.yaml:7: corpus.sources[0].filters.min_wrds: unknown key; did you mean 'min_words'",
        ),
        (GOOD.replace("seed: 7", "seed: seven"), "r.yaml:1: seed: expected a whole number"),
        (
            GOOD.replace("kind: python-docs", "kind: python-doc"),
            "corpus.sources[0].kind: must be one of 'shards', 'python-docs', got 'python-doc'; "
            "did you mean 'python-docs'?",
        ),
        (GOOD + "  on_bad_shard: ignore\n", "corpus.on_bad_shard: must be one of 'fail', 'skip'"),
        (GOOD + "  decontaminate:\n    files: [nope.jsonl]\n", "no such file: nope.jsonl"),
        (GOOD.replace("kind: python-docs", "kind: shards"), "needs `path`"),
        ("corpus: [1, 2]\n", "corpus: expected a mapping of settings"),
        ("seed: 1\n", "at least one source is needed"),
        ("corpus:\n  sources:\n  - {name: a\n", "not valid YAML"),
    ],
)
def test_errors_name_the_key_and_the_fix(tmp_path, text, expected):
    with pytest.raises(RecipeError) as e:
        load_recipe(_write(tmp_path, text))
    assert expected in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    from click.testing import CliRunner

    from domainlm.cli import main

    p = _write(tmp_path, GOOD.replace("seed: 7", "sed: 7"))
    res = CliRunner().invoke(main, ["corpus", "build", "--recipe", str(p)])
    assert res.exit_code == 2
    assert "did you mean 'seed'" in res.output
    assert "Traceback" not in res.output


def test_every_corpus_field_is_documented():
    import dataclasses

    from domainlm.recipe import (
        CorpusConfig,
        DecontamConfig,
        DedupConfig,
        PIIConfig,
        SourceConfig,
    )

    doc = Path("docs/corpus.md").read_text(encoding="utf-8")
    for cls in (CorpusConfig, SourceConfig, QualityFilters, PIIConfig, DedupConfig,
                DecontamConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"{cls.__name__}.{f.name} is not in docs/corpus.md"


@pytest.mark.parametrize(
    "section, page",
    [
        ("TokenizerConfig", "docs/tokenizer.md"),
        ("PlanConfig", "docs/plan.md"),
        ("TrainConfig", "docs/pretrain.md"),
        ("FinetuneConfig", "docs/finetune.md"),
        ("LoRAConfig", "docs/finetune.md"),
        ("AdapterConfig", "docs/finetune.md"),
        ("PromptTuningConfig", "docs/finetune.md"),
        ("SelectiveConfig", "docs/finetune.md"),
        ("InstructionSource", "docs/finetune.md"),
        ("QLoRAConfig", "docs/finetune.md"),
        ("AlignConfig", "docs/align.md"),
        ("PreferenceSource", "docs/align.md"),
        ("AlignLoRAConfig", "docs/align.md"),
        ("RewardConfig", "docs/align.md"),
        ("DPOConfig", "docs/align.md"),
        ("PPOConfig", "docs/align.md"),
        ("GRPOConfig", "docs/align.md"),
        ("ExportConfig", "docs/quantize.md"),
        ("EvalConfig", "docs/eval.md"),
    ],
)
def test_every_stage_field_is_documented(section: str, page: str) -> None:
    import dataclasses

    import domainlm.recipe as r

    doc = Path(page).read_text(encoding="utf-8")
    for f in dataclasses.fields(getattr(r, section)):
        assert f"`{f.name}`" in doc, f"{section}.{f.name} is not in {page}"


def _recipe_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a recipe can set, dotted (list items as `key[].field`)."""
    import dataclasses
    import typing

    from domainlm.recipe import Recipe

    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("loader") or f.metadata.get("recipe", True) is False:
            continue
        key = f"{prefix}{f.name}"
        tp, args = hints[f.name], typing.get_args(hints[f.name])
        if dataclasses.is_dataclass(tp):
            keys += _recipe_keys(tp, f"{key}.")
        elif typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            keys += [key, *_recipe_keys(args[0], f"{key}[].")]
        else:
            keys.append(key)
    return keys


def test_every_recipe_field_is_in_docs_recipes_md():
    """recipes/demo.yaml sends its readers to docs/recipes.md for every field."""
    from domainlm.recipe import Recipe

    assert "docs/recipes.md" in Path("recipes/demo.yaml").read_text(encoding="utf-8")
    doc = Path("docs/recipes.md").read_text(encoding="utf-8")
    keys = _recipe_keys(Recipe)
    assert len(keys) > 140
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"not in docs/recipes.md: {missing}"
