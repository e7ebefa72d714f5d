"""The eval stage's report.md (from metrics.json's values only) and its loss plots."""

from __future__ import annotations

from pathlib import Path

from domainlm.recipe import Recipe

SECTIONS = (
    "Corpus",
    "Tokenizer",
    "Plan versus training",
    "Training",
    "Loss curves",
    "Fine-tuning",
    "Perplexity before and after fine-tuning",
    "Why the perplexities differ",
    "Quantization",
    "Sample generations",
)


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _f(x, spec: str = ".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and spec != ",":
        return f"{x:,}"
    return format(x, spec)


def _not_built(target: str) -> list[str]:
    return [f"not built: run `make {target}`", ""]


def _corpus(c) -> list[str]:
    if c is None:
        return _not_built("corpus")
    lines = [f"Documents in the splits: train {_f(c['splits']['train'])}, "
             f"val {_f(c['splits']['val'])}.", ""]
    if c["total"] is None:
        return lines + ["The corpus manifest records no counts by stage.", ""]
    cols = list(c["total"])
    lines += ["| source | " + " | ".join(cols) + " |", "|---" + "|---:" * len(cols) + "|"]
    for name, row in [*c["sources"].items(), ("**total**", c["total"])]:
        lines.append(f"| {name} | " + " | ".join(_f(row[k]) for k in cols) + " |")
    return lines + [""]


def _tokenizer(t) -> list[str]:
    if t is None:
        return _not_built("tokenizer")
    return [
        "| statistic | value |", "|---|---:|",
        f"| vocabulary size | {_f(t['vocab_size'])} |",
        f"| bytes per token (validation) | {_f(t['bytes_per_token'], '.4f')} |",
        f"| tokens vs one token per byte | {_f(t['baseline_token_ratio'], '.4f')} |",
        f"| bits vs UTF-8 bytes | {_f(t['baseline_bits_ratio'], '.4f')} |",
        f"| round-trip failures | {_f(t['round_trip_failures'])} of "
        f"{_f(t['round_trip_checked'])} documents |",
        "",
    ]


def _plan(p) -> list[str]:
    if p is None:
        return _not_built("plan")
    lines = ["| | planned | trained |", "|---|---:|---:|"]
    trained = p["trained"] or {}
    for key, label, spec in (("params", "parameters", ",.0f"), ("tokens", "tokens", ",.0f"),
                             ("steps", "steps", ",.0f"), ("loss", "loss (law) / val loss", ".4f")):
        lines.append(f"| {label} | {_f(p['planned'][key], spec)} | "
                     f"{_f(trained.get(key), spec)} |")
    if p["trained"] is None:
        lines += ["", "trained: not built: run `make pretrain`"]
    lines += [
        "",
        "The law's loss is Chinchilla's fit, in nats per token of the paper's tokenizer and "
        "data, extrapolated far below the sizes it was fitted on: a guide to the trade between "
        "parameters and tokens, not a prediction of this validation loss.",
    ]
    return lines + [""]


def _training(p) -> list[str]:
    if p is None:
        return _not_built("pretrain")
    rows = [
        ("hardware", p.get("hardware") or "-"),
        ("optimizer steps", _f(p.get("steps"))),
        ("tokens trained", _f(p.get("tokens"))),
        ("passes over the training data", _f(p.get("passes"), ".2f")),
        ("training time", "-" if p.get("train_seconds") is None
         else f"{p['train_seconds']:,.1f} s"),
        ("throughput", "-" if p.get("tokens_per_s") is None
         else f"{p['tokens_per_s']:,.0f} tokens/s"),
        ("model FLOP utilization", "-" if p.get("mfu") is None else f"{p['mfu']:.1%}"),
    ]
    lines = ["| pretraining | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
    return lines + ["", "Throughput and MFU are Lightning's, over the last logged steps; the "
                    "logged `epoch` is passes over the training data.", ""]


def _finetune(f) -> list[str]:
    if f is None:
        return _not_built("finetune")
    lines = ["Held-out instructions, greedy answers scored against the reference (0-1).", "",
             "| method | ROUGE-L | exact match | pretraining-val perplexity | trainable "
             "parameters | training time | passes over the data |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in f.items():
        seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:,.1f} s"
        lines.append(f"| {name} | {_f(r['rouge_l'])} | {_f(r['exact_match'])} | "
                     f"{_f(r['pretrain_ppl'], '.2f')} | {_f(r['trainable'])} | {seconds} | "
                     f"{_f(r['passes'], '.2f')} |")
    return lines + ["", "`base`: the pretrained model before fine-tuning, answering with the "
                    "same template.", ""]


def _why(m) -> list[str]:
    first = next(iter(m["perplexity"].values())) if m.get("perplexity") else {}
    return [
        "The same model gets a different perplexity in each section because each section "
        "scores different tokens in a different way; compare figures within a section only.",
        "",
        "- **Plan versus training** (pretrain val loss): the token arrays' validation split, "
        "documents packed back to back and cut into windows of the training `seq_len` that "
        "cross document boundaries (as training reads them); every window read with a fresh "
        "context; fp32; the whole split. The last point of the val/loss curve is this value.",
        "- **Perplexity before and after fine-tuning**: each source's documents on their own, "
        "each after an eos, up to the first "
        f"{_f(first.get('max_tokens'))}"
        " tokens per source, windows of the model's context (capped at the training "
        "`seq_len`); the overall row weights the sources by their tokens, not by the split's "
        "mixture.",
        "- **Quantization**: the first `export.eval_tokens` tokens of the validation split in "
        "windows of min(context, 256) tokens, with every format, the reference included, run "
        "in bf16 (or in the format's own precision), so a format's figure is comparable with "
        "the bf16 reference beside it only.",
        "- **Fine-tuning**'s pretraining-val perplexity (the forgetting column): the token "
        "arrays' validation split as in the first item, in windows of the fine-tuning "
        "`seq_len`, the same for every method.",
        "",
    ]


def _curves(c) -> list[str]:
    if not c:
        return _not_built("pretrain")
    lines = []
    for name, info in c.items():
        lines += [f"### {name}", "", f"![{name} loss]({info['plot']})", ""]
        for k in ("train/loss", "val/loss"):
            if f"{k}_points" in info:
                lines.append(f"- {k}: {_f(info[f'{k}_first'], '.4f')} -> "
                             f"{_f(info[f'{k}_last'], '.4f')} ({info[f'{k}_points']} points)")
        lines.append("")
    return lines


def _perplexity(p, pretrain, finetune_built: bool) -> list[str]:
    if not p:
        return _not_built("pretrain")
    first = next(iter(p.values()))
    lines = [f"Validation split, up to {_f(first['max_tokens'])} tokens per source, windows "
             f"of {first['seq_len']} tokens.", "",
             "| model | source | documents | tokens | loss | perplexity | bits/byte |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model, r in p.items():
        for source, s in [*r["sources"].items(), ("**overall**", r["overall"])]:
            lines.append(f"| {model} | {source} | {_f(s['documents'])} | {_f(s['tokens'])} | "
                         f"{_f(s['loss'], '.4f')} | {_f(s['ppl'])} | "
                         f"{_f(s['bits_per_byte'], '.4f')} |")
    lines += ["", "Domain versus general text (`eval.general_sources`: the general sources; every "
              "other source is domain):", "",
              "| model | group | sources | tokens | perplexity | bits/byte |",
              "|---|---|---|---:|---:|---:|"]
    for model, r in p.items():
        for group, g in r.get("groups", {}).items():
            lines.append(f"| {model} | {group} | {', '.join(g['sources'])} | {_f(g['tokens'])} | "
                         f"{_f(g['ppl'])} | {_f(g['bits_per_byte'], '.4f')} |")
    lines.append("")
    if pretrain and pretrain.get("unigram_baseline") is not None:
        lines += [f"Unigram baseline loss (pretrain): {_f(pretrain['unigram_baseline'], '.4f')}; "
                  f"pretrain val loss: {_f(pretrain['val_loss'], '.4f')}.", ""]
    if not finetune_built:
        lines += ["after fine-tuning: not built: run `make finetune`", ""]
    return lines


def _quant(rows) -> list[str]:
    if rows is None:
        return _not_built("quantize")
    lines = ["| model | format | size on disk | perplexity | vs bf16 | target |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        target = "-" if r["target"] is None else (
            f"<= {r['target']:.0%}: " + ("met" if r["met"] else "**not met**"))
        lines.append(f"| {r['model']} | {r['format']} | {_f(r['bytes'])} B | {_f(r['ppl'])} | "
                     f"{r['change']:+.2%} | {target} |")
    return lines + [""]


def _samples(samples) -> list[str]:
    if not samples:
        return _not_built("pretrain")
    lines = []
    for s in samples:
        text = s["text"] if s["text"].startswith(s["prompt"]) else s["prompt"] + s["text"]
        lines += [f"**{s['model']}**", "", "```text", text, "```", ""]
        if s.get("reference"):
            lines += [f"reference: {s['reference']}", ""]
    return lines


def render(recipe: Recipe, m: dict) -> str:
    bodies = [
        _corpus(m["corpus"]),
        _tokenizer(m["tokenizer"]),
        _plan(m["plan"]),
        _training(m["pretrain"]),
        _curves(m["curves"]),
        _finetune(m.get("finetune")),
        _perplexity(m["perplexity"], m["pretrain"], m["finetuned"]),
        _why(m),
        _quant(m["quantization"]),
        _samples(m["samples"]),
    ]
    lines = [f"# Evaluation report: run `{recipe.name}`", "",
             "Every figure below is in metrics.json, read from the stages' outputs or computed "
             "from the models on the validation split.", ""]
    for title, body in zip(SECTIONS, bodies, strict=True):
        lines += [f"## {title}", "", *body]
    return "\n".join(lines).rstrip() + "\n"
