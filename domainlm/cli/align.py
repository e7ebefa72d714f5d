"""`domainlm align` (the stage) and `domainlm align sample` (the labeling loop's first half:
completions for a labeling team to rank)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from domainlm.cli.base import _friendly, main, recipe_option


@main.group("align", invoke_without_command=True)
@recipe_option
@click.option("--force", is_flag=True, help="Start afresh: discard checkpoints and retrain.")
@click.option("--no-progress", is_flag=True, help="No progress bar (logs still written).")
@click.pass_context
@_friendly
def align(ctx: click.Context, recipe: Path, force: bool, no_progress: bool) -> None:
    """Align the instruction-tuned model with preferences (`make align`).

    Reads the preference files of align.data (ranked completions, preference pairs or scored
    completions; the demo's are labeled by a program that stands in for people), trains the
    reward model, then each method of align.methods: dpo, ipo (against the frozen reference),
    ppo (reward model minus a per-token KL penalty, value head, GAE, clipped updates), grpo.
    Writes build/<run>/align/<method>/model (a PEFT LoRA adapter over the instruction-tuned
    model, or a whole folder), align/reward/model (a transformers sequence classifier),
    report.md (reward accuracy, curves, win rates, forgetting) and manifest.json. Resumes
    from checkpoints after an interruption. `domainlm align sample` makes completions to label.
    """
    if ctx.invoked_subcommand is not None:
        return
    from domainlm.align.stage import align as run
    from domainlm.recipe import load_recipe

    run(load_recipe(recipe), force=force, progress=not no_progress)


@align.command("sample")
@click.option("--prompts", "prompts_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help='JSONL of {"prompt": text or chat messages} records.')
@click.option("-n", "n", type=int, default=4, show_default=True,
              help="Completions per prompt (a ranking needs at least 2).")
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the records to label (JSONL).")
@click.option("--model", "-m", type=click.Path(path_type=Path),
              help="The model that answers (a model folder, or an adapter folder on its base). "
              "Default: the recipe's align.sft_model.")
@recipe_option
@click.option("--max-new-tokens", type=int, help="Default: the recipe's align.max_new_tokens.")
@click.option("--temperature", "-t", type=float, default=1.0, show_default=True,
              help="Sampling temperature (0: greedy, the same completion n times).")
@click.option("--top-p", type=float, help="Sample from the smallest set of tokens whose "
              "probability reaches p.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="The same seed, model and prompts give the same completions.")
@_friendly
def sample(prompts_file: Path, n: int, out: Path, model: Path | None, recipe: Path,
           max_new_tokens: int | None, temperature: float, top_p: float | None,
           seed: int) -> None:
    """Write n completions of each prompt for a labeling team to rank.

    Each output line is {"prompt", "completions": [...], "ranking": null, "origin"}; the
    labelers fill `ranking` with the rank of each completion (1 = best, equal ranks for ties),
    and the file goes into align.data as it is. Lines of the prompts file that hold no prompt
    are reported with their file:line and reason, and skipped.
    """
    from domainlm.align.sampling import write_samples
    from domainlm.align.stage import sft_folder
    from domainlm.model.load import load_model, load_tokenizer
    from domainlm.recipe import load_recipe
    from domainlm.tokenizer.templates import chat_template

    r = load_recipe(recipe)
    path = model if model is not None else sft_folder(r)
    net = load_model(path)
    sp, folder = load_tokenizer(path)
    result = write_samples(net, sp, chat_template(folder), prompts_file, out, n,
                           max_new_tokens=max_new_tokens or r.align.max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed)
    for q in result["quarantined"]:
        click.echo(f"{q['origin']}: {q['reason']}: {q['detail']}", err=True)
    click.echo(json.dumps({"prompts": result["prompts"], "written": result["written"],
                           "skipped": len(result["quarantined"]), "out": str(out)}))
