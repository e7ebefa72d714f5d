"""`domainlm corpus|tokenizer|tokens|plan`: the data stages and the planner."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from domainlm.cli.base import _friendly, main, recipe_option

# ----------------------------------------------------------------------------- corpus


@main.group()
def corpus() -> None:
    """Check, contribute and build the training corpus."""


@corpus.command("build")
@recipe_option
@click.option("--force", is_flag=True, help="Rebuild even if the inputs have not changed.")
@click.option("--workers", type=int, default=None, help="Processes (default: the recipe's).")
@click.option(
    "--executor",
    type=click.Choice(["local", "ray"]),
    default=None,
    help="Where the per-shard work and dedup partitions run (default: corpus.executor).",
)
@click.option(
    "--ray-address",
    default=None,
    help="An existing Ray cluster (e.g. auto, ray://head:10001); default: start Ray here.",
)
@_friendly
def corpus_build(
    recipe: Path, force: bool, workers: int | None, executor: str | None, ray_address: str | None
) -> None:
    """Read, clean, filter, redact, deduplicate, decontaminate, mix and split the corpus.

    Writes build/<run>/corpus/: train-*.parquet, val-*.parquet, rejected/ (every dropped
    record with its reason), manifest.json and report.md. Shards already processed with the
    same settings are reused from the cache, so adding a shard processes only that shard.
    """
    from domainlm.corpus.pipeline import build_corpus
    from domainlm.recipe import load_recipe

    build_corpus(
        load_recipe(recipe), force=force, workers=workers, executor=executor,
        ray_address=ray_address,
    )


@corpus.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--max-record-bytes",
    type=int,
    default=8 * 1024 * 1024,
    show_default=True,
    help="Records (lines) longer than this are problems.",
)
@_friendly
def corpus_validate(paths: tuple[Path, ...], max_record_bytes: int) -> None:
    """Check shards before contributing them: encoding, schema, sizes, duplicates.

    Prints a summary per file and every problem as file:line. Exits 1 if any problem is
    found, so it can guard a CI job or a pre-commit hook.
    """
    from domainlm.corpus.validate import run_validate

    sys.exit(run_validate(list(paths), max_record_bytes=max_record_bytes))


@corpus.command("add")
@click.option("--team", required=True, help="The contributing team (a folder under shards/).")
@click.option(
    "--shards-dir",
    default="corpus/shards",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--force", is_flag=True, help="Copy even if validation finds problems.")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@_friendly
def corpus_add(team: str, shards_dir: Path, force: bool, files: tuple[Path, ...]) -> None:
    """Validate shards and copy them into corpus/shards/<team>/."""
    from domainlm.corpus.validate import run_add

    sys.exit(run_add(team, list(files), shards_dir=shards_dir, force=force))


# ----------------------------------------------------------------------------- tokenizer, plan


@main.group()
def tokenizer() -> None:
    """Train and inspect the SentencePiece tokenizer."""


@tokenizer.command("train")
@recipe_option
@click.option("--force", is_flag=True, help="Retrain even if the corpus has not changed.")
@_friendly
def tokenizer_train(recipe: Path, force: bool) -> None:
    """Train the tokenizer on a sample of the corpus's train split.

    Writes build/<run>/tokenizer/: tokenizer.model (SentencePiece), tokenizer.vocab,
    report.json and report.md (bytes per token per source, unknown rate, round-trip check,
    comparison with a byte-level baseline, the vocabulary-size curve when vocab_size: auto).
    """
    from domainlm.recipe import load_recipe
    from domainlm.tokenizer.train import train_tokenizer

    train_tokenizer(load_recipe(recipe), force=force)


@main.command("tokens")
@recipe_option
@click.option("--force", is_flag=True, help="Re-encode even if nothing changed.")
@_friendly
def tokens(recipe: Path, force: bool) -> None:
    """Encode the corpus into memory-mapped token arrays (build/<run>/tokens/)."""
    from domainlm.recipe import load_recipe
    from domainlm.tokenizer.tokens import encode_tokens

    encode_tokens(load_recipe(recipe), force=force)


@main.command("plan")
@recipe_option
@click.option("--flops", type=float, help="Total training compute in FLOPs.")
@click.option("--gpu", help="Accelerator (h100, h200, a100, ...): with --gpus, --hours, --mfu.")
@click.option("--gpus", type=int, help="Number of accelerators.")
@click.option("--hours", type=float, help="Wall-clock hours on the accelerators.")
@click.option("--mfu", type=float, help="Expected model FLOPs utilization (0-1).")
@click.option("--minutes", type=float, help="Wall-clock minutes on this machine (probed).")
@click.option("--law", type=click.Choice(["approach1", "approach3"]), help="Chinchilla approach.")
@click.option("--fit", type=click.Choice(["chinchilla", "epoch"]), help="Approach-3 constants.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--force", is_flag=True, help="Measure this machine again instead of reusing plan.json's probe."
)
@click.option(
    "--write-recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the recipe with the planned model section to this path.",
)
@_friendly
def plan(
    recipe: Path, as_json: bool, force: bool, write_recipe: Path | None, **budget
) -> None:
    """What to train with this budget and this data: Chinchilla-optimal parameters and
    tokens, a concrete model shape, memory per device per strategy, and the time it takes.

    The budget comes from the options, else from the recipe's plan section. Writes
    build/<run>/plan.json.
    """
    from domainlm.plan.run import run_plan
    from domainlm.recipe import load_recipe

    overrides = {k: v for k, v in budget.items() if v is not None}
    run_plan(
        load_recipe(recipe), overrides, as_json=as_json, write_recipe=write_recipe, force=force
    )
