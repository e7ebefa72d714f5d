"""Making a plan: budget → Chinchilla-optimal size → model shape → memory, strategy and time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from domainlm.errors import UserError
from domainlm.files import hash_file, read_json
from domainlm.plan import hardware, memory, scaling
from domainlm.plan.budget import Hardware, Settings, resolve_hardware
from domainlm.plan.output import count, duration, nbytes
from domainlm.plan.shape import ShapeError, search_shape, smallest
from domainlm.recipe import LlamaConfig, PlanConfig, Recipe

PLAN_VERSION = 1
MIN_STEPS = 1000  # the default global batch leaves at least this many optimizer steps
SHAPE_FALLBACK_TOLERANCE = 0.15
MODEL_PROBE_ROUNDS = 3
RATE_SETTLED = 0.15  # a re-plan whose model runs within 15% of the assumed speed is final


# --------------------------------------------------------------------------------------------
# Data.


def _read_tokens(recipe: Recipe, required: bool, notes: list[str]) -> dict:
    folder = recipe.layout.tokens
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
    # 16-mixed keeps the same bytes as bf16-mixed (fp32 weights and states, 16-bit compute).
    p = recipe.train.precision
    return "bf16-mixed" if p == "16-mixed" else p


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
) -> LlamaConfig:
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
        if target < smallest(vocab, m.tie_embeddings).num_params() * 0.95:
            raise ShapeError(why()) from e
        # Between two shapes of a tiny model with a large vocabulary: take the nearest and say so.
        shape = search_shape(target, vocab, tolerance=SHAPE_FALLBACK_TOLERANCE, **kw)
        notes.append(
            f"no shape is within 5% of {count(target)} parameters with a vocabulary of "
            f"{vocab}: the nearest has {count(shape.num_params())} "
            f"({shape.num_params() / target - 1:+.0%})"
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
        f"{floor.num_params():,} (its embedding table alone {floor.embedding_params:,})"
    )
    c_floor = scaling.compute_for_params(floor.num_params(), p.law, p.fit)
    if data is not None:
        need = scaling.optimum(c_floor, p.law, p.fit)[1]
        return (
            f"{p.max_epochs:g} epochs of the {count(data['unique_tokens'])} unique tokens "
            f"support only {target:,.0f} parameters (data-constrained), {head}, which wants "
            f"{count(need)} tokens ({need / data['unique_tokens']:.0f} epochs): add data, raise "
            "plan.max_epochs, or train a tokenizer with a smaller tokenizer.vocab_size"
        )
    time = duration(c_floor / (hw.devices * hw.flops_per_s) / 3600)
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
    """The plan as one JSON-ready dict (see docs/plan.md); runs the probes only when needed.

    A wall-clock budget on this machine is planned twice or more: the first plan uses the
    generic probe's speed; then the planned model's own training step is timed and the plan
    made again with that speed, until the shape stops changing. Small models reach a fraction
    of the speed of larger ones on a CPU, so the generic figure alone would overrun the budget.
    """
    notes: list[str] = []
    settings = Settings(recipe, overrides or {})
    kind, budget, budget_desc, hw = resolve_hardware(settings, previous, force, notes)
    data = _read_tokens(recipe, require_tokens, notes)
    vocab = _vocab_size(recipe, data, notes)
    plan = _plan(recipe, settings, kind, budget, budget_desc, hw, data, vocab, list(notes))
    if kind != "minutes":
        return plan
    minutes = settings.plan.minutes
    # Every measurement of this plan, reused from plan.json on the next run: the rounds replay
    # identically, so an unchanged plan stays unchanged (and nothing downstream rebuilds).
    old = ((previous or {}).get("hardware") or {}).get("model_probes") or []
    cache = [] if force else list(old)
    measurements: list[dict] = []
    for _ in range(MODEL_PROBE_ROUNDS):
        measured = _model_rate(plan["shape"], plan["strategy"], cache)
        measurements.append(measured)
        change = measured["flops_per_s"] / hw.flops_per_s - 1
        hw = dataclasses.replace(
            hw,
            flops_per_s=measured["flops_per_s"],
            source=f"timed training steps of the planned model ({measured['steps']} steps)",
            model_probe=measured,
            model_probes=measurements,
        )
        budget = hw.flops_per_s * hw.devices * minutes * 60
        budget_desc = f"{minutes:g} min on this machine, {budget:.3g} FLOPs"
        plan = _plan(recipe, settings, kind, budget, budget_desc, hw, data, vocab, list(notes))
        # Settled when the planned model runs at about the speed the plan assumed: a shape a
        # layer away then runs at about that speed too (timings vary by ~10% run to run).
        if abs(change) <= RATE_SETTLED:
            break
    else:
        plan["notes"].append(
            f"the planned model's measured speed still moved by {change:+.0%} after "
            f"{MODEL_PROBE_ROUNDS} rounds of timing it; the time estimate is rough"
        )
    return plan


def _model_rate(shape: dict, strategy: dict, cache: list[dict]) -> dict:
    """The planned model's measured training speed here: from `cache`, else timed now."""
    key = {
        "shape": shape,
        "micro_batch": strategy["micro_batch"],
        "seq_len": strategy["seq_len"],
        "precision": strategy["precision"],
        "checkpointing": strategy["activation_checkpointing"],
        "machine": hardware.machine_fingerprint(),
    }
    for old in cache:
        if all(old.get(k) == v for k, v in key.items()):
            return old
    rate, steps = hardware.probe_model(
        LlamaConfig.from_dict(shape),
        key["micro_batch"],
        key["seq_len"],
        key["precision"],
        key["checkpointing"],
    )
    cache.append({**key, "flops_per_s": rate, "steps": steps})
    return cache[-1]


def _plan(
    recipe: Recipe,
    settings: Settings,
    kind: str,
    budget: float,
    budget_desc: str,
    hw: Hardware,
    data: dict,
    vocab: int,
    notes: list[str],
) -> dict:
    p = settings.plan
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

    try:
        shape = _shape(target, vocab, recipe, p.seq_len, notes, why)
    except ShapeError as e:
        if kind != "minutes" or constrained:
            raise
        # Minutes on this machine are a wish, not a quantity: a machine busy with other work
        # measures slow and the budget then buys less than the smallest model. Train that one
        # and say how long it will take, rather than refuse.
        m = recipe.model
        shape = smallest(vocab, m.tie_embeddings, p.seq_len)
        shape = dataclasses.replace(shape, rope_theta=m.rope_theta, norm_eps=m.norm_eps)
        notes.append(
            f"{e} — planning the smallest model instead, trained on the tokens the budget buys "
            "(fewer than compute-optimal)"
        )
    n = shape.num_params()
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
            f"data-constrained: the compute-optimal {count(n_opt)} params need {count(d_opt)} "
            f"tokens, more than {p.max_epochs:g} epochs of the {count(data['unique_tokens'])} "
            f"unique tokens; planning the largest model those {count(tokens)} tokens support, "
            f"which leaves {unused:.3g} FLOPs ({unused / budget:.0%} of the budget) unused"
        )
    loss = scaling.predicted_loss(n, tokens, p.fit)
    if n < scaling.FITTED_PARAMS[0]:
        notes.append(
            f"{count(n)} params is below the {count(scaling.FITTED_PARAMS[0])} smallest model "
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
            f"does not fit: {nbytes(chosen.total)} per device even with {chosen.label} at "
            f"micro-batch 1, over the {nbytes(usable)} usable; it needs {fix}"
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


