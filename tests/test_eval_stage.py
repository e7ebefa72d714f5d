"""`make eval`: metrics.json and report.md from a tiny pretrained run (no fine-tuning or
export: those sections say which target builds them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from builders import grammar_corpus, tiny_run
from click.testing import CliRunner

from domainlm.cli import main
from domainlm.errors import UserError
from domainlm.eval.perplexity import perplexity_by_source
from domainlm.eval.report import SECTIONS
from domainlm.eval.stage import evaluate_run
from domainlm.model.load import load_model
from domainlm.recipe import load_recipe
from domainlm.train.pretrain import pretrain

MODEL = {"from_plan": False, "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
         "ffn_dim": 64, "max_seq_len": 32, "tie_embeddings": True}
TRAIN = {"seq_len": 32, "micro_batch": 4, "grad_accum": 1, "tokens": 4 * 32 * 12,
         "lr": 1e-2, "warmup_steps": 2, "val_every": 4, "val_batches": 2, "ckpt_every": 100,
         "log_every": 1, "sample_prompt": "The", "sample_tokens": 6}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    path = tiny_run(root, vocab_size=320, corpus=grammar_corpus(docs=120), model=MODEL,
                    train=TRAIN)
    pretrain(load_recipe(path), progress=False)
    return path


def test_eval_stage_writes_metrics_and_report_from_real_outputs(run):
    recipe = load_recipe(run)
    res = CliRunner().invoke(main, ["eval", "--recipe", str(run)])
    assert res.exit_code == 0, res.output
    out = recipe.layout.eval
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()

    # perplexity per source equals the function's, computed directly
    model = load_model(recipe.layout.pretrain_model)
    with torch.no_grad():
        direct = perplexity_by_source(model, recipe.layout.tokenizer_model,
                                      recipe.layout.corpus, 32, 32768)
    assert list(metrics["perplexity"]) == ["base"]
    base = metrics["perplexity"]["base"]
    assert base["sources"].keys() == direct["sources"].keys() == {"grammar"}
    for source, s in direct["sources"].items():
        assert base["sources"][source]["ppl"] == pytest.approx(s["ppl"], rel=1e-6)
        assert base["sources"][source]["bits_per_byte"] == pytest.approx(s["bits_per_byte"],
                                                                         rel=1e-6)
        # the report shows the numbers of metrics.json
        row = (f"| base | {source} | {s['documents']:,} | {s['tokens']:,} | "
               f"{base['sources'][source]['loss']:.4f} | {base['sources'][source]['ppl']:.3f} | "
               f"{base['sources'][source]['bits_per_byte']:.4f} |")
        assert row in report

    # every section, in order; the stages not built say which target builds them
    positions = [report.index(f"## {title}\n") for title in SECTIONS]
    assert positions == sorted(positions)
    quant = report.split("## Quantization")[1].split("## ")[0]
    assert "not built: run `make quantize`" in quant
    assert "not built: run `make plan`" in report.split("## Plan versus training")[1]
    assert "after fine-tuning: not built: run `make finetune`" in report
    assert metrics["quantization"] is None and metrics["plan"] is None

    # tokenizer and corpus figures come from their stages
    tok = json.loads((recipe.layout.tokenizer / "report.json").read_text())
    assert metrics["tokenizer"]["vocab_size"] == tok["model"]["vocab_size"]
    assert f"| vocabulary size | {tok['model']['vocab_size']:,} |" in report
    assert metrics["corpus"]["splits"] == {"train": 108, "val": 12}
    assert "train 108, val 12" in report

    # the loss curve: a PNG embedded in the report, its end points from the training log
    curve = metrics["curves"]["pretrain"]
    png = out / curve["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({curve['plot']})" in report
    assert f"-> {curve['train/loss_last']:.4f}" in report
    pre = json.loads((recipe.layout.pretrain / "manifest.json").read_text())
    assert metrics["pretrain"]["val_loss"] == pre["metrics"]["val_loss"]
    assert metrics["samples"][0]["text"] == pre["metrics"]["sample"]["text"]
    assert pre["metrics"]["sample"]["text"] in report

    # training: hardware, time, throughput and passes over the data, from the pretrain manifest
    from domainlm.tokenizer.arrays import TokenArrays, TokenWindows

    windows = len(TokenWindows(TokenArrays(recipe.layout.tokens, "train"), 32))
    assert metrics["pretrain"]["passes"] == pytest.approx(12 * 4 / windows)
    assert metrics["pretrain"]["steps"] == 12 and metrics["pretrain"]["hardware"]
    training = report.split("## Training\n")[1].split("\n## ")[0]
    assert f"| hardware | {metrics['pretrain']['hardware']} |" in training
    assert f"| passes over the training data | {12 * 4 / windows:.2f} |" in training
    assert "tokens/s |" in training and "| training time | " in training
    # the sections' perplexities differ, and the report says why
    assert "compare figures within a section only" in report.split("## Why the perplexities")[1]
    assert "not built: run `make finetune`" in report.split("## Fine-tuning\n")[1]

    # second run: nothing to do, files untouched
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = CliRunner().invoke(main, ["eval", "--recipe", str(run)])
    assert again.exit_code == 0 and "up to date" in again.output
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_the_report_shows_the_fine_tuning_results(run):
    """ROUGE-L and exact match per method, its training time and passes over the data (the
    last `epoch` of its log), from the finetune stage's manifest and logs."""
    from domainlm.files import write_json

    recipe = load_recipe(run)
    layout = recipe.layout
    score = {"samples": [], "trainable": 1000, "total": 9000, "seconds": 1.0}
    write_json(layout.manifest("finetune"), {
        "stage": "finetune",
        "base": {"name": "base (prompted)", "rougeL": 0.125, "exact_match": 0.0,
                 "pretrain_ppl": 40.5, **score},
        "methods": {"lora": {"name": "lora", "rougeL": 0.5, "exact_match": 0.25,
                             "pretrain_ppl": 41.25, "train_seconds": 12.5, "lr": 1e-3,
                             **score}},
    })
    log = layout.sft_method("lora") / "logs" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss\n0.5,0,3.0\n1.5,1,2.0\n")
    res = CliRunner().invoke(main, ["eval", "--recipe", str(run)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((layout.eval / "metrics.json").read_text())
    assert metrics["finetune"]["lora"] == {"rouge_l": 0.5, "exact_match": 0.25,
                                           "pretrain_ppl": 41.25, "trainable": 1000,
                                           "train_seconds": 12.5, "passes": 1.5}
    section = (layout.eval / "report.md").read_text().split("## Fine-tuning\n")[1]
    assert "| lora | 0.500 | 0.250 | 41.25 | 1,000 | 12.5 s | 1.50 |" in section
    assert "| base | 0.125 | 0.000 | 40.50 | 1,000 | - | - |" in section


def test_eval_without_corpus_names_the_stage(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: none\nbuild_dir: {tmp_path}/build\n"
                      "corpus:\n  sources: [{name: a, path: x}]\n")
    with pytest.raises(UserError, match="make corpus"):
        evaluate_run(load_recipe(recipe))


def test_domain_and_general_groups_sum_their_sources():
    from domainlm.eval.stage import groups

    sources = {
        "filings": {"tokens": 100, "bytes": 400, "nats": 250.0},
        "news": {"tokens": 50, "bytes": 220, "nats": 150.0},
        "web": {"tokens": 30, "bytes": 100, "nats": 90.0},
    }
    g = groups(sources, ["news", "web"])
    assert g["domain"]["sources"] == ["filings"] and g["domain"]["tokens"] == 100
    assert g["general"]["tokens"] == 80 and g["general"]["nats"] == 240.0
    assert g["general"]["ppl"] == pytest.approx(math.exp(240 / 80))
    assert g["general"]["bits_per_byte"] == pytest.approx(240 / math.log(2) / 320)
    assert set(groups(sources, [])) == {"domain"}
