"""The Lightning machinery every training stage shares: the Trainer (loggers, checkpoints,
throughput, clean stop), checkpoint folders that know which run they belong to, and a CSV log
that survives resumes."""

from __future__ import annotations

import contextlib
import contextvars
import csv
import os
import shutil
from pathlib import Path

from domainlm.files import atomic_path, read_json, write_json
from domainlm.recipe import EarlyStoppingConfig, TrainConfig
from domainlm.train.settings import RunSettings


def checkpoint_dir(out: Path, run_fp: str, force: bool, say) -> tuple[Path, Path | None]:
    """The checkpoint folder and the checkpoint to resume from. The checkpoints of another run
    are set aside in checkpoints.previous/, not deleted: they go only when the new run has
    finished (drop_previous_checkpoints), so a run that fails destroys nothing."""
    ckpt_dir = out / "checkpoints"
    run_file = ckpt_dir / "run.json"
    if ckpt_dir.exists():
        old = read_json(run_file).get("fingerprint") if run_file.exists() else None
        if force or old != run_fp:
            why = "--force" if force else "the recipe, plan or data changed"
            aside = previous_checkpoints(out)
            say(f"{out.name}: starting afresh ({why}); the old checkpoints are kept in {aside}/ "
                "until this run finishes")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(ckpt_dir, aside)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, {"fingerprint": run_fp})
    # last.ckpt is written just after each periodic step-*.ckpt; a kill between the two leaves
    # the step checkpoint newer, so resume from whichever holds the later step.
    candidates = [ckpt_dir / "last.ckpt", *ckpt_dir.glob("step-*.ckpt")]
    existing = [p for p in candidates if p.is_file()]
    if not existing:
        return ckpt_dir, None
    return ckpt_dir, max(existing, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"))


def previous_checkpoints(out: Path) -> Path:
    return out / "checkpoints.previous"


def drop_previous_checkpoints(out: Path) -> None:
    """The run finished: the checkpoints of the run before it are no longer needed."""
    shutil.rmtree(previous_checkpoints(out), ignore_errors=True)


@contextlib.contextmanager
def kept_csv_log(path: Path):
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
            merge_csv(old, path)
            old.unlink()


def merge_csv(old: Path, new: Path) -> None:
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


# Callbacks that a driver of whole stages (the sweep) adds to the Trainers built while it runs
# them: a function of a run's output folder that returns the callbacks for that run.
_OUTER_CALLBACKS: contextvars.ContextVar = contextvars.ContextVar("outer_callbacks", default=None)


@contextlib.contextmanager
def outer_callbacks(factory):
    """Every Trainer that build_trainer makes inside this block also gets factory(out)."""
    token = _OUTER_CALLBACKS.set(factory)
    try:
        yield
    finally:
        _OUTER_CALLBACKS.reset(token)


BEST = "val/loss"  # what early stopping watches and the best checkpoint is chosen by


def build_trainer(
    s: RunSettings,
    t: TrainConfig,
    out: Path,
    module,
    *,
    has_val: bool,
    progress: bool,
    extra_callbacks: tuple = (),
    early_stopping: EarlyStoppingConfig | None = None,
    loggers: bool = True,
):
    """The Lightning Trainer of a run (also what `make bench` times): (trainer, the
    throughput callback, the clean-stop callback). Checkpoints go to out/checkpoints/, logs
    to out/logs/. With early_stopping (and validation), training stops after `patience`
    validations without improvement, and checkpoints/best-*.ckpt keeps the best weights
    (restore_best loads them). Without loggers (the GPU check, where TensorBoard may not be
    installed) nothing is logged to files."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar
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
    if early_stopping is not None and early_stopping.patience and has_val:
        callbacks += [
            EarlyStopping(
                monitor=BEST,
                mode="min",
                patience=early_stopping.patience,
                min_delta=early_stopping.min_delta,
            ),
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best-{step:06d}",
                monitor=BEST,
                mode="min",
                save_top_k=1,
                auto_insert_metric_name=False,
            ),
        ]
    if progress:
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every))
    callbacks += list(extra_callbacks)
    outer = _OUTER_CALLBACKS.get()
    if outer is not None:
        callbacks += list(outer(out))
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
        # The module logs (and syncs) only on the steps the loggers write.
        log_every_n_steps=t.log_every,
        logger=[
            CSVLogger(logs, name="", version=""),
            TensorBoardLogger(logs, name="tensorboard", version="", default_hp_metric=False),
        ] if loggers else False,
        callbacks=callbacks,
        use_distributed_sampler=False,
        enable_progress_bar=progress,
        enable_model_summary=progress,
        default_root_dir=out,
    )
    return trainer, throughput, stop


def restore_best(trainer, module) -> dict:
    """After an early-stopping run: load the best validation's weights into module (the model
    a stage saves is then the best one, not the last) and say what happened; {} without."""
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    best = next((c for c in trainer.callbacks
                 if isinstance(c, ModelCheckpoint) and c.monitor == BEST), None)
    if stopper is None or best is None or not best.best_model_path:
        return {}
    state = torch.load(best.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return {
        "best_step": int(state["global_step"]),
        "best_val_loss": float(best.best_model_score),
        "last_step": int(trainer.global_step),
        "stopped_early": bool(stopper.stopped_epoch) or trainer.global_step < trainer.max_steps,
    }


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
