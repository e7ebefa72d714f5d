"""Tokenized instruction data: prompt-masked examples, task mixing, packing, and the
LightningDataModule that batches them in a resumable, per-step order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from itertools import chain
from typing import Any, TypeVar

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from domainlm.corpus.mix import unit_hash
from domainlm.corpus.records import QUARANTINE, clip
from domainlm.errors import UserError
from domainlm.finetune.records import Example
from domainlm.model.llama import IGNORE_INDEX
from domainlm.tokenizer import special
from domainlm.tokenizer.templates import Template
from domainlm.train.data import StepLoader, StepSampler

PROMPT_TOO_LONG = f"{QUARANTINE}:prompt_too_long"

Encoded = tuple[list[int], list[int]]  # (input ids, labels: IGNORE_INDEX on prompt tokens)
T = TypeVar("T")


class PromptTooLong(UserError):
    """An example whose prompt leaves no room for its reply; `entry` is its quarantine record."""

    def __init__(self, entry: dict) -> None:
        super().__init__(f"{entry['origin']}: {entry['detail']}")
        self.entry = entry


def encode_example(
    sp: Any, template: Template, example: Example, max_seq_len: int,
    quarantine: list[dict] | None = None,
) -> Encoded | None:
    """(input_ids, labels) of one example, at most max_seq_len + 1 tokens.

    Prompt and completion are encoded separately and concatenated: at inference the prompt
    is encoded alone, so training on a joint encoding (whose pieces may merge across the
    boundary) would teach a sequence the model never sees. EOS ends the completion. A long
    example loses the completion's end; one whose prompt leaves no room for a single reply
    token is quarantined: appended to `quarantine` and None returned (without a list,
    PromptTooLong is raised, a UserError carrying the quarantine record).
    """
    prompt, completion = template.prompt_and_completion(example.messages)
    p, c = sp.encode([prompt, completion])
    return _assemble(p, c, example, prompt, max_seq_len, quarantine)


def encode_examples(
    sp: Any, template: Template, examples: Sequence[Example], max_seq_len: int,
    quarantine: list[dict],
) -> list[Encoded]:
    """encode_example over many examples with one batched SentencePiece call; the examples
    that do not fit are quarantined."""
    texts = [template.prompt_and_completion(e.messages) for e in examples]
    ids = sp.encode([s for pair in texts for s in pair])
    out = []
    for i, e in enumerate(examples):
        enc = _assemble(ids[2 * i], ids[2 * i + 1], e, texts[i][0], max_seq_len, quarantine)
        if enc is not None:
            out.append(enc)
    return out


def _assemble(
    p: list[int], c: list[int], example: Example, prompt: str, max_seq_len: int,
    quarantine: list[dict] | None,
) -> Encoded | None:
    room = max_seq_len + 1 - len(p)  # tokens left for the completion and EOS
    if room < 1:
        detail = (
            f"the prompt is {len(p)} tokens, which leaves no room for the reply within "
            f"finetune.max_seq_len = {max_seq_len}; raise it or shorten the prompt"
        )
        entry = {"task": example.task, "origin": example.origin, "reason": PROMPT_TOO_LONG,
                 "detail": detail, "text": clip(prompt)}
        if quarantine is None:
            raise PromptTooLong(entry)
        quarantine.append(entry)
        return None
    c = [*c, special.EOS_ID][:room]
    return [*p, *c], [IGNORE_INDEX] * len(p) + c


def mix(tasks: dict[str, list[T]], weights: dict[str, float | None], seed: int) -> list[T]:
    """One training list from several tasks.

    Without weights every example appears once. With weights, the total stays the number of
    examples of all tasks, and each task contributes its weight's share of it (exactly, up
    to rounding): whole copies of the task, then examples chosen by a seeded hash for the
    remainder, as multi-task instruction mixtures up- and down-sample their sources.
    """
    given = {t: weights.get(t) for t in tasks}
    if all(w is None for w in given.values()):
        return [x for items in tasks.values() for x in items]
    named = {t: float(w) for t, w in given.items() if w is not None}
    if len(named) < len(given):
        raise UserError("finetune.data: give `weight` to every source or to none")
    if min(named.values()) < 0 or sum(named.values()) <= 0:
        raise UserError("finetune.data: weights must be >= 0, and at least one above 0")
    total = sum(len(items) for items in tasks.values())
    wsum = sum(named.values())
    targets = _apportion({t: total * w / wsum for t, w in named.items()}, total)
    out: list[T] = []
    for t, items in tasks.items():
        want = targets[t]
        if not items and named[t] > 0:
            raise UserError(
                f"finetune.data: {t!r} has weight {named[t]:g} but no usable examples (see the "
                "quarantine report); fix its file or set its weight to 0"
            )
        if not want:
            continue
        whole, rest = divmod(want, len(items))
        out += items * whole
        ranked = sorted(range(len(items)), key=lambda i: unit_hash("sft-mix", seed, t, i))
        out += [items[i] for i in sorted(ranked[:rest])]
    return out


def _apportion(shares: dict[str, float], total: int) -> dict[str, int]:
    """Integers summing to total, each the floor of its share plus one for the largest
    remainders (ties by name), so every share is met to within one example."""
    out = {t: math.floor(s) for t, s in shares.items()}
    left = total - sum(out.values())
    for t in sorted(shares, key=lambda t: (out[t] - shares[t], t))[:left]:
        out[t] += 1
    return out


def pack(items: Sequence[Encoded], max_seq_len: int, seed: int) -> list[Encoded]:
    """Examples concatenated greedily (in a seeded order, so sequences mix tasks) into
    sequences of at most max_seq_len + 1 tokens; labels are concatenated alike, so every
    label is kept, and the first token of the next example is a prompt token (-100)."""
    limit = max_seq_len + 1
    order = sorted(range(len(items)), key=lambda i: unit_hash("sft-pack", seed, i))
    out: list[Encoded] = []
    ids: list[int] = []
    labels: list[int] = []
    for i in order:
        a, b = items[i]
        if len(a) > limit:
            raise ValueError(f"example {i} has {len(a)} tokens, over max_seq_len + 1 = {limit}")
        if ids and len(ids) + len(a) > limit:
            out.append((ids, labels))
            ids, labels = [], []
        ids.extend(a)
        labels.extend(b)
    if ids:
        out.append((ids, labels))
    return out


def steps_for(n: int, epochs: float, micro_batch: int, grad_accum: int, world_size: int) -> int:
    """Optimizer steps for `epochs` passes over n examples (or packed sequences), at least 1."""
    per_step = micro_batch * grad_accum * world_size
    # The epsilon keeps 2000 * 2.0 / 16 from becoming 251 through float rounding.
    return max(1, math.ceil(n * epochs / per_step - 1e-9))


class _Sequences(Dataset):
    """Token sequences in two flat int32 arrays plus offsets: a few bytes per token instead of
    a Python int each, and cheap to hand to loader workers. Item i is (x, y) = (ids[:-1],
    labels[1:]): the targets are shifted here, once."""

    def __init__(self, items: Sequence[Encoded]):
        lengths = np.array([len(ids) for ids, _ in items], dtype=np.int64)
        if len(items) and lengths.min() < 2:
            raise ValueError("every sequence needs at least 2 tokens (one input, one target)")
        if any(len(ids) != len(labels) for ids, labels in items):
            raise ValueError("input ids and labels differ in length")
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        total = int(self.offsets[-1])
        self.ids = np.fromiter(chain.from_iterable(i for i, _ in items), np.int32, total)
        self.labels = np.fromiter(chain.from_iterable(b for _, b in items), np.int32, total)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        x = torch.from_numpy(self.ids[a : b - 1].astype(np.int64))
        y = torch.from_numpy(self.labels[a + 1 : b].astype(np.int64))
        return x, y


def collate(
    batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence of the batch: x with pad_id, y with -100 (no loss)."""
    width = max(len(x) for x, _ in batch)
    xs = torch.full((len(batch), width), pad_id, dtype=torch.long)
    ys = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(batch):
        xs[row, : len(x)] = x
        ys[row, : len(y)] = y
    return xs, ys


class SFTData(L.LightningDataModule):
    """Encoded train and validation examples for the Trainer (use_distributed_sampler=False).

    The train order is StepSampler's (a pure function of seed and optimizer step, split over
    ranks), started at trainer.global_step: a resumed run sees what the uninterrupted run saw.
    With packing, train examples are packed into sequences first; validation is never packed,
    so its loss compares across packing settings.
    """

    def __init__(
        self, train: Sequence[Encoded], val: Sequence[Encoded], *, micro_batch: int,
        grad_accum: int, total_steps: int, seed: int, max_seq_len: int, packing: bool = False,
        pad_id: int = special.PAD_ID, num_workers: int = 0,
    ):
        super().__init__()
        if not train:
            raise UserError(
                "finetune: no training examples are left (see the quarantine report); "
                "check finetune.data and finetune.max_seq_len"
            )
        limit = max_seq_len + 1
        too_long = next((len(ids) for ids, _ in [*train, *val] if len(ids) > limit), None)
        if too_long is not None:
            raise ValueError(f"a sequence of {too_long} tokens is over max_seq_len + 1 = {limit}")
        self.micro_batch, self.grad_accum, self.total_steps = micro_batch, grad_accum, total_steps
        self.seed, self.max_seq_len, self.packing = seed, max_seq_len, packing
        self.pad_id, self.num_workers = pad_id, num_workers
        self.train_set = _Sequences(pack(train, max_seq_len, seed) if packing else train)
        self.val_set = _Sequences(val) if val else None

    @property
    def n_train(self) -> int:
        """Training examples, or packed sequences with packing: what steps_for counts."""
        return len(self.train_set)

    @property
    def has_val(self) -> bool:
        return self.val_set is not None

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return StepLoader(
            dataset, collate_fn=partial(collate, pad_id=self.pad_id),
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0, **kwargs,
        )

    def train_sampler(self) -> StepSampler:
        world_size, rank = self._world()
        return StepSampler(
            len(self.train_set), micro_batch=self.micro_batch, grad_accum=self.grad_accum,
            world_size=world_size, rank=rank, total_steps=self.total_steps, seed=self.seed,
            # Read at each iter(): Lightning builds the loader before restoring global_step.
            start_step=lambda: self.trainer.global_step if self.trainer is not None else 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, batch_sampler=self.train_sampler())

    def val_indices(self) -> range:
        """This rank's validation examples: an equal contiguous share (remainder dropped)."""
        if self.val_set is None:
            return range(0)
        world_size, rank = self._world()
        share = len(self.val_set) // world_size
        if share == 0:
            raise UserError(
                f"finetune: {len(self.val_set)} held-out example(s) for {world_size} processes; "
                "raise finetune.heldout_fraction or add data"
            )
        return range(rank * share, (rank + 1) * share)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        subset = torch.utils.data.Subset(self.val_set, self.val_indices())
        return self._loader(subset, batch_size=self.micro_batch, shuffle=False)
