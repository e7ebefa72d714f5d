"""The one evaluator: next-token loss, perplexity and bits per byte of any model with the
decoder's contract over token windows (from the token arrays) or over a token stream.

Every caller (the end of pretraining, fine-tuning's forgetting column, the quantization table,
`domainlm eval perplexity`) sums nats and counts targets here, so their figures agree when they
read the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainlm.model.llama import IGNORE_INDEX


@dataclass(frozen=True)
class Loss:
    """Summed next-token loss (nats) over `tokens` targets; `bytes`, when known, are the UTF-8
    bytes of the text those targets stand for (bits per byte needs them)."""

    nats: float
    tokens: int
    bytes: int | None = None

    @property
    def loss(self) -> float:
        """Mean nats per target token."""
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        """nats / ln 2 / bytes: independent of the tokenizer, so models with different
        vocabularies compare (as BloombergGPT reports)."""
        return self.nats / math.log(2) / self.bytes if self.bytes else float("nan")

    def to_dict(self) -> dict[str, float | int | None]:
        """The sums and what follows from them, as reports and metrics.json record them."""
        return {
            "tokens": self.tokens,
            "bytes": self.bytes,
            "nats": self.nats,
            "loss": self.loss,
            "ppl": self.ppl,
            "bits_per_byte": self.bits_per_byte,
        }

    def __add__(self, other: Loss) -> Loss:
        both = None if self.bytes is None or other.bytes is None else self.bytes + other.bytes
        return Loss(self.nats + other.nats, self.tokens + other.tokens, both)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batch_loss(model: nn.Module, x: Tensor, y: Tensor) -> Loss:
    """The summed loss of targets y (B, T; IGNORE_INDEX is skipped) given inputs x (B, T).

    On a GPU the forward runs under bf16 autocast (as training does); the cross-entropy is
    always taken in fp32.
    """
    device = _device(model)
    x, y = x.to(device), y.to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)[0]
    nats = F.cross_entropy(
        logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return Loss(float(nats), int((y != IGNORE_INDEX).sum()))


@torch.no_grad()
def evaluate_windows(
    model: nn.Module, windows: Sequence[tuple[Tensor, Tensor]], micro_batch: int = 16
) -> Loss:
    """The loss over every (x, y) window (e.g. TokenWindows over the validation split)."""
    model.eval()
    total = Loss(0.0, 0)
    for start in range(0, len(windows), micro_batch):
        batch = [windows[i] for i in range(start, min(start + micro_batch, len(windows)))]
        total += batch_loss(model, torch.stack([b[0] for b in batch]),
                            torch.stack([b[1] for b in batch]))
    return total


@torch.no_grad()
def evaluate_stream(
    model: nn.Module,
    ids: np.ndarray,
    seq_len: int,
    micro_batch: int = 8,
    n_bytes: int | None = None,
) -> Loss:
    """The loss of ids[1:] given their window's context: the stream is cut into non-overlapping
    windows of seq_len targets, each read with a fresh context; the last window, shorter when
    the count is not a multiple of seq_len, is scored too with its fewer targets. ids[0] is
    context only."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be at least 1, not {seq_len}")
    model.eval()
    tokens = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    full = (len(tokens) - 1) // seq_len
    windows = [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(full)]
    total = Loss(0.0, 0)
    for b in range(0, full, micro_batch):
        w = torch.stack(windows[b : b + micro_batch])
        total += batch_loss(model, w[:, :-1], w[:, 1:])
    if (len(tokens) - 1) % seq_len:
        rest = tokens[full * seq_len :].unsqueeze(0)
        total += batch_loss(model, rest[:, :-1], rest[:, 1:])
    return Loss(total.nats, total.tokens, n_bytes)
