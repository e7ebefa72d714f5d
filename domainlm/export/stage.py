"""`make quantize`: every model and format the recipe lists, written under build/<run>/export/,
each measured for size on disk and validation perplexity against the bf16 model."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.files import read_json, write_text
from domainlm.recipe import Recipe
from domainlm.recipe.layout import ALIGN_METHODS
from domainlm.stage import Stage, file_inputs, run_stage

STAGE_VERSION = 2  # 2: int8/int4 folders in compressed-tensors format
TARGETS = {"int8": 0.01, "int4": 0.05, "gguf-q8_0": 0.01, "gguf-q4_0": 0.05}
GGUF_TYPES = {"gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _weights_size(path: Path) -> int:
    """Bytes of the weights alone (a GGUF file, or the folder's safetensors)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _windows(recipe: Recipe, seq_len: int, limit: int | None):
    from domainlm.tokenizer.arrays import TokenArrays, TokenWindows

    val = TokenArrays(recipe.layout.tokens, "val")
    windows = TokenWindows(val, seq_len)
    n = len(windows) if limit is None else max(1, min(len(windows), limit // seq_len))
    return [windows[i] for i in range(n)]


def _ppl(model, windows) -> float:
    from domainlm.model.evaluate import evaluate_windows

    return evaluate_windows(model, windows, micro_batch=8).ppl


def quantize_stage(recipe: Recipe) -> tuple[Stage, dict[str, Path]]:
    """The stage (every file of every model it exports, the validation tokens, the tokenizer;
    the export section) and the folders of the models, checked to exist."""
    layout = recipe.layout
    folders = {name: layout.model(name) for name in recipe.export.models}
    for name, folder in folders.items():
        if not (folder / "config.json").exists():
            stage = {"base": "pretrain"}.get(name, "align" if name in ALIGN_METHODS else "finetune")
            raise UserError(f"{folder} does not exist: run `make {stage} RECIPE={recipe.path}`")
    files = [p for f in folders.values() for p in sorted(f.iterdir()) if p.is_file()]
    files += sorted(p for p in layout.tokens.glob("val*") if p.is_file())
    stage = Stage(
        "quantize",
        layout.manifest("quantize"),
        file_inputs([*files, layout.tokenizer_model], layout.root),
        {"seed": recipe.seed, "export": dataclasses.asdict(recipe.export)},
        STAGE_VERSION,
        outputs=[layout.export / "report.md"],
        hashes=layout.hashes,
    )
    return stage, folders


def quantize(recipe: Recipe, *, force: bool = False) -> dict:
    """Write build/<run>/export/<model>/<format> for every model and format; returns the
    manifest (also build/<run>/export/manifest.json) with sizes and perplexities."""
    stage, folders = quantize_stage(recipe)
    return run_stage(stage, lambda _: _export(recipe, folders), force=force)


def _export(recipe: Recipe, folders: dict[str, Path]) -> dict:
    """The stage's work: each model in each format, written and measured; the report."""
    import torch

    from domainlm.model.compressed import save_quantized
    from domainlm.model.gguf import write_gguf
    from domainlm.model.hf import save_hf_folder
    from domainlm.model.load import load_model
    from domainlm.model.quantized import quantize_model
    from domainlm.tokenizer.templates import load_template

    say = click.echo
    cfg = recipe.export
    out = recipe.layout.export
    tokenizer_model = recipe.layout.tokenizer_model
    rows: list[dict] = []
    for name, folder in folders.items():
        model = load_model(folder)
        template = read_json(folder / "tokenizer_config.json").get("chat_template") if (
            folder / "tokenizer_config.json"
        ).exists() else None
        windows = _windows(recipe, min(model.config.max_seq_len, 256), cfg.eval_tokens)
        fp32_size = sum(p.numel() * 4 for p in {id(p): p for p in model.parameters()}.values())
        with torch.no_grad():
            ref = _ppl(_as(model, torch.bfloat16), windows)
        say(f"quantize: {name}: bf16 perplexity {ref:.3f} on {len(windows)} windows")
        for fmt in cfg.formats:
            t = time.time()
            target = recipe.layout.export_target(name, fmt, GGUF_TYPES.get(fmt))
            if fmt in ("hf-bf16", "hf-fp16"):
                dtype = "bfloat16" if fmt == "hf-bf16" else "float16"
                save_hf_folder(model, tokenizer_model, target, dtype=dtype, chat_template=template)
                runs = _as(load_model(target), getattr(torch, dtype))
            elif fmt in ("int8", "int4"):
                bits = 8 if fmt == "int8" else 4
                # Codes from the fp32 weights; scales and the float parts (embedding, norms,
                # head) in bf16, as servers hold them: the file is exactly the model measured.
                qmodel = quantize_model(model, bits, cfg.group_size).to(torch.bfloat16)
                save_quantized(qmodel, target, tokenizer_model, bits, cfg.group_size,
                               chat_template=template)
                runs = qmodel
            else:
                # A folder without a template (the base) gets the recipe's: the one a chat
                # adapter on it, or the fine-tuned model, was trained with.
                gguf_template = template or load_template(recipe.finetune.template).source
                write_gguf(model, tokenizer_model, target, GGUF_TYPES[fmt], gguf_template)
                runs = load_model(target)
            with torch.no_grad():
                ppl = _ppl(runs.eval(), windows)
            change = ppl / ref - 1
            row = {
                "model": name,
                "format": fmt,
                "path": str(target),
                "bytes": _size(target),
                "weights_bytes": _weights_size(target),
                "fp32_weights_bytes": fp32_size,
                "ppl": ppl,
                "ppl_bf16": ref,
                "change": change,
                "target": TARGETS.get(fmt),
                "met": None if fmt not in TARGETS else change <= TARGETS[fmt],
                "seconds": round(time.time() - t, 1),
            }
            rows.append(row)
            say(
                f"quantize: {name} {fmt}: {row['bytes'] / 1e6:.2f} MB, perplexity {ppl:.3f} "
                f"({change:+.2%} vs bf16)"
                + ("" if row["met"] is None else f", target {TARGETS[fmt]:.0%}: "
                   + ("met" if row["met"] else "NOT met"))
            )
    write_text(out / "report.md", report(recipe, rows))
    say(f"quantize: wrote {out}/ (report.md: sizes and quality)")
    return {"rows": rows}


def _as(model, dtype):
    import copy

    return copy.deepcopy(model).to(dtype)


def report(recipe: Recipe, rows: list[dict]) -> str:
    lines = [
        f"# Export report: run `{recipe.name}`",
        "",
        "Size on disk and validation perplexity of every exported format, against the same "
        "model in bf16 (the reference of the targets: int8 within 1%, int4 within 5%). GGUF "
        "perplexities are computed from the weights read back from the file.",
        "",
        "| model | format | size on disk | weights vs fp32 | perplexity | vs bf16 | target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        target = "-" if r["target"] is None else (
            f"<= {r['target']:.0%}: " + ("met" if r["met"] else "**not met**")
        )
        lines.append(
            f"| {r['model']} | {r['format']} | {r['bytes'] / 1e6:.2f} MB | "
            f"{r['weights_bytes'] / r['fp32_weights_bytes']:.2f} | {r['ppl']:.3f} | "
            f"{r['change']:+.2%} | {target} |"
        )
    lines += [
        "",
        "Serve a folder with `domainlm serve --model PATH`, a GGUF file with llama.cpp "
        "(`llama-server -m FILE`), an HF folder with vLLM (`vllm serve PATH`).",
    ]
    return "\n".join(lines) + "\n"
