"""`make eval`: build/<run>/eval/metrics.json and report.md, every figure read or computed from
the outputs of the stages before it (a section whose stage is not built says which target
builds it; nothing is typed in)."""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

import click

from domainlm.errors import UserError
from domainlm.files import read_json, write_json, write_text
from domainlm.model.evaluate import Loss
from domainlm.recipe import Recipe
from domainlm.stage import Stage, file_inputs, run_stage

STAGE_VERSION = 1
MAX_TOKENS = 32768  # validation tokens scored per source and model
CURVES = ("train/loss", "val/loss")


def _json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def read_curves(csv_path: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of train/loss and val/loss in a Lightning metrics.csv."""
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in CURVES}
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for key in CURVES:
                if row.get(key) not in (None, "") and row.get("step") not in (None, ""):
                    curves[key].append((int(float(row["step"])), float(row[key])))
    return {k: v for k, v in curves.items() if v}


def eval_stage(recipe: Recipe, folders: dict[str, Path], max_tokens: int) -> Stage:
    """The stage: every manifest, log and model file the report reads, the validation split."""
    layout = recipe.layout
    files = [
        *sorted(layout.corpus.glob("val-*.parquet")),
        layout.manifest("corpus"),
        layout.tokenizer / "report.json",
        layout.tokenizer_model,
        layout.plan,
        layout.manifest("pretrain"),
        layout.pretrain / "logs" / "metrics.csv",
        layout.manifest("finetune"),
        layout.manifest("quantize"),
        *sorted(layout.sft.glob("*/logs/metrics.csv")),
        *[p for folder in folders.values() for p in sorted(folder.iterdir())],
    ]
    return Stage(
        "eval",
        layout.manifest("eval"),
        file_inputs([p for p in files if p.is_file()], layout.root),
        {"max_tokens": max_tokens, "eval": dataclasses.asdict(recipe.eval)},
        STAGE_VERSION,
        outputs=[layout.eval / "metrics.json", layout.eval / "report.md"],
        hashes=layout.hashes,
    )


def _corpus(recipe: Recipe) -> dict | None:
    m = _json(recipe.layout.manifest("corpus"))
    if m is None:
        return None
    splits = {"train": 0, "val": 0}
    for name, out in m.get("outputs", {}).items():
        for split in splits:
            if name.startswith(f"{split}-") and "rows" in out:
                splits[split] += out["rows"]
    counts = m.get("counts")

    def stages(c: dict) -> dict:
        return {
            "in": c["in"],
            "filtered": sum(c.get("filtered", {}).values()),
            "duplicates": sum(c.get("duplicates", {}).values()),
            "decontaminated": c.get("decontaminated", 0),
            "quarantined": c.get("quarantined", 0),
            "kept": c["kept"],
        }

    return {
        "splits": splits,
        "total": stages(counts["total"]) if counts else None,
        "sources": {s: stages(c) for s, c in counts["sources"].items()} if counts else None,
    }


def _tokenizer(recipe: Recipe) -> dict | None:
    r = _json(recipe.layout.tokenizer / "report.json")
    if r is None:
        return None
    ev = r.get("eval", {})
    return {
        "vocab_size": r["model"]["vocab_size"],
        "type": r["model"].get("type"),
        "bytes_per_token": ev.get("total", {}).get("bytes_per_token"),
        "baseline_token_ratio": ev.get("baseline", {}).get("token_ratio"),
        "baseline_bits_ratio": ev.get("baseline", {}).get("bits_ratio"),
        "round_trip_checked": ev.get("round_trip", {}).get("checked"),
        "round_trip_failures": ev.get("round_trip", {}).get("failures"),
    }


def _plan(recipe: Recipe, pre: dict | None) -> dict | None:
    plan = _json(recipe.layout.plan)
    if plan is None:
        return None
    planned = {
        "params": plan.get("params"),
        "tokens": plan.get("tokens"),
        "steps": plan.get("strategy", {}).get("steps"),
        "loss": plan.get("loss"),
    }
    trained = None
    if pre is not None:
        s, m = pre.get("settings", {}), pre.get("metrics", {})
        trained = {
            "params": s.get("model", {}).get("params"),
            "tokens": m.get("tokens", s.get("tokens")),
            "steps": m.get("steps", s.get("total_steps")),
            "loss": m.get("val_loss"),
        }
    return {"planned": planned, "trained": trained}


def _curves(recipe: Recipe, out: Path) -> dict:
    from domainlm.eval.report import plot_curves

    logs = {"pretrain": recipe.layout.pretrain / "logs" / "metrics.csv"}
    for p in sorted(recipe.layout.sft.glob("*/logs/metrics.csv")):
        logs[f"finetune {p.parent.parent.name}"] = p
    result = {}
    for name, path in logs.items():
        if not path.is_file():
            continue
        curves = read_curves(path)
        if not curves:
            continue
        png = out / "plots" / (name.replace(" ", "-") + "-loss.png")
        plot_curves(curves, f"{recipe.name}: {name} loss", png)
        result[name] = {
            "plot": str(png.relative_to(out)),
            **{f"{k}_points": len(v) for k, v in curves.items()},
            **{f"{k}_first": v[0][1] for k, v in curves.items()},
            **{f"{k}_last": v[-1][1] for k, v in curves.items()},
        }
    return result


def _perplexity(recipe: Recipe, folders: dict[str, Path], pre: dict | None, max_tokens: int,
                say) -> dict:
    import torch

    from domainlm.eval.perplexity import perplexity_by_source
    from domainlm.model.load import load_model

    tok = recipe.layout.tokenizer_model
    result = {}
    for name, folder in folders.items():
        model = load_model(folder)
        seq_len = model.config.max_seq_len
        if pre is not None and pre.get("settings", {}).get("seq_len"):
            seq_len = min(seq_len, pre["settings"]["seq_len"])
        t = time.time()
        with torch.no_grad():
            result[name] = perplexity_by_source(
                model, tok, recipe.layout.corpus, seq_len, max_tokens
            )
        result[name]["groups"] = groups(result[name]["sources"], recipe.eval.general_sources)
        say(f"eval: {name}: perplexity {result[name]['overall']['ppl']:.3f} "
            f"({time.time() - t:.1f}s)")
    return result


def groups(sources: dict[str, dict], general: list[str]) -> dict[str, dict]:
    """Domain and general text: the per-source sums of tokens, bytes and nats, regrouped."""
    out = {}
    for group, names in (
        ("domain", [s for s in sources if s not in general]),
        ("general", [s for s in sources if s in general]),
    ):
        if not names:
            continue
        loss = sum(
            (Loss(sources[s]["nats"], sources[s]["tokens"], sources[s]["bytes"]) for s in names),
            Loss(0.0, 0, 0),
        )
        out[group] = {"sources": names, **loss.to_dict()}
    return out


def last_logged(csv_path: Path, key: str) -> float | None:
    """The last value of a column in a Lightning metrics.csv (None when absent)."""
    if not csv_path.is_file():
        return None
    value = None
    with open(csv_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row.get(key) not in (None, ""):
                value = float(row[key])
    return value


def _finetune(recipe: Recipe, sft: dict | None) -> dict | None:
    """Per fine-tuning method (and the base before it): ROUGE-L, exact match, the forgetting
    column, training time and passes over the instruction data, from the finetune manifest and
    each method's log."""
    if sft is None:
        return None
    out = {}
    for name, entry in {"base": sft.get("base"), **sft.get("methods", {})}.items():
        if not entry:
            continue
        log = recipe.layout.sft_method(name) / "logs" / "metrics.csv"
        out[name] = {
            "rouge_l": entry.get("rougeL"),
            "exact_match": entry.get("exact_match"),
            "pretrain_ppl": entry.get("pretrain_ppl"),
            "trainable": entry.get("trainable"),
            "train_seconds": entry.get("train_seconds"),
            "passes": last_logged(log, "epoch") if name != "base" else None,
        }
    return out


def _samples(pre: dict | None, sft: dict | None) -> list[dict]:
    out = []
    if pre is not None and pre.get("metrics", {}).get("sample"):
        s = pre["metrics"]["sample"]
        out.append({"model": "base (pretrain)", "prompt": s["prompt"], "text": s["text"]})
    if sft is not None:
        entries = {"base": sft.get("base"), **sft.get("methods", {})}
        for name, entry in entries.items():
            for s in ((entry or {}).get("samples") or [])[:2]:
                out.append({"model": f"finetune {name}", "prompt": s["prompt"],
                            "text": s["prediction"], "reference": s.get("reference")})
    return out


def evaluate_run(recipe: Recipe, *, force: bool = False, max_tokens: int = MAX_TOKENS) -> dict:
    """Write build/<run>/eval/ (metrics.json, report.md, plots/); returns the metrics."""
    layout = recipe.layout
    if not layout.manifest("corpus").is_file():
        raise UserError(f"{layout.corpus} is not built: run `make corpus "
                        f"RECIPE={recipe.path}` first")
    folders = layout.models()
    if folders and not layout.tokenizer_model.is_file():
        raise UserError("the tokenizer is not built: run `make tokenizer` first")
    stage = eval_stage(recipe, folders, max_tokens)
    run_stage(stage, lambda _: _evaluate(recipe, folders, max_tokens), force=force)
    return read_json(layout.eval / "metrics.json")


def _evaluate(recipe: Recipe, folders: dict[str, Path], max_tokens: int) -> dict:
    """The stage's work: every section of metrics.json, the report and the plots."""
    from domainlm.eval.report import render

    say = click.echo
    layout = recipe.layout
    out = layout.eval
    t_start = time.time()
    pre = _json(layout.manifest("pretrain"))
    sft = _json(layout.manifest("finetune"))
    export = _json(layout.manifest("quantize"))
    metrics = {
        "run": recipe.name,
        "corpus": _corpus(recipe),
        "tokenizer": _tokenizer(recipe),
        "plan": _plan(recipe, pre),
        "pretrain": None if pre is None else {
            k: pre.get("metrics", {}).get(k)
            for k in ("val_loss", "val_ppl", "val_bpb", "unigram_baseline", "train_seconds",
                      "steps", "tokens", "tokens_per_s", "mfu", "passes", "hardware")
        },
        "finetune": _finetune(recipe, sft),
        "curves": _curves(recipe, out),
        "perplexity": _perplexity(recipe, folders, pre, max_tokens, say) if folders else None,
        "finetuned": bool(sft) and any(k != "base" for k in folders),
        "quantization": None if export is None else [
            {k: r.get(k) for k in ("model", "format", "bytes", "ppl", "ppl_bf16", "change",
                                   "target", "met")}
            for r in export["rows"]
        ],
        "samples": _samples(pre, sft),
    }
    write_json(out / "metrics.json", metrics)
    write_text(out / "report.md", render(recipe, metrics))
    say(f"eval: wrote {out}/ (report.md, metrics.json) in {time.time() - t_start:.1f}s")
    return {"outputs": ["metrics.json", "report.md",
                        *[c["plot"] for c in metrics["curves"].values()]]}
