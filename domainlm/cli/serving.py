"""`domainlm generate|serve`: text from any model the pipeline wrote, on the command line or
over an OpenAI-compatible HTTP API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from domainlm.cli.base import DEFAULT_RECIPE, _friendly, main
from domainlm.errors import UserError
from domainlm.recipe.layout import RunLayout

model_option = click.option(
    "--model",
    "-m",
    type=click.Path(path_type=Path),
    help="Any model the pipeline writes: a model folder (float or int8/int4), a .gguf file, or "
    "an adapter folder (LoRA, prompt tuning, bottleneck) on its base. Default: the demo run's "
    "fine-tuned model (sft/full/model) if it exists, else its pretrained one.",
)


def _model_dir(model: Path | None) -> Path:
    if model is not None:
        return model
    layout = RunLayout("build", Path(DEFAULT_RECIPE).stem)
    found = layout.models()
    for name in ("full", "base"):
        if name in found:
            return found[name]
    raise UserError(
        f"no model at {layout.sft_model('full')} or {layout.pretrain_model}: run `make "
        "finetune` (or `make pretrain`) first, or pass --model PATH"
    )


@main.command("generate")
@model_option
@click.option(
    "--adapter",
    type=click.Path(file_okay=False, path_type=Path),
    help="A LoRA adapter folder (adapter_config.json + adapter_model.safetensors, e.g. "
    "build/demo/sft/lora/model) to apply on top of --model.",
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
    from domainlm.model.decode import SamplingParams
    from domainlm.serve.engine import Engine

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
@click.option("--max-batch", default=64, show_default=True, type=click.IntRange(1),
              help="Sequences decoded together; more requests wait for a free row.")
@click.option("--batch-per-adapter", is_flag=True,
              help="Decode each adapter's requests in a batch of their own (stepped in turn) "
              "instead of one batch for all adapters.")
@click.option("--allow-adapter-updates", is_flag=True,
              help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they load "
              "any folder the server can read: only on a trusted network).")
@click.option("--idle-timeout", default=30.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--workers", default=64, show_default=True, type=click.IntRange(1),
              help="Requests served at once (threads); further requests wait in line.")
@_friendly
def serve(model: Path | None, adapters: tuple[str, ...], host: str, port: int,
          name: str | None, max_batch: int, batch_per_adapter: bool,
          allow_adapter_updates: bool, idle_timeout: float, workers: int) -> None:
    """Serve the model and its adapters over an OpenAI-compatible HTTP API.

    Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming
    with "stream": true), POST /tokenize and /detokenize, GET /metrics (Prometheus), GET
    /health. Any OpenAI client works: base_url http://HOST:PORT/v1, any api_key, model = the
    base's name or an adapter's NAME. Concurrent requests are decoded together in one batch
    (continuous batching); see docs/serve.md.
    """
    from domainlm.serve.engine import Engine
    from domainlm.serve.server import serve as run

    named: dict[str, Path] = {}
    for item in adapters:
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise UserError(
                f"--adapter {item!r}: write NAME=PATH, e.g. lora=build/demo/sft/lora/model"
            )
        named[key] = Path(path)
    engine = Engine(_model_dir(model), named, name, max_batch=max_batch,
                    mix_adapters=not batch_per_adapter)
    run(engine, host, port, allow_adapter_updates=allow_adapter_updates,
        idle_timeout=idle_timeout, workers=workers)
