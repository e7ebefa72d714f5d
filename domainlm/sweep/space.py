"""The search space of a sweep: the recipe fields named in `sweep.params`, checked against the
recipe's sections, turned into Optuna suggestions (or a grid), and written into a copy of the
recipe's YAML."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import typing
from typing import Any

from domainlm.errors import UserError
from domainlm.recipe import Recipe, SweepParam

SCALARS = (bool, int, float, str, type(None))


def check_field(key: str, where: str) -> None:
    """`key` (dotted, e.g. finetune.full.lr) names a setting of the recipe, not a section."""
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("loader")}
        if part not in names:
            section = ".".join(parts[:i]) or "the top level"
            raise UserError(f"{where}: {key!r} is not a recipe field ({section} has "
                            f"{', '.join(sorted(names))})")
        tp = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(tp):
            cls = tp
            continue
        if i != len(parts) - 1:
            raise UserError(f"{where}: {key!r}: {'.'.join(parts[: i + 1])} is a setting, not a "
                            "section (list items cannot be swept)")
        return
    raise UserError(f"{where}: {key!r} is a whole section; name one of its settings")


def check_space(recipe: Recipe) -> None:
    """Every searched and fixed field exists, and every range or choice list makes sense."""
    sw = recipe.sweep
    if not sw.params:
        raise UserError(f"{recipe.path}: sweep.params is empty: name at least one recipe field "
                        "to search, e.g. finetune.full.lr: {low: 1.0e-5, high: 1.0e-3, log: true}")
    for key in sw.fixed:
        check_field(key, f"{recipe.path}: sweep.fixed")
    for key, p in sw.params.items():
        where = f"{recipe.path}: sweep.params.{key}"
        check_field(key, f"{recipe.path}: sweep.params")
        if key in sw.fixed:
            raise UserError(f"{where}: is also in sweep.fixed; keep it in one of the two")
        if p.choices is not None:
            if p.low is not None or p.high is not None:
                raise UserError(f"{where}: give either choices or low and high, not both")
            if not p.choices or not all(isinstance(c, SCALARS) for c in p.choices):
                raise UserError(f"{where}: choices must be a non-empty list of numbers, text, "
                                "true/false or null")
            continue
        if p.low is None or p.high is None:
            raise UserError(f"{where}: needs low and high (a range) or choices (a list)")
        if not p.low < p.high:
            raise UserError(f"{where}: low ({p.low}) must be below high ({p.high})")
        if p.log and p.low <= 0:
            raise UserError(f"{where}: a log range needs low > 0, got {p.low}")


def is_int(p: SweepParam) -> bool:
    return isinstance(p.low, int) and isinstance(p.high, int)


def suggest(trial, key: str, p: SweepParam) -> Any:
    """The trial's value of one field, as the sampler chooses it."""
    if p.choices is not None:
        return trial.suggest_categorical(key, p.choices)
    if is_int(p):
        return trial.suggest_int(key, p.low, p.high, log=p.log)
    return trial.suggest_float(key, float(p.low), float(p.high), log=p.log)


def grid_values(p: SweepParam) -> list[Any]:
    """The values a grid tries for one field: the choices, or `points` spread over the range."""
    if p.choices is not None:
        return list(p.choices)
    lo, hi, n = p.low, p.high, p.points
    if p.log:
        values = [math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i / (n - 1))
                  for i in range(n)]
    else:
        values = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    if is_int(p):
        return sorted({round(v) for v in values})
    return [float(f"{v:.6g}") for v in values]


def grid(params: dict[str, SweepParam]) -> list[dict[str, Any]]:
    """Every combination, the first field varying slowest, in the order the recipe writes."""
    keys = list(params)
    return [dict(zip(keys, combo, strict=True))
            for combo in itertools.product(*(grid_values(params[k]) for k in keys))]


def with_values(data: dict, values: dict[str, Any]) -> dict:
    """A deep copy of the recipe's YAML data with each dotted field set."""
    out = copy.deepcopy(data)
    for key, value in values.items():
        node = out
        *sections, last = key.split(".")
        for s in sections:
            child = node.get(s)
            if not isinstance(child, dict):
                child = node[s] = {}
            node = child
        node[last] = value
    return out
