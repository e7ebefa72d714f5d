"""`make align`: preference tuning of the instruction-tuned model. The reward model, then each
method of align.methods (DPO, IPO, PPO, GRPO), each trained, saved and compared with the
instruction-tuned model on held-out prompts; report.md and manifest.json."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.recipe import Recipe
from domainlm.recipe.layout import MODEL_NAMES
from domainlm.stage import Stage, file_inputs, run_stage

STAGE_VERSION = 1


def sft_folder(recipe: Recipe) -> Path:
    """The whole folder of the model to align (align.sft_model), checked to be built."""
    name = recipe.align.sft_model
    allowed = [n for n in MODEL_NAMES if n in ("base", "full", "selective", "lora-merged")]
    if name not in allowed:
        raise UserError(f"align.sft_model: {name!r} is not a model to align; use one of "
                        f"{', '.join(allowed)} (with LoRA fine-tuning: lora-merged)")
    folder = recipe.layout.model(name)
    if not (folder / "config.json").is_file():
        stage = "pretrain" if name == "base" else "finetune"
        raise UserError(f"{folder} is not built: run `make {stage} RECIPE={recipe.path}` first "
                        f"(or set align.sft_model to a model that finetune.methods builds)")
    return folder


def align_stage(recipe: Recipe) -> Stage:
    """The stage: the instruction-tuned folder, the tokenizer, the validation tokens that
    measure forgetting, the preference files (the demo's by the standard library's
    fingerprint: its labels come from the model and the settings); the align section and the
    settings it borrows."""
    from domainlm.corpus import python_docs

    a, layout = recipe.align, recipe.layout
    folder = sft_folder(recipe)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    files += [layout.tokenizer_model, *sorted(p for p in layout.tokens.glob("val*")
                                              if p.is_file())]
    inputs: dict[str, Path | str] = dict(file_inputs(files, layout.root))
    for i, src in enumerate(a.data):
        if src.kind == "python-docs":
            inputs[f"align.data[{i}] (python-docs)"] = python_docs.fingerprint()
        elif src.path:
            inputs[f"align.data[{i}]"] = Path(src.path)
    if Path(recipe.finetune.template).is_file():
        inputs["finetune.template"] = Path(recipe.finetune.template)
    params = {
        "seed": recipe.seed,
        "align": dataclasses.asdict(a),
        "finetune": {"template": recipe.finetune.template,
                     "heldout_fraction": recipe.finetune.heldout_fraction},
        "train": {k: getattr(recipe.train, k) for k in
                  ("precision", "accelerator", "betas", "eps", "grad_clip", "log_every",
                   "ckpt_every", "val_every", "min_lr_ratio", "schedule")},
    }
    if recipe.train.early_stopping.patience:  # off: the fingerprint of earlier runs stands
        params["train"]["early_stopping"] = dataclasses.asdict(recipe.train.early_stopping)
    return Stage("align", layout.manifest("align"), inputs, params, STAGE_VERSION,
                 outputs=[layout.align / "report.md"], hashes=layout.hashes)


def rollout_prompts(pairs, model, max_new_tokens: int) -> list[list[int]]:
    """The distinct prompts (token ids, as the pairs encode them) of the training pairs that
    leave room for max_new_tokens: what PPO and GRPO sample completions for."""
    from domainlm.align.sampling import fits
    from domainlm.model.llama import IGNORE_INDEX

    out, seen = [], set()
    for pair in pairs:
        ids, labels = pair.chosen
        start = next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)
        prompt = tuple(ids[:start])
        if prompt not in seen and fits(model, list(prompt), max_new_tokens):
            seen.add(prompt)
            out.append(list(prompt))
    return out


def check(recipe: Recipe) -> None:
    """The recipe's align section and inputs, before anything runs."""
    a = recipe.align
    if not a.methods:
        raise UserError("align.methods is empty: list at least one of dpo, ipo, ppo, grpo")
    for i, src in enumerate(a.data):
        if src.kind == "jsonl" and not src.path:
            raise UserError(f"align.data[{i}]: a jsonl source needs `path`")
        if src.kind == "jsonl" and not Path(src.path).is_file():
            raise UserError(f"align.data[{i}].path: {src.path} does not exist: fix the path in "
                            f"{recipe.path}")
    minimum = {
        "align.micro_batch": (a.micro_batch, 1), "align.grad_accum": (a.grad_accum, 1),
        "align.max_new_tokens": (a.max_new_tokens, 1), "align.samples": (a.samples, 1),
        "align.eval_prompts": (a.eval_prompts, 1),
        "align.ppo.steps": (a.ppo.steps, 1), "align.ppo.minibatch": (a.ppo.minibatch, 1),
        "align.ppo.prompts_per_step": (a.ppo.prompts_per_step, 1),
        "align.ppo.ppo_epochs": (a.ppo.ppo_epochs, 1),
        "align.ppo.ckpt_every": (a.ppo.ckpt_every, 1),
        "align.grpo.steps": (a.grpo.steps, 1), "align.grpo.minibatch": (a.grpo.minibatch, 1),
        "align.grpo.prompts_per_step": (a.grpo.prompts_per_step, 1),
        "align.grpo.ppo_epochs": (a.grpo.ppo_epochs, 1),
        "align.grpo.ckpt_every": (a.grpo.ckpt_every, 1),
        "align.grpo.group_size": (a.grpo.group_size, 2),
    }
    for key, (value, least) in minimum.items():
        if value < least:
            raise UserError(f"{key} is {value}; it must be at least {least}")
    for key, beta in (("align.dpo.beta", a.dpo.beta), ("align.ipo.beta", a.ipo.beta)):
        if not beta > 0:
            raise UserError(f"{key} must be positive, got {beta}")
    if a.ppo.kl_target is not None and not a.ppo.kl_target > 0:
        raise UserError(f"align.ppo.kl_target must be positive or null, got {a.ppo.kl_target}")
    if not 0 <= a.heldout_fraction < 1:
        raise UserError("align.heldout_fraction must be in [0, 1)")


def align(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict:
    """Build build/<run>/align/: reward/, one folder per method, data/, report.md, manifest."""
    check(recipe)
    return run_stage(align_stage(recipe), lambda fp: _align(recipe, fp, force, progress),
                     force=force)


def _align(recipe: Recipe, fingerprint: str, force: bool, progress: bool) -> dict:
    import sentencepiece as spm

    from domainlm.align import methods as M
    from domainlm.align.evaluate import answer_prompts, compare, pair_accuracy
    from domainlm.align.prepare import load_data
    from domainlm.align.report import write_report
    from domainlm.files import hash_json
    from domainlm.model.load import load_model
    from domainlm.tokenizer.arrays import TokenArrays, TokenWindows
    from domainlm.tokenizer.templates import load_template

    say = click.echo
    t0 = time.time()
    a, layout = recipe.align, recipe.layout
    folder = sft_folder(recipe)
    sft = load_model(folder)
    sp = spm.SentencePieceProcessor(model_file=str(layout.tokenizer_model))
    template = load_template(recipe.finetune.template)
    sft_hash = hash_json(align_stage(recipe).input_hashes())
    data = load_data(recipe, sft, sp, template, sft_hash, say)
    say(f"align: {data.counts['pairs']['train']:,} training pairs, "
        f"{data.counts['pairs']['heldout']:,} held out, {data.counts['quarantined']:,} "
        f"quarantined; {data.counts['eval_prompts']} held-out prompts for the win rates")

    rm, rm_info = M.train_reward(recipe, sft, data, fingerprint, force=force, progress=progress,
                                 chat_template=template.source)
    rm_info["accuracy_train"] = pair_accuracy(rm, data.train)
    rm_info["accuracy_heldout"] = pair_accuracy(rm, data.heldout)
    say(f"align: reward model: pairwise accuracy {rm_info['accuracy_train']:.3f} (train), "
        f"{rm_info['accuracy_heldout'] or float('nan'):.3f} (held out)")

    windows = None
    if layout.manifest("tokens").exists():
        val = TokenArrays(layout.tokens, "val")
        seq_len = min(a.max_seq_len, sft.config.max_seq_len)
        if val.num_tokens > seq_len:
            windows = TokenWindows(val, seq_len)
    prompts = [m for m, _ in data.eval_prompts]
    refs_text = [r for _, r in data.eval_prompts]
    kw = dict(max_new_tokens=a.max_new_tokens, max_seq_len=a.max_seq_len, windows=windows)
    sft_answers = answer_prompts(sft, sp, template, prompts, refs_text, rm, **kw)
    results: dict = {"sft": sft_answers.means()}

    refs = None
    if {"dpo", "ipo"} & set(a.methods):
        refs = {side: M.reference_for_pairs(recipe, sft, getattr(data, side))
                for side in ("train", "heldout")}
    rl_prompts = rollout_prompts(data.train, sft, a.max_new_tokens)
    methods: dict[str, dict] = {}
    for method in a.methods:
        if method in ("dpo", "ipo"):
            policy, info = M.train_dpo(recipe, method, sft, data, refs, fingerprint, force=force,
                                       progress=progress)
        else:
            policy, info = M.train_rl(recipe, method, sft, rm, rl_prompts, fingerprint,
                                      force=force, progress=progress)
        M.save_policy(policy, method, recipe, folder, template.source)
        got = answer_prompts(policy, sp, template, prompts, refs_text, rm, **kw)
        methods[method] = {**info, **compare(got, sft_answers), "samples": got.samples}
        r = methods[method]
        say(f"align: {method}: wins {r['judge']['win_rate']:.1%} of held-out prompts by "
            f"ROUGE-L (chrF on ties), {r['judge_reward']['win_rate']:.1%} by the reward model "
            f"({info['train_seconds']} s)")
    manifest = {"counts": data.counts, "reward": rm_info, "sft": results["sft"],
                "methods": methods, "minutes": round((time.time() - t0) / 60, 2)}
    write_report(layout.align / "report.md", recipe, manifest)
    say(f"align: wrote {layout.align}/ (report.md: win rates, reward accuracy, curves)")
    return manifest
