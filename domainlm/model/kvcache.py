"""A KV cache for rows at different positions: continuous batching on the decoder's own cache.

The decoder's KVCache is a list of per-layer (k, v), each (rows, kv_heads, columns, head_dim).
Here every row's tokens are right-aligned: row r's own tokens fill the last length[r]
columns, its first pad[r] = columns - length[r] columns are padding. So a decode step appends
one column for every row at once, whatever their lengths, and the decoder needs only

* positions (B, 1): length[r], each row's next position (the rotary angle), and
* key_mask (B, columns + 1): column >= pad[r], so no row attends to another's padding.

A sequence joins after its own prefill (a batch of one, no padding: the cache it leaves is
exactly the single-sequence one) by padding the shorter side on the left; finished rows leave by
index, and the columns every remaining row pads are cut. The width is therefore the longest
row's length, never more than the model's context.

When no row is padded (one row, or rows that joined together) the decoder is called exactly as
a single sequence calls it, with no positions or mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainlm.model.llama import KVCache


def _pad_left(cache: KVCache, columns: int) -> KVCache:
    if columns == 0:
        return cache
    return [(F.pad(k, (0, 0, columns, 0)), F.pad(v, (0, 0, columns, 0))) for k, v in cache]


class RaggedCache:
    """The KV cache of a batch whose rows hold different numbers of tokens."""

    def __init__(self) -> None:
        self.layers: KVCache = []
        self.pad: list[int] = []  # padding columns at the left of each row

    @property
    def rows(self) -> int:
        return len(self.pad)

    @property
    def width(self) -> int:
        return self.layers[0][0].size(2) if self.layers else 0

    def lengths(self) -> list[int]:
        """How many positions each row holds (its next token's position)."""
        return [self.width - p for p in self.pad]

    def join(self, cache: KVCache, copies: int = 1) -> None:
        """Append `copies` rows holding a single sequence's cache (batch of one, unpadded)."""
        if copies > 1:
            cache = [(k.expand(copies, -1, -1, -1), v.expand(copies, -1, -1, -1))
                     for k, v in cache]
        if not self.layers:
            # Kept as the model left it (a single sequence's cache is used as it is).
            self.layers = cache if copies == 1 else [(k.contiguous(), v.contiguous())
                                                     for k, v in cache]
            self.pad = [0] * copies
            return
        length = cache[0][0].size(2)
        before = self.width
        width = max(before, length)
        old = _pad_left(self.layers, width - before)
        new = _pad_left(cache, width - length)
        self.layers = [(torch.cat((ko, kn)), torch.cat((vo, vn)))
                       for (ko, vo), (kn, vn) in zip(old, new, strict=True)]
        self.pad = [p + width - before for p in self.pad] + [width - length] * copies

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); cut the columns that all of them pad."""
        if not rows:
            self.layers, self.pad = [], []
            return
        if rows != list(range(self.rows)):
            index = torch.tensor(rows, device=self.layers[0][0].device)
            self.layers = [(k.index_select(0, index), v.index_select(0, index))
                           for k, v in self.layers]
            self.pad = [self.pad[r] for r in rows]
        cut = min(self.pad)
        if cut:
            self.layers = [(k[:, :, cut:], v[:, :, cut:]) for k, v in self.layers]
            self.pad = [p - cut for p in self.pad]

    def step(self, model: nn.Module, tokens: list[int], device: torch.device) -> Tensor:
        """Feed each row its next token; the logits (B, vocab) of the new position. The cache
        grows by one column."""
        idx = torch.tensor(tokens, device=device)[:, None]
        cache = self.layers
        if not any(self.pad):
            logits = model(idx, cache=cache)[0][:, -1]
        else:
            width = self.width
            pad = torch.tensor(self.pad, device=device)
            positions = (width - pad)[:, None]
            key_mask = torch.arange(width + 1, device=device)[None, :] >= pad[:, None]
            logits = model(idx, cache=cache, positions=positions, key_mask=key_mask)[0][:, -1]
        self.layers = cache  # the decoder replaced each layer's entry with the longer one
        return logits
