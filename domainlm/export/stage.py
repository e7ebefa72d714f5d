"""`make quantize`: every model and format the recipe lists, written under build/<run>/export/,
each measured for size on disk and validation perplexity against the bf16 model."""

from __future__ import annotations

import math
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.files import hash_json, read_json, versions, write_json, write_text
from domainlm.recipe import Recipe

STAGE_VERSION = 1
TARGETS = {"int8": 0.01, "int4": 0.05, "gguf-q8_0": 0.01, "gguf-q4_0": 0.05}
GGUF_TYPES = {"gguf-f16": "F16", "gguf-bf16": "BF16", "gguf-q8_0": "Q8_0", "gguf-q4_0": "Q4_0"}


def model_folder(recipe: Recipe, name: str) -> Path:
    """The folder of a model named in export.models."""
    if name == "base":
        return recipe.stage_dir("pretrain") / "model"
    if name == "lora-merged":
        return recipe.stage_dir("sft") / "lora-merged"
    if name in ("full", "selective"):
        return recipe.stage_dir("sft") / name / "model"
    raise UserError(
        f"export.models: unknown model {name!r}; use base, full, selective or lora-merged "
        "(adapters are served on their base: `domainlm serve --adapter`)"
    )


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
    from domainlm.tokenizer.arrays import TokenArrays
    from domainlm.train.data import TokenWindows

    val = TokenArrays(recipe.stage_dir("tokens"), "val")
    windows = TokenWindows(val, seq_len)
    n = len(windows) if limit is None else max(1, min(len(windows), limit // seq_len))
    return [windows[i] for i in range(n)]


def _ppl(model, windows) -> float:
    import torch

    from domainlm.train.finish import evaluate

    return math.exp(evaluate(model, windows, 8, torch.device("cpu")))


def quantize(recipe: Recipe, *, force: bool = False) -> dict:
    """Write build/<run>/export/<model>/<format> for every model and format; returns the
    manifest (also build/<run>/export/manifest.json) with sizes and perplexities."""
    import torch

    from domainlm.export.gguf_export import read_gguf_model, write_gguf
    from domainlm.export.hf import load_hf_folder, save_hf_folder
    from domainlm.export.quantize import quantize_model, save_quantized

    say = click.echo
    cfg = recipe.export
    out = recipe.stage_dir("export")
    tokenizer_model = recipe.stage_dir("tokenizer") / "tokenizer.model"
    folders = {name: model_folder(recipe, name) for name in cfg.models}
    for name, folder in folders.items():
        if not (folder / "config.json").exists():
            stage = "pretrain" if name == "base" else "finetune"
            raise UserError(f"{folder} does not exist: run `make {stage} RECIPE={recipe.path}`")
    inputs = {name: read_json(f / "config.json") for name, f in folders.items()}
    hashes = {
        name: sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in f.iterdir())
        for name, f in folders.items()
    }
    fingerprint = hash_json([STAGE_VERSION, cfg.__dict__, inputs, hashes, recipe.seed])
    manifest_path = out / "manifest.json"
    if not force and manifest_path.exists():
        old = read_json(manifest_path)
        if old.get("fingerprint") == fingerprint:
            say(f"quantize: up to date ({manifest_path}); nothing to do")
            return old
    if manifest_path.exists():
        manifest_path.unlink()

    t_start = time.time()
    rows: list[dict] = []
    for name, folder in folders.items():
        model = load_hf_folder(folder).eval()
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
            target = out / name / (f"model-{GGUF_TYPES[fmt]}.gguf" if fmt in GGUF_TYPES else fmt)
            if fmt in ("hf-bf16", "hf-fp16"):
                dtype = "bfloat16" if fmt == "hf-bf16" else "float16"
                save_hf_folder(model, tokenizer_model, target, dtype=dtype, chat_template=template)
                runs = _as(load_hf_folder(target), getattr(torch, dtype))
            elif fmt in ("int8", "int4"):
                bits = 8 if fmt == "int8" else 4
                qmodel = quantize_model(model, bits, cfg.group_size)
                save_quantized(qmodel, target, tokenizer_model, bits, cfg.group_size)
                runs = qmodel
            else:
                write_gguf(model, tokenizer_model, target, GGUF_TYPES[fmt], chat_template=template)
                runs = read_gguf_model(target)
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
    manifest = {
        "stage": "quantize",
        "fingerprint": fingerprint,
        "rows": rows,
        "seconds": round(time.time() - t_start, 1),
        "versions": versions(),
    }
    write_json(manifest_path, manifest)
    say(f"quantize: wrote {out}/ (report.md: sizes and quality)")
    return manifest


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
