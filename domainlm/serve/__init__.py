"""Serving: generation with a KV cache and streaming (generate.py), and an OpenAI-compatible HTTP
server over one base model and its LoRA adapters (server.py)."""

from domainlm.serve.generate import (
    Completion,
    ContextError,
    Engine,
    ParamError,
    SamplingParams,
    TextStream,
    UnknownModel,
    complete,
    stream,
    top_p_filter,
)

__all__ = [
    "Completion",
    "ContextError",
    "Engine",
    "ParamError",
    "SamplingParams",
    "TextStream",
    "UnknownModel",
    "complete",
    "stream",
    "top_p_filter",
]
