"""`make pretrain`: train the decoder from scratch with Lightning, resumable, then export it."""

from __future__ import annotations

import dataclasses
import time

import click

from domainlm.errors import UserError
from domainlm.files import hash_json
from domainlm.recipe import Recipe
from domainlm.stage import Stage, file_inputs, run_stage
from domainlm.tokenizer.templates import load_template
from domainlm.train.loop import (
    build_trainer,
    checkpoint_dir,
    drop_previous_checkpoints,
    kept_csv_log,
    previous_checkpoints,
)
from domainlm.train.settings import RunSettings, resolve

STAGE_VERSION = 1
# Settings that change what is logged or exported, never the trained weights.
COSMETIC = ("val_every", "val_batches", "ckpt_every", "log_every", "sample_prompt")
COSMETIC += ("sample_tokens", "export_dtype")
# Read by fine-tuning and alignment only.
COSMETIC += ("early_stopping",)


class Interrupted(UserError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""


def pretrain_stage(recipe: Recipe, settings: RunSettings) -> tuple[Stage, str]:
    """The stage, and the fingerprint of what the weights depend on (checkpoints of a run with
    another one are stale): the token arrays, the seed, the resolved run and the train section
    but for the settings that only change logging or the export."""
    layout = recipe.layout
    inputs = _inputs(recipe)
    weights = _weights(recipe, settings)
    t = recipe.train
    outputs = {k: getattr(t, k) for k in ("export_dtype", "sample_prompt", "sample_tokens")}
    # The base folder carries the chat template its fine-tuned adapters are served with.
    outputs["chat_template"] = load_template(recipe.finetune.template).source
    stage = Stage(
        "pretrain",
        layout.manifest("pretrain"),
        inputs,
        {**weights, "outputs": outputs, "val_batches": t.val_batches},
        STAGE_VERSION,
        outputs=[layout.pretrain_model / "config.json"],
        hashes=layout.hashes,
    )
    return stage, hash_json([STAGE_VERSION, stage.input_hashes(), weights])


def _inputs(recipe: Recipe) -> dict:
    layout = recipe.layout
    arrays = sorted(p for p in layout.tokens.iterdir() if p.suffix in (".bin", ".npy"))
    return file_inputs([*arrays, layout.tokens / "meta.json", layout.tokenizer_model],
                       layout.root)


def _weights(recipe: Recipe, settings: RunSettings) -> dict:
    train = {k: v for k, v in dataclasses.asdict(recipe.train).items() if k not in COSMETIC}
    return {"seed": recipe.seed, "settings": settings.to_dict(), "train": train}


def trunk_key(recipe: Recipe, settings: RunSettings) -> str:
    """What a run's wsd-trunk.ckpt must match for this run to start from it: everything the
    weights depend on but the run's length (tokens, steps) and its warmup length."""
    weights = _weights(recipe, settings)
    for k in ("tokens", "total_steps"):
        weights["settings"].pop(k)
    for k in ("tokens", "warmup_steps"):
        weights["train"].pop(k)
    layout = recipe.layout
    stage = Stage("pretrain", layout.manifest("pretrain"), _inputs(recipe), {}, 0,
                  hashes=layout.hashes)
    return hash_json(["wsd-trunk", STAGE_VERSION, stage.input_hashes(), weights])


def pretrain(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict:
    """Train (or resume) build/<run>/pretrain/ and export model/; returns the manifest."""
    settings = resolve(recipe)
    if not (recipe.layout.manifest("tokens")).is_file():
        raise UserError(
            f"{recipe.layout.tokens} is not built: run `make tokens RECIPE={recipe.path}` first"
        )
    stage, run_fp = pretrain_stage(recipe, settings)
    return run_stage(
        stage, lambda _: _train(recipe, settings, run_fp, force, progress), force=force
    )


def _train(
    recipe: Recipe, settings: RunSettings, run_fp: str, force: bool, progress: bool
) -> dict | None:
    """The stage's work: train from the newest checkpoint of this run (or afresh), then finish."""
    import lightning as L

    from domainlm.train.data import PretrainData
    from domainlm.train.finish import finish
    from domainlm.train.module import PretrainModule

    say = click.echo
    out = recipe.layout.pretrain
    ckpt_dir, resume = checkpoint_dir(out, run_fp, force, say)

    t = recipe.train
    s = settings
    say(
        f"pretrain: {s.params:,} params ({s.config.n_layers} layers, d_model {s.config.d_model}), "
        f"{s.tokens:,} tokens in {s.total_steps:,} steps of {s.tokens_per_step:,} "
        f"(micro-batch {s.micro_batch} x {s.grad_accum} accumulation x {s.world_size} "
        f"device(s), seq_len {s.seq_len}), {s.precision} on {s.accelerator}, "
        f"strategy {s.strategy}"
    )
    for note in s.notes:
        say(f"pretrain: note: {note}")
    trunk_cb = None
    if t.schedule == "wsd":
        from domainlm.train import optim
        from domainlm.train.extend import TrunkCheckpoint, find_trunk

        key = trunk_key(recipe, s)
        warmup = optim.warmup_steps(t, s.total_steps)
        start = optim.decay_start(t, s.total_steps, warmup)
        if resume is None and not force:
            resume = find_trunk([previous_checkpoints(out)], key, warmup, start)
            if resume is not None:
                say(f"pretrain: extending a shorter wsd run from its decay start ({resume})")
        if start > 0:
            trunk_cb = TrunkCheckpoint(ckpt_dir, key, start)
    if resume is not None:
        say(f"pretrain: resuming from {resume}")

    L.seed_everything(recipe.seed, workers=True, verbose=False)
    data = PretrainData(
        recipe.layout.tokens,
        seq_len=s.seq_len,
        micro_batch=s.micro_batch,
        grad_accum=s.grad_accum,
        total_steps=s.total_steps,
        seed=recipe.seed,
        val_batches=t.val_batches,
    )
    data.setup("fit")
    # Under FSDP the strategy wraps each block for checkpointing; elsewhere the model does it.
    own_checkpointing = s.checkpointing and s.strategy != "fsdp"
    train_cfg = dataclasses.replace(t, activation_checkpointing=own_checkpointing)
    module = PretrainModule(
        s.config,
        train_cfg,
        total_steps=s.total_steps,
        grad_accum=s.grad_accum,
        seq_len=s.seq_len,
        micro_batch=s.micro_batch,
        val_bytes_per_token=data.val_bytes_per_token if data.has_val else None,
        fused_optimizer=s.strategy in ("auto", "ddp") and s.precision != "16-mixed",
    )
    last_ckpt = ckpt_dir / "last.ckpt"
    trainer, throughput, stop = build_trainer(
        s, t, out, module, has_val=data.has_val, progress=progress,
        extra_callbacks=(trunk_cb,) if trunk_cb else (),
    )
    train_start = time.time()
    with kept_csv_log(out / "logs" / "metrics.csv"):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    train_seconds = time.time() - train_start
    if stop.requested:
        raise Interrupted(
            f"training stopped ({stop.requested}) at step {trainer.global_step} of "
            f"{s.total_steps}, checkpoint {last_ckpt}: run `make pretrain` again to continue"
        )
    sharded = s.strategy == "fsdp" or s.strategy.startswith("deepspeed")
    # A checkpoint of the last step too (the periodic ones need not fall on it), so a later
    # stage or a longer run can start from the end. Under FSDP/DeepSpeed every rank writes its
    # part of it, and rank 0 assembles the full model from it.
    trainer.save_checkpoint(last_ckpt)
    if sharded:
        trainer.save_checkpoint(ckpt_dir / "final.ckpt")
    if trainer.global_rank != 0:
        return None
    manifest = finish(
        recipe,
        settings,
        trainer,
        module,
        data,
        ckpt_dir / "final.ckpt" if sharded else None,
        train_seconds=train_seconds,
        throughput=throughput.last,
        say=say,
    )
    drop_previous_checkpoints(out)
    manifest.update(
        run_fingerprint=run_fp,
        settings=s.to_dict(),
        resumed_from=str(resume) if resume else None,
    )
    return manifest
