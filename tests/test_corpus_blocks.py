"""Pipeline blocks: a domain team's filter is one class and one recipe entry (the worked
example of docs/corpus.md, run from the page itself), counted, timed and recorded like the
built-in rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from domainlm.corpus.assemble import balanced
from domainlm.corpus.pipeline import build_corpus
from domainlm.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "corpus.md"


def _example_code() -> str:
    """The finance-table filter exactly as docs/corpus.md shows it."""
    text = DOCS.read_text(encoding="utf-8")
    m = re.search(r"```python\n(# recipes/finance_filters.py\n.*?)```", text, re.S)
    assert m, "the worked example is missing from docs/corpus.md"
    return m.group(1)


TABLES = [
    "year | revenue | margin\n2022 | 1,204 | 12%\n2023 | 1,380 | 14%\n2024 | 1,512 | 15%",
    "name | role | office\nAnn | CFO | London\nBob | CTO | Paris\nEve | COO | Berlin",
    "quarter\tEPS\nQ1\t0.42\nQ2\t0.51\nQ3\t0.48\nQ4\t0.60",
    "just one | row",
]


def _recipe_data(tmp_path: Path, filters_file: Path, **entry) -> dict:
    folder = tmp_path / "shards" / "finance-tables"
    write_jsonl(folder / "t.jsonl", [{"text": t} for t in TABLES])
    prose_off = {"min_words": None, "min_mean_word_length": None, "min_alpha_words": None,
                 "max_symbol_word_ratio": None, "min_stop_words": None, "languages": None,
                 "max_top_ngram_char_fraction": None, "max_dup_ngram_char_fraction": None}
    source = {"name": "tables", "path": str(folder), "filters": prose_off,
              "blocks": [{"use": f"{filters_file}:FinanceTables", **entry}]}
    return {"corpus": {"sources": [source], "workers": 1, "val_fraction": 0.0}}


def test_the_worked_example_filters_tables(tmp_path, make_recipe):
    code = tmp_path / "finance_filters.py"
    code.write_text(_example_code(), encoding="utf-8")
    recipe = make_recipe(_recipe_data(tmp_path, code, min_numeric_rows=0.6))
    m = build_corpus(recipe, progress=False)
    total = m["counts"]["total"]
    assert balanced(total) and total["in"] == 4 and total["kept"] == 2
    assert total["filtered"] == {"finance_tables": 2}
    rows = [json.loads(x) for x in
            (recipe.layout.corpus / "rejected" / "filter.jsonl").read_text().splitlines()]
    assert {r["origin"]: r["detail"] for r in rows} == {
        "tables/t.jsonl:2": "0.00 of rows hold figures < 0.6",
        "tables/t.jsonl:4": "1 table rows < 3",
    }
    kept = {r["text"] for r in pq.read_table(recipe.layout.corpus / "train-00000.parquet")
            .to_pylist()}
    assert kept == {TABLES[0], TABLES[2]}
    assert "| tables | filter:finance_tables | 2 |" in (recipe.layout.corpus / "report.md")\
        .read_text()
    stats = next((recipe.layout.corpus / ".cache" / "shards").glob("*/stats.json"))
    assert "finance_tables" in json.loads(stats.read_text())["stage_seconds"]

    # Editing the filter's code reprocesses the shard, with the new rule.
    code.write_text(_example_code().replace("len(rows) < self.min_rows", "False"))
    m = build_corpus(recipe, progress=False)
    assert m["run"]["processed"] == ["tables/t.jsonl"]
    assert m["counts"]["total"]["filtered"] == {"finance_tables": 2}
    details = (recipe.layout.corpus / "rejected" / "filter.jsonl").read_text()
    assert "table rows" not in details and "tables/t.jsonl:4" in details


def test_bad_block_entries_are_one_clear_error(tmp_path, make_recipe):
    code = tmp_path / "finance_filters.py"
    code.write_text(_example_code(), encoding="utf-8")
    with pytest.raises(UserError, match="use: package.module:ClassName"):
        make_recipe({"corpus": {"sources": [{"name": "x", "path": str(tmp_path)}],
                                "blocks": [{"min_rows": 3}]}})
    with pytest.raises(UserError, match="cannot be loaded"):
        build_corpus(make_recipe(_recipe_data(tmp_path, tmp_path / "absent.py")),
                     progress=False)
    with pytest.raises(UserError, match="unexpected keyword"):
        build_corpus(make_recipe(_recipe_data(tmp_path, code, min_figures=2), name="b"),
                     progress=False)
