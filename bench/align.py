"""`make align` on the demo, measured: minutes from scratch (labeling, reward model, each
method), the reward model's accuracy, each method's win rates against the instruction-tuned
model by both judges, PPO's final KL, and the forgetting. Needs `make finetune` first."""

from __future__ import annotations

import os
import shutil
import time

from bench.common import commit, machine, table, write_section

RECIPE = "recipes/demo.yaml"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main(quick: bool = False) -> None:
    from domainlm.align.report import read_curves
    from domainlm.align.stage import align
    from domainlm.recipe import load_recipe

    recipe = load_recipe(RECIPE)
    layout = recipe.layout
    if not (layout.sft_model(recipe.align.sft_model) / "config.json").is_file():
        print(f"bench align: skipped, run `make finetune` first ({layout.sft} is not built)")
        return
    shutil.rmtree(layout.align, ignore_errors=True)  # from scratch: labeling included
    load = os.getloadavg()[0]
    t = time.time()
    m = align(recipe, force=True, progress=False)
    minutes = (time.time() - t) / 60
    rm = m["reward"]
    rows = []
    for method, r in m["methods"].items():
        jr, jo, jm = r["judge"], r["judge_rouge_only"], r["judge_reward"]
        curves = read_curves(layout.align_method(method) / "logs" / "metrics.csv")
        kl = curves.get("train/kl", [(0, None)])[-1][1]
        rows.append([
            method, f"{jr['wins']}/{jr['ties']}/{jr['losses']}", _pct(jr["win_rate"]),
            _pct(jr["win_rate_ties_half"]), f"{jo['wins']}/{jo['ties']}/{jo['losses']}",
            f"{jm['wins']}/{jm['ties']}/{jm['losses']}",
            _pct(jm["win_rate"]), "-" if kl is None else f"{kl:.2f}",
            f"{r['pretrain_ppl']:.1f}" if r["pretrain_ppl"] else "-",
            f"{r['train_seconds'] / 60:.1f}",
        ])
    sft = m["sft"]
    body = "\n".join([
        "## Alignment on the demo (`make align`, CPU)",
        "",
        f"Machine: {machine()}. Commit {commit()}. Command: `python -m bench align` (one run "
        f"from scratch, {time.strftime('%Y-%m-%d')}"
        + (f", OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
           if os.environ.get("OMP_NUM_THREADS") else "")
        + f"); load average {load:.1f} when it started"
        + (" (other work shared the cores: the minutes are inflated)" if load > 2 else "")
        + ".",
        "",
        f"Whole stage: {minutes:.1f} minutes (labeling the demo's samples, the reward model, "
        f"every method, the judging). Preference pairs: {m['counts']['pairs']['train']:,} to "
        f"train, {m['counts']['pairs']['heldout']:,} held out (labeled by a program standing "
        "in for people: ROUGE-L against the reference answer, ties broken by chrF). Reward "
        "model pairwise accuracy: "
        f"{rm['accuracy_train']:.3f} train, {rm['accuracy_heldout']:.3f} held out.",
        "",
        f"Against the instruction-tuned model (`sft/{recipe.align.sft_model}`, ROUGE-L "
        f"{sft['rougeL']:.3f}, pretraining-val perplexity {sft['pretrain_ppl']:.1f}) on "
        f"{m['counts']['eval_prompts']} held-out prompts, greedy answers:",
        "",
        table(["method", "W/T/L (judge: ROUGE-L, chrF on ties)", "win rate", "ties as half",
               "W/T/L (ROUGE-L alone)", "W/T/L (reward model)", "win rate", "final KL (nats)",
               "pretraining-val ppl", "train min"], rows),
    ])
    write_section("align", body)
    print(body)
