"""Text generation: sampling (greedy, temperature, top-k, top-p), stop strings, streamed text, and
an Engine that serves one base model with any number of LoRA adapters switched per request."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import sentencepiece as spm
import torch
from torch import Tensor, nn

from domainlm.errors import UserError
from domainlm.export.hf import load_hf_folder
from domainlm.files import read_json
from domainlm.finetune.templates import BUILTIN, Template, load_template
from domainlm.model.peft.lora import load_lora, set_adapter
from domainlm.tokenizer.special import EOS_ID

ROLES = ("system", "user", "assistant")
Prompt = str | list[dict]  # a text prompt, or chat messages ({role, content})
Tokenizer = spm.SentencePieceProcessor
_REPLACEMENT = "\ufffd"  # what SentencePiece decodes an incomplete UTF-8 byte sequence to


class ParamError(UserError, ValueError):
    """A request or sampling parameter that is out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param} {message}")
        self.param = param


class ContextError(UserError, ValueError):
    """The prompt plus the tokens to generate do not fit in the model's context."""


class UnknownModel(UserError, LookupError):
    """A model name that is neither the base model nor one of its adapters."""


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
    probabilities sum to at least top_p (Holtzman et al. 2020)."""
    if top_p >= 1:
        return logits
    probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
    # A token is dropped when the tokens ranked above it already reach top_p; the first never is.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next id from the last position's logits (vocab,)."""
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    return int(torch.multinomial(logits.softmax(dim=-1), 1, generator=generator))


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
    ids generated so far. `close()` ends it early (and frees the engine)."""

    def __init__(self, model: nn.Module, sp: Tokenizer, prompt_ids: list[int],
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
        self._gen.close()  # runs the session's exit: the engine's lock is released

    def _run(self) -> Iterator[str]:
        with self._session():
            yield from self._decode()

    def _decode(self) -> Iterator[str]:
        model, p = self.model, self.params
        device = next(model.parameters()).device
        generator = torch.Generator(device=device)
        if p.seed is None:
            generator.seed()
        else:
            generator.manual_seed(p.seed)
        cache: list | None = [] if p.use_cache else None
        new: list[int] = []
        emitted, longest_stop = 0, max((len(s) for s in p.stop), default=0)
        step = torch.tensor([self.prompt_ids], device=device)
        while True:
            # Grad mode is thread state: set per call, never held across a yield.
            with torch.no_grad():
                logits = model(step, cache=cache)[0][0, -1]
            token = next_token(logits, p, generator)
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
            ids = [token] if cache is not None else self.prompt_ids + new
            step = torch.tensor([ids], device=device)
        self.text = self.sp.decode(new)
        if len(self.text) > emitted:
            yield self.text[emitted:]


def stream(model: nn.Module, sp: Tokenizer, prompt_ids: list[int], params: SamplingParams,
           *, truncate: bool = True) -> TextStream:
    """Text pieces of the continuation of prompt_ids, as they are decoded. A prompt that does
    not leave room for max_new_tokens loses tokens from the left (truncate) or is refused."""
    return TextStream(model, sp, prompt_ids, params, truncate=truncate)


def collect(pieces: TextStream) -> Completion:
    text = "".join(pieces)
    return Completion(text, pieces.finish_reason or "stop", pieces.prompt_tokens,
                      pieces.completion_tokens)


def complete(model: nn.Module, sp: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             *, truncate: bool = True) -> Completion:
    """(text, finish_reason, prompt_tokens, completion_tokens) of one whole generation."""
    return collect(stream(model, sp, prompt_ids, params, truncate=truncate))


def chat_template(folder: Path) -> Template:
    """The folder's chat template (tokenizer_config.json), else the built-in `chat`."""
    path = Path(folder) / "tokenizer_config.json"
    source = read_json(path).get("chat_template") if path.is_file() else None
    if isinstance(source, list):  # transformers' named templates: take the default one
        source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not source:
        return load_template("chat")
    builtin = next((name for name, text in BUILTIN.items() if text == source), None)
    return load_template(builtin) if builtin else Template(f"{path} chat_template", source)


class Engine:
    """One base model loaded once, its tokenizer and chat template, and LoRA adapters loaded onto
    that same base; each request names the base or an adapter.

    A request holds one lock for its whole generation, from selecting its adapter with
    set_adapter to its last token, so concurrent requests never mix adapters, and generation is
    serialized: one request at a time. That is fine for a CPU reference server; vLLM (which
    batches requests and serves several LoRA adapters at once from the same exported folders) is
    the production path.
    """

    def __init__(self, model_dir: Path, adapters: dict[str, Path] | None = None,
                 name: str | None = None) -> None:
        model_dir = Path(model_dir)
        self.model = load_hf_folder(model_dir)
        tokenizer = model_dir / "tokenizer.model"
        if not tokenizer.is_file():
            raise UserError(f"{tokenizer} is missing: export the model folder with its tokenizer")
        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        self.template = chat_template(model_dir)
        folder = model_dir.resolve()
        # build/<run>/sft/full/model → "full": the folder named "model" says nothing.
        self.name = name or (folder.parent.name if folder.name == "model" else folder.name)
        self.adapters: dict[str, Path] = {}
        for adapter, path in (adapters or {}).items():
            if not adapter or adapter == self.name or adapter in self.adapters:
                raise UserError(
                    f"adapter name {adapter!r} is empty or already taken (the base model is "
                    f"{self.name!r}); give every adapter its own name"
                )
            load_lora(self.model, Path(path), adapter)
            self.adapters[adapter] = Path(path)
        set_adapter(self.model, None)
        self.model.eval()
        self.context = context_length(self.model)
        self._lock = threading.Lock()

    def models(self) -> list[str]:
        """The names requests can use: the base model first, then the adapters."""
        return [self.name, *self.adapters]

    def encode(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        """Token ids of a text prompt, or of messages rendered by the chat template with the
        assistant's turn opened; and the stop strings that the prompt's format implies."""
        if isinstance(prompt, str):
            return self.sp.encode(prompt), []
        if not isinstance(prompt, list) or not prompt:
            raise ParamError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ParamError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ParamError(f"messages[{i}].content", "must be a string")
        text = self.template.render(prompt, add_generation_prompt=True)
        return self.sp.encode(text), [self.template.stop] if self.template.stop else []

    def stream(self, model: str, prompt: Prompt, params: SamplingParams | None = None, *,
               truncate: bool = True) -> TextStream:
        """The streamed generation for `model` (base or adapter name); errors in the request are
        raised here, before any text; the engine's lock is taken at the first piece."""
        if model not in self.models():
            raise UnknownModel(f"model {model!r} does not exist; this server has {self.models()}")
        adapter = None if model == self.name else model
        params = params or SamplingParams()
        ids, stops = self.encode(prompt)
        extra = [s for s in stops if s not in params.stop]
        if extra:
            params = dataclasses.replace(params, stop=[*params.stop, *extra])
        return TextStream(self.model, self.sp, ids, params, truncate=truncate,
                          session=lambda: self._session(adapter))

    def generate(self, model: str, prompt: Prompt, params: SamplingParams | None = None, *,
                 truncate: bool = True) -> Completion:
        """One whole generation for `model`; messages are rendered with the chat template."""
        return collect(self.stream(model, prompt, params, truncate=truncate))

    @contextlib.contextmanager
    def _session(self, adapter: str | None) -> Iterator[None]:
        with self._lock:
            set_adapter(self.model, adapter)
            yield
