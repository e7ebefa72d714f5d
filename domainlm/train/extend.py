"""Extending a warmup-stable-decay run: its checkpoint at the start of the decay is the state a
longer run with the same settings has at that step (the learning rate before a WSD decay does not
depend on the run's length, and the batches are a function of the step), so a longer run starts
there instead of from scratch."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from domainlm.files import read_json, write_json

TRUNK = "wsd-trunk.ckpt"  # in checkpoints/: the state at the first step of the decay
INFO = "wsd-trunk.json"  # {"key": what must match to reuse it, "step": its optimizer step}


class TrunkCheckpoint(L.Callback):
    """Save checkpoints/wsd-trunk.ckpt once `step` optimizer steps are done (the decay's first
    step is next), with the key a longer run must match to start from it."""

    def __init__(self, ckpt_dir: Path, key: str, step: int) -> None:
        self.ckpt_dir, self.key, self.step = ckpt_dir, key, step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = self.ckpt_dir / TRUNK
        if trainer.global_step != self.step or path.exists():
            return
        tmp = path.with_name(path.name + ".tmp")
        trainer.save_checkpoint(tmp)
        if trainer.global_rank == 0:
            os.replace(tmp, path)
            write_json(self.ckpt_dir / INFO, {"key": self.key, "step": self.step})


def find_trunk(folders: list[Path], key: str, warmup: int, decay_start: int) -> Path | None:
    """A trunk checkpoint of a run with the same key (the same settings but its length) taken
    after this run's warmup and no later than this run's decay start; the latest such."""
    found = []
    for folder in folders:
        info_path, ckpt = folder / INFO, folder / TRUNK
        if not (info_path.is_file() and ckpt.is_file()):
            continue
        info = read_json(info_path)
        if info.get("key") == key and warmup <= int(info.get("step", -1)) <= decay_start:
            found.append((int(info["step"]), ckpt))
    return max(found)[1] if found else None
