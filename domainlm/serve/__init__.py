"""Serving: the engine (engine.py: one model, its adapters, a lock per request) and an
OpenAI-compatible HTTP server over it (server.py). Decoding itself is domainlm.model.decode."""

from domainlm.serve.engine import Engine, UnknownModel

__all__ = ["Engine", "UnknownModel"]
