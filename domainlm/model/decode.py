"""The one decoding engine: sampling over any model with the decoder's contract, batched token
ids for tests and scripts (`generate`), and streamed text with stop strings (`stream`,
`TextStream`) for `domainlm generate`, `domainlm serve`, fine-tuning's scoring and evaluation.

Sampling and its parameters live in model/sampling.py, the loop that decodes many sequences at
once (continuous batching) in model/batch.py over the ragged KV cache of model/kvcache.py; a
TextStream turns one sequence's tokens into text, whether it decodes alone in the caller's thread
or in serve's shared batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from domainlm.model.batch import (
    ContextError,
    Sequence,
    Token,
    context_length,
    decode_alone,
)
from domainlm.model.sampling import (
    Logprob,
    ParamError,
    SamplingParams,
    sample,
    top_p_filter,
)
from domainlm.tokenizer.special import EOS_ID

__all__ = [
    "Completion", "ContextError", "Logprob", "ParamError", "SamplingParams", "Sequence",
    "TextStream", "Token", "collect", "complete", "context_length", "generate", "sample",
    "steps", "stream", "top_p_filter",
]

_REPLACEMENT = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to


class Completion(NamedTuple):
    text: str
    finish_reason: str  # "stop" (eos, a stop token or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


def steps(
    model: nn.Module, idx: Tensor, params: SamplingParams, generator: torch.Generator | None
) -> Iterator[Tensor]:
    """The decoding loop: the next ids (B,) after idx (B, T), one step per iteration, for as
    long as the caller iterates. With the KV cache each step feeds only the new token."""
    cache: list | None = [] if params.use_cache else None
    seq, step = idx, idx
    while True:
        # Grad mode is thread state: set per call, never held across a yield.
        with torch.no_grad():
            logits = model(step, cache=cache)[0][:, -1]
        nxt = sample(logits, params, generator)
        yield nxt
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        step = nxt[:, None] if cache is not None else seq


def generate(
    model: nn.Module,
    idx: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue idx (B, T) by up to max_new_tokens ids; greedy when temperature is 0.

    Rows that have produced eos_id are padded with it; generation stops early once every
    row has. Returns (B, T + generated).
    """
    limit = context_length(model)
    if idx.size(1) + max_new_tokens > limit:
        virtual = model.config.max_seq_len - limit
        held = f" ({virtual} of its positions hold virtual tokens)" if virtual else ""
        raise ContextError(
            f"prompt ({idx.size(1)}) + max_new_tokens ({max_new_tokens}) exceed the model's "
            f"context of {limit} tokens{held}"
        )
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, use_cache=use_cache)
    out = [idx]
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for i, nxt in enumerate(steps(model, idx, params, generator)):
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done = done | (nxt == eos_id)
        out.append(nxt[:, None])
        if i + 1 >= max_new_tokens or (eos_id is not None and bool(done.all())):
            break
    return torch.cat(out, dim=1)


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of text can be emitted now: not an incomplete UTF-8 character at the end (more
    byte pieces may complete it), nor a suffix that could be the start of a stop string."""
    end = len(text.rstrip(_REPLACEMENT))
    safe = end
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text.endswith(s[:k], 0, end):
                safe = min(safe, end - k)
                break
    return safe


Source = Callable[[Sequence], Iterator[Token]]  # decodes a sequence: its tokens, in order


class TextStream:
    """An iterator of decoded text pieces. Once the last piece is out, `text`, `finish_reason`,
    `token_ids` (the generated ids, eos included) and `tokens` (with log-probs when asked for)
    are set; `completion_tokens` counts the ids generated so far. `close()` ends it early.

    `source` decodes the sequence: by default alone, in the iterating thread, when the first
    piece is asked for; serve's scheduler passes its own, which starts decoding at once in the
    shared batch. `pieces` yields each piece with the tokens consumed for it (the last piece,
    possibly empty, carries the rest)."""

    def __init__(self, model: nn.Module, sp: Any, prompt_ids: list[int],
                 params: SamplingParams, *, truncate: bool = True, adapter: str | None = None,
                 source: Source | None = None) -> None:
        limit = context_length(model)
        if params.max_new_tokens >= limit:
            raise ParamError(
                "max_new_tokens",
                f"({params.max_new_tokens}) leaves no room for a prompt in the model's context "
                f"of {limit} tokens; ask for at most {limit - 1}",
            )
        params.check_vocab(model.config.vocab_size)
        # An empty prompt starts a new document, as pretraining saw one: right after </s>.
        ids = list(prompt_ids) or [EOS_ID]
        room = limit - params.max_new_tokens
        self.truncated = max(0, len(ids) - room)  # prompt tokens dropped from the left
        if self.truncated and not truncate:
            raise ContextError(
                f"the model's context is {limit} tokens, but {len(ids) + params.max_new_tokens} "
                f"were requested ({len(ids)} in the prompt, {params.max_new_tokens} to generate); "
                "shorten the prompt or ask for fewer tokens"
            )
        self.sp, self.params = sp, params
        self.prompt_ids = ids[self.truncated :]
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.tokens: list[Token] = []
        self.finish_reason: str | None = None
        self.text = ""
        self.sequence = Sequence(self.prompt_ids, params, adapter)
        if source is None:
            self._tokens: Iterator[Token] = _lazy(lambda: decode_alone(model, self.sequence))
        else:
            self._tokens = source(self.sequence)
        self._gen = self._pieces()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        while True:  # the pieces that carry only tokens (eos) are not text
            text, _ = next(self._gen)
            if text:
                return text

    def close(self) -> None:
        """Stop decoding (a shared batch drops the sequence at its next step). From another
        thread than the one iterating, this only cancels: that iteration then ends."""
        self.sequence.cancelled.set()
        for gen in (self._gen, self._tokens):
            try:
                gen.close()  # type: ignore[attr-defined]
            except (ValueError, AttributeError):  # running in another thread, or no close
                pass

    def pieces(self) -> Iterator[tuple[str, list[Token]]]:
        """(text piece, the tokens consumed since the previous piece); the same iteration as
        the stream's own (each piece is handed out once, either way)."""
        return self._gen

    def _pieces(self) -> Iterator[tuple[str, list[Token]]]:
        p = self.params
        new: list[int] = []
        taken = 0  # tokens already handed out with a piece
        emitted, longest_stop = 0, max((len(s) for s in p.stop), default=0)
        for token in self._tokens:
            self.tokens.append(token)
            self.token_ids.append(token.id)
            self.completion_tokens += 1
            if token.id == EOS_ID and not p.ignore_eos:
                continue  # the decoder ends the sequence here
            new.append(token.id)
            text = self.sp.decode(new)
            if self.completion_tokens >= p.min_tokens:
                cut = _find_stop(text, p.stop, max(0, emitted - longest_stop))
                if cut is not None:
                    self.text, self.finish_reason = text[:cut], "stop"
                    self.close_source()
                    yield text[emitted:cut] if cut > emitted else "", self.tokens[taken:]
                    return
            safe = _safe_end(text, p.stop)
            if safe > emitted:
                yield text[emitted:safe], self.tokens[taken:]
                emitted, taken = safe, len(self.tokens)
        self.finish_reason = self.sequence.finish_reason or "stop"
        self.text = self.sp.decode(new)
        if len(self.text) > emitted or taken < len(self.tokens):
            yield self.text[emitted:], self.tokens[taken:]

    def close_source(self) -> None:
        self.sequence.cancelled.set()
        close = getattr(self._tokens, "close", None)
        if close is not None:
            close()


def _lazy(make: Callable[[], Iterator[Token]]) -> Iterator[Token]:
    """make()'s tokens, made when the first is asked for (so nothing runs for an unread stream)."""
    yield from make()


def stream(model: nn.Module, sp: Any, prompt_ids: list[int], params: SamplingParams,
           *, truncate: bool = True) -> TextStream:
    """Text pieces of the continuation of prompt_ids, as they are decoded. A prompt that does
    not leave room for max_new_tokens loses tokens from the left (truncate) or is refused."""
    return TextStream(model, sp, prompt_ids, params, truncate=truncate)


def collect(pieces: TextStream) -> Completion:
    text = "".join(pieces)
    return Completion(text, pieces.finish_reason or "stop", pieces.prompt_tokens,
                      pieces.completion_tokens)


def complete(model: nn.Module, sp: Any, prompt_ids: list[int], params: SamplingParams,
             *, truncate: bool = True) -> Completion:
    """(text, finish_reason, prompt_tokens, completion_tokens) of one whole generation."""
    return collect(stream(model, sp, prompt_ids, params, truncate=truncate))
