"""Training callbacks: tokens/s and MFU on the progress bar, and a clean stop on Ctrl-C/SIGTERM."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops


class ThroughputBar(L.Callback):
    """tokens/s and MFU from Lightning's `Throughput`, measured every `every` optimizer steps.

    Only then does it wait for the GPU (so the hot loop has no host sync per step), and time
    spent in validation is left out. MFU is against the device's dense peak for the compute
    dtype as Lightning's table knows it; on a CPU there is no such peak, so only tokens/s.
    """

    def __init__(self, every: int, tokens_per_step: int, flops_per_step: float, window: int = 5):
        self.every = max(1, every)
        self.tokens_per_step = tokens_per_step  # per device
        self.flops_per_step = flops_per_step  # per device
        self.window = max(2, window)
        self._paused = 0.0
        self._t0 = 0.0
        self._val_t0 = 0.0
        self._steps = 0
        self.throughput: Throughput | None = None
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(
            str(trainer.precision).split("-")[0], torch.float32
        )
        peak = get_available_flops(device, dtype) if device.type == "cuda" else None
        self.throughput = Throughput(
            available_flops=peak, world_size=trainer.world_size, window_size=self.window
        )
        self._t0, self._paused, self._steps = time.perf_counter(), 0.0, 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        accum = getattr(pl_module, "grad_accum", 1)
        if (batch_idx + 1) % accum:
            return
        self._steps += 1
        # global_step has counted this step already: step s is measured (and logged, with the
        # loss) when (s + 1) % every == 0.
        if trainer.global_step % self.every or self.throughput is None:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0 - self._paused
        self.throughput.update(
            time=elapsed,
            batches=self._steps,
            samples=self._steps * self.tokens_per_step,
            flops=self.flops_per_step * self.every,
        )
        metrics = self.throughput.compute()
        per_device = metrics.get("device/samples_per_sec")
        if per_device is None:
            return
        self.last = {"tokens_per_s": per_device * trainer.world_size}
        # CPU tensors: a float would become a device tensor (a blocking copy to the GPU).
        pl_module.log("perf/tokens_per_s", torch.tensor(self.last["tokens_per_s"]), prog_bar=True)
        if "device/mfu" in metrics:
            self.last["mfu"] = metrics["device/mfu"]
            pl_module.log("perf/mfu", torch.tensor(metrics["device/mfu"]), prog_bar=True)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.throughput is not None and not trainer.sanity_checking:
            self._paused += time.perf_counter() - self._val_t0


class GracefulStop(L.Callback):
    """The first Ctrl-C or SIGTERM stops training after the current optimizer step with a
    checkpoint of that step, so `make pretrain` resumes exactly there; a second Ctrl-C stops
    at once (the periodic checkpoints then remain, as after kill -9)."""

    def __init__(self, last_checkpoint: Path, check_every: int = 10):
        self.last_checkpoint = Path(last_checkpoint)
        self.check_every = max(1, check_every)  # steps between the ranks' agreement (DDP)
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(
            f"\n{self.requested}: stopping after this optimizer step with a checkpoint "
            "(Ctrl-C again to stop now)",
            flush=True,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Installed after Lightning's own handlers (registered when fit starts), replacing them
        # for the training loop; they are put back when training ends.
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook's worker): no handler
                pass

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % getattr(pl_module, "grad_accum", 1):
            return
        stop = self.requested is not None
        if trainer.world_size > 1:
            # Ranks must stop at the same step; agreeing costs a host sync, so not every step.
            if trainer.global_step % self.check_every:
                return
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        trainer.save_checkpoint(self.last_checkpoint)
        trainer.should_stop = True
        self.requested = self.requested or "stop"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()
