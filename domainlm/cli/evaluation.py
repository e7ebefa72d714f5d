"""`domainlm eval`: the run report, and scoring any model file or folder."""

from __future__ import annotations

from pathlib import Path

import click

from domainlm.cli.base import _friendly, main, recipe_option
from domainlm.errors import UserError

# ----------------------------------------------------------------------------- eval


@main.group("eval", invoke_without_command=True)
@recipe_option
@click.option("--force", is_flag=True, help="Evaluate again even if up to date.")
@click.pass_context
@_friendly
def eval_(ctx: click.Context, recipe: Path, force: bool) -> None:
    """Evaluate the run (`make eval`): build/<run>/eval/metrics.json and report.md (corpus,
    tokenizer, plan vs trained, loss curves, perplexity per source before and after
    fine-tuning, quantization, samples). `domainlm eval metrics` scores texts directly."""
    if ctx.invoked_subcommand is None:
        from domainlm.eval.stage import evaluate_run
        from domainlm.recipe import load_recipe

        evaluate_run(load_recipe(recipe), force=force)


def _print(result: dict, as_json: bool) -> None:
    import json

    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))
        return
    for k, v in result.items():
        if isinstance(v, float):
            click.echo(f"{k:16s} {v:.4f}")
        elif not isinstance(v, (dict, list)):
            click.echo(f"{k:16s} {v}")


model_path = click.option(
    "--model", "-m", "model", required=True, type=click.Path(exists=True, path_type=Path),
    help="A model folder (HF, int8/int4, adapter) or a .gguf file.",
)


@eval_.command("perplexity")
@model_path
@recipe_option
@click.option("--max-tokens", type=int, default=None, help="Tokens per source (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_perplexity(model: Path, recipe: Path, max_tokens: int | None, as_json: bool) -> None:
    """Perplexity and bits per byte of any model on the run's validation split, per source
    and for domain versus general text (eval.general_sources)."""
    from domainlm.eval.tasks import perplexity
    from domainlm.recipe import load_recipe

    r = perplexity(model, load_recipe(recipe), max_tokens)
    if as_json:
        _print(r, True)
        return
    rows = [*r["sources"].items(), *r["groups"].items(), ("overall", r["overall"])]
    for name, s in rows:
        click.echo(
            f"{name:20s} tokens {s['tokens']:>10,}  perplexity {s['ppl']:10.3f}  "
            f"bits/byte {s['bits_per_byte']:.4f}"
        )


@eval_.command("generate")
@model_path
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="JSONL with `prompt` and `reference` per line.")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user turn (chat template).")
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True)
@click.option("--recipe", "-r", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The run whose tokenizer to use when the model folder has none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_generate(model: Path, data: Path, chat: bool, max_new_tokens: int,
                  recipe: Path | None, as_json: bool) -> None:
    """Greedy answers to a JSONL of prompts, scored against the references: BLEU
    (sacrebleu), ROUGE-1/2/L (rouge-score) and exact match."""
    from domainlm.eval.tasks import generation
    from domainlm.recipe import load_recipe

    rec = load_recipe(recipe) if recipe else None
    _print(generation(model, data, rec, max_new_tokens, chat), as_json)


@eval_.command("fewshot")
@model_path
@click.option("--shots", required=True, type=click.Path(path_type=Path),
              help="JSONL of labelled examples (`text`, `label`) to draw the k shots from.")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="JSONL of labelled texts to classify (`text`, `label`).")
@click.option("--labels", required=True, help="The label words, comma-separated.")
@click.option("--k", type=int, default=4, show_default=True, help="Examples in each prompt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--recipe", "-r", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The run whose tokenizer to use when the model folder has none.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_fewshot(model: Path, shots: Path, data: Path, labels: str, k: int, seed: int,
                 recipe: Path | None, as_json: bool) -> None:
    """Few-shot classification by the likelihood of each label word after k examples:
    accuracy, macro F1 and the confusion counts."""
    from domainlm.eval.tasks import fewshot
    from domainlm.recipe import load_recipe

    rec = load_recipe(recipe) if recipe else None
    names = [x.strip() for x in labels.split(",") if x.strip()]
    _print(fewshot(model, shots, data, names, k, seed, rec), as_json)


@eval_.command("metrics")
@click.option("--reference", "-r", "references", multiple=True, required=True,
              help="A reference text (repeat, paired in order with --prediction).")
@click.option("--prediction", "-p", "predictions", multiple=True, required=True,
              help="A predicted text (repeat).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_metrics(references: tuple[str, ...], predictions: tuple[str, ...], as_json: bool) -> None:
    """BLEU (sacrebleu), ROUGE-1/2/L F-measure (rouge-score) and exact match of
    prediction/reference pairs, as the reference implementations compute them, all on 0-1
    (BLEU is sacrebleu's 0-100 score / 100)."""
    import json

    from domainlm.metrics import all_metrics

    if len(references) != len(predictions):
        raise UserError(
            f"{len(references)} --reference but {len(predictions)} --prediction: give them in pairs"
        )
    scores = all_metrics(list(references), list(predictions))
    if as_json:
        click.echo(json.dumps(scores, sort_keys=True))
    else:
        for k, v in scores.items():
            click.echo(f"{k:12s} {v:.4f}")
