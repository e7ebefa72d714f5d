"""An OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions, streaming
as server-sent events) over an Engine: one base model and its LoRA adapters.

Built on the standard library's ThreadingHTTPServer rather than a web framework: the whole API
is a few hundred lines, and a reference server should add no dependency. Generation is
serialized by the Engine's lock; for production traffic serve the exported folders with vLLM
(batching, multi-LoRA) or llama.cpp's server (GGUF).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from domainlm.errors import UserError
from domainlm.model.decode import ContextError, ParamError, SamplingParams, TextStream
from domainlm.serve.engine import Engine, UnknownModel

MAX_BODY = 16 * 1024 * 1024  # bytes; a larger request body is refused with 413
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Fields whose non-default values ask for features this server does not have: refused, not ignored.
UNSUPPORTED = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False),
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
}


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


def _get(body: dict, key: str, kinds: tuple[type, ...], default: Any = None) -> Any:
    """body[key] when it has one of the JSON types kinds (bool is never a number), else a 400."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("float", "number")
                            for k in kinds)
        raise APIError(400, f"{key} must be {names}, got {json.dumps(value)[:80]}", key,
                       "invalid_type")
    return value


def _params(engine: Engine, body: dict, prompt_tokens: int, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI request, checked against the model's context."""
    for key, defaults in UNSUPPORTED.items():
        if key in body and body[key] not in defaults:
            raise APIError(400, f"{key} is not supported by this server", key, "unsupported")
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", "n")
    limit = engine.context
    key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    # Without max_tokens: OpenAI's 16 for completions, the rest of the context for chat (vLLM).
    room = max(limit - prompt_tokens, 1)
    max_tokens = _get(body, key, (int,), room if chat else min(DEFAULT_COMPLETION_TOKENS, room))
    if not 1 <= max_tokens < limit:
        raise APIError(400, f"{key} must be in [1, {limit - 1}] (the model's context is {limit} "
                       f"tokens), got {max_tokens}", key)
    if prompt_tokens + max_tokens > limit:
        raise APIError(400, f"this model's maximum context length is {limit} tokens, but "
                       f"{prompt_tokens + max_tokens} were requested ({prompt_tokens} in the "
                       f"prompt, {max_tokens} for the completion); shorten the prompt or reduce "
                       f"{key}", "messages" if chat else "prompt", "context_length_exceeded")
    temperature = _get(body, "temperature", (int, float), 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_k = _get(body, "top_k", (int,))  # vLLM's extension; -1 or 0 means off, as there
    stop = _get(body, "stop", (str, list), [])
    try:
        return SamplingParams(
            max_new_tokens=max_tokens, temperature=float(temperature),
            top_k=top_k if top_k and top_k > 0 else None,
            top_p=_get(body, "top_p", (int, float)), stop=[stop] if isinstance(stop, str) else stop,
            seed=_get(body, "seed", (int,)))
    except ParamError as e:
        raise APIError(400, str(e), e.param) from None


def _prompt(body: dict, chat: bool) -> str | list[dict]:
    if chat:
        messages = _get(body, "messages", (list,))
        if not messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: only text is understood here
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise APIError(400, "only text content parts are supported",
                                   f"messages[{i}].content")
                content = "".join(str(p.get("text", "")) for p in content)
            out.append({**m, "content": content} if isinstance(m, dict) else m)
        return out
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string or a list of one string", "prompt")
    return prompt


class Handler(BaseHTTPRequestHandler):
    server: APIServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections

    # --------------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:  # chunked transfer encoding, for event streams
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj: Any) -> None:
        self._chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    def _read(self) -> bytes:
        """The request body, read whatever the route, so the next request on the connection
        starts where it should."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the unread body would be parsed as the next request
            status = 413 if length > MAX_BODY else 400
            raise APIError(status, f"Content-Length must be a number of bytes up to {MAX_BODY}",
                           None, "request_too_large" if status == 413 else None)
        return self.rfile.read(length)

    def _json(self) -> dict:
        try:
            body = json.loads(self._raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", None, "invalid_json")
        return body

    def _handle(self, method: str) -> None:
        routes = {"/v1/models": ("GET", self._models), "/health": ("GET", self._health),
                  "/v1/completions": ("POST", lambda: self._generate(chat=False)),
                  "/v1/chat/completions": ("POST", lambda: self._generate(chat=True))}
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._raw = self._read()
            if path.startswith("/v1/models/") and method == "GET":
                return self._model(path[len("/v1/models/"):])
            if path not in routes:
                raise APIError(404, f"unknown route {method} {path}", None, "not_found")
            want, action = routes[path]
            if method != want:
                raise APIError(405, f"{path} takes {want}, not {method}", None,
                               "method_not_allowed")
            action()
        except APIError as e:
            self._send(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug: answer 500, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            self._send(500, err.body())

    def do_GET(self) -> None:  # noqa: N802 - the names BaseHTTPRequestHandler dispatches to
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    # --------------------------------------------------------------------- routes

    def _health(self) -> None:
        self._send(200, {"status": "ok"})

    def _card(self, name: str) -> dict:
        engine = self.server.engine
        return {"id": name, "object": "model", "created": self.server.created,
                "owned_by": "domainlm", "root": engine.name,
                "parent": None if name == engine.name else engine.name,
                "max_model_len": engine.context}

    def _models(self) -> None:
        self._send(200, {"object": "list",
                         "data": [self._card(n) for n in self.server.engine.models()]})

    def _model(self, name: str) -> None:
        if name not in self.server.engine.models():
            raise APIError(404, f"model {name!r} does not exist", "model", "model_not_found")
        self._send(200, self._card(name))

    def _generate(self, chat: bool) -> None:
        engine, body = self.server.engine, self._json()
        model = _get(body, "model", (str,))
        if model not in engine.models():
            raise APIError(404, f"the model {model!r} does not exist; this server has "
                           f"{engine.models()}", "model", "model_not_found")
        prompt = _prompt(body, chat)
        stream = _get(body, "stream", (bool,), False)
        options = _get(body, "stream_options", (dict,), {})
        try:
            ids, _ = engine.encode(prompt)
            params = _params(engine, body, len(ids) or 1, chat)
            pieces = engine.stream(model, prompt, params, truncate=False)
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None
        except ContextError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt",
                           "context_length_exceeded") from None
        except (UnknownModel, UserError) as e:
            raise APIError(400, str(e)) from None
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": model}
        if stream:
            return self._stream(pieces, head, chat, bool(options.get("include_usage")))
        try:
            text = "".join(pieces)
        finally:
            pieces.close()
        choice: dict[str, Any] = {"index": 0, "logprobs": None,
                                  "finish_reason": pieces.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        self._send(200, {**head, "choices": [choice], "usage": _usage(pieces)})

    def _stream(self, pieces: TextStream, head: dict, chat: bool, usage: bool) -> None:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": {"role": "assistant", **delta} if role else delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return {**head, "choices": [{**choice, "logprobs": None, "finish_reason": finish}]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            if chat:
                self._event(chunk("", role=True))
            for piece in pieces:
                self._event(chunk(piece))
            self._event(chunk(None, pieces.finish_reason))
            if usage:
                self._event({**head, "choices": [], "usage": _usage(pieces)})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
            traceback.print_exc(file=sys.stderr)
            self._event(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                 type="server_error").body())
        finally:
            pieces.close()  # frees the engine's lock even when the client went away
        self._event("[DONE]")
        self._chunk(b"")


def _usage(pieces: TextStream) -> dict[str, int]:
    return {"prompt_tokens": pieces.prompt_tokens, "completion_tokens": pieces.completion_tokens,
            "total_tokens": pieces.prompt_tokens + pieces.completion_tokens}


class APIServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive

    def __init__(self, engine: Engine, address: tuple[str, int], log_requests: bool) -> None:
        super().__init__(address, Handler)
        self.engine, self.log_requests = engine, log_requests
        self.created = int(time.time())


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0,
                log_requests: bool = False) -> APIServer:
    """A server bound to (host, port), not yet serving (port 0: any free port, see
    server.server_address); run server.serve_forever() in a thread and server.shutdown()."""
    return APIServer(engine, (host, port), log_requests)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until Ctrl-C, logging one line per request to stderr."""
    server = make_server(engine, host, port, log_requests=True)
    h, p = server.server_address[:2]
    print(f"serving {', '.join(engine.models())} at http://{h}:{p}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
