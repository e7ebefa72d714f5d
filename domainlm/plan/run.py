"""`domainlm plan`: the plan stage (build/<run>/plan.json, remade only when the recipe or the
data change) and what-if questions (other budgets on the command line), which never write it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from domainlm.plan import hardware
from domainlm.plan.budget import Settings
from domainlm.plan.build import PLAN_VERSION, make_plan
from domainlm.plan.output import format_plan, write_planned_recipe
from domainlm.recipe import Recipe, section_dict
from domainlm.stage import Stage, read_manifest, run_stage


def plan_stage(recipe: Recipe) -> Stage:
    """The plan as a stage: its inputs are the token counts (when they exist) and the sections
    that size the model; a wall-clock budget also depends on the machine it was timed on."""
    layout = recipe.layout
    meta = layout.tokens / "meta.json"
    settings = Settings(recipe, {})
    params: dict[str, Any] = {
        "plan": settings.values,
        "model": section_dict(recipe.model),
        "precision": recipe.train.precision,
        "tokenizer": {k: section_dict(recipe.tokenizer)[k] for k in ("vocab_size", "candidates")},
    }
    if settings.values.get("minutes") is not None:
        params["machine"] = hardware.machine_fingerprint()
    return Stage(
        "plan",
        layout.plan,
        {"tokens/meta.json": meta} if meta.is_file() else {},
        params,
        PLAN_VERSION,
        hashes=layout.hashes,
    )


def run_plan(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    *,
    as_json: bool = False,
    write_recipe: Path | None = None,
    force: bool = False,
    require_tokens: bool | None = None,
) -> dict:
    """Print the plan (a table, or one JSON object). Without overrides this is the run's plan:
    build/<run>/plan.json, remade when its inputs change. With overrides (--flops, --gpu, ...)
    it answers a question and leaves plan.json as it is, so the next `make pretrain` still
    trains what the recipe asks for.

    require_tokens (default: the recipe's plan.require_tokens) turns a missing tokens folder
    from a note into an error. Timings stored in plan.json are reused (same shape, same
    machine) unless force.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if require_tokens is None:
        require_tokens = recipe.plan.require_tokens
    previous = read_manifest(recipe.layout.plan)
    out = recipe.layout.plan
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo

    def make(_: str) -> dict:
        return make_plan(
            recipe, overrides, previous=previous, force=force, require_tokens=require_tokens
        )

    if overrides:
        plan = make("")
        where = f"what-if: not written ({out} is the run's plan, from the recipe)"
    else:
        Settings(recipe, {})  # a recipe without a budget fails here, before anything is touched
        plan = run_stage(plan_stage(recipe), make, force=force, say=say)
        where = f"wrote      {out}"
    if write_recipe is not None:
        write_planned_recipe(recipe, plan, Settings(recipe, overrides).values, Path(write_recipe))
        where += f" and {write_recipe}"
    if as_json:
        click.echo(json.dumps(plan, indent=2, sort_keys=True))
    else:
        click.echo(format_plan(plan))
        click.echo(f"  {where}")
    return plan
