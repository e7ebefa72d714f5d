"""The `domainlm` command: one sub-command per pipeline stage, each a thin call into a module.

Importing this package registers every sub-command on `main` (the console script's entry)."""

from domainlm.cli import align, data, evaluation, serving, training  # noqa: F401 - they register
from domainlm.cli.base import main

__all__ = ["main"]
