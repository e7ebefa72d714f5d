"""scripts/check_server.py on a tiny run: `domainlm serve` on the run's base folder and LoRA
adapter, driven by the openai client and compared with lm-eval's hf backend (which must agree
request by request); and the script fails when the server answers differently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import grammar_corpus, tiny_run

from domainlm.model.load import load_model
from domainlm.model.peft import LoRALinear, add_lora, save_lora
from domainlm.recipe import load_recipe
from domainlm.recipe.finetune import LoRAConfig
from domainlm.train.pretrain import pretrain

pytestmark = pytest.mark.slow  # trains a tiny model, starts a server, runs lm-eval twice

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_server.py"
MODEL = {"from_plan": False, "n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1,
         "ffn_dim": 64, "max_seq_len": 128, "tie_embeddings": True}
TRAIN = {"seq_len": 64, "micro_batch": 4, "grad_accum": 1, "tokens": 4 * 64 * 10,
         "lr": 1e-2, "warmup_steps": 2, "val_every": 5, "val_batches": 1, "ckpt_every": 100,
         "log_every": 1, "sample_prompt": "The", "sample_tokens": 4}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check-server")
    path = tiny_run(root, vocab_size=320, corpus=grammar_corpus(docs=80), model=MODEL,
                    train=TRAIN)
    recipe = load_recipe(path)
    pretrain(recipe, progress=False)
    # A LoRA adapter where fine-tuning puts it (random weights: the check compares backends).
    model = load_model(recipe.layout.pretrain_model)
    cfg = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    add_lora(model, cfg, "default")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape,
                                                             generator=g) * 0.2)
    save_lora(model, "default", recipe.layout.sft_model("lora"), cfg,
              str(recipe.layout.pretrain_model.resolve()))
    return path


def check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=1200)


def test_check_server_passes_on_a_run(run):
    result = check("--recipe", str(run))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout and "adapter None" not in result.stdout
    compared = int(result.stdout.split(" lm-eval requests compared")[0].rsplit(" ", 1)[1])
    # 2 models x (at least 4 questions x 4 choices + 4 documents), compared between backends
    assert compared >= 2 * (4 * 4 + 4)


def test_check_server_names_what_is_missing(tmp_path):
    result = check("--model", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no model folder" in result.stderr
