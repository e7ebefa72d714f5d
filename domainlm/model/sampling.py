"""How the next token is chosen: the sampling parameters of one sequence, the logits processors
(logit bias, min_tokens, penalties, temperature, top-k, top-p, min-p) and the log-probabilities
that are reported, for one row or a batch of rows that each have their own parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor

from domainlm.errors import UserError
from domainlm.tokenizer.special import EOS_ID

MAX_LOGPROBS = 20  # most alternatives per position (OpenAI's top_logprobs limit)
SEED_RANGE = 2**64  # torch.Generator.manual_seed takes seeds in [-2**63, 2**64)


class ParamError(UserError, ValueError):
    """A request or sampling parameter that is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _in(v: Any, lo: float, hi: float) -> bool:
    return _is_number(v) and lo <= v <= hi


@dataclass
class SamplingParams:
    """How to continue a prompt: greedy when temperature is 0, else sampled from the
    temperature-scaled distribution restricted to the top_k tokens, the top_p nucleus and the
    tokens at least min_p times as likely as the most likely one. Bias, bans and penalties
    change the logits first, so they steer greedy decoding too (as in vLLM)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)  # text that ends generation (not emitted)
    seed: int | None = None  # None: a fresh random seed per generation
    use_cache: bool = True  # the KV cache; off recomputes every position (same greedy output)
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability (0: off)
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides (>0) / multiplies (<0) logits of seen tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # eos, stop_token_ids and stop strings are held off until this many
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end generation (kept)
    ignore_eos: bool = False  # go on after eos (it is then an ordinary token)
    logprobs: int | None = None  # report each chosen token's log-prob and this many top ones
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo)

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
            ("seed", self.seed is None or _is_int(self.seed)
             and -(2**63) <= self.seed < SEED_RANGE, "an integer in [-2**63, 2**64) or unset"),
            ("use_cache", isinstance(self.use_cache, bool), "true or false"),
            ("min_p", _in(self.min_p, 0, 1), "a number in [0, 1]"),
            ("presence_penalty", _in(self.presence_penalty, -2, 2), "a number in [-2, 2]"),
            ("frequency_penalty", _in(self.frequency_penalty, -2, 2), "a number in [-2, 2]"),
            ("repetition_penalty", _is_number(self.repetition_penalty)
             and self.repetition_penalty > 0, "a number > 0"),
            ("logit_bias", isinstance(self.logit_bias, dict) and all(
                _is_int(k) and k >= 0 and _in(v, -100, 100) for k, v in self.logit_bias.items()),
             "a map of token ids to numbers in [-100, 100]"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens, "an integer >= 0"),
            ("stop_token_ids", isinstance(self.stop_token_ids, (list, tuple)) and all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids), "a list of token ids"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "true or false"),
            ("logprobs", self.logprobs is None or _is_int(self.logprobs)
             and 0 <= self.logprobs <= MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}] or unset"),
            ("prompt_logprobs", self.prompt_logprobs is None or _is_int(self.prompt_logprobs)
             and 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"an integer in [0, {MAX_LOGPROBS}] or unset"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ParamError(name, f"must be {want}, got {getattr(self, name)!r}")
        if self.min_tokens > self.max_new_tokens:
            raise ParamError("min_tokens", f"({self.min_tokens}) must not exceed max_new_tokens "
                             f"({self.max_new_tokens})")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in the parameters must exist in the model."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids",
                                                           self.stop_token_ids)):
            bad = [i for i in ids if i >= vocab_size]
            if bad:
                raise ParamError(name, f"names token {bad[0]}, but the vocabulary has "
                                 f"{vocab_size} tokens (ids 0..{vocab_size - 1})")

    @property
    def plain(self) -> bool:
        """Nothing but temperature, top-k and top-p shapes the distribution."""
        return (not self.logit_bias and self.presence_penalty == 0
                and self.frequency_penalty == 0 and self.repetition_penalty == 1
                and self.min_tokens == 0 and self.min_p == 0)

    def enders(self) -> set[int]:
        """Token ids that end generation once produced."""
        return set(self.stop_token_ids) | (set() if self.ignore_eos else {EOS_ID})


class Logprob(NamedTuple):
    """A token's log-probability under the model, and the most likely alternatives there."""

    logprob: float
    top: list[tuple[int, float]]  # (id, log-prob), most likely first


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


def shaped(logits: Tensor, params: SamplingParams) -> Tensor:
    """Temperature, top-k, top-p and min-p applied to logits (B, vocab) of rows that share
    params; greedy parameters leave them as they are."""
    if params.temperature == 0:
        return logits
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * params.min_p
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """The next ids (B,) from the last position's logits (B, vocab)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = shaped(logits, params)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


def adjusted(logits: Tensor, params: SamplingParams, prompt: Tensor | None,
             output: list[int]) -> Tensor:
    """One row's logits (vocab,) after logit_bias, the min_tokens ban and the penalties.

    prompt: the prompt's ids (for the repetition penalty, which counts prompt and output, as
    CTRL and vLLM do); output: the ids generated so far (presence and frequency penalties count
    only those, as OpenAI does)."""
    if params.plain:
        return logits
    logits = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        bias = torch.tensor([float(v) for v in params.logit_bias.values()],
                            device=logits.device)
        logits[ids] += bias  # the ids are a dict's keys: distinct
    if len(output) < params.min_tokens:
        banned = params.enders()
        if banned:
            logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
    out = torch.tensor(output, dtype=torch.long, device=logits.device)
    if params.repetition_penalty != 1:
        seen = out if prompt is None else torch.cat((prompt.to(logits.device), out))
        seen = seen.unique()
        if seen.numel():
            values = logits[seen]
            r = params.repetition_penalty
            logits[seen] = torch.where(values > 0, values / r, values * r)
    if out.numel() and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(out, minlength=logits.size(-1)).to(logits.dtype)
        logits -= params.frequency_penalty * counts
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def choose(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           prompts: list[Tensor | None], outputs: list[list[int]]) -> list[int]:
    """The next id of every row of logits (B, vocab), each row with its own parameters,
    generator and history. Plain greedy rows share one argmax."""
    ids = logits.argmax(dim=-1).tolist()
    for i, p in enumerate(params):
        if p.plain and p.temperature == 0:
            continue
        row = adjusted(logits[i], p, prompts[i], outputs[i])[None]
        ids[i] = int(sample(row, p, generators[i])[0])
    return ids


def logprobs_of(logits: Tensor, chosen: Tensor, top: int) -> list[Logprob]:
    """The model's own log-probabilities (before any bias, penalty or temperature, as vLLM
    reports them by default) of chosen (N,) under logits (N, vocab), with the `top` most
    likely alternatives at each position."""
    logp = logits.float().log_softmax(dim=-1)
    picked = logp.gather(-1, chosen[:, None]).squeeze(1).tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        pairs = zip(ids.tolist(), values.tolist(), strict=True)
        tops = [list(zip(i, v, strict=True)) for i, v in pairs]
    else:
        tops = [[] for _ in picked]
    return [Logprob(p, t) for p, t in zip(picked, tops, strict=True)]


def generator_for(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator seeded with seed (reduced into torch's range), or freshly at random."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed % SEED_RANGE)
    return generator
