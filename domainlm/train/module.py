"""The LightningModule that trains our decoder on next-token prediction (pretraining)."""

from __future__ import annotations

import math
from dataclasses import asdict

import lightning as L
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from domainlm.errors import UserError
from domainlm.model.llama import Llama
from domainlm.recipe import TrainConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.train import optim
from domainlm.train.data import StepSampler


class Diverged(UserError):
    """The training loss stopped being a finite number; no checkpoint of it was written."""


def passes(trainer, steps_done: int) -> float | None:
    """Passes over the training windows after `steps_done` optimizer steps, or None when the
    loader is not a StepSampler's. Lightning's own epoch counter stays 0 for the whole run:
    the step sampler yields every step as one epoch (its position is the step, so a resume
    needs no loader state), so the logged `epoch` is this instead."""
    sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
    if not isinstance(sampler, StepSampler):
        return None
    return steps_done * sampler.global_batch / sampler.n_windows


class PretrainModule(L.LightningModule):
    """Our Llama decoder with AdamW and a warmup + cosine (or WSD) schedule; pretraining and
    fine-tuning both train with it (fine-tuning's targets mask the prompt with -100).

    Logged: train/loss (mean over the step's micro-batches, this rank; all ranks' mean when
    distributed), train/lr, val/loss, val/ppl and val/bpb (bits per byte: nats per token over
    ln 2 and the validation split's bytes per token, comparable across tokenizers).
    """

    def __init__(
        self,
        config: LlamaConfig,
        train: TrainConfig,
        *,
        total_steps: int,
        grad_accum: int,
        seq_len: int,
        micro_batch: int,
        val_bytes_per_token: float | None = None,
        fused_optimizer: bool = True,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # Plain data only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "config": asdict(config),
                "train": asdict(train),
                "total_steps": total_steps,
                "grad_accum": grad_accum,
                "seq_len": seq_len,
                "micro_batch": micro_batch,
            }
        )
        self.config = config
        self.last_val_step: int | None = None  # optimizer steps done at the last validation
        self.train_cfg = train
        self.total_steps = total_steps
        self.grad_accum = grad_accum
        self.val_bytes_per_token = val_bytes_per_token
        self.fused_optimizer = fused_optimizer
        # Fine-tuning passes a prepared model (a base with LoRA, adapters, a prompt, or some
        # weights frozen); it has Llama's forward(idx, targets) -> (logits, loss) contract.
        self.model = model if model is not None else Llama(config)
        if hasattr(self.model, "gradient_checkpointing"):
            self.model.gradient_checkpointing = bool(train.activation_checkpointing)
        # For Lightning's throughput utilities: the PaLM count, per micro-batch on one device.
        self.flops_per_batch = config.flops_per_token(seq_len) * micro_batch * seq_len
        self._step_loss: torch.Tensor | None = None
        self._val_sum: torch.Tensor | None = None
        # False once any training loss was NaN or inf: a device tensor, read (a host sync) only
        # when a step is logged and before a checkpoint is written, so the hot loop never waits.
        self._finite: torch.Tensor | None = None

    def configure_model(self) -> None:
        if self.train_cfg.compile:
            # Compile the blocks' math but keep the module (and its parameter names) intact.
            self.model.forward = torch.compile(self.model.forward)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        _, loss = self.model(x, y)
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        part = loss.detach() / self.grad_accum
        self._step_loss = part if self._step_loss is None else self._step_loss + part
        if (batch_idx + 1) % self.grad_accum == 0:
            # Lightning writes the logs of step s (0-based) when (s + 1) % log_every_n_steps
            # == 0; log exactly then, so nothing is computed (or synced) that is not written.
            step = self.global_step  # the optimizer step this micro-batch completes
            if (step + 1) % self.train_cfg.log_every == 0:
                self._log_step(self._step_loss)
            self._step_loss = None
        return loss

    def _log_step(self, step_loss: torch.Tensor) -> None:
        """Log the step's mean loss (over micro-batches, and over ranks) and learning rate.

        Only every log_every steps: that is the one host sync (and, distributed, the one
        all-reduce) the loop makes for logging. Values go to Lightning as CPU tensors, so
        its progress bar reads them without waiting for the GPU.
        """
        if self.trainer.world_size > 1:
            step_loss = self.trainer.strategy.reduce(step_loss, reduce_op="mean")
        value = step_loss.item()
        if not math.isfinite(value):
            self.diverged(f"the loss is {value}")
        self.log("train/loss", torch.tensor(value), prog_bar=True)
        self.log("train/lr", torch.tensor(self.lr_schedulers().get_last_lr()[0]))
        self._log_passes(self.global_step + 1)

    def _log_passes(self, steps_done: int) -> None:
        """Log `epoch` as the passes over the training data after `steps_done` optimizer steps
        (Lightning fills the loggers' `epoch` column only where the module logs none)."""
        done = passes(self.trainer, steps_done)
        if done is not None:
            self.log("epoch", torch.tensor(done, dtype=torch.float64), rank_zero_only=True)

    def check_finite(self) -> None:
        """Raise Diverged if any training loss so far was not finite (a host sync)."""
        finite = self._finite
        if finite is not None and self.trainer.world_size > 1:
            finite = self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        if finite is not None and not bool(finite):
            self.diverged("a training loss was NaN or inf")

    def diverged(self, what: str) -> None:
        raise Diverged(
            f"training diverged at step {self.global_step}: {what} (learning rate "
            f"{self.train_cfg.lr:g}). The last good checkpoint is kept; lower the learning "
            "rate, lengthen the warmup (warmup_steps) or clip gradients (train.grad_clip), "
            "then run again"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Never write a checkpoint of weights that a NaN or inf loss has already reached.
        self.check_finite()
        # The logs on disk keep up with the checkpoints: after a kill, the rows of the steps
        # before the checkpoint are there (CSVLogger otherwise writes every 100 rows).
        for logger in self.trainer.loggers:
            logger.save()

    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        _, loss = self.model(x, y)
        # Sum of token losses and the token count, reduced over ranks at the end: the exact
        # mean over every validation token, whatever the batch sizes.
        counted = (y != -100).sum().double()  # fine-tuning masks prompts and padding
        self._val_sum += torch.stack([loss.double() * counted, counted])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val_sum, reduce_op="sum")
        loss = total[0] / total[1].clamp(min=1)
        self.log("val/loss", loss.float(), prog_bar=True, rank_zero_only=True)
        self.log("val/ppl", torch.exp(loss).float(), rank_zero_only=True)
        if self.val_bytes_per_token:
            bpb = loss / math.log(2) / self.val_bytes_per_token
            self.log("val/bpb", bpb.float(), rank_zero_only=True)
        if not self.trainer.sanity_checking:
            self._log_passes(self.global_step)
            self.last_val_step = self.global_step

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        # Lightning refuses to clip for a fused optimizer under mixed precision, because with a
        # float16 loss scaler the fused step unscales internally. bf16 has no scaler, and the
        # gradients here are whole (DDP or one device: the only cases that get a fused AdamW,
        # or Muon), so clipping them directly is exact, in the model's parameter order.
        whole = optimizer.defaults.get("fused") or isinstance(optimizer, optim.MuonAdamW)
        if whole and gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = optim.make_optimizer(self.model, self.train_cfg, self.fused_optimizer)
        warmup = optim.warmup_steps(self.train_cfg, self.total_steps)
        total, cfg = self.total_steps, self.train_cfg
        schedule = LambdaLR(optimizer, lambda step: optim.lr_factor(step, total, warmup, cfg))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1},
        }
