"""The OpenAI request bodies this server understands, checked field by field: every field is
either implemented, accepted only at the value that means "off", or refused with a 400 that
names it; so is any key the server does not know. Errors have OpenAI's shape."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from domainlm.model.sampling import MAX_LOGPROBS, ParamError, SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_CHOICES = 128  # prompts x n in one request
MAX_DEPTH = 32  # nesting of the JSON body; nothing this API takes is deeper than 5

# Fields accepted only at the values that ask for nothing (None: the field is absent or null).
OFF_ONLY: dict[str, tuple[Any, ...]] = {
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
          "presence_penalty", "frequency_penalty", "logit_bias", "seed", "user", "logprobs",
          # vLLM's extensions
          "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids", "ignore_eos"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                        "tools", "tool_choice", "parallel_tool_calls", "functions",
                        "function_call"}
MESSAGE_FIELDS = {"role", "content"}
_BRACKETS_AND_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status, message, param, code, type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _reject_constant(name: str) -> None:
    raise APIError(400, f"the body holds {name}, which is not JSON", None, "invalid_json")


def parse_json(raw: bytes) -> Any:
    """The body as JSON, or a 400: invalid UTF-8 or JSON, NaN/Infinity, integers of more than
    4300 digits, nesting deeper than MAX_DEPTH, strings with lone surrogates."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid UTF-8 ({e})", None, "invalid_json") from None
    # Nesting is counted before parsing: json.loads recurses, and a deep enough body would hit
    # the interpreter's recursion limit (a 500) before anything else could refuse it.
    depth = 0
    for m in _BRACKETS_AND_STRINGS.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > MAX_DEPTH:
                raise APIError(400, f"the body nests more than {MAX_DEPTH} levels deep", None,
                               "invalid_json")
        elif c == "]" or c == "}":
            depth -= 1
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except APIError:
        raise
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
    _check_strings(body, "")
    return body


def _check_strings(value: Any, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where or 'the body'} holds a lone UTF-16 surrogate, which is "
                           "not text", where or None, "invalid_json") from None
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_strings(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, where)
            _check_strings(v, f"{where}.{k}" if where else k)


def get(body: dict, key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[key] when it has one of the JSON types kinds (bool is never a number), else a 400."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join({"str": "a string", "float": "a number", "int": "an integer",
                             "bool": "a boolean", "list": "an array", "dict": "an object"}
                            .get(k.__name__, k.__name__) for k in kinds)
        raise APIError(400, f"{key} must be {names}, got {_show(value)}", key, "invalid_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise APIError(400, f"{key} must be finite", key, "invalid_value")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fields(body: dict, allowed: set[str]) -> None:
    """A 400 for the first key the endpoint does not know, or that asks for something off."""
    for key in body:
        if key not in allowed:
            raise APIError(400, f"unrecognized request argument supplied: {key} (this server does "
                           "not implement it; see docs/serve.md)", key, "unsupported")
        if key in OFF_ONLY and body[key] not in OFF_ONLY[key]:
            allowed_values = ", ".join(json.dumps(v) for v in OFF_ONLY[key] if v is not None)
            raise APIError(400, f"{key} {_show(body[key])} is not supported by this server"
                           f"{' (only ' + allowed_values + ')' if allowed_values else ''}", key,
                           "unsupported")


@dataclass
class Request:
    """What a completions or chat request asks for, checked."""

    model: str
    prompts: list[Any]  # text, token ids or chat messages
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    max_tokens: int  # 0: echo the prompt's log-probs only (max_new_tokens is then 1, unused)
    logprobs: int | None  # alternatives per position; None: no log-probs


def _prompts(body: dict) -> list[Any]:
    """A completion's prompts: a string, a list of strings, a list of token ids, or a list of
    lists of token ids."""
    prompt = body.get("prompt")

    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [prompt]
    if is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p)
                                                   for p in prompt):
        return list(prompt)
    raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a "
                   f"list of lists of token ids, got {_show(prompt)}", "prompt", "invalid_type")


def _messages(body: dict) -> list[dict]:
    messages = get(body, "messages", (list,))
    if not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(400, "a message must be an object", f"messages[{i}]")
        for key in m:
            if key not in MESSAGE_FIELDS:
                raise APIError(400, f"messages[{i}].{key} is not supported by this server (a "
                               "message has a role and a content)", f"messages[{i}].{key}",
                               "unsupported")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and set(p) <= {"type",
                       "text"} and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, "only text content parts ({type: text, text}) are supported",
                               f"messages[{i}].content", "unsupported")
            content = "".join(p["text"] for p in content)
        out.append({**m, "content": content})
    return out


def parse(body: Any, chat: bool, context: int) -> Request:
    """The request, or a 400 naming the first field that is wrong or not implemented."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_json")
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = get(body, "model", (str,))
    if model is None:
        raise APIError(400, "model is required", "model")
    prompts = [_messages(body)] if chat else _prompts(body)
    n = get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_CHOICES or n * len(prompts) > MAX_CHOICES:
        raise APIError(400, f"n x prompts must be in [1, {MAX_CHOICES}], got {n} x {len(prompts)}",
                       "n")
    best_of = get(body, "best_of", (int,))
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of other than n is not supported by this server", "best_of",
                       "unsupported")
    echo = not chat and get(body, "echo", (bool,), False)
    if chat:
        logprobs = None
        if get(body, "logprobs", (bool,), False):
            logprobs = get(body, "top_logprobs", (int,), 0)
        elif get(body, "top_logprobs", (int,)) is not None:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        max_tokens = get(body, key, (int,), None)
    else:
        logprobs = get(body, "logprobs", (int,))
        key = "max_tokens"
        max_tokens = get(body, key, (int,), DEFAULT_COMPLETION_TOKENS)
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"{'top_logprobs' if chat else 'logprobs'} must be in "
                       f"[0, {MAX_LOGPROBS}], got {logprobs}", "top_logprobs" if chat else
                       "logprobs")
    low = 0 if echo else 1
    if max_tokens is not None and not low <= max_tokens < context:
        raise APIError(400, f"{key} must be in [{low}, {context - 1}] (the model's context is "
                       f"{context} tokens{'; 0 only with echo' if not chat else ''}), got "
                       f"{max_tokens}", key)
    options = get(body, "stream_options", (dict,), {})
    for k in options:
        if k != "include_usage":
            raise APIError(400, f"stream_options.{k} is not supported by this server",
                           f"stream_options.{k}", "unsupported")
    stream = get(body, "stream", (bool,), False)
    if options and not stream:
        raise APIError(400, "stream_options needs stream: true", "stream_options")
    temperature = get(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_k = get(body, "top_k", (int,))  # vLLM's: -1 or 0 means off, as there
    stop = get(body, "stop", (str, list), [])
    bias = get(body, "logit_bias", (dict,), {})
    try:
        bias = {int(k): v for k, v in bias.items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids", "logit_bias") from None
    if any(isinstance(v, bool) for v in bias.values()):
        raise APIError(400, "logit_bias values must be numbers", "logit_bias")
    if top_k is not None and top_k < -1:
        raise APIError(400, f"top_k must be -1, 0 (off) or >= 1, got {top_k}", "top_k")
    # Without max_tokens a chat may use the rest of the context (the server sets it per prompt).
    budget = context - 1 if max_tokens is None else max(max_tokens, 1)
    try:
        params = SamplingParams(
            max_new_tokens=budget, temperature=float(temperature),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=get(body, "top_p", (int, float)),
            stop=[stop] if isinstance(stop, str) else stop,
            seed=get(body, "seed", (int,)),
            min_p=get(body, "min_p", (int, float), 0.0),
            presence_penalty=get(body, "presence_penalty", (int, float), 0.0),
            frequency_penalty=get(body, "frequency_penalty", (int, float), 0.0),
            repetition_penalty=get(body, "repetition_penalty", (int, float), 1.0),
            logit_bias=bias,
            min_tokens=get(body, "min_tokens", (int,), 0),
            stop_token_ids=get(body, "stop_token_ids", (list,), []),
            ignore_eos=get(body, "ignore_eos", (bool,), False),
            logprobs=logprobs,
            prompt_logprobs=logprobs if echo and logprobs is not None else None)
    except ParamError as e:
        raise APIError(400, str(e), e.param) from None
    return Request(model, prompts, params, n, stream, bool(options.get("include_usage")), echo,
                   -1 if max_tokens is None else max_tokens, logprobs)
