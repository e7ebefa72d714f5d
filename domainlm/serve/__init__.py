"""Serving: the engine (engine.py: one model, its adapters, the scheduler that batches every
request's decoding, scheduler.py) and an OpenAI-compatible HTTP server over it (server.py, with
http.py, api.py, routes.py, logprobs.py, metrics.py). Decoding itself is domainlm.model.decode."""

from domainlm.serve.engine import Engine, UnknownModel

__all__ = ["Engine", "UnknownModel"]
