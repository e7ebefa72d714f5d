"""`domainlm sweep`: short trials of one stage over the fields of `sweep.params`, searched by
Optuna (grid, random or TPE), pruned with Optuna's Lightning callback when a trial's validation
loss falls behind the others'; writes the best recipe and a table of every trial under
build/<run>/sweep/. Each trial is a whole run of the stage in its own folder
(sweep/trials/trial-NNN/), reading the run's earlier stages through links, so the run's own
outputs are never touched."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import click
import yaml

from domainlm.errors import UserError
from domainlm.files import write_json, write_text
from domainlm.recipe import Recipe, load_recipe
from domainlm.sweep.space import check_space, grid, suggest, with_values
from domainlm.train.loop import BEST, outer_callbacks

STAGES = ("pretrain", "finetune", "align")
# The earlier stages' folders a trial reads (linked into its folder), and the stage that must
# be built first.
READS = {
    "pretrain": ("corpus", "tokenizer", "tokens"),
    "finetune": ("corpus", "tokenizer", "tokens", "pretrain"),
    "align": ("corpus", "tokenizer", "tokens", "pretrain", "sft"),
}
BEFORE = {"pretrain": "tokens", "finetune": "pretrain", "align": "finetune"}
VALIDATED_ALIGN = ("dpo", "ipo")  # the methods that validate (PPO and GRPO only sample)


class _ByValidation:
    """The trial as Optuna's pruning callback sees it, with one change: the step of a report is
    the validation's number, not the epoch (our runs validate every few optimizer steps, often
    several times in an epoch). It keeps every reported loss for the trial's value."""

    def __init__(self, trial) -> None:
        self.trial = trial
        self.losses: list[float] = []

    def report(self, value: float, step: int) -> None:
        self.trial.report(float(value), len(self.losses))
        self.losses.append(float(value))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.trial, name)


def method_of(recipe: Recipe, stage: str) -> str | None:
    """The one method trials train (finetune, align): sweep.method or the recipe's first."""
    if stage == "pretrain":
        return None
    listed = recipe.finetune.methods if stage == "finetune" else recipe.align.methods
    method = recipe.sweep.method or (listed[0] if listed else None)
    if stage == "finetune" and method not in ("full", "lora", "qlora", "adapter", "prompt",
                                              "selective"):
        raise UserError(f"sweep.method: {method!r} is not a fine-tuning method")
    if stage == "align" and method not in VALIDATED_ALIGN:
        raise UserError(f"sweep.method: {method!r}: an alignment sweep tunes one of "
                        f"{', '.join(VALIDATED_ALIGN)}, the methods with a validation loss")
    return method


def target(recipe: Recipe, stage: str, method: str | None) -> Path:
    """The folder of the trainer whose validation loss is the trial's value."""
    layout = recipe.layout
    if stage == "pretrain":
        return layout.pretrain
    return layout.sft_method(method) if stage == "finetune" else layout.align_method(method)


def link_inputs(run: Recipe, trial: Recipe, stage: str) -> None:
    """The trial's folder reads the run's earlier stages through symbolic links (plan.json is
    copied: a trial whose settings change the plan rewrites its own)."""
    root = trial.layout.root
    root.mkdir(parents=True, exist_ok=True)
    for name in READS[stage]:
        src = run.layout.root / name
        if src.exists():
            os.symlink(src.resolve(), root / name, target_is_directory=True)
    if run.layout.plan.is_file():
        shutil.copy2(run.layout.plan, trial.layout.plan)


def run_trial_stage(trial: Recipe, stage: str) -> None:
    if stage == "pretrain":
        from domainlm.plan.run import run_plan
        from domainlm.train.pretrain import pretrain

        if trial.layout.plan.is_file():  # the run has a plan: the trial's settings may move it
            run_plan(trial)
        pretrain(trial, progress=False)
    elif stage == "finetune":
        from domainlm.finetune.stage import finetune

        finetune(trial, progress=False)
    else:
        from domainlm.align.stage import align

        align(trial, progress=False)


def drop_checkpoints(folder: Path) -> None:
    """A finished trial keeps its model and logs, not its checkpoints (links are not followed)."""
    for dirpath, dirnames, _ in os.walk(folder):
        for d in list(dirnames):
            if d.startswith("checkpoints"):
                shutil.rmtree(Path(dirpath) / d, ignore_errors=True)
                dirnames.remove(d)


def recipe_value(recipe: Recipe, key: str) -> Any:
    obj: Any = recipe
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def in_space(value: Any, p) -> bool:
    if p.choices is not None:
        return value in p.choices
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and p.low <= value <= p.high


def sweep(recipe: Recipe, stage: str, *, trials: int | None = None) -> dict:
    """Run the sweep; returns its summary (also build/<run>/sweep/sweep.json)."""
    import optuna
    from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

    if stage not in STAGES:
        raise UserError(f"--stage {stage!r}: one of {', '.join(STAGES)}")
    check_space(recipe)
    sw = recipe.sweep
    method = method_of(recipe, stage)
    if not recipe.layout.manifest(BEFORE[stage]).is_file():
        raise UserError(f"a {stage} sweep trains on the run's {BEFORE[stage]} outputs: run "
                        f"`make {BEFORE[stage]} RECIPE={recipe.path}` first")
    say = click.echo
    out = recipe.layout.sweep
    trials_dir = out / "trials"
    shutil.rmtree(trials_dir, ignore_errors=True)  # an earlier sweep's trials
    trials_dir.mkdir(parents=True)
    data = yaml.safe_load(Path(recipe.path).read_text(encoding="utf-8")) or {}
    one_method = {"finetune": {"finetune.methods": [method]},
                  "align": {"align.methods": [method]}}.get(stage, {})

    # A failed trial's reason goes into the table; Optuna's own warning would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    queue: list[dict] = []
    if sw.sampler == "grid":
        queue = grid(sw.params)
        sampler = optuna.samplers.RandomSampler(seed=recipe.seed)  # every trial is enqueued
        budget = min(trials or sw.trials, len(queue))
    else:
        sampler = (optuna.samplers.TPESampler(seed=recipe.seed) if sw.sampler == "tpe"
                   else optuna.samplers.RandomSampler(seed=recipe.seed))
        budget = trials or sw.trials
        # The recipe's own values first, when they lie in the space: the table then shows
        # what the search gained over them.
        own = {k: recipe_value(recipe, k) for k in sw.params}
        if all(in_space(v, sw.params[k]) for k, v in own.items()):
            queue = [own]
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=sw.startup_trials,
                                          n_warmup_steps=sw.warmup_validations)
              if sw.pruner == "median" else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    for params in queue:
        study.enqueue_trial(params)

    def objective(trial) -> float:
        t0 = time.time()
        values = {k: suggest(trial, k, p) for k, p in sw.params.items()}
        name = f"trial-{trial.number:03d}"
        say(f"sweep: {name}: " + ", ".join(f"{k} = {v}" for k, v in values.items()))
        trial_data = with_values(data, {**sw.fixed, **values, **one_method})
        trial_data.update(name=name, build_dir=str(trials_dir))
        trial_data.pop("sweep", None)
        path = trials_dir / f"{name}.yaml"
        write_text(path, yaml.safe_dump(trial_data, sort_keys=False))
        reporter = _ByValidation(trial)
        try:
            trial_recipe = load_recipe(path)
            link_inputs(recipe, trial_recipe, stage)
            folder = target(trial_recipe, stage, method).resolve()
            pruning = PyTorchLightningPruningCallback(reporter, monitor=BEST)
            with outer_callbacks(lambda o: [pruning] if Path(o).resolve() == folder else []):
                run_trial_stage(trial_recipe, stage)
        except UserError as e:
            trial.set_user_attr("note", str(e).splitlines()[0][:200])
            raise
        finally:
            trial.set_user_attr("seconds", round(time.time() - t0, 1))
            trial.set_user_attr("validations", len(reporter.losses))
            drop_checkpoints(trials_dir / name)
        if not reporter.losses:
            raise UserError(f"{name} validated nowhere: give the stage validation data (and a "
                            "val_every below its steps)")
        return min(reporter.losses)

    timeout = sw.timeout_minutes * 60 if sw.timeout_minutes else None
    t0, cpu0 = time.time(), _cpu_seconds()
    study.optimize(objective, n_trials=budget, timeout=timeout, catch=(UserError,))
    cost = {"wall_minutes": round((time.time() - t0) / 60, 1),
            "cpu_minutes": round((_cpu_seconds() - cpu0) / 60, 1)}
    summary = report(recipe, stage, method, study, data, queue if sw.sampler != "grid" else [],
                     cost)
    say(f"sweep: wrote {out}/ (trials.md: every trial; best.yaml: the best recipe)")
    return summary


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def report(recipe: Recipe, stage: str, method: str | None, study, data: dict,
           baseline: list[dict], cost: dict) -> dict:
    """trials.csv and trials.md (every trial), best.yaml (the recipe with the best values),
    sweep.json (the summary)."""
    from optuna.trial import TrialState

    sw, out = recipe.sweep, recipe.layout.sweep
    keys = list(sw.params)
    rows = []
    for t in study.trials:
        state = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
                 TrialState.FAIL: "failed"}.get(t.state, t.state.name.lower())
        losses = t.intermediate_values
        value = t.value if t.state == TrialState.COMPLETE else (min(losses.values())
                                                                 if losses else None)
        note = t.user_attrs.get("note", "")
        if state == "pruned":
            note = f"pruned after validation {max(losses) + 1}" if losses else "pruned"
        if baseline and t.number == 0:
            note = (note + "; " if note else "") + "the recipe's own values"
        rows.append({"trial": t.number, "state": state,
                     "val_loss": None if value is None else round(value, 4),
                     **{k: t.params.get(k) for k in keys},
                     "validations": t.user_attrs.get("validations", 0),
                     "seconds": t.user_attrs.get("seconds"), "note": note})
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value) if complete else None
    columns = ["trial", "state", "val_loss", *keys, "validations", "seconds", "note"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "trials.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out / "trials.csv")
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# Sweep of `{stage}`" + (f" ({method})" if method else ""), "",
             f"`domainlm sweep --recipe {recipe.path} --stage {stage}`: {len(rows)} trials, "
             f"{sw.sampler} sampler, {sw.pruner} pruner, {cost['wall_minutes']} minutes "
             f"({cost['cpu_minutes']} CPU minutes); value: the trial's best `{BEST}`.", ""]
    if sw.fixed:
        lines += ["Every trial: " + ", ".join(f"`{k}: {v}`" for k, v in sw.fixed.items()), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    summary: dict = {"stage": stage, "method": method, "sampler": sw.sampler, **cost,
                     "trials": rows, "best": None}
    if best is not None:
        best_data = with_values(data, best.params)
        best_data["name"] = recipe.name
        header = (f"# The best of {len(rows)} trials of `domainlm sweep --stage {stage}` over "
                  f"{recipe.path}: validation loss {best.value:.4f} (trial {best.number}).\n")
        write_text(out / "best.yaml", header + yaml.safe_dump(best_data, sort_keys=False))
        summary["best"] = {"trial": best.number, "val_loss": best.value, "params": best.params}
        lines += ["", f"Best: trial {best.number}, " + ", ".join(
            f"`{k}` = {fmt(v)}" for k, v in best.params.items())
            + f" (validation loss {best.value:.4f}); `best.yaml` is the recipe with these."]
    else:
        lines += ["", "No trial completed: no best recipe was written."]
    write_text(out / "trials.md", "\n".join(lines) + "\n")
    write_json(out / "sweep.json", summary)
    click.echo("\n".join(lines[lines.index("| " + " | ".join(columns) + " |"):]))
    if best is None:
        raise UserError(f"no trial of the sweep completed (see {out / 'trials.md'})")
    return summary
