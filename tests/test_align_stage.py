"""`make align` end to end on a tiny run: the outputs in the tools they are made for (the reward
model in transformers, the policies in transformers and peft), the stage's bookkeeping, the
labeling loop (`domainlm align sample`), the export of an aligned model, and resume after
kill -9 continuing the same curves."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from builders import grammar_corpus, run_killed_after_checkpoint, tiny_run
from click.testing import CliRunner

from domainlm.align.records import Preferences, read_preferences
from domainlm.cli import main
from domainlm.files import read_json
from domainlm.recipe import load_recipe

pytestmark = pytest.mark.slow  # trains and exports real (tiny) models

GOOD = "good great strong solid excellent healthy positive fine stable superb".split()
BAD = "bad weak poor awful negative shaky terrible dismal grim dreadful".split()
NOUNS = "report ledger audit meeting quarter market bond client invoice merger loan".split()


def write_data(root: Path) -> tuple[Path, Path]:
    sft, prefs = [], []
    for noun in NOUNS:
        for adj in GOOD + BAD:
            label = "positive" if adj in GOOD else "negative"
            other = "negative" if label == "positive" else "positive"
            text = f"Sentiment: {noun} was {adj}."
            sft.append(json.dumps({"instruction": text, "output": label}))
            prefs.append(json.dumps({"prompt": text, "chosen": label, "rejected": other}))
    prefs.insert(3, "{not json")
    (root / "sentiment.jsonl").write_text("\n".join(sft) + "\n")
    (root / "prefs.jsonl").write_text("\n".join(prefs) + "\n")
    return root / "sentiment.jsonl", root / "prefs.jsonl"


ALIGN = {
    "methods": ["dpo", "ipo", "ppo", "grpo"],
    "max_new_tokens": 6, "max_seq_len": 48, "eval_prompts": 8, "heldout_fraction": 0.2,
    "micro_batch": 16,
    "reward": {"epochs": 1, "lr": 1e-3},
    "dpo": {"epochs": 1, "sft_weight": 0.5}, "ipo": {"epochs": 1},
    "ppo": {"steps": 3, "prompts_per_step": 8, "minibatch": 8, "ppo_epochs": 1, "ckpt_every": 1},
    "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "minibatch": 8,
             "ppo_epochs": 1, "ckpt_every": 1},
}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny run pretrained and instruction-tuned (full), with a preference file."""
    root = tmp_path_factory.mktemp("align")
    sft, prefs = write_data(root)
    recipe = tiny_run(
        root, vocab_size=320, corpus=grammar_corpus(),
        model={"from_plan": False, "n_layers": 2, "d_model": 64, "n_heads": 2, "n_kv_heads": 1,
               "ffn_dim": 128, "max_seq_len": 64},
        train={"seq_len": 32, "micro_batch": 8, "grad_accum": 1, "tokens": 8 * 32 * 40,
               "lr": 1e-2, "val_every": 20, "ckpt_every": 20, "log_every": 10,
               "sample_tokens": 4, "precision": "32-true"},
        finetune={"data": [{"name": "sentiment", "path": str(sft)}], "methods": ["full"],
                  "full": {"lr": 3e-3}, "epochs": 2, "micro_batch": 16, "max_seq_len": 48,
                  "heldout_fraction": 0.15, "eval_examples": 4, "max_new_tokens": 4},
        align={"data": [{"name": "prefs", "path": str(prefs)}], **ALIGN},
    )
    for cmd in ("pretrain", "finetune"):
        result = CliRunner().invoke(main, [cmd, "--recipe", str(recipe), "--no-progress"],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return load_recipe(recipe)


@pytest.fixture(scope="module")
def aligned(tuned):
    result = CliRunner().invoke(main, ["align", "--recipe", str(tuned.path), "--no-progress"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return tuned, result.output


def test_counts_report_and_every_output(aligned):
    recipe, output = aligned
    layout = recipe.layout
    m = read_json(layout.manifest("align"))
    c = m["counts"]["sources"]["prefs"]
    assert c["records"] == len(NOUNS) * 20 + 1 and c["quarantined"] == {
        "quarantine:invalid_json": 1}
    assert m["counts"]["pairs"]["train"] + m["counts"]["pairs"]["heldout"] == c["pairs"]
    rejected = (layout.align_data / "rejected.jsonl").read_text().splitlines()
    assert [json.loads(r)["origin"].rsplit(":", 1)[1] for r in rejected] == ["4"]
    for method in ALIGN["methods"]:
        assert f"align: {method}: wins" in output
        assert (layout.align_model(method) / "adapter_config.json").is_file()
        assert (layout.align_merged(method) / "model.safetensors").is_file()
        v = m["methods"][method]["judge"]
        assert v["wins"] + v["ties"] + v["losses"] == m["counts"]["eval_prompts"]
        assert (layout.align_method(method) / "curves.png").is_file()
    report = (layout.align / "report.md").read_text()
    for text in ("## Reward model", "Pairwise accuracy", "| dpo |", "| ppo |", "train/kl",
                 "train/clipfrac", "train/value_loss", "train/entropy", "train/margin",
                 "pretraining-val ppl"):
        assert text in report
    assert 0 <= m["reward"]["accuracy_heldout"] <= 1


def test_the_reward_model_scores_the_same_in_transformers(aligned):
    from transformers import AutoModelForSequenceClassification

    from domainlm.align.reward import load_reward_model, score_sequences
    from domainlm.tokenizer import special

    recipe, _ = aligned
    folder = recipe.layout.reward_model
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    seqs = [[5, 40, 41, 42, 2], [7, 8, 9, 10, 11, 12, 13, 2], [30, 31, 2]]
    ids = torch.full((3, 8), special.PAD_ID)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != special.PAD_ID).long()).logits[:, 0]
    torch.testing.assert_close(score_sequences(load_reward_model(folder), seqs), theirs,
                               atol=1e-4, rtol=0)


def test_the_aligned_adapter_loads_in_peft_and_transformers(aligned):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domainlm.model.load import load_model

    recipe, _ = aligned
    layout = recipe.layout
    idx = torch.randint(4, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_model(layout.align_model("dpo"))  # the base found from the adapter's config
    base = AutoModelForCausalLM.from_pretrained(layout.sft_model("full"))
    peft = PeftModel.from_pretrained(base, layout.align_model("dpo")).eval()
    merged = AutoModelForCausalLM.from_pretrained(layout.align_merged("dpo")).eval()
    sft = load_model(layout.sft_model("full"))
    with torch.no_grad():
        want = ours(idx)[0]
        torch.testing.assert_close(peft(idx).logits, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(idx).logits, want, atol=1e-4, rtol=0)
        assert (sft(idx)[0] - want).abs().max() > 1e-3  # it did move away from the reference
    assert layout.models()["dpo"] == layout.align_merged("dpo")


def test_the_server_engine_serves_the_aligned_adapter_on_its_base(aligned):
    """`domainlm serve --model sft/full/model --adapter dpo=align/dpo/model`: the adapter's
    answer is the merged folder's, the base's is the instruction-tuned model's."""
    from domainlm.model.decode import SamplingParams
    from domainlm.serve.engine import Engine

    recipe, _ = aligned
    layout = recipe.layout
    messages = [{"role": "user", "content": "Sentiment: bond was grim."}]
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    served = Engine(layout.sft_model("full"), {"dpo": layout.align_model("dpo")})
    alone = Engine(layout.align_merged("dpo"))
    sft = Engine(layout.sft_model("full"))
    assert served.generate("dpo", messages, params).text == alone.generate(
        alone.name, messages, params).text
    assert served.generate(served.name, messages, params).text == sft.generate(
        sft.name, messages, params).text


def test_a_second_run_is_up_to_date(aligned):
    recipe, _ = aligned
    result = CliRunner().invoke(main, ["align", "--recipe", str(recipe.path)])
    assert result.exit_code == 0 and "up to date" in result.output


def test_quantize_exports_aligned_models(aligned):
    recipe, _ = aligned
    data = yaml.safe_load(recipe.path.read_text())
    data["export"] = {"models": ["dpo", "ppo"], "formats": ["int8"], "group_size": 32,
                      "eval_tokens": 2048}
    path = recipe.path.with_name("tiny-export.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["quantize", "--recipe", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (recipe.layout.export_target("dpo", "int8") / "config.json").is_file()
    assert (recipe.layout.export_target("ppo", "int8") / "config.json").is_file()


def test_sample_writes_completions_to_rank_and_the_ranked_file_reads_back(aligned, tmp_path):
    recipe, _ = aligned
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Sentiment: bond was good."}) + "\n{broken\n"
        + json.dumps({"prompt": [{"role": "user", "content": "Sentiment: loan was bad."}]})
        + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    out = tmp_path / "to-label.jsonl"
    args = ["align", "sample", "--recipe", str(recipe.path), "--prompts", str(prompts), "-n",
            "3", "--out", str(out), "--seed", "1", "--max-new-tokens", "5"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{prompts}:2: quarantine:invalid_json" in result.output
    assert f"{prompts}:4: quarantine:missing_field" in result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and all(len(r["completions"]) == 3 for r in records)
    assert all(r["ranking"] is None for r in records)
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert again.exit_code == 0 and out.read_text().splitlines() == [
        json.dumps(r, ensure_ascii=False) for r in records]  # seeded: the same completions
    # the labelers rank them; the file is then preference data as it is
    for r in records:
        r["ranking"] = [3, 1, 2]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    prefs = Preferences()
    read_preferences(out, "labeled", prefs)
    c = prefs.counts["labeled"]
    assert c["pairs"] + c["ties"] + c["identical"] == 2 * 3
    unlabeled = Preferences()
    out.write_text(json.dumps({**records[0], "ranking": None}) + "\n")
    read_preferences(out, "x", unlabeled)
    assert unlabeled.counts["x"]["quarantined"] == {"quarantine:unlabeled": 1}


def _copy_run(tuned, root: Path, methods: list[str]) -> Path:
    """The tiny run's outputs up to fine-tuning in a new build folder, and its recipe."""
    src = tuned.layout.root
    dst = root / "build" / tuned.name
    dst.mkdir(parents=True)
    for part in ("corpus", "tokenizer", "tokens", "pretrain", "sft"):
        shutil.copytree(src / part, dst / part)
    data = yaml.safe_load(tuned.path.read_text())
    data["build_dir"] = str(root / "build")
    data["align"]["methods"] = methods
    data["align"]["ppo"] = {**ALIGN["ppo"], "steps": 6}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _curves(run_root: Path, method: str) -> list[dict]:
    with open(run_root / "build" / "tiny" / "align" / method / "logs" / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k.startswith("train/") and v and "perf" not in k}
                for r in csv.DictReader(f)]


def test_resume_after_kill_9_continues_the_same_curves(tuned, tmp_path):
    whole = _copy_run(tuned, tmp_path / "whole", ["ppo"])
    cut = _copy_run(tuned, tmp_path / "cut", ["ppo"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "domainlm", "align", "--no-progress", "--recipe"]
    subprocess.run([*cmd, str(whole)], check=True, env=env, capture_output=True)
    proc = run_killed_after_checkpoint([*cmd[3:], str(cut)], 2, env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    manifest = tmp_path / "cut" / "build" / "tiny" / "align" / "manifest.json"
    assert not manifest.exists(), "the run ended before it could be killed"
    logged = tmp_path / "cut" / "build" / "tiny" / "align" / "ppo" / "logs" / "metrics.csv"
    partial = _curves(tmp_path / "cut", "ppo") if logged.exists() else []
    subprocess.run([*cmd, str(cut)], check=True, env=env, capture_output=True)
    assert manifest.exists()
    got, want = _curves(tmp_path / "cut", "ppo"), _curves(tmp_path / "whole", "ppo")
    assert len(want) == 6 and len(partial) < 6
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(got, want, strict=True):
        for k in a:
            assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6), k


def test_a_dpo_sweep_trains_each_trial_in_its_own_folder(tuned, tmp_path):
    """`domainlm sweep --stage align`: DPO trials in sweep/trials/, their value its validation
    loss, early stopping on; the run's own align folder is not written by them."""
    data = yaml.safe_load(Path(tuned.path).read_text())
    data["train"]["early_stopping"] = {"patience": 1}
    data["sweep"] = {"params": {"align.dpo.lr": {"choices": [3e-3, 1e-3]}}, "sampler": "grid",
                     "method": "dpo", "pruner": "none",
                     "fixed": {"align.eval_prompts": 2, "align.dpo.epochs": 1.0}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = sorted(p.name for p in tuned.layout.align.rglob("*")) \
        if tuned.layout.align.exists() else []
    result = CliRunner().invoke(main, ["sweep", "--recipe", str(path), "--stage", "align"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    sweep = tuned.layout.sweep
    with open(sweep / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["complete", "complete"]
    assert all(int(r["validations"]) >= 1 for r in rows)
    for i in range(2):
        trial = sweep / "trials" / f"trial-00{i}"
        assert (trial / "align" / "dpo" / "model" / "adapter_config.json").is_file()
        assert set(read_json(trial / "align" / "manifest.json")["methods"]) == {"dpo"}
    after = sorted(p.name for p in tuned.layout.align.rglob("*")) \
        if tuned.layout.align.exists() else []
    assert after == before
    assert load_recipe(sweep / "best.yaml").align.dpo.lr in (3e-3, 1e-3)
