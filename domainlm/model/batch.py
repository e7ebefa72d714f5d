"""The decoding loop over a batch of sequences that join and leave at any step (continuous
batching): each sequence is prefilled alone, joins the batch's ragged KV cache
(model/kvcache.py), and from then on advances one token per step with every other row, each
with its own sampling parameters, generator, LoRA adapter and log-probabilities."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.model.kvcache import RaggedCache
from domainlm.model.peft.lora import set_row_adapters
from domainlm.model.sampling import Logprob, SamplingParams, choose, generator_for, logprobs_of


class ContextError(UserError, ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


def context_length(model: nn.Module) -> int:
    """Positions for prompt + generated tokens (a prompt-tuned model spends some on its prompt)."""
    return model.config.max_seq_len - int(getattr(model, "n_virtual", 0) or 0)


class Token(NamedTuple):
    """One generated token and, when asked for, its log-probability and the top alternatives."""

    id: int
    logprob: Logprob | None


@dataclass(eq=False)
class Sequence:
    """One sequence to decode. The decoder appends its tokens and sets finish_reason ("stop":
    eos or a stop token id; "length": max_new_tokens); prompt_logprobs (one per prompt token,
    None for the first) when params.prompt_logprobs is set. Another thread may set cancelled."""

    prompt: list[int]
    params: SamplingParams
    adapter: str | None = None  # a LoRA adapter's name; None: the base model
    tokens: list[Token] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] | None = None
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    generator: torch.Generator | None = None

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]


class BatchDecoder:
    """Sequences in, one token per sequence per step out. Not thread-safe: one thread (the
    caller, or serve's scheduler) drives it. With use_cache=False every step recomputes every
    position; such a decoder takes one group of sequences (they stay aligned).

    With adapters=True each sequence's `adapter` (None: the base alone) is applied to its own
    rows (set_row_adapters); with False the model's LoRA selection is left as the caller set
    it, and every sequence's adapter must be None."""

    def __init__(self, model: nn.Module, use_cache: bool = True, adapters: bool = False) -> None:
        self.model, self.use_cache, self.adapters = model, use_cache, adapters
        self.device = next(model.parameters()).device
        self.cache = RaggedCache()
        self.rows: list[Sequence] = []
        self.limit = context_length(model)
        self._prompts: dict[int, Tensor] = {}  # id(seq) -> prompt ids, for the repetition penalty

    def __len__(self) -> int:
        return len(self.rows)

    def _select(self, names: list[str | None]) -> None:
        if self.adapters:
            set_row_adapters(self.model, names)
        elif any(n is not None for n in names):
            raise ValueError("this decoder leaves adapters as they are: make it adapters=True")

    def add(self, group: list[Sequence]) -> list[Sequence]:
        """Prefill the group's one prompt (shared by all its sequences, e.g. the n choices of
        a request), choose each sequence's first token, and keep the unfinished ones in the
        batch. Returns the group (each sequence has one token more)."""
        first = group[0]
        if any(s.prompt != first.prompt or s.adapter != first.adapter for s in group):
            raise ValueError("a group shares one prompt and one adapter")
        if not self.use_cache and self.rows:
            raise ValueError("a decoder without a KV cache takes one group")
        longest = max(s.params.max_new_tokens for s in group)
        if not first.prompt or len(first.prompt) + longest > self.limit:
            raise ContextError(
                f"the prompt ({len(first.prompt)} tokens) and max_new_tokens ({longest}) must "
                f"fit in the model's context of {self.limit} tokens (and the prompt is not empty)")
        vocab = self.model.config.vocab_size
        for s in group:
            s.params.check_vocab(vocab)
            if s.generator is None and s.params.temperature > 0:
                s.generator = generator_for(self.device, s.params.seed)
        idx = torch.tensor([first.prompt], device=self.device)
        self._select([first.adapter])
        cache: list | None = [] if self.use_cache else None
        with torch.no_grad():
            logits = self.model(idx, cache=cache)[0][0]
        wanted = [s.params.prompt_logprobs for s in group if s.params.prompt_logprobs is not None]
        if wanted:
            scored = logprobs_of(logits[:-1], idx[0, 1:], max(wanted))
            for s in group:
                k = s.params.prompt_logprobs
                if k is not None:
                    s.prompt_logprobs = [None, *(Logprob(p, t[:k]) for p, t in scored)]
        prompt = idx[0]
        for s in group:
            self._prompts[id(s)] = prompt
        self._advance(group, logits[-1:].expand(len(group), -1))
        alive = [s for s in group if s.finish_reason is None]
        if alive:
            if self.use_cache:
                self.cache.join(cache, len(alive))
            self.rows.extend(alive)
        for s in group:
            if s.finish_reason is not None:
                self._prompts.pop(id(s), None)
        return group

    def step(self) -> list[Sequence]:
        """One token for every sequence in the batch (cancelled ones leave first); finished
        sequences leave after it. Returns the sequences that advanced."""
        if any(s.cancelled.is_set() for s in self.rows):
            self._keep([i for i, s in enumerate(self.rows) if not s.cancelled.is_set()])
        if not self.rows:
            return []
        rows = list(self.rows)
        self._select([s.adapter for s in rows])
        with torch.no_grad():
            if self.use_cache:
                logits = self.cache.step(self.model, [s.tokens[-1].id for s in rows],
                                         self.device)
            else:
                full = [s.prompt + s.ids for s in rows]
                logits = self.model(torch.tensor(full, device=self.device))[0][:, -1]
        self._advance(rows, logits)
        if any(s.finish_reason is not None for s in rows):
            self._keep([i for i, s in enumerate(rows) if s.finish_reason is None])
        return rows

    def _keep(self, index: list[int]) -> None:
        for i, s in enumerate(self.rows):
            if i not in index:
                self._prompts.pop(id(s), None)
        self.rows = [self.rows[i] for i in index]
        if self.use_cache:
            self.cache.keep(index)

    def _advance(self, rows: list[Sequence], logits: Tensor) -> None:
        """Choose and record each row's next token from its logits (B, vocab)."""
        ids = choose(logits, [s.params for s in rows], [s.generator for s in rows],
                     [self._prompts.get(id(s)) for s in rows], [s.ids for s in rows])
        asked = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        scored: dict[int, Logprob] = {}
        if asked:
            chosen = torch.tensor([ids[i] for i in asked], device=logits.device)
            top = max(rows[i].params.logprobs or 0 for i in asked)
            for i, lp in zip(asked, logprobs_of(logits[asked], chosen, top), strict=True):
                scored[i] = Logprob(lp.logprob, lp.top[: rows[i].params.logprobs])
        for i, (s, token) in enumerate(zip(rows, ids, strict=True)):
            s.tokens.append(Token(token, scored.get(i)))
            if token in s.params.enders() and len(s.tokens) >= s.params.min_tokens:
                s.finish_reason = "stop"
            elif len(s.tokens) >= s.params.max_new_tokens:
                s.finish_reason = "length"


def decode_alone(model: nn.Module, seq: Sequence) -> Iterator[Token]:
    """Decode one sequence in the calling thread: its tokens as they are chosen. Closing the
    iterator early stops it."""
    decoder = BatchDecoder(model, use_cache=seq.params.use_cache)
    decoder.add([seq])
    yield seq.tokens[-1]
    while seq.finish_reason is None:
        decoder.step()
        yield seq.tokens[-1]
