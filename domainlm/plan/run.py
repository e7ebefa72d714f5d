"""`domainlm plan`: budget → Chinchilla-optimal size → model shape → memory, strategy and time."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml

from domainlm.errors import UserError
from domainlm.files import atomic_path, hash_file, read_json, versions, write_json
from domainlm.plan import hardware, memory, scaling
from domainlm.plan.shape import Shape, ShapeError, search_shape, smallest
from domainlm.recipe import PlanConfig, Recipe, load_recipe

PLAN_VERSION = 1
BUDGET_KEYS = ("flops", "hours", "minutes")
HARDWARE_KEYS = ("gpu", "gpus", "mfu")
CLI_FLAGS = {k: f"--{k}" for k in ("flops", "gpu", "gpus", "hours", "mfu", "minutes", "law", "fit")}
MIN_STEPS = 1000  # the default global batch leaves at least this many optimizer steps
SHAPE_FALLBACK_TOLERANCE = 0.15


@dataclass
class Hardware:
    """Where the training runs: a named accelerator from the table, or this machine (probed)."""

    name: str
    device: str  # "cuda" (any accelerator) or "cpu"
    devices: int
    memory_bytes: int  # per device
    flops_per_s: float  # per device, what training is expected to achieve
    peak_flops: float | None = None
    mfu: float | None = None
    source: str = ""
    probe: dict | None = None

    def describe(self) -> str:
        if self.peak_flops is not None:
            return (
                f"{self.devices} x {self.name} ({self.peak_flops / 1e12:,.0f} TFLOP/s peak bf16 "
                f"dense, MFU {self.mfu:.2f})"
            )
        return (
            f"this machine: {self.name} ({self.device}), measured "
            f"{_si(self.flops_per_s)}FLOP/s in bf16"
        )


class _Settings:
    """The recipe's plan section with the command line's options applied, and where each is from."""

    def __init__(self, recipe: Recipe, overrides: dict[str, Any]):
        self.recipe = recipe
        self.cli = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(self.cli) - set(CLI_FLAGS)
        if unknown:
            raise UserError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
        base = dataclasses.asdict(recipe.plan)
        if any(k in self.cli for k in BUDGET_KEYS):
            # A budget on the command line replaces the recipe's budget as a whole; the
            # recipe's hardware (gpu, gpus, mfu) still applies to a --flops or --hours budget.
            for k in BUDGET_KEYS:
                base[k] = None
        self.values = {**base, **self.cli}
        self.plan = PlanConfig(**self.values)

    def where(self, key: str) -> str:
        if key in self.cli:
            return CLI_FLAGS[key]
        return f"{self.recipe.path or 'the recipe'}: plan.{key}"

    def budget_kinds(self) -> list[str]:
        return [k for k in BUDGET_KEYS if self.values.get(k) is not None]


# --------------------------------------------------------------------------------------------
# Budget and hardware.


def _positive(settings: _Settings, key: str, integer: bool = False) -> None:
    value = settings.values[key]
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{settings.where(key)} must be a number, got {value!r}")
    if value <= 0:
        raise UserError(f"{settings.where(key)} must be > 0, got {value:g}")
    if integer and int(value) != value:
        raise UserError(f"{settings.where(key)} must be a whole number, got {value:g}")


def _resolve_hardware(
    settings: _Settings, previous: dict | None, force: bool, notes: list[str]
) -> tuple[str, float, str, Hardware]:
    """(budget kind, budget FLOPs, description, hardware), or a UserError naming the fix."""
    for key in ("flops", "hours", "minutes", "mfu", "max_epochs", "global_batch_tokens"):
        _positive(settings, key)
    for key in ("gpus", "seq_len"):
        _positive(settings, key, integer=True)
    p = settings.plan
    if p.mfu > 1:
        raise UserError(f"{settings.where('mfu')} is a fraction of peak (0-1], got {p.mfu:g}")
    kinds = settings.budget_kinds()
    choices = "--flops F, --gpu NAME --gpus N --hours H [--mfu U], or --minutes M"
    if not kinds:
        extra = f" (--gpu {p.gpu} needs --hours)" if p.gpu else ""
        raise UserError(
            f"no compute budget{extra}: give one of {choices}, or set plan.flops, "
            "plan.gpu + plan.hours, or plan.minutes in the recipe"
        )
    if len(kinds) > 1:
        named = " and ".join(settings.where(k) for k in kinds)
        raise UserError(f"give one compute budget, not two: {named}; choose one of {choices}")
    kind = kinds[0]
    if kind == "minutes":
        cli_hw = [CLI_FLAGS[k] for k in HARDWARE_KEYS if k in settings.cli]
        if cli_hw:
            raise UserError(
                f"--minutes measures this machine; {', '.join(cli_hw)} describe accelerators: "
                "give --hours with them instead"
            )
        if p.gpu:
            notes.append(f"plan.gpu ({p.gpu}) is ignored: --minutes measures this machine")
        hw = _local(previous, force)
        flops = hw.flops_per_s * hw.devices * p.minutes * 60
        return kind, flops, f"{p.minutes:g} min on this machine, {flops:.3g} FLOPs", hw
    if kind == "hours" and not p.gpu:
        raise UserError(
            f"{settings.where('hours')} needs a gpu: add --gpu NAME (one of "
            f"{', '.join(sorted(hardware.ACCELERATORS))}), or use --minutes for this machine"
        )
    if p.gpu:
        acc = hardware.accelerator(p.gpu)
        hw = Hardware(
            name=acc.name,
            device="cuda",
            devices=p.gpus,
            memory_bytes=acc.memory_bytes,
            flops_per_s=acc.peak_flops * p.mfu,
            peak_flops=acc.peak_flops,
            mfu=p.mfu,
            source=f"{acc.description}: {acc.source}",
        )
        if acc.name == "v100":
            notes.append("the V100 has no bf16: train it with precision 16-mixed (same memory)")
    else:
        hw = _local(previous, force)
        notes.append("no --gpu given: memory and time are for this machine")
    if kind == "hours":
        flops = hw.devices * hw.flops_per_s * p.hours * 3600
        desc = f"{p.gpus} x {hw.name} x {p.hours:g} h at MFU {p.mfu:g}, {flops:.3g} FLOPs"
        return kind, flops, desc, hw
    return kind, float(p.flops), f"{p.flops:.3g} FLOPs", hw


def _local(previous: dict | None, force: bool) -> Hardware:
    """This machine, measured by the probe, or the measurement in plan.json from this machine.

    Reusing it keeps `make plan` stable: a second probe on a busy machine could give another
    speed, hence another model shape, and make every later stage rebuild.
    """
    old = ((previous or {}).get("hardware") or {}).get("probe")
    probe = None
    if not force and old and old.get("machine") == hardware.machine_fingerprint():
        try:
            probe = hardware.Probe(**old)
        except TypeError:  # stored by another version of the probe
            probe = None
    if probe is None:
        probe = hardware.probe()
    return Hardware(
        name=probe.name,
        device=probe.device,
        devices=probe.devices,
        memory_bytes=probe.memory_bytes,
        flops_per_s=probe.flops_per_s,
        source=f"probe: {probe.steps} training steps of a 1-block transformer in {probe.dtype}",
        probe=probe.to_dict(),
    )


# --------------------------------------------------------------------------------------------
# Data.


def _read_tokens(recipe: Recipe, required: bool, notes: list[str]) -> dict:
    folder = recipe.stage_dir("tokens")
    meta_path = folder / "meta.json"
    if not folder.exists():
        if required:
            raise UserError(
                f"{folder}/ does not exist and this plan must check the data: run "
                f"`make tokens RECIPE={recipe.path}` first"
            )
        notes.append(
            f"data not checked: {folder}/ does not exist (run `make tokens`), so the plan "
            "assumes there are enough unique tokens"
        )
        return {"checked": False, "path": str(meta_path)}
    try:
        meta = read_json(meta_path)
        # Unique tokens: up-sampled copies of a document repeat data, they add none.
        unique = meta["train"].get("unique_tokens", meta["train"]["tokens"])
        val = meta.get("val", {}).get("tokens")
        vocab = meta["vocab_size"]
        if not isinstance(unique, int) or not isinstance(vocab, int) or vocab < 1:
            raise TypeError("train.tokens and vocab_size must be whole numbers")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{meta_path} is missing or unreadable ({type(e).__name__}: {e}): re-run "
            f"`domainlm tokens --recipe {recipe.path} --force`"
        ) from None
    if unique <= 0:
        raise UserError(f"{meta_path}: the train split has no tokens; check `make corpus`")
    return {
        "checked": True,
        "path": str(meta_path),
        "hash": hash_file(meta_path),
        "unique_tokens": unique,
        "val_tokens": val,
        "vocab_size": vocab,
    }


def _vocab_size(recipe: Recipe, data: dict, notes: list[str]) -> int:
    if data.get("vocab_size"):
        return int(data["vocab_size"])
    v = recipe.tokenizer.vocab_size
    if isinstance(v, int):
        return v
    largest = max(recipe.tokenizer.candidates)
    notes.append(f"tokenizer.vocab_size is auto and no tokens exist yet: assuming {largest}")
    return largest


def _precision(recipe: Recipe) -> str:
    # The recipe has no training section yet; when it gains train.precision, it applies here.
    p = getattr(getattr(recipe, "train", None), "precision", None)
    return p if p in memory.PRECISIONS else "bf16-mixed"


# --------------------------------------------------------------------------------------------
# The plan.


def default_global_batch_tokens(n_params: float, n_tokens: float) -> int:
    """About 0.5M tokens per step at 1B parameters, growing as N^(1/3) up to 4M.

    Batches grow with model size in GPT-3 (0.5M at 125M-1.3B to 3.2M at 175B) and Chinchilla
    (1.5M-3M at 70B); a small run also needs enough optimizer steps, so the batch is at most
    1/MIN_STEPS of the training tokens. Rounded to a power of two.
    """
    target = 2**19 * (n_params / 1e9) ** (1 / 3)
    target = min(target, 2**22, n_tokens / MIN_STEPS)
    return 2 ** max(0, round(math.log2(max(target, 1.0))))


def _shape(
    target: float,
    vocab: int,
    recipe: Recipe,
    seq_len: int,
    notes: list[str],
    why: Callable[[], str],
) -> Shape:
    m = recipe.model
    kw = dict(
        tie_embeddings=m.tie_embeddings,
        max_seq_len=seq_len,
        rope_theta=m.rope_theta,
        norm_eps=m.norm_eps,
    )
    try:
        return search_shape(target, vocab, **kw)
    except ShapeError as e:
        if target < smallest(vocab, m.tie_embeddings).params * 0.95:
            raise ShapeError(why()) from e
        # Between two shapes of a tiny model with a large vocabulary: take the nearest and say so.
        shape = search_shape(target, vocab, tolerance=SHAPE_FALLBACK_TOLERANCE, **kw)
        notes.append(
            f"no shape is within 5% of {_count(target)} parameters with a vocabulary of "
            f"{vocab}: the nearest has {_count(shape.params)} ({shape.params / target - 1:+.0%})"
        )
        return shape


def _too_small(
    p: PlanConfig,
    hw: Hardware,
    budget_desc: str,
    target: float,
    vocab: int,
    tie: bool,
    data: dict | None,
) -> str:
    """The error for a target below the smallest model: what binds and what would suffice."""
    floor = smallest(vocab, tie)
    head = (
        f"but with a vocabulary of {vocab:,} the smallest model (d_model 64, 1 layer) has "
        f"{floor.params:,} (its embedding table alone {floor.embedding_params:,})"
    )
    c_floor = scaling.compute_for_params(floor.params, p.law, p.fit)
    if data is not None:
        need = scaling.optimum(c_floor, p.law, p.fit)[1]
        return (
            f"{p.max_epochs:g} epochs of the {_count(data['unique_tokens'])} unique tokens "
            f"support only {target:,.0f} parameters (data-constrained), {head}, which wants "
            f"{_count(need)} tokens ({need / data['unique_tokens']:.0f} epochs): add data, raise "
            "plan.max_epochs, or train a tokenizer with a smaller tokenizer.vocab_size"
        )
    time = _duration(c_floor / (hw.devices * hw.flops_per_s) / 3600)
    return (
        f"the budget ({budget_desc}) is compute-optimal for {target:,.0f} parameters, {head}, "
        f"which wants {c_floor:.3g} FLOPs ({time} on {hw.describe()}): raise the budget, or "
        "train a tokenizer with a smaller tokenizer.vocab_size"
    )


def make_plan(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    *,
    previous: dict | None = None,
    force: bool = False,
    require_tokens: bool = False,
) -> dict:
    """The plan as one JSON-ready dict (see docs/plan.md); runs the probe only when needed."""
    notes: list[str] = []
    settings = _Settings(recipe, overrides or {})
    p = settings.plan
    kind, budget, budget_desc, hw = _resolve_hardware(settings, previous, force, notes)
    data = _read_tokens(recipe, require_tokens, notes)
    vocab = _vocab_size(recipe, data, notes)

    n_opt, d_opt = scaling.optimum(budget, p.law, p.fit)
    target, constrained = n_opt, False
    if data["checked"]:
        d_max = p.max_epochs * data["unique_tokens"]
        data["max_epochs"] = p.max_epochs
        data["max_tokens"] = d_max
        if d_opt > d_max:
            # The largest model the data support: the one whose compute-optimal token count is
            # all the tokens we may use; the compute beyond it would only repeat data more.
            constrained = True
            c_data = scaling.compute_for_tokens(d_max, p.law, p.fit)
            target = scaling.optimum(c_data, p.law, p.fit)[0]

    def why() -> str:
        tie = recipe.model.tie_embeddings
        return _too_small(p, hw, budget_desc, target, vocab, tie, data if constrained else None)

    shape = _shape(target, vocab, recipe, p.seq_len, notes, why)
    n = shape.params
    tokens = budget / (6 * n)
    if data["checked"] and tokens > data["max_tokens"]:
        if not constrained:
            # The optimum fitted the data, but the shape came out smaller than the target.
            notes.append(
                f"the shape is {1 - n / target:.1%} smaller than the optimum, so its tokens "
                f"are capped at {p.max_epochs:g} epochs of the data"
            )
        tokens = float(data["max_tokens"])
    used = 6 * n * tokens
    unused = max(0.0, budget - used)
    if data["checked"]:
        data["epochs"] = tokens / data["unique_tokens"]
    if constrained:
        # Up to about 4 epochs, repeated tokens are almost as good as new ones (Muennighoff et
        # al. 2023), which is why max_epochs bounds the tokens rather than the unique count.
        notes.append(
            f"data-constrained: the compute-optimal {_count(n_opt)} params need {_count(d_opt)} "
            f"tokens, more than {p.max_epochs:g} epochs of the {_count(data['unique_tokens'])} "
            f"unique tokens; planning the largest model those {_count(tokens)} tokens support, "
            f"which leaves {unused:.3g} FLOPs ({unused / budget:.0%} of the budget) unused"
        )
    loss = scaling.predicted_loss(n, tokens, p.fit)
    if n < scaling.FITTED_PARAMS[0]:
        notes.append(
            f"{_count(n)} params is below the {_count(scaling.FITTED_PARAMS[0])} smallest model "
            "the laws were fitted on: the sizes and the loss are extrapolations"
        )

    precision = _precision(recipe)
    usable = memory.usable_bytes(hw.memory_bytes, hw.device)
    gbt = p.global_batch_tokens or default_global_batch_tokens(n, tokens)
    sequences = max(hw.devices, int(gbt // p.seq_len))
    per_device = math.ceil(sequences / hw.devices)
    opts = memory.options(shape, precision, hw.devices, p.seq_len, usable, per_device)
    chosen = next((o for o in opts if o.fits), opts[-1])
    if not chosen.fits:
        need = memory.devices_needed(shape, precision, p.seq_len, usable)
        fix = (
            f"at least {need} such devices with FSDP and checkpointing"
            if need
            else f"a shorter plan.seq_len (one sequence of {p.seq_len} does not fit)"
        )
        notes.append(
            f"does not fit: {_bytes(chosen.total)} per device even with {chosen.label} at "
            f"micro-batch 1, over the {_bytes(usable)} usable; it needs {fix}"
        )
    micro = max(chosen.micro_batch, 1)
    accum = math.ceil(per_device / micro)
    micro = math.ceil(per_device / accum)
    at_micro = memory.option(
        shape,
        precision,
        chosen.strategy,
        chosen.checkpointing,
        hw.devices,
        p.seq_len,
        usable,
        micro,
    )
    step_tokens = micro * accum * hw.devices * p.seq_len
    # Recomputing the forward pass costs 2N of the 6N FLOPs per token again.
    slowdown = 8 / 6 if chosen.checkpointing else 1.0
    hours = used * slowdown / (hw.devices * hw.flops_per_s) / 3600
    if chosen.checkpointing:
        notes.append("activation checkpointing recomputes the forward pass: time x 4/3")

    budget_info: dict[str, Any] = {"kind": kind, "description": budget_desc, "flops": budget}
    if kind == "minutes":
        budget_info["minutes"] = p.minutes
    elif p.gpu:
        budget_info.update(gpu=hw.name, gpus=p.gpus, mfu=p.mfu)
        if kind == "hours":
            budget_info["hours"] = p.hours
    return {
        "run": recipe.name,
        "recipe": str(recipe.path) if recipe.path else None,
        "budget": budget_info,
        "hardware": {
            **dataclasses.asdict(hw),
            "usable_bytes": usable,
            "description": hw.describe(),
        },
        "law": p.law,
        "fit": p.fit,
        "law_description": scaling.describe(p.law, p.fit),
        "flops": budget,
        "flops_used": used,
        "unused_flops": unused,
        "optimum": {"params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt},
        "target_params": target,
        "params": n,
        "tokens": tokens,
        "tokens_per_param": tokens / n,
        "loss": loss,
        "data": data,
        "data_constrained": constrained,
        "shape": shape.to_dict(),
        "precision": precision,
        "memory": {
            "precision": precision,
            "precision_note": memory.PRECISIONS[precision].note,
            "device_memory_bytes": hw.memory_bytes,
            "usable_bytes": usable,
            "seq_len": p.seq_len,
            "options": [o.to_dict() for o in opts],
        },
        "strategy": {
            "name": memory.LABELS[chosen.strategy],
            "lightning": memory.LIGHTNING[chosen.strategy] if hw.devices > 1 else "auto",
            "activation_checkpointing": chosen.checkpointing,
            "fits": chosen.fits,
            "devices": hw.devices,
            "memory_bytes": at_micro.total if chosen.fits else chosen.total,
            "micro_batch": micro,
            "grad_accum": accum,
            "seq_len": p.seq_len,
            "global_batch_sequences": micro * accum * hw.devices,
            "global_batch_tokens": step_tokens,
            "steps": math.ceil(tokens / step_tokens),
            "precision": precision,
        },
        "hours": hours,
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# Output.


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.1f} min"
    if hours < 48:
        return f"{hours:.1f} h"
    return f"{hours / 24:.1f} days ({hours:,.0f} h)"


def format_plan(plan: dict) -> str:
    """The readable table that `domainlm plan` prints."""
    b, hw, s, st, m = plan["budget"], plan["hardware"], plan["shape"], plan["strategy"], plan
    opt = plan["optimum"]
    data = plan["data"]
    lines = [
        f"plan for run '{plan['run']}' ({plan['recipe']})",
        f"  budget     {b['description']}",
        f"  hardware   {hw['description']}",
        f"  law        {plan['law_description']}",
        f"  optimum    {_count(opt['params'])} params x {_count(opt['tokens'])} tokens "
        f"({opt['tokens_per_param']:.1f} tokens/param)",
    ]
    if data["checked"]:
        lines.append(
            f"  data       {_count(data['unique_tokens'])} unique train tokens x "
            f"{data['max_epochs']:g} epochs max = {_count(data['max_tokens'])}: "
            + (
                "DATA-CONSTRAINED, the model is sized to the data"
                if plan["data_constrained"]
                else "enough"
            )
        )
    else:
        lines.append("  data       not checked (no tokens folder yet)")
    lines += [
        f"  model      {_count(plan['params'])} params ({plan['params']:,} exact): "
        + Shape(**{k: s[k] for k in _SHAPE_FIELDS}).describe(),
        f"  training   {_count(plan['tokens'])} tokens ({plan['tokens_per_param']:.1f} per "
        f"param"
        + (f", {data['epochs']:.2f} epochs" if data["checked"] else "")
        + f"), {plan['flops_used']:.3g} FLOPs used",
        f"  loss       {plan['loss']:.3f} nats/token predicted ({plan['fit']} fit, on the "
        "law's own data: a guide, not a promise)",
        f"  memory     per device, {m['memory']['precision']} "
        f"({m['memory']['precision_note']}), {_bytes(m['memory']['device_memory_bytes'])} "
        f"of which {_bytes(m['memory']['usable_bytes'])} usable, seq_len {st['seq_len']}:",
        "    strategy        weights    grads  optimizer  activations  buffers    total  "
        "max micro-batch",
    ]
    for o in m["memory"]["options"]:
        lines.append(
            f"    {o['label']:<14}{_bytes(o['weights']):>9}{_bytes(o['grads']):>9}"
            f"{_bytes(o['optimizer']):>11}{_bytes(o['activations']):>13}"
            f"{_bytes(o['buffers']):>9}{_bytes(o['total']):>9}  "
            + (str(o["micro_batch"]) if o["fits"] else "does not fit")
        )
    ckpt = " + activation checkpointing" if st["activation_checkpointing"] else ""
    lines += [
        f"  strategy   {st['name']}{ckpt} (Lightning strategy '{st['lightning']}'"
        + ("" if st["fits"] else ", DOES NOT FIT")
        + f"): micro-batch {st['micro_batch']} x {st['grad_accum']} accumulation x "
        f"{st['devices']} devices = {st['global_batch_sequences']} sequences = "
        f"{st['global_batch_tokens']:,} tokens/step, {st['steps']:,} steps, "
        f"{_bytes(st['memory_bytes'])} per device",
        f"  time       {_duration(plan['hours'])}",
    ]
    lines += [f"  note       {n}" for n in plan["notes"]]
    return "\n".join(lines)


_SHAPE_FIELDS = [f.name for f in dataclasses.fields(Shape)]


def write_planned_recipe(recipe: Recipe, plan: dict, settings_plan: dict, path: Path) -> None:
    """Copy the recipe with `model:` set to the planned shape and `plan:` to the budget used.

    Only those two top-level sections are replaced, so the rest keeps its comments. The run
    name is pinned, so the copy reuses build/<run>/ (corpus, tokenizer, tokens) instead of
    starting a new run named after the new file.
    """
    if recipe.path is None:
        raise UserError("--write-recipe needs a recipe loaded from a file")
    text = recipe.path.read_text(encoding="utf-8")
    shape = Shape(**{k: plan["shape"][k] for k in _SHAPE_FIELDS})
    header = f"# Written by `domainlm plan` ({plan['params']:,} parameters"
    sections = {
        "plan": {k: v for k, v in settings_plan.items() if v is not None},
        "model": shape.model_section(),
    }
    for key, value in sections.items():
        block = f"{header}; see build/{recipe.name}/plan.json)\n" + yaml.safe_dump(
            {key: value}, sort_keys=False
        )
        text = _replace_top_level(text, key, block)
    if not re.search(r"^name\s*:", text, flags=re.M):
        text = f"name: {recipe.name}  # pinned: shares build/{recipe.name}/\n" + text
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
        try:
            load_recipe(tmp)
        except UserError as e:  # pragma: no cover - a bug here, not the user's mistake
            raise UserError(
                f"the written recipe does not load ({e}); {path} was not written"
            ) from None


def _replace_top_level(text: str, key: str, block: str) -> str:
    """Replace the top-level mapping `key:` (up to the next top-level key) with `block`."""
    lines = text.splitlines(keepends=True)
    top = re.compile(r"^[A-Za-z_][\w-]*\s*:")
    start = next((i for i, line in enumerate(lines) if re.match(rf"^{key}\s*:", line)), None)
    if start is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        return text + sep + "\n" + block
    end = start + 1
    while end < len(lines) and not top.match(lines[end]):
        end += 1
    # Comments just above the next key belong to it, not to the section being replaced.
    while end - 1 > start and lines[end - 1].lstrip().startswith("#"):
        end -= 1
    return "".join(lines[:start]) + block + "".join(lines[end:])


def run_plan(
    recipe: Recipe,
    overrides: dict[str, Any] | None = None,
    *,
    as_json: bool = False,
    write_recipe: Path | None = None,
    force: bool = False,
    require_tokens: bool | None = None,
) -> dict:
    """Make the plan, print it (a table, or one JSON object), write build/<run>/plan.json.

    plan.json is rewritten only when its content changes, so `make` sees an unchanged plan
    as unchanged. require_tokens (default: the recipe's plan.require_tokens, when the recipe
    has it) turns a missing tokens folder from a note into an error.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    out = recipe.run_dir / "plan.json"
    previous = None
    if out.exists():
        try:
            previous = read_json(out)
        except (OSError, ValueError):
            previous = None
    if require_tokens is None:
        require_tokens = bool(getattr(recipe.plan, "require_tokens", False))
    plan = make_plan(
        recipe, overrides, previous=previous, force=force, require_tokens=require_tokens
    )
    settings = _Settings(recipe, overrides)
    record = {
        **plan,
        "version": PLAN_VERSION,
        "inputs": {
            "recipe": str(recipe.path) if recipe.path else None,
            "recipe_hash": hash_file(recipe.path) if recipe.path else None,
            "plan_section": dataclasses.asdict(recipe.plan),
            "overrides": overrides,
            "effective": settings.values,
            "model_section": dataclasses.asdict(recipe.model),
            "tokens_meta": {k: plan["data"].get(k) for k in ("path", "hash")},
        },
        "versions": versions(),
    }
    if previous != json.loads(json.dumps(record)):
        write_json(out, record)
    if write_recipe is not None:
        write_planned_recipe(recipe, plan, settings.values, Path(write_recipe))
    if as_json:
        click.echo(json.dumps(plan, indent=2, sort_keys=True))
    else:
        click.echo(format_plan(plan))
        click.echo(f"  wrote      {out}" + (f" and {write_recipe}" if write_recipe else ""))
    return plan
