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


# ----------------------------------------------------------------------------- generate, serve

DEFAULT_MODELS = (Path("build/demo/sft/full/model"), Path("build/demo/pretrain/model"))

model_option = click.option(
    "--model",
    "-m",
    type=click.Path(file_okay=False, path_type=Path),
    help="A Hugging Face model folder (config.json, model.safetensors, tokenizer.model). "
    "Default: build/demo/sft/full/model if it exists, else build/demo/pretrain/model.",
)


def _model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    found = next((p for p in DEFAULT_MODELS if (p / "config.json").is_file()), None)
    if found is None:
        raise UserError(
            f"no model at {' or '.join(map(str, DEFAULT_MODELS))}: run `make finetune` (or "
            "`make pretrain`) first, or pass --model FOLDER"
        )
    return found


@main.command("generate")
@model_option
@click.option(
    "--adapter",
    type=click.Path(file_okay=False, path_type=Path),
    help="A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. "
    "build/demo/sft/lora) to apply on top of --model.",
)
@click.option("--prompt", "-p", help="Text to continue as it is (no template).")
@click.option(
    "--chat",
    "-c",
    help="A user message: rendered with the model's chat template, the reply stops at its "
    "end-of-turn string.",
)
@click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True,
              help="0: greedy (deterministic); higher: more random sampling.")
@click.option("--top-k", type=int, help="Sample only from the k most probable tokens.")
@click.option("--top-p", type=float,
              help="Sample only from the smallest set of tokens whose probability reaches p.")
@click.option("--stop", multiple=True,
              help="Stop when this text appears (not printed); repeat for several.")
@click.option("--seed", type=int, help="Seed for sampling: the same seed gives the same text.")
@click.option("--no-cache", is_flag=True,
              help="Recompute every position instead of using the KV cache (slower; the same "
              "greedy text; for checking).")
@_friendly
def generate(model: Path | None, adapter: Path | None, prompt: str | None, chat: str | None,
             max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
             stop: tuple[str, ...], seed: int | None, no_cache: bool) -> None:
    """Continue a prompt (--prompt) or answer a message (--chat), streaming the text to stdout.

    A prompt too long for the model's context loses tokens from its start (a note says so on
    stderr). The finish reason and token counts go to stderr.
    """
    from domainlm.serve.generate import Engine, SamplingParams

    if (prompt is None) == (chat is None):
        raise UserError("give exactly one of --prompt TEXT and --chat TEXT")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, stop=list(stop), seed=seed, use_cache=not no_cache)
    adapters = {adapter.name: adapter} if adapter else {}
    engine = Engine(_model_dir(model), adapters)
    name = adapter.name if adapter else engine.name
    text: str | list[dict] = prompt if prompt is not None else [{"role": "user", "content": chat}]
    pieces = engine.stream(name, text, params)
    if pieces.truncated:
        click.echo(f"note: the prompt's first {pieces.truncated} tokens were dropped to fit the "
                   f"model's context of {engine.context} tokens", err=True)
    for piece in pieces:
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    click.echo(f"[{pieces.finish_reason}: {pieces.prompt_tokens} prompt tokens, "
               f"{pieces.completion_tokens} generated]", err=True)


@main.command("serve")
@model_option
@click.option(
    "--adapter",
    "adapters",
    multiple=True,
    metavar="NAME=PATH",
    help="A LoRA adapter folder served as model NAME on the same base; repeat for several.",
)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; there is no authentication).")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to listen on.")
@click.option("--name", help="The base model's name in requests (default: its folder's name, "
              "or the parent's when the folder is called model).")
@_friendly
def serve(model: Path | None, adapters: tuple[str, ...], host: str, port: int,
          name: str | None) -> None:
    """Serve the model and its adapters over an OpenAI-compatible HTTP API.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming
    with "stream": true). Any OpenAI client works: base_url http://HOST:PORT/v1, any api_key,
    model = the base's name or an adapter's NAME. Requests are answered one at a time; this is
    a reference server, serve the exported folder with vLLM for production traffic.
    """
    from domainlm.serve.generate import Engine
    from domainlm.serve.server import serve as run

    named: dict[str, Path] = {}
    for item in adapters:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise UserError(f"--adapter {item!r}: write NAME=PATH, e.g. lora=build/demo/sft/lora")
        named[key] = Path(path)
    run(Engine(_model_dir(model), named, name), host, port)


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
    """BLEU (sacrebleu, 0-100), ROUGE-1/2/L F-measure (rouge-score) and exact match of
    prediction/reference pairs, as the reference implementations compute them."""
    import json

    from domainlm.eval.metrics import all_metrics

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


if __name__ == "__main__":  # pragma: no cover
    main()
