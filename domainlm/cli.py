"""The `domainlm` command: one sub-command per pipeline stage, each a thin call into a module."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from domainlm.errors import UserError

DEFAULT_RECIPE = "recipes/demo.yaml"


def _friendly(fn):
    """Print a UserError as one line (no traceback) and exit 2, the convention of click."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

    return wrapper


recipe_option = click.option(
    "--recipe",
    "-r",
    default=DEFAULT_RECIPE,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The recipe (YAML) that describes the run; outputs go to build/<recipe name>/.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="domainlm")
def main() -> None:
    """Build a domain-specific language model end to end.

    Stages, in order (each reads the previous stage's files under build/<run>/):
    corpus, tokenizer, tokens, plan, pretrain, finetune, quantize, eval.
    The Makefile runs them: `make corpus pretrain finetune`.
    """


# ----------------------------------------------------------------------------- corpus


@main.group()
def corpus() -> None:
    """Check, contribute and build the training corpus."""


@corpus.command("build")
@recipe_option
@click.option("--force", is_flag=True, help="Rebuild even if the inputs have not changed.")
@click.option("--workers", type=int, default=None, help="Processes (default: the recipe's).")
@_friendly
def corpus_build(recipe: Path, force: bool, workers: int | None) -> None:
    """Read, clean, filter, redact, deduplicate, decontaminate, mix and split the corpus.

    Writes build/<run>/corpus/: train-*.parquet, val-*.parquet, rejected/ (every dropped
    record with its reason), manifest.json and report.md. Shards already processed with the
    same settings are reused from the cache, so adding a shard processes only that shard.
    """
    from domainlm.corpus.pipeline import build_corpus
    from domainlm.recipe import load_recipe

    build_corpus(load_recipe(recipe), force=force, workers=workers)


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
    from domainlm.tokenizer.encode import encode_tokens

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


# ----------------------------------------------------------------------------- pretrain


@main.command("pretrain")
@recipe_option
@click.option("--force", is_flag=True, help="Start afresh: discard checkpoints and retrain.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still written).")
@_friendly
def pretrain(recipe: Path, force: bool, no_progress: bool) -> None:
    """Pretrain the decoder from scratch with Lightning (bf16-mixed by default).

    The model shape, tokens and batch come from build/<run>/plan.json unless the recipe's
    model: and train: sections set them. Checkpoints go to build/<run>/pretrain/checkpoints/;
    after Ctrl-C (which stops at the end of the current step), SIGTERM or kill -9, running the
    command again resumes from the last checkpoint with the same data order. At the end,
    build/<run>/pretrain/model/ holds a Hugging Face folder (config.json, model.safetensors,
    tokenizer files); logs (CSV, TensorBoard) are in build/<run>/pretrain/logs/.
    """
    from domainlm.recipe import load_recipe
    from domainlm.train.pretrain import pretrain as run

    run(load_recipe(recipe), force=force, progress=not no_progress)


@main.command("finetune")
@recipe_option
@click.option("--force", is_flag=True, help="Start afresh: discard checkpoints and retrain.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still written).")
@_friendly
def finetune(recipe: Path, force: bool, no_progress: bool) -> None:
    """Instruction-tune the pretrained model with each method in finetune.methods.

    Methods: full, lora, adapter (bottleneck), prompt (prompt tuning), selective (top blocks
    and norms). Each trains with the pretraining machinery (Lightning, bf16, resume) on the
    instruction mixture with the prompt tokens masked, and is scored on held-out instructions
    (ROUGE-L, exact match) with the perplexity change on the pretraining corpus. Writes
    build/<run>/sft/<method>/ (HF folder, or a PEFT adapter for lora), sft/lora-merged/,
    report.md and manifest.json.
    """
    from domainlm.finetune.stage import finetune as run
    from domainlm.recipe import load_recipe

    run(load_recipe(recipe), force=force, progress=not no_progress)


# ----------------------------------------------------------------------------- later stages


def _not_yet(stage: str, issue: str) -> None:
    raise UserError(f"the `{stage}` stage is not built yet ({issue}); `make corpus` works today")


for _stage, _issue in [
    ("quantize", "issue 6"),
    ("eval", "issue 7"),
]:

    def _make(stage: str = _stage, issue: str = _issue):
        @main.command(stage, help=f"The {stage} stage (arrives with {issue}).")
        @recipe_option
        @_friendly
        def _cmd(recipe: Path) -> None:
            _not_yet(stage, issue)

    _make()


if __name__ == "__main__":  # pragma: no cover
    main()
