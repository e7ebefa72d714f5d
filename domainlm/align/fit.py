"""One alignment method trained with the project's Trainer: checkpoints that know their run,
resume from the latest one, the CSV log kept across resumes, the clean stop on Ctrl-C."""

from __future__ import annotations

import dataclasses
import time

import click
import lightning as L

from domainlm.errors import UserError
from domainlm.files import hash_json
from domainlm.recipe import Recipe, TrainConfig
from domainlm.train.loop import build_trainer, checkpoint_dir, kept_csv_log, restore_best
from domainlm.train.settings import RunSettings, resolve_accelerator


def train_config(recipe: Recipe, lr: float, steps: int, *, ckpt_every: int | None = None,
                 grad_clip: float | None = None) -> TrainConfig:
    """The train: section as alignment uses it: its precision, betas and clipping, with the
    method's learning rate and cadences scaled to its (few) steps; always AdamW (Muon, a
    pretraining choice, is not used on adapters or a policy: docs/align.md)."""
    a, t = recipe.align, recipe.train
    return dataclasses.replace(
        t, optimizer="adamw", lr=lr, warmup_steps=a.warmup_steps, weight_decay=a.weight_decay,
        compile=False, activation_checkpointing=False, val_batches=None,
        val_every=max(1, min(t.val_every, steps // 4 or 1)),
        ckpt_every=ckpt_every or max(1, min(t.ckpt_every, steps // 4 or 1)),
        log_every=max(1, min(t.log_every, steps // 20 or 1)),
        grad_clip=t.grad_clip if grad_clip is None else grad_clip,
    )


def fit(recipe: Recipe, name: str, module: L.LightningModule, data: L.LightningDataModule,
        train_cfg: TrainConfig, *, total_steps: int, micro_batch: int, grad_accum: int,
        seq_len: int, fingerprint: str, force: bool, progress: bool) -> float:
    """Train `module` in align/<name>/ for total_steps optimizer steps, resuming from the
    checkpoints of the same run (the stage's fingerprint); returns the seconds it took. A
    stop on Ctrl-C or SIGTERM checkpoints and ends in a UserError that says how to go on. With
    train.early_stopping the module ends with the weights of its best validation."""
    out = recipe.layout.align_method(name)
    ckpt_dir, resume = checkpoint_dir(out, hash_json([fingerprint, name]), force, click.echo)
    settings = RunSettings(
        config=getattr(module.model, "config", None), seq_len=seq_len, micro_batch=micro_batch,
        grad_accum=grad_accum, devices=1, num_nodes=1, total_steps=total_steps,
        accelerator=resolve_accelerator(recipe.train.accelerator), strategy="auto",
        precision=recipe.train.precision, checkpointing=False,
    )
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    trainer, _, stop = build_trainer(settings, train_cfg, out, module,
                                     has_val=getattr(data, "has_val", False), progress=progress,
                                     early_stopping=recipe.train.early_stopping)
    t = time.time()
    with kept_csv_log(out / "logs" / "metrics.csv"):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    if stop.requested:
        raise UserError(
            f"align ({name}) stopped ({stop.requested}) at step {trainer.global_step} of "
            f"{total_steps}, checkpoint {ckpt_dir / 'last.ckpt'}: run `make align` again to "
            "continue"
        )
    seconds = round(time.time() - t, 1)
    best = restore_best(trainer, module)  # with train.early_stopping: the best validation's
    if best:
        click.echo(f"align: {name}: early stopping: kept step {best['best_step']} of "
                   f"{best['last_step']} (validation loss {best['best_val_loss']:.4f})")
    return seconds
