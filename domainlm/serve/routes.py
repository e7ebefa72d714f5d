"""The server's routes other than generation: models, health, Prometheus metrics, vLLM's
/tokenize and /detokenize, and vLLM's runtime LoRA endpoints (/v1/load_lora_adapter,
/v1/unload_lora_adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainlm.errors import UserError
from domainlm.model.decode import ParamError
from domainlm.serve.api import APIError, check_fields, get


class RoutesMixin:
    """Route handlers for serve.server.Handler (which provides _send, _json and server)."""

    server: Any
    _send: Any
    _json: Any
    _generate: Any

    def _models(self, path: str) -> None:
        self._send(200, {"object": "list",
                         "data": [self._card(n) for n in self.server.engine.models()]})

    def _model(self, path: str) -> None:
        name = path[len("/v1/models/"):]
        if name not in self.server.engine.models():
            raise APIError(404, f"model {name!r} does not exist", "model", "model_not_found")
        self._send(200, self._card(name))

    def _card(self, name: str) -> dict:
        engine = self.server.engine
        return {"id": name, "object": "model", "created": self.server.created,
                "owned_by": "domainlm", "root": engine.name,
                "parent": None if name == engine.name else engine.name,
                "max_model_len": engine.context}

    def _health(self, path: str) -> None:
        self._send(200, {"status": "ok"})

    def _metrics(self, path: str) -> None:
        data, content_type = self.server.metrics.render()
        self._send(200, data, content_type=content_type)

    def _body(self, fields: set[str]) -> dict:
        body = self._json()
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", None, "invalid_json")
        check_fields(body, fields)
        model = get(body, "model", (str,))
        if model is not None and model not in self.server.engine.models():
            raise APIError(404, f"the model {model!r} does not exist", "model",
                           "model_not_found")
        return body

    def _tokenize(self, path: str) -> None:
        """vLLM's /tokenize: {prompt} or {messages}; our tokenizer adds no special tokens (a
        document follows the end-of-document token), so add_special_tokens changes nothing."""
        engine = self.server.engine
        body = self._body({"model", "prompt", "messages", "add_special_tokens",
                           "add_generation_prompt", "return_token_strs"})
        get(body, "add_special_tokens", (bool,))
        if ("prompt" in body) == ("messages" in body):
            raise APIError(400, "give exactly one of prompt and messages", "prompt")
        try:
            if "prompt" in body:
                ids, _ = engine.encode(get(body, "prompt", (str,), ""))
            else:
                if not get(body, "add_generation_prompt", (bool,), True):
                    raise APIError(400, "add_generation_prompt false is not supported",
                                   "add_generation_prompt", "unsupported")
                ids, _ = engine.encode(get(body, "messages", (list,)))
        except ParamError as e:
            raise APIError(400, str(e), e.param) from None
        names = self.server.tokens.names
        strs = [names[i] for i in ids] if get(body, "return_token_strs", (bool,), False) else None
        self._send(200, {"count": len(ids), "max_model_len": engine.context, "tokens": ids,
                         "token_strs": strs})

    def _detokenize(self, path: str) -> None:
        engine = self.server.engine
        body = self._body({"model", "tokens"})
        ids = get(body, "tokens", (list,))
        vocab = engine.sp.get_piece_size()
        if ids is None or not all(isinstance(i, int) and not isinstance(i, bool)
                                  and 0 <= i < vocab for i in ids):
            raise APIError(400, f"tokens must be a list of token ids in [0, {vocab})", "tokens")
        self._send(200, {"prompt": engine.sp.decode(ids)})

    def _adapters_allowed(self) -> None:
        if not self.server.allow_adapter_updates:
            raise APIError(403, "loading and unloading adapters at run time is off: start the "
                           "server with --allow-adapter-updates", None, "forbidden")

    def _load_lora(self, path: str) -> None:
        self._adapters_allowed()
        body = self._body({"lora_name", "lora_path", "load_inplace"})
        name, folder = get(body, "lora_name", (str,)), get(body, "lora_path", (str,))
        if not name or not folder:
            raise APIError(400, "lora_name and lora_path are required",
                           "lora_name" if not name else "lora_path")
        if get(body, "load_inplace", (bool,), False):
            raise APIError(400, "load_inplace is not supported (unload the adapter first)",
                           "load_inplace", "unsupported")
        try:
            self.server.engine.load_adapter(name, Path(folder))
        except UserError as e:
            raise APIError(400, str(e), "lora_path") from None
        self._send(200, f"Success: LoRA adapter '{name}' added successfully.".encode(),
                   content_type="text/plain; charset=utf-8")

    def _unload_lora(self, path: str) -> None:
        self._adapters_allowed()
        body = self._body({"lora_name", "lora_int_id"})
        name = get(body, "lora_name", (str,))
        if not name:
            raise APIError(400, "lora_name is required", "lora_name")
        try:
            self.server.engine.unload_adapter(name)
        except UserError as e:
            raise APIError(404, str(e), "lora_name", "model_not_found") from None
        self._send(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(),
                   content_type="text/plain; charset=utf-8")

    ROUTES: dict[str, tuple[str, Any]] = {
        "/v1/models": ("GET", _models),
        "/v1/models/{id}": ("GET", _model),
        "/health": ("GET", _health),
        "/metrics": ("GET", _metrics),
        "/tokenize": ("POST", _tokenize),
        "/detokenize": ("POST", _detokenize),
        "/v1/load_lora_adapter": ("POST", _load_lora),
        "/v1/unload_lora_adapter": ("POST", _unload_lora),
        "/v1/completions": ("POST", lambda self, path: self._generate(chat=False)),
        "/v1/chat/completions": ("POST", lambda self, path: self._generate(chat=True)),
    }
