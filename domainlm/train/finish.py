"""The end of `make pretrain`: full weights, validation on the whole split, the exported
model folder, and a sample continuation, all recorded in the stage's manifest."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from domainlm.files import hash_file
from domainlm.model.decode import generate
from domainlm.model.evaluate import evaluate_windows
from domainlm.model.llama import Llama
from domainlm.recipe import Recipe
from domainlm.train.settings import RunSettings


def full_state_dict(module, settings: RunSettings, final_ckpt: Path | None) -> dict:
    """The trained weights as one CPU float32 state dict (gathered from a sharded checkpoint)."""
    if final_ckpt is None:
        return {k: v.detach().float().cpu() for k, v in module.model.state_dict().items()}
    if settings.strategy.startswith("deepspeed"):
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "full.pt"
            convert_zero_checkpoint_to_fp32_state_dict(str(final_ckpt), str(path))
            state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    else:
        state = torch.load(final_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "model."
    return {k[len(prefix) :]: v.float() for k, v in state.items() if k.startswith(prefix)}


def sample(model: Llama, tokenizer_model: Path, prompt: str, tokens: int, seed: int) -> str:
    """A seeded continuation of `prompt` (temperature 0.8, top-k 40)."""
    import sentencepiece as spm

    from domainlm.tokenizer.special import EOS_ID

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    ids = sp.encode(prompt)
    room = model.config.max_seq_len - len(ids)
    if not ids or room < 1:
        return ""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = generate(
        model,
        torch.tensor([ids], device=device),
        min(tokens, room),
        temperature=0.8,
        top_k=40,
        eos_id=EOS_ID,
        generator=g,
    )
    new = [i for i in out[0, len(ids) :].tolist() if i != EOS_ID]
    return prompt + sp.decode(new)


def log_final_validation(trainer, module, metrics: dict) -> None:
    """The validation of the final weights, into the run's logs (metrics.csv, TensorBoard) at
    the last step, unless a periodic validation already fell on it: the loss curve then ends
    where training ended (val_every need not divide the steps)."""
    from domainlm.train.module import passes

    steps = trainer.global_step
    if steps == 0 or getattr(module, "last_val_step", None) == steps:
        return
    row = {"val/loss": metrics["val_loss"], "val/ppl": metrics["val_ppl"],
           "val/bpb": metrics["val_bpb"]}
    done = passes(trainer, steps)
    if done is not None:
        row["epoch"] = done
    for logger in trainer.loggers:
        logger.log_metrics(row, step=steps - 1)  # Lightning's step column: steps done - 1
        logger.save()


def finish(
    recipe: Recipe,
    settings: RunSettings,
    trainer,
    module,
    data,
    final_ckpt: Path | None,
    *,
    train_seconds: float,
    throughput: dict,
    say: Callable[[str], None],
) -> dict:
    from domainlm.model.hf import save_hf_folder
    from domainlm.plan.hardware import device_name
    from domainlm.tokenizer.arrays import TokenWindows
    from domainlm.tokenizer.templates import load_template
    from domainlm.train.data import unigram_baseline
    from domainlm.train.module import passes

    t = recipe.train
    out = recipe.layout.pretrain
    tokenizer_model = recipe.layout.tokenizer_model
    device = trainer.strategy.root_device if trainer.strategy.root_device.type == "cuda" else None
    device = device or torch.device("cpu")
    model = Llama(settings.config)
    model.load_state_dict(full_state_dict(module, settings, final_ckpt))
    model.to(device)

    metrics: dict = {
        "steps": trainer.global_step,
        "tokens": trainer.global_step * settings.tokens_per_step,
        "train_seconds": round(train_seconds, 1),
        "tokens_per_s": throughput.get("tokens_per_s"),
        "mfu": throughput.get("mfu"),
        "unigram_baseline": unigram_baseline(data.train_arrays, data.val_arrays)
        if data.has_val
        else None,
        "passes": passes(trainer, trainer.global_step),  # over the training windows
        "hardware": device_name(),
    }
    if data.has_val:
        loss = evaluate_windows(model, TokenWindows(data.val_arrays, settings.seq_len)).loss
        metrics.update(
            val_loss=loss,
            val_ppl=math.exp(loss),
            val_bpb=loss / math.log(2) / data.val_bytes_per_token,
        )
        log_final_validation(trainer, module, metrics)
        say(
            f"pretrain: validation loss {loss:.3f} nats/token, perplexity {math.exp(loss):.2f}, "
            f"{metrics['val_bpb']:.3f} bits/byte (unigram baseline "
            f"{metrics['unigram_baseline']:.3f} nats/token, perplexity "
            f"{math.exp(metrics['unigram_baseline']):.1f})"
        )
    # The chat template of the recipe's fine-tuning: adapters are served on this folder.
    template = load_template(recipe.finetune.template).source
    folder = save_hf_folder(
        model.cpu().float(), tokenizer_model, out / "model", dtype=t.export_dtype,
        chat_template=template,
    )
    text = sample(model, tokenizer_model, t.sample_prompt, t.sample_tokens, recipe.seed)
    metrics["sample"] = {"prompt": t.sample_prompt, "text": text}
    say(f"pretrain: wrote {folder}/ (loads with transformers.AutoModelForCausalLM)")
    say(f"pretrain: sample: {text!r}")
    outputs = {
        str(p.relative_to(out)): hash_file(p) for p in sorted(folder.iterdir()) if p.is_file()
    }
    return {"metrics": metrics, "outputs": outputs}
