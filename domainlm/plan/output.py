"""What `domainlm plan` prints (a table) and writes besides plan.json (a planned recipe)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from domainlm.errors import UserError
from domainlm.files import atomic_path
from domainlm.recipe import Recipe, load_recipe
from domainlm.recipe.model import LlamaConfig


def si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} "


def count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}"


def nbytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def duration(hours: float) -> str:
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
        f"  optimum    {count(opt['params'])} params x {count(opt['tokens'])} tokens "
        f"({opt['tokens_per_param']:.1f} tokens/param)",
    ]
    if data["checked"]:
        lines.append(
            f"  data       {count(data['unique_tokens'])} unique train tokens x "
            f"{data['max_epochs']:g} epochs max = {count(data['max_tokens'])}: "
            + (
                "DATA-CONSTRAINED, the model is sized to the data"
                if plan["data_constrained"]
                else "enough"
            )
        )
    else:
        lines.append("  data       not checked (no tokens folder yet)")
    lines += [
        f"  model      {count(plan['params'])} params ({plan['params']:,} exact): "
        + LlamaConfig.from_dict(s).describe(),
        f"  training   {count(plan['tokens'])} tokens ({plan['tokens_per_param']:.1f} per "
        f"param"
        + (f", {data['epochs']:.2f} epochs" if data["checked"] else "")
        + f"), {plan['flops_used']:.3g} FLOPs used",
        f"  loss       {plan['loss']:.3f} nats/token predicted ({plan['fit']} fit, on the "
        "law's own data: a guide, not a promise)",
        f"  memory     per device, {m['memory']['precision']} "
        f"({m['memory']['precision_note']}), {nbytes(m['memory']['device_memory_bytes'])} "
        f"of which {nbytes(m['memory']['usable_bytes'])} usable, seq_len {st['seq_len']}:",
        "    strategy        weights    grads  optimizer  activations  buffers    total  "
        "max micro-batch",
    ]
    for o in m["memory"]["options"]:
        lines.append(
            f"    {o['label']:<14}{nbytes(o['weights']):>9}{nbytes(o['grads']):>9}"
            f"{nbytes(o['optimizer']):>11}{nbytes(o['activations']):>13}"
            f"{nbytes(o['buffers']):>9}{nbytes(o['total']):>9}  "
            + (str(o["micro_batch"]) if o["fits"] else "does not fit")
        )
    ckpt = " + activation checkpointing" if st["activation_checkpointing"] else ""
    lines += [
        f"  strategy   {st['name']}{ckpt} (Lightning strategy '{st['lightning']}'"
        + ("" if st["fits"] else ", DOES NOT FIT")
        + f"): micro-batch {st['micro_batch']} x {st['grad_accum']} accumulation x "
        f"{st['devices']} devices = {st['global_batch_sequences']} sequences = "
        f"{st['global_batch_tokens']:,} tokens/step, {st['steps']:,} steps, "
        f"{nbytes(st['memory_bytes'])} per device",
        f"  time       {duration(plan['hours'])}",
    ]
    lines += [f"  note       {n}" for n in plan["notes"]]
    return "\n".join(lines)


def _model_section(shape: LlamaConfig) -> dict:
    """The recipe's `model:` section for a shape (vocab_size comes from the tokenizer)."""
    keys = ("n_layers", "d_model", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
    keys += ("tie_embeddings", "rope_theta", "norm_eps")
    return {"from_plan": False, **{k: getattr(shape, k) for k in keys}}


def write_planned_recipe(recipe: Recipe, plan: dict, settings_plan: dict, path: Path) -> None:
    """Copy the recipe with `model:` set to the planned shape and `plan:` to the budget used.

    Only those two top-level sections are replaced, so the rest keeps its comments. The run
    name is pinned, so the copy reuses build/<run>/ (corpus, tokenizer, tokens) instead of
    starting a new run named after the new file.
    """
    if recipe.path is None:
        raise UserError("--write-recipe needs a recipe loaded from a file")
    text = recipe.path.read_text(encoding="utf-8")
    shape = LlamaConfig.from_dict(plan["shape"])
    header = f"# Written by `domainlm plan` ({plan['params']:,} parameters"
    sections = {
        "plan": {k: v for k, v in settings_plan.items() if v is not None},
        "model": _model_section(shape),
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
