"""`make pretrain`: train the decoder from scratch with Lightning, resumable, then export it."""

from __future__ import annotations

import dataclasses
import time

import click

from domainlm.errors import UserError
from domainlm.files import hash_file, hash_json, read_json, versions, write_json
from domainlm.recipe import Recipe
from domainlm.train.loop import build_trainer, checkpoint_dir, kept_csv_log
from domainlm.train.settings import RunSettings, resolve

STAGE_VERSION = 1
# Settings that change what is logged or exported, never the trained weights.
COSMETIC = ("val_every", "val_batches", "ckpt_every", "log_every", "sample_prompt")
COSMETIC += ("sample_tokens", "export_dtype")


class Interrupted(UserError):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""


def _run_fingerprint(recipe: Recipe, settings: RunSettings) -> str:
    """What the weights depend on: checkpoints from a run with another fingerprint are stale."""
    train = {k: v for k, v in dataclasses.asdict(recipe.train).items() if k not in COSMETIC}
    tokens = recipe.stage_dir("tokens")
    return hash_json(
        [
            STAGE_VERSION,
            recipe.seed,
            settings.to_dict(),
            train,
            hash_file(tokens / "meta.json"),
            hash_file(tokens / "manifest.json"),
        ]
    )


def _stage_fingerprint(recipe: Recipe, run_fp: str) -> str:
    t = recipe.train
    return hash_json([run_fp, t.export_dtype, t.sample_prompt, t.sample_tokens, t.val_batches])


def pretrain(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict:
    """Train (or resume) build/<run>/pretrain/ and export model/; returns the manifest."""
    import lightning as L

    from domainlm.train.data import PretrainData
    from domainlm.train.finish import finish
    from domainlm.train.module import PretrainModule

    t_start = time.time()
    say = click.echo
    out = recipe.stage_dir("pretrain")
    settings = resolve(recipe)
    run_fp = _run_fingerprint(recipe, settings)
    fingerprint = _stage_fingerprint(recipe, run_fp)
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint and (out / "model" / "config.json").exists():
            say(f"pretrain: up to date ({manifest_path}); nothing to do")
            return old
    if manifest_path.exists():
        manifest_path.unlink()  # incomplete until a new manifest is written
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
    if resume is not None:
        say(f"pretrain: resuming from {resume}")

    L.seed_everything(recipe.seed, workers=True, verbose=False)
    data = PretrainData(
        recipe.stage_dir("tokens"),
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
        s, t, out, module, has_val=data.has_val, progress=progress
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
        return {}
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
    manifest.update(
        fingerprint=fingerprint,
        run_fingerprint=run_fp,
        stage_version=STAGE_VERSION,
        settings=s.to_dict(),
        resumed_from=str(resume) if resume else None,
        seconds=round(time.time() - t_start, 1),
        versions=versions(),
    )
    write_json(manifest_path, manifest)
    return manifest
