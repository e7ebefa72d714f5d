"""The `domainlm` group and what every sub-command shares: the recipe option and the way a
user's mistake is printed (one line, no traceback)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from domainlm.errors import UserError

DEFAULT_RECIPE = "recipes/demo.yaml"


def _friendly(fn):
    """Print a UserError as one line (no traceback) and exit 2, the convention of click."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(2)

    return wrapper


recipe_option = click.option(
    "--recipe",
    "-r",
    default=DEFAULT_RECIPE,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The recipe (YAML) that describes the run; outputs go to build/<recipe name>/.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="domainlm")
def main() -> None:
    """Build a domain-specific language model end to end.

    Stages, in order (each reads the previous stage's files under build/<run>/):
    corpus, tokenizer, tokens, plan, pretrain, finetune, align, quantize, eval.
    The Makefile runs them: `make corpus pretrain finetune`.
    """
