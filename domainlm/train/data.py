"""Pretraining data: fixed-length windows over the token arrays, a resumable per-step batch
sampler that splits each step across ranks, and the LightningDataModule that wires them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from domainlm.errors import UserError
from domainlm.tokenizer.arrays import TokenArrays, TokenWindows


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """`np.random.default_rng([seed, epoch]).permutation(n)` (which is shuffle(arange(n))),
    in uint32 where it fits: half the memory of int64 at hundreds of millions of windows."""
    perm = np.arange(n, dtype=np.uint32 if n <= 1 << 32 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(perm)
    return perm


class StepSampler(Sampler[list[int]]):
    """Batches of window indices that are a pure function of (seed, optimizer step).

    Global sample g (counted over the whole run) is window `perm_e[g % n]` of epoch
    e = g // n. Step s, micro-batch j, rank r takes g = s*G + j*micro*world + r*micro + k,
    k < micro, with G = micro * grad_accum * world. So a run resumed at step s sees the batches
    the uninterrupted run saw, and the ranks together see what one process would see.
    """

    def __init__(
        self, n_windows: int, *, micro_batch: int, grad_accum: int, world_size: int, rank: int,
        total_steps: int, seed: int, start_step: int | Callable[[], int] = 0,
    ):
        if n_windows < 1 or micro_batch < 1 or grad_accum < 1 or world_size < 1:
            raise ValueError("n_windows, micro_batch, grad_accum and world_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.n_windows, self.micro_batch, self.grad_accum = n_windows, micro_batch, grad_accum
        self.world_size, self.rank, self.total_steps = world_size, rank, total_steps
        self.seed, self.start_step = seed, start_step
        self.global_batch = micro_batch * grad_accum * world_size
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def start(self) -> int:
        """The first step to yield, read now (a callable reads trainer.global_step)."""
        s = self.start_step() if callable(self.start_step) else self.start_step
        return min(max(int(s), 0), self.total_steps)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:  # the current epoch's only; samples move forward in g
            self._perm, self._epoch = epoch_permutation(self.n_windows, self.seed, epoch), epoch
        return self._perm

    def _windows(self, first: int, count: int) -> list[int]:
        """Windows of global samples first .. first + count - 1."""
        e, i = divmod(first, self.n_windows)
        if i + count <= self.n_windows:
            return self._permutation(e)[i : i + count].tolist()
        # The batch crosses an epoch boundary.
        return [int(self._permutation(g // self.n_windows)[g % self.n_windows])
                for g in range(first, first + count)]

    def samples(self, step: int) -> list[int]:
        """All global_batch windows of one optimizer step, in order of g."""
        return self._windows(step * self.global_batch, self.global_batch)

    def __iter__(self) -> Iterator[list[int]]:
        mb, per_micro = self.micro_batch, self.micro_batch * self.world_size
        for s in range(self.start(), self.total_steps):
            for j in range(self.grad_accum):
                yield self._windows(s * self.global_batch + j * per_micro + self.rank * mb, mb)

    def __len__(self) -> int:
        # The whole run's micro-batches, not the ones left: Lightning restores its batch index
        # (start * grad_accum) on resume and expects the loader to yield the rest of len().
        # Counting only the rest would end its epoch early (extra epoch-end hooks, validation
        # and checkpoints at the wrong places).
        return self.total_steps * self.grad_accum

    def remaining(self) -> int:
        """Micro-batches `__iter__` yields from the current start step."""
        return (self.total_steps - self.start()) * self.grad_accum


class StepLoader(DataLoader):
    """A DataLoader that Lightning treats as resumable, which it is: its position is
    trainer.global_step, read when iterated, so its state is empty. (Without these methods
    Lightning warns on every mid-run resume that the results may be unreliable.)"""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class PretrainData(L.LightningDataModule):
    """Train and val windows of build/<run>/tokens/ for the Trainer.

    The Trainer runs with `use_distributed_sampler=False`: the rank split is done here, and
    the position in the data comes from `trainer.global_step`, so nothing is saved for resume.
    """

    def __init__(
        self, tokens_dir: str | Path, *, seq_len: int, micro_batch: int, grad_accum: int,
        total_steps: int, seed: int, val_batches: int | None, num_workers: int = 0,
    ):
        super().__init__()
        self.tokens_dir = Path(tokens_dir)
        self.seq_len, self.micro_batch, self.grad_accum = seq_len, micro_batch, grad_accum
        self.total_steps, self.seed = total_steps, seed
        self.val_batches, self.num_workers = val_batches, num_workers
        self.train_arrays: TokenArrays | None = None
        self.val_arrays: TokenArrays | None = None
        self.train_windows: TokenWindows | None = None
        self.val_windows: TokenWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_arrays is not None:
            return
        train = TokenArrays(self.tokens_dir, "train")
        self.train_windows = TokenWindows(train, self.seq_len)
        # A run without a val split (or an empty one) trains without validation.
        if train.meta.get("val", {}).get("tokens", 0) > 0:
            self.val_arrays = TokenArrays(self.tokens_dir, "val")
            self.val_windows = TokenWindows(self.val_arrays, self.seq_len)
        self.train_arrays = train

    def _train(self) -> TokenArrays:
        self.setup()
        assert self.train_arrays is not None
        return self.train_arrays

    @property
    def vocab_size(self) -> int:
        return self._train().vocab_size

    @property
    def eos_id(self) -> int:
        return self._train().eos_id

    @property
    def train_tokens(self) -> int:
        return self._train().num_tokens

    @property
    def has_val(self) -> bool:
        self.setup()
        return self.val_windows is not None

    @property
    def val_bytes_per_token(self) -> float | None:
        """Val text bytes per val token: bits per byte = loss_nats / ln 2 / this."""
        self.setup()
        if self.val_arrays is None:
            return None
        counts = self.val_arrays.meta["val"]
        return counts["bytes"] / counts["tokens"]

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return StepLoader(
            dataset, num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0, **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_windows is not None
        world_size, rank = self._world()
        sampler = StepSampler(
            len(self.train_windows), micro_batch=self.micro_batch, grad_accum=self.grad_accum,
            world_size=world_size, rank=rank, total_steps=self.total_steps, seed=self.seed,
            # Read at each iter(): Lightning builds the loader before restoring global_step.
            start_step=lambda: self.trainer.global_step if self.trainer is not None else 0,
        )
        return self._loader(self.train_windows, batch_sampler=sampler)

    def val_indices(self) -> range:
        """This rank's val windows: an equal contiguous share of the first ones."""
        self.setup()
        if self.val_windows is None:
            return range(0)
        world_size, rank = self._world()
        n = len(self.val_windows)
        if self.val_batches is not None:
            n = min(n, self.val_batches * self.micro_batch * world_size)
        share = n // world_size  # ranks must see equal counts: drop the remainder
        if share == 0:
            raise UserError(
                f"the val split of {self.tokens_dir} has {n} window(s) of {self.seq_len + 1} "
                f"tokens, fewer than the {world_size} processes: use a shorter train.seq_len, "
                "or a larger val split"
            )
        return range(rank * share, (rank + 1) * share)

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_val:
            return []
        assert self.val_windows is not None
        subset = Subset(self.val_windows, self.val_indices())
        return self._loader(subset, batch_size=self.micro_batch, shuffle=False)


def unigram_baseline(arrays_train: TokenArrays, arrays_val: TokenArrays) -> float:
    """Cross-entropy (nats/token) of the val tokens under the train unigram distribution,
    add-one smoothed over the vocabulary: the loss of a model that ignores context."""
    v = arrays_train.vocab_size
    train, val = _counts(arrays_train.tokens, v), _counts(arrays_val.tokens, v)
    n_val = int(val.sum())
    if n_val == 0:
        raise ValueError(f"{arrays_val!r} has no tokens")
    log_p = np.log(train + 1.0) - math.log(int(train.sum()) + v)
    return float(-(val * log_p).sum() / n_val)


def _counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    # In chunks: bincount widens its input to int64, 4x the uint16 memmap it reads.
    counts = np.zeros(vocab_size, np.int64)
    for a in range(0, len(tokens), chunk):
        c = np.bincount(tokens[a : a + chunk], minlength=vocab_size)
        if len(c) > vocab_size:
            raise ValueError(f"token id {len(c) - 1} is outside the {vocab_size}-piece vocabulary")
        counts += c
    return counts
