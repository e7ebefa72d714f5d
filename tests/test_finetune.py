"""`make finetune` end to end on a tiny pretrained model: the data counts and quarantine,
every method's outputs, the comparison report, the chat template in the exported folders,
and an improvement over the prompted base model on held-out instructions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from builders import grammar_corpus, tiny_run
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.files import hash_file, read_json
from domainlm.recipe import load_recipe
from domainlm.train.module import PretrainModule

pytestmark = pytest.mark.slow  # end-to-end stages; `make test-fast` skips them

NOUNS = "report ledger audit meeting quarter market bond client invoice merger loan fund".split()
GOOD = "good great strong solid excellent healthy positive fine stable superb".split()
BAD = "bad weak poor awful negative shaky terrible dismal grim dreadful".split()


def instruction_file(path: Path) -> Path:
    """Alpaca records of a learnable task (the label follows from the adjective, which held-out
    sentences combine with other nouns), plus two bad lines to quarantine."""
    rng = random.Random(0)
    lines = []
    for noun in NOUNS:
        for adj in GOOD + BAD:
            label = "positive" if adj in GOOD else "negative"
            text = f"Sentiment: {noun} was {adj}."
            lines.append(json.dumps({"instruction": text, "output": label}))
    rng.shuffle(lines)
    lines.insert(5, "{not json")
    lines.insert(9, json.dumps({"instruction": "no output here"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = instruction_file(root / "sentiment.jsonl")
    recipe_path = tiny_run(
        root,
        vocab_size=320,
        corpus=grammar_corpus(),
        model={
            "from_plan": False,
            "n_layers": 2,
            "d_model": 64,
            "n_heads": 2,
            "n_kv_heads": 1,
            "ffn_dim": 128,
            "max_seq_len": 96,
        },
        train={
            "seq_len": 32,
            "micro_batch": 8,
            "grad_accum": 1,
            "tokens": 8 * 32 * 60,
            "lr": 1e-2,
            "val_every": 30,
            "ckpt_every": 30,
            "log_every": 10,
            "sample_tokens": 4,
        },
        finetune={
            "data": [{"name": "sentiment", "path": str(data)}],
            "template": "chat",
            "methods": ["full", "lora", "qlora", "adapter", "prompt", "selective"],
            "full": {"lr": 3e-3},
            "lora": {
                "r": 8,
                "alpha": 16,
                "lr": 1e-2,
                "target_modules": [
                    "q_proj",
                    "k_proj",
                    "v_proj",
                    "o_proj",
                    "gate_proj",
                    "up_proj",
                    "down_proj",
                ],
            },
            "prompt": {"virtual_tokens": 4, "lr": 3e-2},
            "epochs": 8,
            "micro_batch": 16,
            "max_seq_len": 80,
            "heldout_fraction": 0.15,
            "eval_examples": 24,
            "max_new_tokens": 10,
        },
    )
    runner = CliRunner()
    result = runner.invoke(
        main, ["pretrain", "--recipe", str(recipe_path), "--no-progress"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    # Which modules train in training mode (dropout on), step by step, while fine-tuning.
    original = PretrainModule.training_step

    def spy(self, batch, batch_idx):
        MODES.append(all(m.training for m in self.model.modules()))
        return original(self, batch, batch_idx)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PretrainModule, "training_step", spy)
        result = runner.invoke(
            main, ["finetune", "--recipe", str(recipe_path), "--no-progress"],
            catch_exceptions=False,
        )
    assert result.exit_code == 0, result.output
    recipe = load_recipe(recipe_path)
    return recipe, result.output


MODES: list[bool] = []


def test_every_module_trains_in_training_mode(finetuned):
    """A loaded base is in eval mode; fine-tuning once trained it so (Lightning warned "Found
    242 module(s) in eval mode"), and LoRA's dropout never applied."""
    assert len(MODES) > 6 and all(MODES)


def test_counts_and_quarantine(finetuned):
    recipe, _ = finetuned
    m = read_json(recipe.layout.sft / "manifest.json")
    c = m["counts"]["sentiment"]
    assert c["train"] + c["heldout"] == len(NOUNS) * (len(GOOD) + len(BAD))
    assert m["counts"]["quarantined"] == 2
    rejected = (recipe.layout.sft / "rejected.jsonl").read_text().splitlines()
    origins = sorted(json.loads(r)["origin"] for r in rejected)
    assert [o.rsplit(":", 1)[1] for o in origins] == ["10", "6"]  # 1-based lines, as sorted


def test_every_method_prints_counts_and_saves_its_format(finetuned):
    recipe, output = finetuned
    sft = recipe.layout.sft
    for method in ("full", "lora", "qlora", "adapter", "prompt", "selective"):
        assert f"finetune: {method}: " in output and "trainable of" in output
    assert "4-bit base's linear layers take" in output
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (sft / "qlora" / "model").iterdir()
    }
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (sft / "lora" / "model").iterdir()
    }
    for folder in (sft / "full" / "model", sft / "selective" / "model", sft / "lora-merged"):
        cfg = read_json(folder / "tokenizer_config.json")
        assert "<|assistant|>" in cfg["chat_template"]
        assert (folder / "model.safetensors").exists()
    m = read_json(sft / "manifest.json")["methods"]
    assert m["lora"]["trainable"] < m["selective"]["trainable"] < m["full"]["trainable"]
    assert m["prompt"]["trainable"] == 4 * 64


def test_fine_tuning_beats_the_prompted_base_model(finetuned):
    recipe, _ = finetuned
    m = read_json(recipe.layout.sft / "manifest.json")
    base = m["base"]["rougeL"]
    assert m["methods"]["full"]["rougeL"] > base + 0.2
    assert m["methods"]["lora"]["rougeL"] > base
    report = (recipe.layout.sft / "report.md").read_text()
    for name in ("base (prompted)", "full", "lora", "adapter", "prompt", "selective"):
        assert f"| {name} |" in report


def test_merged_lora_folder_equals_base_plus_adapter(finetuned):
    import torch

    from domainlm.model.hf import load_hf_folder
    from domainlm.model.peft.methods import load

    recipe, _ = finetuned
    sft = recipe.layout.sft
    base = load_hf_folder(recipe.layout.pretrain_model)
    with_adapter = load(base, "lora", sft / "lora" / "model").eval()
    merged = load_hf_folder(sft / "lora-merged").eval()
    idx = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (with_adapter(idx)[0] - merged(idx)[0]).abs().max() <= 1e-4


def test_a_second_run_is_up_to_date(finetuned):
    recipe, _ = finetuned
    result = CliRunner().invoke(main, ["finetune", "--recipe", str(recipe.path)])
    assert result.exit_code == 0 and "up to date" in result.output


def test_finetune_without_pretraining_names_the_command(tmp_path):
    path = tmp_path / "r.yaml"
    recipe = {
        "name": "x",
        "build_dir": str(tmp_path / "build"),
        "corpus": {"sources": [{"name": "s", "path": str(tmp_path)}]},
    }
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["finetune", "--recipe", str(path)])
    assert result.exit_code == 2 and "make pretrain" in result.output


def test_quantize_then_eval_fill_every_report_section(finetuned):
    """`make corpus pretrain finetune quantize eval` on a tiny run: every report section is
    filled from real outputs (none says "not built")."""
    from domainlm.eval.report import SECTIONS

    recipe, _ = finetuned
    data = yaml.safe_load(recipe.path.read_text())
    data["plan"] = {"max_epochs": 16, "flops": 3e11}
    data["export"] = {
        "models": ["base", "lora-merged"],
        "formats": ["int8", "gguf-q8_0"],
        "group_size": 32,
        "eval_tokens": 4096,
    }
    path = recipe.path.with_name("tiny-eval.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    # The tiny model's shape is fixed in the recipe; a plan still shows planned vs trained.
    for args in (["plan"], ["quantize"], ["eval"]):
        result = CliRunner().invoke(main, [*args, "--recipe", str(path)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    report = (recipe.layout.eval / "report.md").read_text()
    for title in SECTIONS:
        assert title in report
    assert "not built" not in report
    metrics = read_json(recipe.layout.eval / "metrics.json")
    assert {"base", "full", "lora-merged"} <= set(metrics["perplexity"])
    # Every stage's manifest lists what it read, each input with the hash of its content.
    for stage in ("tokens", "plan", "pretrain", "finetune", "quantize", "eval"):
        manifest = read_json(recipe.layout.manifest(stage))
        assert manifest["stage"] == stage and manifest["inputs"], stage
        for entry in manifest["inputs"].values():
            assert entry["hash"] == hash_file(entry["path"]), (stage, entry)


def test_eval_commands_score_any_model_folder(finetuned, tmp_path):
    """`domainlm eval generate|fewshot|perplexity` on the fine-tuned and base folders."""
    from domainlm.eval.fewshot import classify
    from domainlm.eval.tasks import tokenizer_for
    from domainlm.model.load import load_model

    recipe, _ = finetuned
    rng = random.Random(3)
    rows = [
        (f"{noun} was {adj}.", "positive" if adj in GOOD else "negative")
        for noun in NOUNS
        for adj in GOOD + BAD
    ]
    rng.shuffle(rows)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"Sentiment: {t}", "reference": y}) + "\n" for t, y in rows[:12]
        )
    )
    shots, data = tmp_path / "shots.jsonl", tmp_path / "data.jsonl"
    shots.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows[:40]))
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows[40:60]))
    full = recipe.layout.sft / "full" / "model"
    base = recipe.layout.pretrain_model

    def run(*args):
        result = CliRunner().invoke(main, ["eval", *args, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    tuned = run("generate", "-m", str(full), "--data", str(prompts), "--chat", "-n", "10")
    prompted = run("generate", "-m", str(base), "--data", str(prompts), "--chat", "-n", "10")
    assert tuned["n"] == 12 and tuned["rougeL"] > prompted["rougeL"] + 0.3

    got = run(
        "fewshot",
        "-m",
        str(full),
        "--shots",
        str(shots),
        "--data",
        str(data),
        "--labels",
        "positive,negative",
        "--k",
        "2",
        "--seed",
        "1",
    )
    sp, _ = tokenizer_for(full, None)
    direct = classify(load_model(full), sp, rows[:40], rows[40:60], ["positive", "negative"], 2, 1)
    assert got["accuracy"] == direct["accuracy"] and got["macro_f1"] == direct["macro_f1"]

    ppl = run("perplexity", "-m", str(base), "--recipe", str(recipe.path))
    from domainlm.eval.perplexity import perplexity_by_source

    tok = recipe.layout.tokenizer_model
    other = perplexity_by_source(load_model(base), tok, recipe.layout.corpus, 16)
    # Every validation token counted once, whatever the window length.
    assert ppl["overall"]["tokens"] == other["overall"]["tokens"] > 0
    assert ppl["overall"]["bytes"] == other["overall"]["bytes"]
    assert ppl["groups"]["domain"]["tokens"] == ppl["overall"]["tokens"]
