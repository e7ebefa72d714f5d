"""The serving engine: one model loaded once (any format `load_model` reads), its tokenizer and
chat template, and LoRA adapters loaded onto that same base (at start or at run time); each
request names the base or an adapter, and its sequences decode in the scheduler's shared batch
(serve/scheduler.py) through the one decoding engine (domainlm.model.decode)."""

from __future__ import annotations

import dataclasses
import threading
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
from domainlm.model.peft.lora import load_lora, lora_layers, unload_lora
from domainlm.serve.scheduler import MAX_BATCH, Scheduler
from domainlm.tokenizer.templates import chat_template

ROLES = ("system", "user", "assistant")
Prompt = str | list[dict] | list[int]  # text, chat messages ({role, content}) or token ids


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

    Every sequence decodes in the scheduler's thread, which alone touches the model: requests
    run concurrently in one batch (each LoRA adapter applied to its own rows) and never see
    each other's adapters or outputs. max_batch and mix_adapters are the scheduler's.
    """

    def __init__(self, model_dir: Path, adapters: dict[str, Path] | None = None,
                 name: str | None = None, *, max_batch: int = MAX_BATCH,
                 mix_adapters: bool = True) -> None:
        model_dir = Path(model_dir)
        self.model: nn.Module = load_model(model_dir)
        self.sp, tokenizer_dir = load_tokenizer(model_dir)
        self.template = chat_template(tokenizer_dir)
        self.name = name or default_name(model_dir)
        self.adapter_folder = (model_dir / "adapter_config.json").is_file()
        # A LoRA folder served alone is its base with that adapter on: requests for its name
        # keep it on.
        active = {m.active for m in lora_layers(self.model).values()} - {None}
        self._base_adapter = next(iter(active)) if active else None
        self.adapters: dict[str, Path] = {}
        self._lock = threading.Lock()  # changes of the adapter table
        if adapters and self.adapter_folder:
            raise UserError(
                f"{model_dir} is an adapter folder: serve LoRA adapters on a base model (a model "
                "folder, a quantized folder or a .gguf file), or serve this adapter alone"
            )
        for adapter, path in (adapters or {}).items():
            self._check_name(adapter)
            load_lora(self.model, Path(path), adapter)
            self.adapters[adapter] = Path(path)
        self.model.eval()
        self.context = context_length(self.model)
        self.scheduler = Scheduler(self.model, max_batch, mix_adapters)

    def _check_name(self, adapter: str) -> None:
        if not adapter or adapter == self.name or adapter in self.adapters:
            raise UserError(
                f"adapter name {adapter!r} is empty or already taken (the base model is "
                f"{self.name!r}); give every adapter its own name"
            )

    def models(self) -> list[str]:
        """The names requests can use: the base model first, then the adapters."""
        return [self.name, *self.adapters]

    def encode(self, prompt: Prompt) -> tuple[list[int], list[str]]:
        """Token ids of a text prompt, or of messages rendered by the chat template with the
        assistant's turn opened, or the ids themselves; and the stop strings that the prompt's
        format implies."""
        if isinstance(prompt, str):
            return self.sp.encode(prompt), []
        if isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.config.vocab_size
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ParamError("prompt", f"holds token id {bad[0]}, outside the vocabulary "
                                 f"(ids 0..{vocab - 1})")
            return list(prompt), []
        if not isinstance(prompt, list) or not prompt:
            raise ParamError("messages", "must be a non-empty list of {role, content} objects")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ParamError(f"messages[{i}].role", f"must be one of {', '.join(ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ParamError(f"messages[{i}].content", "must be a string")
        text = self.template.render(prompt, add_generation_prompt=True)
        return self.sp.encode(text), [self.template.stop] if self.template.stop else []

    def _adapter(self, model: str) -> str | None:
        if model not in self.models():
            raise UnknownModel(f"model {model!r} does not exist; this server has {self.models()}")
        return self._base_adapter if model == self.name else model

    def streams(self, model: str, prompts: list[Prompt], params: SamplingParams | None = None,
                *, n: int = 1, truncate: bool = True) -> list[list[TextStream]]:
        """n streamed generations for each prompt, decoding together from now on. Errors in the
        request are raised here, before anything runs. Choice i samples with seed + i."""
        adapter = self._adapter(model)
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in prompts]
        with self.scheduler.together() as source:
            out = []
            for ids, stops in encoded:
                extra = [s for s in stops if s not in params.stop]
                base = dataclasses.replace(params, stop=[*params.stop, *extra]) if extra else params
                choices = []
                for i in range(n):
                    p = base if i == 0 or base.seed is None else dataclasses.replace(
                        base, seed=base.seed + i)
                    choices.append(TextStream(self.model, self.sp, ids, p, truncate=truncate,
                                              adapter=adapter, source=source))
                out.append(choices)
        return out

    def stream(self, model: str, prompt: Prompt, params: SamplingParams | None = None, *,
               truncate: bool = True) -> TextStream:
        """The streamed generation for `model` (base or adapter name); errors in the request are
        raised here, before any text."""
        return self.streams(model, [prompt], params, truncate=truncate)[0][0]

    def generate(self, model: str, prompt: Prompt, params: SamplingParams | None = None, *,
                 truncate: bool = True) -> Completion:
        """One whole generation for `model`; messages are rendered with the chat template."""
        return collect(self.stream(model, prompt, params, truncate=truncate))

    # ------------------------------------------------------------------ adapters at run time

    def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter folder onto the base as model `name` (between two decoding
        steps; running requests go on)."""
        if self.adapter_folder:
            raise UserError("this server serves an adapter folder: load adapters onto a base")
        with self._lock:
            self._check_name(name)
            done, errors = threading.Event(), []

            def load() -> bool:
                try:
                    load_lora(self.model, Path(path), name)
                except Exception as e:  # noqa: BLE001 - reported to the caller below
                    errors.append(e)
                finally:
                    done.set()
                return True

            self.scheduler.call(load)
            done.wait()
            if errors:
                e = errors[0]
                raise e if isinstance(e, UserError) else UserError(str(e)) from e
            self.adapters[name] = Path(path)

    def unload_adapter(self, name: str) -> None:
        """Remove adapter `name`: new requests no longer find it; its weights go once the
        requests already running on it finish."""
        with self._lock:
            if name not in self.adapters:
                raise UnknownModel(f"no adapter named {name!r}; this server has "
                                   f"{list(self.adapters)}")
            del self.adapters[name]

        def unload() -> bool:
            if name in self.scheduler.adapters_in_use():
                return False
            unload_lora(self.model, name)
            return True

        self.scheduler.call(unload)
