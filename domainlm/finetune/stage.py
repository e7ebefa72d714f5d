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
from domainlm.files import hash_file, hash_json, read_json, versions, write_json, write_text
from domainlm.recipe import FinetuneConfig, Recipe
from domainlm.train.loop import build_trainer, checkpoint_dir, kept_csv_log

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


def _inputs_fingerprint(recipe: Recipe) -> str:
    from domainlm.corpus import python_docs

    ft = recipe.finetune
    files = {s.path: hash_file(s.path) for s in ft.data if s.path and Path(s.path).exists()}
    pretrain = read_json(recipe.stage_dir("pretrain") / "manifest.json")
    template = Path(ft.template)
    return hash_json(
        [
            STAGE_VERSION,
            recipe.seed,
            dataclasses.asdict(ft),
            files,
            python_docs.fingerprint() if any(s.kind == "python-docs" for s in ft.data) else None,
            pretrain.get("outputs"),
            hash_file(template) if template.is_file() else ft.template,
            {k: getattr(recipe.train, k) for k in ("precision", "accelerator", "devices")},
        ]
    )


def finetune(recipe: Recipe, *, force: bool = False, progress: bool = True) -> dict:
    """Build build/<run>/sft/: one folder per method, report.md and manifest.json."""
    import sentencepiece as spm
    import torch

    from domainlm.export.hf import load_hf_folder, save_hf_folder
    from domainlm.finetune.evaluate import score
    from domainlm.finetune.report import write_report
    from domainlm.finetune.sft_data import encode_examples, mix
    from domainlm.finetune.templates import load_template
    from domainlm.model.peft.lora import merged
    from domainlm.model.peft.methods import prepare, save
    from domainlm.tokenizer.arrays import TokenArrays
    from domainlm.train.data import TokenWindows

    t_start = time.time()
    say = click.echo
    ft = recipe.finetune
    base_dir = recipe.stage_dir("pretrain") / "model"
    if not (recipe.stage_dir("pretrain") / "manifest.json").exists():
        raise UserError(f"{base_dir} is not built: run `make pretrain RECIPE={recipe.path}` first")
    out = recipe.stage_dir("sft")
    tokenizer_model = recipe.stage_dir("tokenizer") / "tokenizer.model"
    fingerprint = _inputs_fingerprint(recipe)
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint and (out / "report.md").exists():
            say(f"finetune: up to date ({manifest_path}); nothing to do")
            return old
    if manifest_path.exists():
        manifest_path.unlink()

    template = load_template(ft.template)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    data = load_instructions(ft, recipe.seed)
    base = load_hf_folder(base_dir)
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
    if (recipe.stage_dir("tokens") / "manifest.json").exists():
        val = TokenArrays(recipe.stage_dir("tokens"), "val")
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
        model, info = prepare(load_hf_folder(base_dir), method, ft)
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
        train_seconds = _train(
            recipe, method, model, info, mixture, val_pairs, seq_len, fingerprint, force, progress
        )
        folder = out / method
        save(model, method, folder / "model", ft, str(base_dir), tokenizer_model)
        if chat_template and (folder / "model" / "tokenizer_config.json").exists():
            _set_chat_template(folder / "model", chat_template)
        if method == "lora":
            save_hf_folder(
                merged(model, "default"),
                tokenizer_model,
                out / "lora-merged",
                chat_template=chat_template,
            )
        s = score(method, model, sp, prompts, references, **kw)
        s.trainable, s.total = info.trainable, info.total
        rows.append(s)
        methods[method] = {**s.to_dict(), "train_seconds": train_seconds, "lr": info.lr}
        say(
            f"finetune: {method}: ROUGE-L {s.rouge_l:.3f}, EM {s.exact_match:.3f}"
            + (f", pretraining-val perplexity {s.pretrain_ppl:.2f}" if s.pretrain_ppl else "")
        )
    write_report(out / "report.md", recipe, data.counts, rows, methods)
    manifest = {
        "stage": "finetune",
        "fingerprint": fingerprint,
        "counts": data.counts,
        "examples": {"train": len(mixture), "heldout": len(heldout), "eval": len(evalset)},
        "base": base_scores.to_dict(),
        "methods": methods,
        "seconds": round(time.time() - t_start, 1),
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    say(f"finetune: wrote {out}/ (report.md: the comparison table)")
    return manifest


def _set_chat_template(folder: Path, chat_template: str) -> None:
    path = folder / "tokenizer_config.json"
    cfg = read_json(path)
    cfg["chat_template"] = chat_template
    write_json(path, cfg)


def _train(recipe, method, model, info, mixture, val_pairs, seq_len, fp, force, progress) -> float:
    """Train one method with the pretraining Trainer; resumable like pretraining."""
    import lightning as L

    from domainlm.finetune.sft_data import SFTData, steps_for
    from domainlm.train.module import PretrainModule
    from domainlm.train.settings import RunSettings, resolve_accelerator

    ft = recipe.finetune
    out = recipe.stage_dir("sft") / method
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
        settings, train_cfg, out, module, has_val=bool(val_pairs), progress=progress
    )
    t = time.time()
    with kept_csv_log(out / "logs" / "metrics.csv"):
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    if stop.requested:
        raise UserError(
            f"fine-tuning ({method}) stopped ({stop.requested}) at step {trainer.global_step} of "
            f"{steps}, checkpoint {ckpt_dir / 'last.ckpt'}: run `make finetune` again to continue"
        )
    return round(time.time() - t, 1)
