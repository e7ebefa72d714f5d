"""Preference pairs as token sequences, padded batches of them, and what every method computes
on a batch: per-token log-probabilities of given completions (the model's forward, not the
decoding engine), summed per sequence, and the hidden state under the output projection."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from domainlm.align.records import Pair
from domainlm.finetune.records import Example
from domainlm.finetune.sft_data import encode_example
from domainlm.model.llama import IGNORE_INDEX
from domainlm.tokenizer import special
from domainlm.tokenizer.templates import Template

Encoded = tuple[list[int], list[int]]  # ids, labels (IGNORE_INDEX on prompt tokens)


@dataclass(frozen=True)
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    origin: str


def encode_pair(sp, template: Template, pair: Pair, max_seq_len: int,
                quarantine: list[dict]) -> EncodedPair | None:
    """Both sides of a pair as fine-tuning encodes an example (prompt and reply encoded apart,
    the template's end of turn and EOS after the reply, the reply's end cut to fit), so the
    policy is tuned on exactly the sequences it was instruction-tuned on. A prompt that leaves
    no room for a reply is quarantined (None)."""
    sides = []
    for reply in (pair.chosen, pair.rejected):
        example = Example("align", [*pair.messages, {"role": "assistant", "content": reply}],
                          pair.origin)
        enc = encode_example(sp, template, example, max_seq_len, quarantine)
        if enc is None:
            return None
        sides.append(enc)
    return EncodedPair(sides[0], sides[1], pair.origin)


def pad_sequences(items: Sequence[Encoded], width: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-padded (ids, labels) of shape (B, width): ids with PAD, labels with IGNORE_INDEX.
    Right padding keeps every real position's causal context intact, with no attention mask."""
    width = width or max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), special.PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, (a, b) in enumerate(items):
        ids[row, : len(a)] = torch.tensor(a, dtype=torch.long)
        labels[row, : len(b)] = torch.tensor(b, dtype=torch.long)
    return ids, labels


def collate_pairs(batch: Sequence[tuple]) -> dict[str, Tensor]:
    """Chosen rows then rejected rows, padded to one width: one forward scores both sides.
    Items are (EncodedPair, ref_chosen, ref_rejected) as PairData yields them."""
    pairs = [b[0] for b in batch]
    items = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, labels = pad_sequences(items)
    return {
        "ids": ids,
        "labels": labels,
        "ref": torch.tensor([[b[1], b[2]] for b in batch], dtype=torch.float32),
    }


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) at every position (B, T), in fp32; 0 where the target is IGNORE_INDEX."""
    mask = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


def sequence_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of log p over each row's labeled tokens (B,), their count (B,)) for sequences ids
    (B, T+1): inputs ids[:, :-1], targets labels[:, 1:]."""
    x, y = ids[:, :-1], labels[:, 1:]
    logits = model(x)[0]
    return token_logps(logits, y).sum(-1), (y != IGNORE_INDEX).sum(-1)


def last_positions(ids: Tensor) -> Tensor:
    """Index of each row's last real token (right padding with PAD): where a sequence's
    score is read, as transformers' LlamaForSequenceClassification reads it."""
    real = ids != special.PAD_ID
    positions = torch.arange(ids.size(1), device=ids.device)
    return (positions * real).argmax(-1)


class HiddenStates:
    """The final norm's output (B, T, d_model) of each forward of a decoder, captured by a
    hook: the value head reads the policy's own features without a second forward."""

    def __init__(self, model: nn.Module) -> None:
        self.last: Tensor | None = None
        self._handle = model.model.norm.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.last = output

    def remove(self) -> None:
        self._handle.remove()


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode for the block, its previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (p = 0): log-probabilities of the policy then equal those of the
    rollout that produced them, as TRL's trainers do by default."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
