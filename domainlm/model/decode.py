"""The one decoding engine: sampling (greedy, temperature, top-k, top-p) over any model with the
decoder's contract, batched token ids for tests and scripts, and streamed text with stop strings
for `domainlm generate`, `domainlm serve`, fine-tuning's scoring and evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.tokenizer.special import EOS_ID

_REPLACEMENT = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to


class ParamError(UserError, ValueError):
    """A request or sampling parameter that is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


class ContextError(UserError, ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclass
class SamplingParams:
    """How to continue a prompt: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution restricted to the top_k tokens and to the top_p nucleus."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)  # text that ends generation (not emitted)
    seed: int | None = None  # None: a fresh random seed per generation
    use_cache: bool = True  # the KV cache; off recomputes every position (same greedy output)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            ("max_new_tokens", _is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
             "an integer >= 1"),
            ("temperature", _is_number(self.temperature) and self.temperature >= 0,
             "a number >= 0"),
            ("top_k", self.top_k is None or _is_int(self.top_k) and self.top_k >= 1,
             "an integer >= 1 or unset"),
            ("top_p", self.top_p is None or _is_number(self.top_p) and 0 < self.top_p <= 1,
             "a number in (0, 1] or unset"),
            ("stop", isinstance(self.stop, (list, tuple))
             and all(isinstance(s, str) and s for s in self.stop), "a list of non-empty strings"),
            ("seed", self.seed is None or _is_int(self.seed), "an integer or unset"),
            ("use_cache", isinstance(self.use_cache, bool), "true or false"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ParamError(name, f"must be {want}, got {getattr(self, name)!r}")
        self.stop = list(self.stop)


class Completion(NamedTuple):
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_new_tokens)
    prompt_tokens: int
    completion_tokens: int


def context_length(model: nn.Module) -> int:
    """Positions for prompt + generated tokens (a prompt-tuned model spends some on its prompt)."""
    return model.config.max_seq_len - int(getattr(model, "n_virtual", 0) or 0)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Logits with -inf outside the nucleus: the smallest set of the most probable tokens whose
    probabilities sum to at least top_p (Holtzman et al. 2020). Works on (..., vocab)."""
    if top_p >= 1:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    # A token is dropped when the tokens ranked above it already reach top_p; the first never is.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """The next ids (B,) from the last position's logits (B, vocab)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


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


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


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


class TextStream:
    """An iterator of decoded text pieces. Once the last piece is out, `text`, `finish_reason`
    and `token_ids` (the generated ids, eos included) are set; `completion_tokens` counts the
    ids generated so far. `close()` ends it early (and runs the session's exit)."""

    def __init__(self, model: nn.Module, sp: Any, prompt_ids: list[int],
                 params: SamplingParams, *, truncate: bool = True,
                 session: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        limit = context_length(model)
        if params.max_new_tokens >= limit:
            raise ParamError(
                "max_new_tokens",
                f"({params.max_new_tokens}) leaves no room for a prompt in the model's context "
                f"of {limit} tokens; ask for at most {limit - 1}",
            )
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
        self.model, self.sp, self.params = model, sp, params
        self.prompt_ids = ids[self.truncated :]
        self.prompt_tokens = len(self.prompt_ids)
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.text = ""
        self._session = session or contextlib.nullcontext
        self._gen = self._run()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # runs the session's exit: an engine's lock is released

    def _run(self) -> Iterator[str]:
        with self._session():
            yield from self._decode()

    def _decode(self) -> Iterator[str]:
        p = self.params
        device = next(self.model.parameters()).device
        idx = torch.tensor([self.prompt_ids], device=device)
        new: list[int] = []
        emitted, longest_stop = 0, max((len(s) for s in p.stop), default=0)
        for nxt in steps(self.model, idx, p, _generator(device, p.seed)):
            token = int(nxt[0])
            self.token_ids.append(token)
            self.completion_tokens += 1
            if token == EOS_ID:
                self.finish_reason = "stop"
                break
            new.append(token)
            text = self.sp.decode(new)
            cut = _find_stop(text, p.stop, max(0, emitted - longest_stop))
            if cut is not None:
                self.text, self.finish_reason = text[:cut], "stop"
                if cut > emitted:
                    yield text[emitted:cut]
                return
            if self.completion_tokens >= p.max_new_tokens:
                self.finish_reason = "length"
                break
            safe = _safe_end(text, p.stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        self.text = self.sp.decode(new)
        if len(self.text) > emitted:
            yield self.text[emitted:]


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
