"""The serving engine: one model loaded once (any format `load_model` reads), its tokenizer and
chat template, and LoRA adapters loaded onto that same base; each request names the base or an
adapter, and decodes through the one decoding engine (domainlm.model.decode)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from domainlm.errors import UserError
from domainlm.model.decode import (
    Completion,
    ParamError,
    SamplingParams,
    TextStream,
    collect,
    context_length,
)
from domainlm.model.load import load_model, load_tokenizer
from domainlm.model.peft.lora import load_lora, set_adapter
from domainlm.tokenizer.templates import chat_template

ROLES = ("system", "user", "assistant")
Prompt = str | list[dict]  # a text prompt, or chat messages ({role, content})


class UnknownModel(UserError, LookupError):
    """A model name that is neither the base model nor one of its adapters."""


def default_name(path: Path) -> str:
    """A model's name in requests: its folder's (or file's stem); build/<run>/sft/full/model →
    "full", because a folder named "model" says nothing."""
    folder = Path(path).resolve()
    if folder.is_file():
        return folder.stem
    return folder.parent.name if folder.name == "model" else folder.name


class Engine:
    """One base model loaded once, its tokenizer and chat template, and LoRA adapters loaded onto
    that same base; each request names the base or an adapter.

    `model_dir` is anything load_model reads: a model folder (float or int8/int4), a .gguf
    file, or an adapter folder on its base (LoRA, prompt tuning, bottleneck).

    A request holds one lock for its whole generation, from selecting its adapter with
    set_adapter to its last token, so concurrent requests never mix adapters, and generation is
    serialized: one request at a time. That is fine for a CPU reference server; vLLM (which
    batches requests and serves several LoRA adapters at once from the same exported folders) is
    the production path.
    """

    def __init__(self, model_dir: Path, adapters: dict[str, Path] | None = None,
                 name: str | None = None) -> None:
        model_dir = Path(model_dir)
        self.model: nn.Module = load_model(model_dir)
        self.sp, tokenizer_dir = load_tokenizer(model_dir)
        self.template = chat_template(tokenizer_dir)
        self.name = name or default_name(model_dir)
        self.adapters: dict[str, Path] = {}
        if adapters and (model_dir / "adapter_config.json").is_file():
            raise UserError(
                f"{model_dir} is an adapter folder: serve LoRA adapters on a base model (a model "
                "folder, a quantized folder or a .gguf file), or serve this adapter alone"
            )
        for adapter, path in (adapters or {}).items():
            if not adapter or adapter == self.name or adapter in self.adapters:
                raise UserError(
                    f"adapter name {adapter!r} is empty or already taken (the base model is "
                    f"{self.name!r}); give every adapter its own name"
                )
            load_lora(self.model, Path(path), adapter)
            self.adapters[adapter] = Path(path)
        if self.adapters:
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
            if self.adapters:
                set_adapter(self.model, adapter)
            yield
