"""`make pretrain`: train the decoder from scratch with Lightning, resumable, then export it."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.files import atomic_path, hash_file, hash_json, read_json, versions, write_json
from domainlm.recipe import Recipe, TrainConfig
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


def _checkpoint_dir(out: Path, run_fp: str, force: bool, say) -> tuple[Path, Path | None]:
    """The checkpoint folder, emptied when it belongs to another run; the checkpoint to resume."""
    ckpt_dir = out / "checkpoints"
    run_file = ckpt_dir / "run.json"
    if ckpt_dir.exists():
        old = read_json(run_file).get("fingerprint") if run_file.exists() else None
        if force or old != run_fp:
            why = "--force" if force else "the recipe, plan or data changed"
            say(f"pretrain: starting afresh ({why}); removing {ckpt_dir}/")
            shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"fingerprint": run_fp})
    last = ckpt_dir / "last.ckpt"
    return ckpt_dir, (last if last.exists() else None)


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
    ckpt_dir, resume = _checkpoint_dir(out, run_fp, force, say)

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
    with _kept_csv_log(out / "logs" / "metrics.csv"):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    train_seconds = time.time() - train_start
    if stop.requested:
        raise Interrupted(
            f"training stopped ({stop.requested}) at step {trainer.global_step} of "
            f"{s.total_steps}, checkpoint {last_ckpt}: run `make pretrain` again to continue"
        )
    sharded = s.strategy == "fsdp" or s.strategy.startswith("deepspeed")
    if sharded:
        # The weights are spread over the ranks: every rank writes its part of one checkpoint,
        # from which rank 0 assembles the full model.
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


@contextlib.contextmanager
def _kept_csv_log(path: Path):
    """Keep the CSV log of the steps before a resume (Lightning's CSVLogger starts a new file).

    The earlier rows of steps the resumed run does again (those after its checkpoint) are
    dropped, so the file is the trajectory of the weights that were kept.
    """
    old = path.with_name(path.name + ".before-resume")
    if path.exists():
        os.replace(path, old)
    try:
        yield
    finally:
        if old.exists():
            _merge_csv(old, path)
            old.unlink()


def _merge_csv(old: Path, new: Path) -> None:
    with open(old, newline="") as f:
        before = list(csv.DictReader(f))
    after: list[dict] = []
    if new.exists():
        with open(new, newline="") as f:
            after = list(csv.DictReader(f))
    first = min((int(r["step"]) for r in after if r.get("step")), default=None)
    rows = [r for r in before if first is None or int(r.get("step") or 0) < first] + after
    keys = sorted({k for r in rows for k in r})
    with atomic_path(new) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def build_trainer(
    s: RunSettings,
    t: TrainConfig,
    out: Path,
    module,
    *,
    has_val: bool,
    progress: bool,
    extra_callbacks: tuple = (),
):
    """The Lightning Trainer of a run (also what `make bench` times): (trainer, the
    throughput callback, the clean-stop callback). Checkpoints go to out/checkpoints/, logs
    to out/logs/."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from domainlm.train.callbacks import GracefulStop, ThroughputBar

    ckpt_dir = out / "checkpoints"
    stop = GracefulStop(ckpt_dir / "last.ckpt", check_every=t.log_every)
    throughput = ThroughputBar(
        t.log_every,
        tokens_per_step=s.micro_batch * s.grad_accum * s.seq_len,
        flops_per_step=module.flops_per_batch * s.grad_accum,
    )
    callbacks = [
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step-{step:06d}",
            every_n_train_steps=t.ckpt_every,
            save_top_k=1,
            save_last=True,
        ),
        throughput,
        stop,
    ]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every))
    callbacks += list(extra_callbacks)
    logs = out / "logs"
    trainer = L.Trainer(
        accelerator=s.accelerator,
        devices=s.devices,
        num_nodes=s.num_nodes,
        strategy=_strategy(s),
        precision=s.precision,
        max_steps=s.total_steps,
        max_epochs=-1,
        accumulate_grad_batches=s.grad_accum,
        gradient_clip_val=t.grad_clip,
        val_check_interval=min(t.val_every, s.total_steps) * s.grad_accum if has_val else None,
        check_val_every_n_epoch=None,
        limit_val_batches=1.0 if has_val else 0,
        num_sanity_val_steps=0,
        # The module logs only every train.log_every steps (and syncs only then), so the
        # loggers write whatever was logged, at once.
        log_every_n_steps=1,
        logger=[
            CSVLogger(logs, name="", version=""),
            TensorBoardLogger(logs, name="tensorboard", version="", default_hp_metric=False),
        ],
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        default_root_dir=out,
    )
    return trainer, throughput, stop


def _strategy(s: RunSettings):
    """The Lightning strategy object (or name) for the resolved settings."""
    if s.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from domainlm.model.llama import Block

        # Shard block by block; a full state dict in one file, so export and resume read it.
        return FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if s.checkpointing else None,
            state_dict_type="full",
        )
    return s.strategy
