"""An OpenAI-compatible HTTP API over an Engine (one base model and its LoRA adapters):
/v1/models, /v1/completions, /v1/chat/completions (streaming as server-sent events), vLLM's
/tokenize, /detokenize and runtime LoRA endpoints, Prometheus /metrics and /health.

Requests decode concurrently in the engine's shared batch (serve/scheduler.py); connections
are served by serve/http.py (a worker pool, idle connections on a selector); request bodies
are checked by serve/api.py. Every error, a client's or a bug, is a JSON body in OpenAI's shape.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from typing import Any

from domainlm.errors import UserError
from domainlm.model.decode import ContextError, ParamError, TextStream
from domainlm.serve.api import APIError, get, parse, parse_json
from domainlm.serve.engine import Engine, UnknownModel
from domainlm.serve.http import ConnectionHandler, HTTPServer
from domainlm.serve.logprobs import TokenText, chat_logprobs, completion_logprobs
from domainlm.serve.metrics import Metrics
from domainlm.serve.routes import RoutesMixin

MAX_BODY = 16 * 1024 * 1024  # bytes; a larger request body is refused with 413


class Handler(RoutesMixin, ConnectionHandler):
    server: APIServer
    protocol_version = "HTTP/1.1"  # keep-alive: the openai client reuses its connections

    # --------------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            super().log_message(format, *args)

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """BaseHTTPRequestHandler's errors (a malformed request line, headers too long, an
        unknown method) in OpenAI's JSON shape instead of an HTML page."""
        self.close_connection = True
        # A request line too broken to parse leaves HTTP/0.9, which has no status line: answer
        # in HTTP/1.1 so that clients see the status.
        self.request_version = "HTTP/1.1"
        kind = "invalid_request_error" if code < 500 else "server_error"
        self._send(code, APIError(code, message or explain or "bad request", None,
                                  None, kind).body())

    def _send(self, status: int, body: dict | bytes, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self._status = status

    def _chunk(self, data: bytes) -> None:  # chunked transfer encoding, for event streams
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, obj: Any) -> None:
        self._chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

    def _read(self) -> bytes:
        """The request body, read whatever the route, so the next request on the connection
        starts where it should; a body that cannot be read closes the connection."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length, not chunked", None,
                           "length_required")
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

    def _json(self) -> Any:
        return parse_json(self._raw)

    def _handle(self) -> None:
        started = time.perf_counter()
        method = self.command
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        route = path if path in self.ROUTES else (
            "/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        self._status = 500
        try:
            self._raw = self._read()
            allowed = self.ROUTES.get(route)
            if allowed is None:
                raise APIError(404, f"unknown route {method} {path}", None, "not_found")
            want, action = allowed
            if method != want and not (method == "HEAD" and want == "GET"):
                self.close_connection = self.close_connection or method not in (
                    "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")
                raise APIError(405, f"{path} takes {want}, not {method}", None,
                               "method_not_allowed")
            action(self, path)
        except APIError as e:
            headers = {"Allow": self.ROUTES[route][0]} if e.status == 405 else None
            self._send(e.status, e.body(), headers)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug: answer 500, log it, keep serving
            traceback.print_exc(file=sys.stderr)
            err = APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            self._send(500, err.body())
        metrics = self.server.metrics
        metrics.requests.labels(route, str(self._status)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - started)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    # --------------------------------------------------------------------- generation

    def _generate(self, chat: bool) -> None:
        started = time.perf_counter()
        engine = self.server.engine
        req = parse(self._json(), chat, engine.context)
        if req.model not in engine.models():
            raise APIError(404, f"the model {req.model!r} does not exist; this server has "
                           f"{engine.models()}", "model", "model_not_found")
        where = "messages" if chat else "prompt"
        params = req.params
        try:
            # An empty prompt is one token: the end-of-document token it starts after.
            longest = max(len(engine.encode(p)[0]) or 1 for p in req.prompts)
            if req.max_tokens == -1:  # a chat without max_tokens: the rest of the context
                room = engine.context - longest
                if room < 1 or room < params.min_tokens:
                    raise ContextError(f"the prompt ({longest} tokens) leaves no room in the "
                                       f"model's context of {engine.context} tokens")
                params = dataclasses.replace(params, max_new_tokens=room)
            elif longest + req.max_tokens > engine.context or longest >= engine.context:
                raise ContextError(
                    f"this model's maximum context length is {engine.context} tokens, but "
                    f"{longest + req.max_tokens} were requested ({longest} in the prompt, "
                    f"{req.max_tokens} for the completion); shorten the prompt or reduce "
                    "max_tokens")
            streams = engine.streams(req.model, req.prompts, params, n=req.n, truncate=False)
        except ParamError as e:
            param = e.param if e.param not in ("messages", "prompt") else where
            raise APIError(400, str(e), param) from None
        except ContextError as e:
            raise APIError(400, str(e), where, "context_length_exceeded") from None
        except (UnknownModel, UserError) as e:
            raise APIError(400, str(e)) from None
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                "created": int(time.time()), "model": req.model}
        flat = [(i, s) for i, choices in enumerate(streams) for s in choices]
        try:
            if req.stream:
                self._stream(req, flat, head, chat, started)
            else:
                self._whole(req, flat, head, chat)
        finally:
            for _, s in flat:
                s.close()  # a client that went away frees its rows
            metrics = self.server.metrics
            metrics.prompt_tokens.inc(sum(c[0].prompt_tokens for c in streams))
            metrics.generation_tokens.inc(sum(s.completion_tokens for _, s in flat))

    def _echo(self, req: Any, prompt_index: int, s: TextStream) -> str:
        if not req.echo:
            return ""
        prompt = req.prompts[prompt_index]
        return prompt if isinstance(prompt, str) else self.server.engine.sp.decode(s.prompt_ids)

    def _entries(self, req: Any, s: TextStream, tokens: list) -> list:
        entries = []
        if req.echo:
            lps = s.sequence.prompt_logprobs or [None] * len(s.prompt_ids)
            entries = list(zip(s.prompt_ids, lps, strict=True))
        if req.max_tokens != 0:
            entries += [(t.id, t.logprob) for t in tokens]
        return entries

    def _logprobs(self, req: Any, chat: bool, entries: list, start: int) -> dict | None:
        if req.logprobs is None:
            return None
        table = self.server.tokens
        return chat_logprobs(table, entries) if chat else completion_logprobs(table, entries,
                                                                              start)

    def _whole(self, req: Any, flat: list, head: dict, chat: bool) -> None:
        choices = []
        for index, (p, s) in enumerate(flat):
            text = "".join(piece for piece, _ in s.pieces())
            echo = self._echo(req, p, s)
            if req.max_tokens == 0:
                text, s.completion_tokens = "", 0
            choice: dict[str, Any] = {"index": index, "finish_reason": s.finish_reason,
                                      "logprobs": self._logprobs(
                                          req, chat, self._entries(req, s, s.tokens), 0)}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = echo + text
            choices.append(choice)
        self._send(200, {**head, "choices": choices, "usage": _usage(req, flat)})

    def _stream(self, req: Any, flat: list, head: dict, chat: bool, started: float) -> None:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def chunk(index: int, text: str | None, finish: str | None = None, role: bool = False,
                  logprobs: dict | None = None) -> dict:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": index,
                          "delta": {"role": "assistant", **delta} if role else delta}
            else:
                choice = {"index": index, "text": text or ""}
            return {**head, "choices": [{**choice, "logprobs": logprobs,
                                         "finish_reason": finish}]}

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._status = 200
        sent = [0] * len(flat)  # characters of each choice's text sent so far
        echoed = [False] * len(flat)
        first = True
        try:
            if chat:
                for index in range(len(flat)):
                    self._event(chunk(index, "", role=True))
            for index, text, tokens, done in _merged([s for _, s in flat]):
                p, s = flat[index]
                if first:
                    self.server.metrics.first_token.observe(time.perf_counter() - started)
                    first = False
                if req.echo and not echoed[index]:  # the prefill is done: its log-probs too
                    echo = self._echo(req, p, s)
                    self._event(chunk(index, echo, logprobs=self._logprobs(
                        req, chat, self._entries(req, s, []), 0)))
                    sent[index], echoed[index] = len(echo), True
                if req.max_tokens == 0:
                    s.completion_tokens = 0
                elif text or tokens:
                    entries = [(t.id, t.logprob) for t in tokens]
                    self._event(chunk(index, text, logprobs=self._logprobs(
                        req, chat, entries, sent[index])))
                    sent[index] += len(text)
                if done:
                    self._event(chunk(index, None, s.finish_reason))
            if req.include_usage:
                self._event({**head, "choices": [], "usage": _usage(req, flat)})
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
            return
        except Exception as e:  # noqa: BLE001 - headers are sent: report it in the stream
            traceback.print_exc(file=sys.stderr)
            self._event(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                 type="server_error").body())
        self._event("[DONE]")
        self._chunk(b"")


def _merged(streams: list[TextStream]) -> Iterator[tuple[int, str, list, bool]]:
    """(choice, text, tokens, finished) as each stream produces them: one stream inline,
    several through a queue fed by one thread each (they decode in the same batch, so a
    round-robin reader would wait on the slowest)."""
    if len(streams) == 1:
        for text, tokens in streams[0].pieces():
            yield 0, text, tokens, False
        yield 0, "", [], True
        return
    q: queue.SimpleQueue = queue.SimpleQueue()

    def pump(i: int, s: TextStream) -> None:
        try:
            for text, tokens in s.pieces():
                q.put((i, text, tokens, False))
            q.put((i, "", [], True))
        except BaseException as e:  # noqa: BLE001 - handed to the writer
            q.put(e)

    for i, s in enumerate(streams):
        threading.Thread(target=pump, args=(i, s), daemon=True).start()
    left = len(streams)
    while left:
        item = q.get()
        if isinstance(item, BaseException):
            raise item
        left -= item[3]
        yield item


def _usage(req: Any, flat: list) -> dict[str, int]:
    prompts = {p: s.prompt_tokens for p, s in flat}
    prompt = sum(prompts.values())
    completion = sum(s.completion_tokens for _, s in flat)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


class APIServer(HTTPServer):
    """The HTTP server with the engine, its metrics and token names."""

    def __init__(self, engine: Engine, address: tuple[str, int], log_requests: bool,
                 allow_adapter_updates: bool = False, **http: Any) -> None:
        super().__init__(address, Handler, **http)
        self.engine, self.log_requests = engine, log_requests
        self.allow_adapter_updates = allow_adapter_updates
        self.created = int(time.time())
        self.tokens = TokenText(engine.sp)
        self.metrics = Metrics(engine.scheduler.stats, lambda: self.connections)


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 0,
                log_requests: bool = False, allow_adapter_updates: bool = False,
                **http: Any) -> APIServer:
    """A server bound to (host, port), not yet serving (port 0: any free port, see
    server.server_address); run server.serve_forever() in a thread and server.shutdown().
    http: serve/http.py's workers, idle_timeout, request_timeout, max_connections."""
    return APIServer(engine, (host, port), log_requests, allow_adapter_updates, **http)


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
          allow_adapter_updates: bool = False, **http: Any) -> None:
    """Serve until Ctrl-C, logging one line per request to stderr."""
    server = make_server(engine, host, port, log_requests=True,
                         allow_adapter_updates=allow_adapter_updates, **http)
    h, p = server.server_address[:2]
    print(f"serving {', '.join(engine.models())} at http://{h}:{p}/v1 (Ctrl-C stops)",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


__all__ = ["APIError", "APIServer", "get", "make_server", "serve"]
