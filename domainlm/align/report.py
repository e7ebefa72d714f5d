"""build/<run>/align/report.md: the data's counts, the reward model's accuracy, each method's
curves (from its CSV log) and its win rates and forgetting against the instruction-tuned model."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from domainlm.files import write_text
from domainlm.recipe import Recipe

CURVES = {
    "reward": ["train/loss", "train/accuracy", "val/loss", "val/accuracy"],
    "dpo": ["train/loss", "train/margin", "train/accuracy", "val/loss", "val/margin",
            "val/accuracy"],
    "ppo": ["train/reward", "train/kl", "train/kl_coef", "train/value_loss", "train/clipfrac",
            "train/entropy", "train/length"],
    "grpo": ["train/reward", "train/kl", "train/kl_k3", "train/clipfrac", "train/entropy",
             "train/length"],
}
CURVES["ipo"] = CURVES["dpo"]


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a Lightning CSV log as (step, value) points."""
    if not path.is_file():
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                out.setdefault(k, []).append((int(row["step"]), float(v)))
    return out


def plot(curves: dict[str, list[tuple[int, float]]], names: list[str], title: str,
         path: Path) -> None:
    """One small panel per metric (their scales differ), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if curves.get(n)]
    if not names:
        return
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.4 * rows), dpi=100,
                             squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        xs, ys = zip(*curves[name], strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=2)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _curve_rows(curves: dict, names: list[str]) -> list[str]:
    lines = ["| metric | first | last | points |", "|---|---:|---:|---:|"]
    for n in names:
        if curves.get(n):
            pts = curves[n]
            lines.append(f"| {n} | {_f(pts[0][1], '.4f')} | {_f(pts[-1][1], '.4f')} | "
                         f"{len(pts)} |")
    return lines


def write_report(path: Path, recipe: Recipe, m: dict) -> None:
    a, layout = recipe.align, recipe.layout
    lines = [f"# Alignment report: run `{recipe.name}`", "",
             f"Aligned model: `{a.sft_model}` ({layout.model(a.sft_model)}); policy tuning "
             f"`{a.tuning}`; methods: {', '.join(a.methods)}.", "", "## Preference data", "",
             "| source | records | kept | quarantined | pairs | ties dropped | identical "
             "dropped |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in m["counts"]["sources"].items():
        lines.append(f"| {name} | {c['records']:,} | {c['kept']:,} | "
                     f"{sum(c['quarantined'].values()):,} | {c['pairs']:,} | {c['ties']:,} | "
                     f"{c['identical']:,} |")
    p = m["counts"]["pairs"]
    lines += ["", f"Pairs used: {p['train']:,} for training, {p['heldout']:,} held out; "
              f"{m['counts']['quarantined']:,} records or pairs quarantined "
              "(`data/rejected.jsonl`, each with its file:line and reason).", ""]
    if any(s.kind == "python-docs" for s in a.data):
        lines += ["The python-docs preferences are labeled by a program that stands in for "
                  "people: the instruction-tuned model's samples"
                  + (f" and the reference answers of {a.other_answers} other prompt(s)"
                     if a.other_answers else "")
                  + " ranked by ROUGE-L against the reference answer (ties broken by chrF), "
                  + ("the reference ranked first." if a.rank_reference else
                     "the reference kept out of the pairs (the judge's only)."), ""]
    rm = m["reward"]
    lines += ["## Reward model", "",
              f"Pairwise accuracy: train {_f(rm['accuracy_train'])}, held out "
              f"{_f(rm['accuracy_heldout'])} ({rm['steps']} steps, {rm['train_seconds']} s). "
              "Saved as a transformers `LlamaForSequenceClassification` folder: "
              "`reward/model`.", ""]
    curves = read_curves(layout.align_method("reward") / "logs" / "metrics.csv")
    plot(curves, CURVES["reward"], f"reward model ({recipe.name})",
         layout.align_method("reward") / "curves.png")
    lines += ["![reward model curves](reward/curves.png)", ""]
    lines += _curve_rows(curves, CURVES["reward"]) + [""]
    sft = m["sft"]
    lines += ["## Against the instruction-tuned model on held-out prompts", "",
              f"{m['counts']['eval_prompts']} held-out prompts, greedy answers. Programmatic "
              "judge: ROUGE-L against the prompt's best-known reply, ties broken by chrF "
              "(W/T/L by ROUGE-L alone in brackets); reward-model judge: the reward model's "
              "score. Win rate: prompts won over all (ties count as half in the second figure)."
              " Forgetting: pretraining-validation perplexity.", "",
              "| model | ROUGE-L | chrF | win rate (judge) | W/T/L (ROUGE-L alone) | "
              "win rate (reward model) | W/T/L | mean reward | pretraining-val ppl | train s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| instruction-tuned ({a.sft_model}) | {_f(sft['rougeL'])} | "
              f"{_f(sft.get('chrF'))} | - | - | - | - | "
              f"{_f(sft['reward'])} | {_f(sft['pretrain_ppl'], '.2f')} | - |"]
    for method, r in m["methods"].items():
        jr, jo, jm = r["judge"], r["judge_rouge_only"], r["judge_reward"]
        lines.append(
            f"| {method} | {_f(r['rougeL'])} | {_f(r['chrF'])} | {_f(jr['win_rate'], '.1%')} "
            f"({_f(jr['win_rate_ties_half'], '.1%')}) | {jr['wins']}/{jr['ties']}/"
            f"{jr['losses']} ({jo['wins']}/{jo['ties']}/{jo['losses']}) | "
            f"{_f(jm['win_rate'], '.1%')} "
            f"({_f(jm['win_rate_ties_half'], '.1%')}) | {jm['wins']}/{jm['ties']}/"
            f"{jm['losses']} | {_f(r['reward'])} | {_f(r['pretrain_ppl'], '.2f')} | "
            f"{r['train_seconds']} |")
    lines.append("")
    for method in m["methods"]:
        curves = read_curves(layout.align_method(method) / "logs" / "metrics.csv")
        png = layout.align_method(method) / "curves.png"
        plot(curves, CURVES[method], f"{method} ({recipe.name})", png)
        lines += [f"### {method}", "", f"![{method} curves]({method}/curves.png)", ""]
        lines += _curve_rows(curves, CURVES[method]) + [""]
        for s in m["methods"][method].get("samples", [])[:2]:
            lines += [f"- prompt: `{s['prompt'][:160]}`", f"  - reference: {s['reference'][:160]}",
                      f"  - answer: {s['answer'][:160]}"]
        lines.append("")
    write_text(path, "\n".join(lines) + "\n")
