"""`make pretrain`: learning, export to transformers, exact resume after kill -9 and Ctrl-C,
DDP equivalence on CPU, schedules, parameter groups and the errors a recipe can cause."""

from __future__ import annotations

import csv
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from builders import grammar_corpus, run_killed_after_checkpoint, tiny_run

from domainlm.errors import UserError
from domainlm.files import read_json
from domainlm.model.llama import Llama
from domainlm.recipe import TrainConfig, load_recipe
from domainlm.recipe.model import LlamaConfig
from domainlm.train import optim
from domainlm.train.pretrain import pretrain
from domainlm.train.settings import resolve

MODEL = {
    "from_plan": False,
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 2,
    "n_kv_heads": 1,
    "ffn_dim": 128,
    "max_seq_len": 64,
    "tie_embeddings": True,
}
STEPS = 100
TRAIN = {
    "seq_len": 32,
    "micro_batch": 4,
    "grad_accum": 1,
    "tokens": 4 * 32 * 100,  # STEPS steps
    "lr": 1e-2,
    "warmup_steps": 4,
    "val_every": 20,
    "val_batches": None,
    "ckpt_every": 10,
    "log_every": 1,
    "sample_prompt": "The",
    "sample_tokens": 8,
}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A tiny run with corpus, tokenizer and tokens built once; recipes are copies of it."""
    root = tmp_path_factory.mktemp("pretrain")
    tiny_run(root, vocab_size=320, corpus=grammar_corpus(), model=MODEL, train=TRAIN)
    return root


def recipe_copy(root: Path, name: str, **train) -> Path:
    """A recipe sharing the tiny run's build folder under a new run name (stages copied)."""

    base = yaml.safe_load((root / "tiny.yaml").read_text())
    base["name"] = name
    base["train"] = {**base["train"], **train}
    for stage in ("corpus", "tokenizer", "tokens"):
        dst = root / "build" / name / stage
        if not dst.exists():
            shutil.copytree(root / "build" / "tiny" / stage, dst)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss per optimizer step from the CSV log (the last value when a step repeats)."""
    out: dict[int, float] = {}
    with open(run_dir / "pretrain" / "logs" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out


def cli(recipe: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "domainlm", "pretrain", "--recipe", str(recipe), "--no-progress"]
    return subprocess.Popen([*cmd, *args], env=env, text=True, **popen)


# ----------------------------------------------------------------------------- learning, export


@pytest.fixture(scope="module")
def trained(run_root):
    recipe = load_recipe(run_root / "tiny.yaml")
    manifest = pretrain(recipe, progress=False)
    return recipe, manifest


@pytest.mark.slow
def test_loss_falls_below_the_unigram_baseline(trained):
    recipe, manifest = trained
    m = manifest["metrics"]
    assert m["steps"] == STEPS and m["tokens"] == STEPS * 4 * 32
    assert m["val_loss"] < m["unigram_baseline"] - 0.3
    assert m["val_ppl"] == pytest.approx(math.exp(m["val_loss"]))
    steps = losses(recipe.layout.root)
    assert sorted(steps) == list(range(STEPS))  # one logged loss per optimizer step
    assert steps[STEPS - 1] < steps[0] - 1.0
    assert m["sample"]["text"].startswith("The")


def test_logs_and_checkpoints_are_written(trained):
    recipe, _ = trained
    out = recipe.layout.pretrain
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    header = (out / "logs" / "metrics.csv").read_text().splitlines()[0]
    for key in ("train/loss", "train/lr", "val/loss", "val/ppl", "val/bpb", "perf/tokens_per_s"):
        assert key in header
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == STEPS


def test_export_loads_in_transformers_with_equal_logits(trained):
    recipe, _ = trained
    folder = recipe.layout.pretrain_model
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.model"} <= (
        names
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ckpt = torch.load(recipe.layout.pretrain / "checkpoints" / "last.ckpt", weights_only=True)
    config = LlamaConfig(**ckpt["hyper_parameters"]["config"])
    ours = Llama(config).eval()
    ours.load_state_dict(
        {k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    )
    idx = torch.randint(0, config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)[0]).abs().max().item()
    assert diff <= 1e-4
    # The base folder carries the chat template its fine-tuned adapters are served with, and
    # bos is the eos that every training document follows.
    from domainlm.tokenizer.templates import load_template

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == load_template(recipe.finetune.template).source
    assert hf.config.bos_token_id == tok.bos_token_id == 2 == hf.generation_config.bos_token_id


def test_a_second_run_is_up_to_date(trained, capsys):
    recipe, manifest = trained
    model = recipe.layout.pretrain_model / "model.safetensors"
    mtime = model.stat().st_mtime_ns
    again = pretrain(recipe, progress=False)
    assert "up to date" in capsys.readouterr().out
    assert again["fingerprint"] == manifest["fingerprint"]
    assert model.stat().st_mtime_ns == mtime


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_losses(run_root, trained):
    reference = losses(trained[0].layout.root)
    recipe = recipe_copy(run_root, "killed")
    run_dir = load_recipe(recipe).layout.root
    killed = run_killed_after_checkpoint(
        ["pretrain", "--recipe", str(recipe), "--no-progress"], 1)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert (run_dir / "pretrain" / "checkpoints" / "step-step=000010.ckpt").is_file()
    assert not (run_dir / "pretrain" / "model").exists()
    # The log was flushed with the checkpoint: every step before it is on disk.
    assert set(losses(run_dir)) >= set(range(9))
    done = subprocess.run(
        [sys.executable, "-m", "domainlm", "pretrain", "--recipe", str(recipe), "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    resumed = losses(run_dir)
    # Lightning logs a step's row after that step's checkpoint is written: a kill between the
    # two loses that one row (step 9 here); every other step is in the log exactly once.
    assert set(reference) - set(resumed) <= {9} and set(resumed) <= set(reference)
    for step in range(10, STEPS):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(run_root, trained):
    reference = losses(trained[0].layout.root)
    recipe = recipe_copy(run_root, "interrupted", ckpt_every=1000)
    run_dir = load_recipe(recipe).layout.root
    proc = cli(recipe, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = run_dir / "pretrain" / "logs" / "metrics.csv"
    t = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 6):
        assert proc.poll() is None and time.time() - t < 120
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "run `make pretrain` again to continue" in err
    ckpt = torch.load(run_dir / "pretrain" / "checkpoints" / "last.ckpt", weights_only=True)
    stopped = ckpt["global_step"]
    assert 0 < stopped < STEPS
    done = cli(recipe, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = done.communicate(timeout=180)
    assert done.returncode == 0, err
    resumed = losses(run_dir)
    for step in range(stopped, STEPS):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_changed_recipe_discards_stale_checkpoints(run_root, trained, capsys):
    recipe = load_recipe(recipe_copy(run_root, "changed", tokens=4 * 32 * 12, ckpt_every=6))
    pretrain(recipe, progress=False)
    changed = load_recipe(recipe_copy(run_root, "changed", tokens=4 * 32 * 12, lr=1e-3))
    pretrain(changed, progress=False)
    out = capsys.readouterr().out
    assert "starting afresh" in out and "resuming" not in out


@pytest.mark.slow
def test_logged_epoch_counts_passes_and_the_last_validation_is_logged(run_root):
    """`epoch` in the logs is passes over the training windows (Lightning's counter would stay
    0: the whole run is one sampler epoch), and the final weights' validation is the last
    val/loss point even when val_every does not divide the steps (the plot ends there too)."""
    from domainlm.eval.stage import read_curves
    from domainlm.tokenizer.arrays import TokenArrays, TokenWindows

    steps = 30
    recipe = load_recipe(recipe_copy(run_root, "passes", tokens=4 * 32 * steps, val_every=12,
                                     log_every=1))
    manifest = pretrain(recipe, progress=False)
    windows = len(TokenWindows(TokenArrays(recipe.layout.tokens, "train"), 32))
    with open(recipe.layout.pretrain / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    assert len(train) == steps
    for r in train:
        assert float(r["epoch"]) == pytest.approx((int(r["step"]) + 1) * 4 / windows)
    assert float(train[-1]["epoch"]) > 0  # Lightning's own counter: 0 for the whole run
    vals = [(int(r["step"]), float(r["val/loss"]), float(r["epoch"]))
            for r in rows if r.get("val/loss")]
    assert [v[0] for v in vals] == [11, 23, steps - 1]
    assert vals[-1][1] == pytest.approx(manifest["metrics"]["val_loss"], rel=1e-5)
    assert vals[-1][2] == pytest.approx(steps * 4 / windows)
    curve = read_curves(recipe.layout.pretrain / "logs" / "metrics.csv")["val/loss"]
    assert curve[-1][0] == steps - 1


# ----------------------------------------------------------------------------- distributed


# Micro-batches of 2 and of 4 take different CPU matmul paths: float32 rounding then grows
# through Adam's early steps to about 4e-5 (relative) by step 10, the same for DDP and for
# accumulation. A wrong data split or gradient average moves the loss by about 1e-2.
REL = 1e-4


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process(run_root):
    # float32, so that the comparison is of the data split and the gradient averaging, not
    # of bf16 rounding (which differs with the batch's shape).
    recipe = recipe_copy(
        run_root,
        "ddp",
        strategy="ddp",
        devices=2,
        micro_batch=2,
        tokens=4 * 32 * 12,
        precision="32-true",
    )
    done = subprocess.run(
        [sys.executable, "-m", "domainlm", "pretrain", "--recipe", str(recipe), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_json(load_recipe(recipe).layout.pretrain / "manifest.json")
    assert manifest["settings"]["world_size"] == 2 and manifest["settings"]["strategy"] == "ddp"
    both = losses(load_recipe(recipe).layout.root)
    # The same 12 global batches of 4 sequences, split over two processes, give the losses of
    # one process with micro-batch 4 (the same schedule, over 12 steps).
    assert sorted(both) == list(range(12))
    reference = _single_process(run_root)
    for step in range(12):
        assert both[step] == pytest.approx(reference[step], rel=REL), step


def test_gradient_accumulation_equals_the_larger_micro_batch(run_root):
    """2 micro-batches of 2 per step give the losses of 1 micro-batch of 4 (same samples)."""
    reference = _single_process(run_root)
    recipe = load_recipe(
        recipe_copy(
            run_root,
            "accum",
            micro_batch=2,
            grad_accum=2,
            tokens=4 * 32 * 12,
            precision="32-true",
            ckpt_every=5,
        )
    )
    pretrain(recipe, progress=False)
    accumulated = losses(recipe.layout.root)
    assert sorted(accumulated) == list(range(12))
    for step in range(12):
        assert accumulated[step] == pytest.approx(reference[step], rel=REL), step
    # The end of the run is checkpointed even when it is not a multiple of ckpt_every.
    last = torch.load(recipe.layout.pretrain / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(run_root):
    reference = _single_process(run_root)
    recipe = load_recipe(
        recipe_copy(run_root, "compiled", tokens=4 * 32 * 12, precision="32-true", compile=True)
    )
    pretrain(recipe, progress=False)
    compiled = losses(recipe.layout.root)
    for step in range(12):
        assert compiled[step] == pytest.approx(reference[step], rel=1e-4), step


_SINGLE: dict[Path, dict[int, float]] = {}


def _single_process(run_root: Path) -> dict[int, float]:
    if run_root in _SINGLE:
        return _SINGLE[run_root]
    recipe = load_recipe(
        recipe_copy(run_root, "single", tokens=4 * 32 * 12, precision="32-true")
    )
    pretrain(recipe, progress=False)
    _SINGLE[run_root] = losses(recipe.layout.root)
    return _SINGLE[run_root]


# ----------------------------------------------------------------------------- units


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(min_lr_ratio=0.1)
    f = [optim.lr_factor(s, 100, 10, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert f[-1] == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = TrainConfig(schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    f = [optim.lr_factor(s, 100, 5, cfg) for s in range(100)]
    assert f[4] == 1.0 and f[79] == 1.0 and f[80] == 1.0
    assert f[90] == pytest.approx(1 - 10 / 19)
    assert f[-1] == pytest.approx(0.0)


def test_no_weight_decay_on_norms_and_embeddings():
    model = Llama(
        LlamaConfig(
            vocab_size=64,
            n_layers=1,
            d_model=16,
            n_heads=2,
            n_kv_heads=2,
            ffn_dim=32,
            tie_embeddings=True,
        )
    )
    decay, no_decay = optim.param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 2 and "embed" not in names[id(p)] for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {
        "model.embed_tokens.weight",
        "model.norm.weight",
    }
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # tied weight counted once


@pytest.mark.parametrize(
    "train, match",
    [
        ({"accelerator": "gpu"}, "has no CUDA GPU"),
        ({"strategy": "fsdp"}, "FSDP.*needs CUDA GPUs"),
        ({"strategy": "deepspeed"}, "DeepSpeed.*needs CUDA GPUs"),
        ({"precision": "16-mixed"}, "16-mixed.*GPUs"),
        ({"micro_batch": 0}, "train.micro_batch: must be >= 1"),
    ],
)
def test_gpu_only_choices_on_a_cpu_are_one_clear_error(run_root, train, match):
    if torch.cuda.is_available():
        pytest.skip("these are the errors of a machine without a GPU")
    with pytest.raises(UserError, match=match):
        resolve(load_recipe(recipe_copy(run_root, "errors", **train)))


def test_a_missing_plan_names_the_command(run_root):
    path = recipe_copy(run_root, "noplan")
    data = yaml.safe_load(path.read_text())
    data["model"]["from_plan"] = True
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match="make plan"):
        resolve(load_recipe(path))
