"""Items (pairs, prompts) for the Trainer in a resumable order: the batch of optimizer step s is
a pure function of (seed, s), as in pretraining, so a resumed run sees what the first saw."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from domainlm.errors import UserError
from domainlm.train.data import StepLoader, StepSampler


class _Items(Dataset):
    def __init__(self, items: Sequence[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


class StepData(L.LightningDataModule):
    """Train items batched by StepSampler from trainer.global_step // steps_per_batch (PPO
    takes several optimizer steps per batch of prompts); validation items in order."""

    def __init__(self, train: Sequence[Any], val: Sequence[Any], *, micro_batch: int,
                 grad_accum: int, total_steps: int, seed: int,
                 collate: Callable[[list], Any], steps_per_batch: int = 1) -> None:
        super().__init__()
        if not train:
            raise UserError("align: no training items are left (see align/data/rejected.jsonl)")
        self.train_set, self.val_set = _Items(train), _Items(val) if val else None
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.total_steps, self.seed = total_steps, seed
        self.collate, self.steps_per_batch = collate, steps_per_batch

    @property
    def has_val(self) -> bool:
        return self.val_set is not None

    def _start(self) -> int:
        return self.trainer.global_step // self.steps_per_batch if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        sampler = StepSampler(
            len(self.train_set), micro_batch=self.micro_batch, grad_accum=self.grad_accum,
            world_size=1, rank=0, total_steps=self.total_steps, seed=self.seed,
            start_step=self._start,  # read at iter(): after Lightning restored global_step
        )
        return StepLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return StepLoader(self.val_set, batch_size=self.micro_batch, shuffle=False,
                          collate_fn=self.collate)
