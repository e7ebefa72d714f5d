"""Prompt templates: Jinja in Hugging Face's chat-template format, rendered as transformers does."""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.tokenizer import special

# The templates never write eos_token: SentencePiece spells the text "</s>" in ordinary pieces,
# so the end of a reply is the EOS id that sft_data appends to the completion.
# No text sits after the last message, so a reply's completion ends with the reply itself
# ("...<|end|>"), followed by EOS: the model learns to stop right there.
CHAT = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('the chat template knows the roles system, user and assistant, not '"
    " ~ message['role']) }}"
    "{% endif %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n' }}{% endif %}"
    "{{ '<|assistant|>\\n' }}"
    "{% endif %}"
)
# Alpaca's layout (Taori et al. 2023) without its fixed preamble: a system message, if any,
# takes the preamble's place.
ALPACA = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' ~ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' ~ message['content'] }}"
    "{% else %}{{ raise_exception('the alpaca template knows the roles system, user and "
    "assistant, not ' ~ message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{% if messages %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### Response:\\n' }}"
    "{% endif %}"
)
PLAIN = (
    "{% for message in messages %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages %}{{ '\\n' }}{% endif %}"
)
BUILTIN = {"chat": CHAT, "alpaca": ALPACA, "plain": PLAIN}
# Text that ends a generated reply besides EOS (the stop string when scoring generations):
# what a built-in writes after an assistant message when the conversation goes on.
STOPS = {"chat": "<|end|>", "alpaca": "\n\n### Instruction:", "plain": ""}

_KEY = "finetune.template"
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' replacement of Jinja's tojson, which would HTML-escape the text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    # The environment transformers' apply_chat_template compiles templates in (its
    # _compile_jinja_template), so a template saved in tokenizer_config.json renders there as
    # it renders here. Left out: strftime_now (a template using it would not be reproducible).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env


class Template:
    """A compiled prompt template; `source` is what goes into tokenizer_config.json, `stop`
    the text that ends a reply besides EOS ("" when only EOS does)."""

    def __init__(self, name: str, source: str, stop: str = "") -> None:
        self.name, self.source, self.stop = name, source, stop
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(
                f"{_KEY}: template {name} line {e.lineno}: {e.message}; fix the Jinja syntax"
            ) from None

    def __repr__(self) -> str:
        return f"Template({self.name!r})"

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=special.DOCUMENT_START,  # as tokenizer_config.json names it
                eos_token=special.EOS,
            )
        except Exception as e:  # noqa: BLE001 - a user's template can fail in any way
            raise UserError(f"{_KEY}: template {self.name} failed to render: {e}") from None

    def prompt_and_completion(self, messages: list[dict]) -> tuple[str, str]:
        """(prompt, completion): prompt is what the model sees before the last (assistant)
        message at inference; prompt + completion is the whole conversation rendered."""
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError("the last message must be the assistant's")
        prompt = self.render(messages[:-1], add_generation_prompt=True)
        full = self.render(messages)
        if not full.startswith(prompt):
            pairs = enumerate(zip(prompt, full, strict=False))
            at = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(full)))
            raise UserError(
                f"{_KEY}: template {self.name}: the whole conversation does not start with the "
                f"prompt (the conversation without its last message, rendered with "
                f"add_generation_prompt=true); they differ at character {at}: prompt "
                f"{prompt[at:at + 30]!r}, conversation {full[at:at + 30]!r}. Such a template "
                "cannot mask the prompt: make the generation prompt exactly the text that "
                "precedes an assistant message"
            )
        completion = full[len(prompt):]
        if not completion.strip():
            raise UserError(
                f"{_KEY}: template {self.name} renders nothing of the assistant's message; "
                "it must write message['content'] for the assistant role"
            )
        return prompt, completion


def load_template(name_or_path: str) -> Template:
    """A built-in template by name (chat, alpaca, plain) or a Jinja file by path, checked on a
    probe conversation so that a template that cannot mask the prompt fails here, not mid-run."""
    if name_or_path in BUILTIN:
        return Template(name_or_path, BUILTIN[name_or_path], STOPS[name_or_path])
    path = Path(name_or_path)
    names = ", ".join(BUILTIN)
    looks_like_path = path.suffix in (".jinja", ".j2", ".jinja2") or len(path.parts) > 1
    if not looks_like_path and not path.exists():
        close = difflib.get_close_matches(name_or_path, list(BUILTIN), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(
            f"{_KEY}: unknown template {name_or_path!r}; {hint}use a built-in ({names}) "
            "or the path of a .jinja file"
        )
    if not path.is_file():
        raise UserError(
            f"{_KEY}: {path} is not a file; give a built-in template ({names}) or the path of "
            "a .jinja file in the Hugging Face chat-template format"
        )
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{_KEY}: {path} is not UTF-8 text; save it as UTF-8") from None
    template = Template(str(path), source)
    template.prompt_and_completion(_PROBE)
    return template


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
