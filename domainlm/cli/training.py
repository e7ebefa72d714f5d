"""`domainlm pretrain|finetune|quantize`: the training stages and the export."""

from __future__ import annotations

from pathlib import Path

import click

from domainlm.cli.base import _friendly, main, recipe_option

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
    build/<run>/sft/<method>/model/ (HF folder, or a PEFT adapter for lora), sft/lora-merged/,
    report.md and manifest.json.
    """
    from domainlm.finetune.stage import finetune as run
    from domainlm.recipe import load_recipe

    run(load_recipe(recipe), force=force, progress=not no_progress)


@main.command("quantize")
@recipe_option
@click.option("--force", is_flag=True, help="Write every format again.")
@_friendly
def quantize(recipe: Path, force: bool) -> None:
    """Export and quantize the models in export.models to every format in export.formats.

    Formats: hf-bf16, hf-fp16 (Hugging Face folders for transformers and vLLM), int8 (per
    output channel), int4 (group-wise; export.group_size), gguf-f16, gguf-bf16, gguf-q8_0,
    gguf-q4_0 (llama.cpp). Each is measured: size on disk and validation perplexity against
    the bf16 model. Writes build/<run>/export/<model>/<format> and report.md.
    """
    from domainlm.export.stage import quantize as run
    from domainlm.recipe import load_recipe

    run(load_recipe(recipe), force=force)


# ----------------------------------------------------------------------------- sweep


@main.command("sweep")
@recipe_option
@click.option(
    "--stage",
    type=click.Choice(["pretrain", "finetune", "align"]),
    required=True,
    help="The stage whose trials the sweep runs (its earlier stages must be built).",
)
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Trials at most (default: sweep.trials).")
@_friendly
def sweep(recipe: Path, stage: str, trials: int | None) -> None:
    """Search the recipe fields named in its sweep: section with short trials of one stage.

    Each trial is a run of the stage in its own folder, build/<run>/sweep/trials/trial-NNN/
    (the run's own outputs are never touched), with the sampled values and sweep.fixed
    applied; its value is its best validation loss. Optuna samples (sweep.sampler: grid,
    random or tpe) and prunes trials whose validation loss falls behind the median of the
    others (sweep.pruner). Writes build/<run>/sweep/trials.md and trials.csv (every trial)
    and best.yaml (the recipe with the best values, which `load_recipe` and every stage read).
    """
    from domainlm.recipe import load_recipe
    from domainlm.sweep.run import sweep as run

    run(load_recipe(recipe), stage, trials=trials)
