"""`make finetune`: instruction-tune the pretrained model with each method the recipe lists,
on the same Lightning machinery as pretraining, and compare them on held-out instructions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.files import hash_json, write_text
from domainlm.recipe import FinetuneConfig, Recipe
from domainlm.stage import Stage, file_inputs, run_stage
from domainlm.tokenizer.templates import load_template
from domainlm.train.loop import (
    build_trainer,
    checkpoint_dir,
    drop_previous_checkpoints,
    kept_csv_log,
    restore_best,
)

STAGE_VERSION = 1


@dataclasses.dataclass
class InstructionData:
    train: dict[str, list]  # task -> examples
    heldout: list
    weights: dict[str, float | None]
    quarantined: list[dict]
    counts: dict


def load_instructions(ft: FinetuneConfig, seed: int) -> InstructionData:
    """Every source of the mixture, read, validated and split into train and held-out."""
    from domainlm.finetune.demo import python_docs_examples
    from domainlm.finetune.records import read_instructions, split_heldout

    train: dict[str, list] = {}
    heldout: list = []
    weights: dict[str, float | None] = {}
    quarantined: list[dict] = []
    counts: dict = {}
    if not ft.data:
        raise UserError("finetune.data is empty: list at least one instruction file")
    for i, src in enumerate(ft.data):
        name = src.name or (Path(src.path).stem if src.path else src.kind)
        if name in train:
            raise UserError(f"finetune.data[{i}].name: {name!r} is used twice")
        if src.kind == "python-docs":
            tr, held = python_docs_examples(heldout_fraction=ft.heldout_fraction, seed=seed)
        else:
            if not src.path:
                raise UserError(f"finetune.data[{i}]: a jsonl source needs `path`")
            before = len(quarantined)
            examples = read_instructions(
                Path(src.path), name, quarantined, key=f"finetune.data[{i}].path"
            )
            for q in quarantined[before:]:
                q.setdefault("task", name)
            tr, held = split_heldout(examples, ft.heldout_fraction)
        train[name], weights[name] = tr, src.weight
        heldout += held
        counts[name] = {"train": len(tr), "heldout": len(held)}
    counts["quarantined"] = len(quarantined)
    return InstructionData(train, heldout, weights, quarantined, counts)


def finetune_stage(recipe: Recipe) -> Stage:
    """The stage: the pretrained model, the instruction files (the built-in set by the
    standard library's fingerprint), the template file, the validation tokens that measure
    forgetting; the finetune section and the training settings it borrows."""
    from domainlm.corpus import python_docs

    ft, layout = recipe.finetune, recipe.layout
    base = sorted(p for p in layout.pretrain_model.iterdir() if p.is_file())
    files = [*base, *sorted(p for p in layout.tokens.glob("val*") if p.is_file())]
    inputs: dict[str, Path | str] = dict(file_inputs(files, layout.root))
    for i, src in enumerate(ft.data):
        if src.kind == "python-docs":
            inputs[f"finetune.data[{i}] (python-docs)"] = python_docs.fingerprint()
        elif src.path:
            inputs[f"finetune.data[{i}]"] = Path(src.path)
    if Path(ft.template).is_file():
        inputs["finetune.template"] = Path(ft.template)
    train = {k: getattr(recipe.train, k) for k in ("precision", "accelerator", "devices")}
    if recipe.train.early_stopping.patience:  # off: the fingerprint of earlier runs stands
        train["early_stopping"] = dataclasses.asdict(recipe.train.early_stopping)
    return Stage(
        "finetune",
        layout.manifest("finetune"),
        inputs,
        {"seed": recipe.seed, "finetune": dataclasses.asdict(ft), "train": train},
        STAGE_VERSION,
        outputs=[layout.sft / "report.md"],
        hashes=layout.hashes,
    )


def finetune(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict:
    """Build build/<run>/sft/: one folder per method, report.md and manifest.json."""
    layout = recipe.layout
    if not layout.manifest("pretrain").is_file():
        raise UserError(
            f"{layout.pretrain_model} is not built: run `make pretrain RECIPE={recipe.path}` first"
        )
    missing = [f"finetune.data[{i}].path: {s.path}" for i, s in enumerate(recipe.finetune.data)
               if s.kind == "jsonl" and s.path and not Path(s.path).is_file()]
    if missing:
        raise UserError(f"{missing[0]} does not exist: fix the path in {recipe.path}")
    load_template(recipe.finetune.template)  # a template that cannot work fails here, first
    return run_stage(
        finetune_stage(recipe), lambda fp: _finetune(recipe, fp, force, progress), force=force
    )


def _finetune(recipe: Recipe, fingerprint: str, force: bool, progress: bool) -> dict:
    """The stage's work: each method trained, saved and scored; the report."""
    import sentencepiece as spm
    import torch

    from domainlm.finetune.evaluate import score
    from domainlm.finetune.report import write_report
    from domainlm.finetune.sft_data import encode_examples, mix
    from domainlm.model.hf import save_hf_folder
    from domainlm.model.load import load_model
    from domainlm.model.peft.lora import merged
    from domainlm.model.peft.methods import prepare, save
    from domainlm.tokenizer.arrays import TokenArrays, TokenWindows

    say = click.echo
    ft, layout = recipe.finetune, recipe.layout
    base_dir = layout.pretrain_model
    out = layout.sft
    tokenizer_model = layout.tokenizer_model
    template = load_template(ft.template)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    data = load_instructions(ft, recipe.seed)
    base = load_model(base_dir)
    virtual = ft.prompt.virtual_tokens if "prompt" in ft.methods else 0
    seq_len = min(ft.max_seq_len, base.config.max_seq_len - virtual)

    encoded = {
        task: encode_examples(sp, template, examples, seq_len, data.quarantined)
        for task, examples in data.train.items()
    }
    mixture = mix(encoded, data.weights, recipe.seed)
    heldout = sorted(data.heldout, key=lambda ex: hashlib.blake2b(ex.origin.encode()).digest())
    val_pairs = encode_examples(sp, template, heldout, seq_len, [])
    if not mixture:
        raise UserError("no usable training instructions: see build/<run>/sft/rejected.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    write_text(
        out / "rejected.jsonl",
        "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in data.quarantined),
    )
    say(
        f"finetune: {len(mixture):,} training examples from "
        + ", ".join(f"{t} ({c['train']:,})" for t, c in data.counts.items() if t != "quarantined")
        + f"; {len(heldout):,} held out; {len(data.quarantined):,} quarantined"
    )

    evalset = heldout[: ft.eval_examples]
    prompts = [template.prompt_and_completion(ex.messages)[0] for ex in evalset]
    references = [ex.messages[-1]["content"] for ex in evalset]
    stop = getattr(template, "stop", "") or ""
    windows = None
    if layout.manifest("tokens").exists():
        val = TokenArrays(layout.tokens, "val")
        if val.num_tokens > seq_len:
            windows = TokenWindows(val, seq_len)
    kw = dict(max_new_tokens=ft.max_new_tokens, stop=stop, windows=windows)
    base_scores = score("base (prompted)", base, sp, prompts, references, **kw)
    b = base_scores
    say(f"finetune: base model: ROUGE-L {b.rouge_l:.3f}, EM {b.exact_match:.3f}")
    rows = [base_scores]
    methods: dict[str, dict] = {}
    chat_template = getattr(template, "source", None)
    for method in ft.methods:
        torch.manual_seed(recipe.seed)
        model, info = prepare(base, method, ft)
        say(
            f"finetune: {method}: {info.trainable:,} trainable of {info.total:,} parameters "
            f"({info.trainable / info.total:.2%}), lr {info.lr:g}"
        )
        if method == "qlora":
            from domainlm.model.peft.qlora import base_memory_bytes

            say(
                f"finetune: qlora: the 4-bit base's linear layers take "
                f"{base_memory_bytes(model):,} bytes"
            )
        train_seconds, best = _train(
            recipe, method, model, info, mixture, val_pairs, seq_len, fingerprint, force, progress
        )
        if best:
            ran = "stopped" if best["stopped_early"] else "ran"
            say(
                f"finetune: {method}: early stopping: {ran} at step {best['last_step']}; "
                f"keeping step {best['best_step']} "
                f"(validation loss {best['best_val_loss']:.4f})"
            )
        folder = layout.sft_model(method)
        save(model, method, folder, ft, str(base_dir), tokenizer_model, chat_template)
        if method == "lora":
            save_hf_folder(
                merged(model, "default"),
                tokenizer_model,
                layout.lora_merged,
                chat_template=chat_template,
            )
        s = score(method, model, sp, prompts, references, **kw)
        s.trainable, s.total = info.trainable, info.total
        rows.append(s)
        methods[method] = {**s.to_dict(), "train_seconds": train_seconds, "lr": info.lr}
        if best:
            methods[method]["early_stopping"] = best
        say(
            f"finetune: {method}: ROUGE-L {s.rouge_l:.3f}, EM {s.exact_match:.3f}"
            + (f", pretraining-val perplexity {s.pretrain_ppl:.2f}" if s.pretrain_ppl else "")
        )
    write_report(out / "report.md", recipe, data.counts, rows, methods)
    say(f"finetune: wrote {out}/ (report.md: the comparison table)")
    return {
        "counts": data.counts,
        "examples": {"train": len(mixture), "heldout": len(heldout), "eval": len(evalset)},
        "base": base_scores.to_dict(),
        "methods": methods,
    }


def _train(recipe, method, model, info, mixture, val_pairs, seq_len, fp, force, progress):
    """Train one method with the pretraining Trainer; resumable like pretraining. Returns the
    seconds it took and, with train.early_stopping, what restore_best says (the model then
    holds the weights of the best validation)."""
    import lightning as L

    from domainlm.finetune.sft_data import SFTData, steps_for
    from domainlm.train.module import PretrainModule
    from domainlm.train.settings import RunSettings, resolve_accelerator

    ft = recipe.finetune
    out = recipe.layout.sft_method(method)
    run_fp = hash_json([fp, method])
    ckpt_dir, resume = checkpoint_dir(out, run_fp, force, click.echo)
    accelerator = resolve_accelerator(recipe.train.accelerator)
    data = SFTData(
        mixture,
        val_pairs,
        micro_batch=ft.micro_batch,
        grad_accum=ft.grad_accum,
        total_steps=1,  # set below, once the number of (packed) sequences is known
        seed=recipe.seed,
        packing=ft.packing,
        max_seq_len=seq_len,
    )
    steps = steps_for(data.n_train, ft.epochs, ft.micro_batch, ft.grad_accum, 1)
    data.total_steps = steps
    settings = RunSettings(
        config=model.config if hasattr(model, "config") else model.base.config,
        seq_len=seq_len,
        micro_batch=ft.micro_batch,
        grad_accum=ft.grad_accum,
        devices=1,
        num_nodes=1,
        total_steps=steps,
        accelerator=accelerator,
        strategy="auto",
        precision=recipe.train.precision,
        checkpointing=False,
    )
    train_cfg = dataclasses.replace(
        recipe.train,
        optimizer="adamw",  # Muon is for pretraining's hidden matrices (docs/finetune.md)
        lr=info.lr,
        warmup_steps=ft.warmup_steps,
        weight_decay=ft.weight_decay,
        compile=False,
        activation_checkpointing=False,
        val_every=max(1, min(recipe.train.val_every, steps // 4 or 1)),
        ckpt_every=max(1, min(recipe.train.ckpt_every, steps // 4 or 1)),
        val_batches=None,
    )
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    module = PretrainModule(
        settings.config,
        train_cfg,
        total_steps=steps,
        grad_accum=ft.grad_accum,
        seq_len=seq_len,
        micro_batch=ft.micro_batch,
        model=model,
        fused_optimizer=settings.precision != "16-mixed",
    )
    trainer, _, stop = build_trainer(
        settings, train_cfg, out, module, has_val=bool(val_pairs), progress=progress,
        early_stopping=recipe.train.early_stopping,
    )
    t = time.time()
    with kept_csv_log(out / "logs" / "metrics.csv"):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    if stop.requested:
        raise UserError(
            f"fine-tuning ({method}) stopped ({stop.requested}) at step {trainer.global_step} of "
            f"{steps}, checkpoint {ckpt_dir / 'last.ckpt'}: run `make finetune` again to continue"
        )
    seconds = round(time.time() - t, 1)
    best = restore_best(trainer, module)
    drop_previous_checkpoints(out)
    return seconds, best
