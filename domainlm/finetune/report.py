"""build/<run>/sft/report.md: one table comparing the base model and every method trained."""

from __future__ import annotations

from pathlib import Path

from domainlm.files import write_text
from domainlm.recipe import Recipe


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_report(path: Path, recipe: Recipe, counts: dict, rows: list, methods: dict) -> None:
    ft = recipe.finetune
    base = rows[0]
    lines = [
        f"# Fine-tuning report: run `{recipe.name}`",
        "",
        f"Template `{ft.template}`; {ft.epochs:g} epochs; micro-batch {ft.micro_batch} x "
        f"{ft.grad_accum} accumulation; sequences up to {ft.max_seq_len} tokens"
        + (" (packed)" if ft.packing else "")
        + ".",
        "",
        "## Data",
        "",
        "| task | train | held out |",
        "|---|---:|---:|",
    ]
    for task, c in counts.items():
        if task != "quarantined":
            lines.append(f"| {task} | {c['train']:,} | {c['heldout']:,} |")
    lines += [
        "",
        f"Quarantined records: {counts.get('quarantined', 0):,} (`rejected.jsonl`, each with "
        "its file:line and reason).",
        "",
        "## Methods on the held-out instructions",
        "",
        "Greedy answers to held-out instructions, scored against the reference answers "
        "(ROUGE-L F-measure from `rouge-score`, exact match after normalizing case, whitespace "
        "and surrounding punctuation). Forgetting: perplexity on the pretraining validation "
        "split, before (base) and after fine-tuning.",
        "",
        "| model | trainable params | share | ROUGE-L (x100) | exact match (%) | "
        "pretraining-val ppl | change | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = methods.get(r.name, {})
        ppl = "-" if r.pretrain_ppl is None else f"{r.pretrain_ppl:.2f}"
        change = "-"
        if r is not base and r.pretrain_ppl is not None and base.pretrain_ppl:
            change = f"{r.pretrain_ppl / base.pretrain_ppl - 1:+.1%}"
        trainable = "-" if r.trainable is None else f"{r.trainable:,}"
        share = "-" if r.trainable is None else f"{r.trainable / r.total:.2%}"
        lines.append(
            f"| {r.name} | {trainable} | {share} | {_pct(r.rouge_l)} | {_pct(r.exact_match)} | "
            f"{ppl} | {change} | {m.get('train_seconds', '-')} |"
        )
    lines += ["", "## Sample answers", ""]
    for r in rows:
        for s in r.samples[:2]:
            lines += [
                f"**{r.name}** — prompt: `{s['prompt'].strip()[:200]}`",
                "",
                f"- reference: {s['reference'][:200]}",
                f"- answer: {s['prediction'][:200]}",
                "",
            ]
    write_text(path, "\n".join(lines) + "\n")
