"""The recipe's `sweep:` section: which recipe fields `domainlm sweep` searches over (ranges or
choices), how (grid, random or TPE), how many trials, and when a trial is pruned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from domainlm.recipe.checks import Rule, at_least, positive


@dataclass
class SweepParam:
    """One searched field: a range (low, high; log-spaced with `log`) or a list of choices."""

    low: int | float | None = None  # whole numbers at both ends: the field takes whole numbers
    high: int | float | None = None
    log: bool = False  # sample (and, for grid, spread points) on a log scale
    choices: list[Any] | None = None  # instead of a range: the values to try
    points: int = 3  # grid search over a range: this many values from low to high

    RANGES: ClassVar[dict[str, Rule | str]] = {"points": at_least(2, "values")}


@dataclass
class SweepConfig:
    """Hyperparameter search (`domainlm sweep`): short trials, each a run of one stage in its
    own folder under build/<run>/sweep/trials/."""

    # Dotted recipe field -> its range or choices, e.g. finetune.full.lr: {low: 1e-5, high: 1e-3}.
    params: dict[str, SweepParam] = field(default_factory=dict)
    # Dotted recipe field -> the value every trial uses (what makes trials short), e.g.
    # finetune.epochs: 1. The best recipe written at the end keeps the recipe's own values.
    fixed: dict[str, Any] = field(default_factory=dict)
    sampler: Literal["tpe", "random", "grid"] = "tpe"  # grid: every combination, in turn
    trials: int = 8  # trials at most (grid: at most the number of combinations)
    timeout_minutes: float | None = None  # no new trial starts after this; null: no limit
    pruner: Literal["median", "none"] = "median"  # stop a trial behind the median of the others
    startup_trials: int = 2  # trials that run to the end before any is pruned
    warmup_validations: int = 1  # validations of a trial before it may be pruned
    method: str | None = None  # finetune or align: the method trials train; null: the first

    RANGES: ClassVar[dict[str, Rule | str]] = {
        "trials": at_least(1, "trials"),
        "timeout_minutes": positive("minutes"),
        "startup_trials": at_least(0, "trials"),
        "warmup_validations": at_least(0, "validations"),
    }
