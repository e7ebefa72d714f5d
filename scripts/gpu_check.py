"""One GPU check (`make gpu-check`): short runs of recipes/gpu-125m.yaml (eager and
torch.compile) and recipes/gpu-1b.yaml (FSDP, DeepSpeed ZeRO-2 and ZeRO-3 on several GPUs; the
single-device path with activation checkpointing on one, eager and compiled) in bf16 on
synthetic tokens of the recipe's vocabulary, through the Trainer that `make pretrain` builds.
Writes one JSON file: per run tokens/s, MFU (PaLM's FLOPs per token over the named device's
dense bf16 peak), peak memory and the memory model's prediction for the same run
(domainlm/plan/memory.py).

    python scripts/gpu_check.py                      # on the GPU machine, <= 8 minutes
    python scripts/gpu_check.py --cpu --out x.json   # the same path with tiny sizes (the tests)

Each run is a subprocess of this script (`--run NAME`), so peak memory, compiled code and the
distributed launch of one run do not leak into the next. Nothing is downloaded, and nothing
imported here imports datasets, datasketch, langdetect or deepspeed (DeepSpeed only for the
ZeRO runs, which need more than one GPU): a GPU machine with torch, lightning, PyYAML and
sentencepiece runs it (docs/pretrain.md says how to carry wheels there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a checkout that is not pip-installed (the GPU machine's copy)

# Dense bf16 peak (no sparsity) of the devices the check targets, FLOP/s, from the vendor's
# data sheets: H100 SXM and H200 989.4 TFLOPS, H100 PCIe 756 TFLOPS.
PEAKS = [("H200", 989.4e12), ("H100 PCIe", 756e12), ("H100", 989.4e12)]
GPU_BUDGET_S = 8 * 60
CPU_BUDGET_S = 30 * 60  # a shared CI machine compiles slowly
# Per run: the optimizer steps left out (compilation, allocator warm-up) and those timed.
WARMUP_STEPS, TIMED_STEPS = 3, 8
CPU_WARMUP_STEPS, CPU_TIMED_STEPS = 1, 3


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAKS:
        if key.lower() in device_name.lower():
            return flops
    return None


def plan_runs(cpu: bool, gpus: int) -> list[dict]:
    """The runs of this check: name, recipe, strategy, compile, activation checkpointing."""
    runs = [
        {"name": "gpu-125m eager", "recipe": "recipes/gpu-125m.yaml", "strategy": "auto",
         "compile": False, "checkpointing": False},
        {"name": "gpu-125m compiled", "recipe": "recipes/gpu-125m.yaml", "strategy": "auto",
         "compile": True, "checkpointing": False},
    ]
    if gpus > 1 and not cpu:
        runs += [{"name": f"gpu-1b {label}", "recipe": "recipes/gpu-1b.yaml", "strategy": s,
                  "compile": False, "checkpointing": False}
                 for label, s in (("FSDP", "fsdp"), ("ZeRO-2", "deepspeed_stage_2"),
                                  ("ZeRO-3", "deepspeed_stage_3"))]
    else:
        runs.append({"name": "gpu-1b + activation checkpointing", "recipe": "recipes/gpu-1b.yaml",
                     "strategy": "auto", "compile": False, "checkpointing": True})
        if not cpu:  # the recipe's own setting; on a CPU the 125m run covers compilation
            runs.append({"name": "gpu-1b + activation checkpointing, compiled",
                         "recipe": "recipes/gpu-1b.yaml", "strategy": "auto", "compile": True,
                         "checkpointing": True})
    return runs


def tiny(config):
    """CPU mode: the recipe's shape cut down to seconds of work, its structure kept (GQA when
    the recipe has it, tied embeddings as the recipe says)."""
    kv = 2 if config.n_kv_heads < config.n_heads else 4
    return dataclasses.replace(config, vocab_size=512, n_layers=2, d_model=64, n_heads=4,
                               n_kv_heads=kv, ffn_dim=160, max_seq_len=64)


def settings_for(run: dict, cpu: bool, gpus: int):
    """The run's RunSettings and train section, as `make pretrain` would resolve them."""
    from domainlm.recipe import load_recipe
    from domainlm.train.settings import RunSettings

    recipe = load_recipe(ROOT / run["recipe"])
    t = recipe.train
    config = recipe.model.shape(recipe.tokenizer.vocab_size)
    seq_len, micro = t.seq_len or recipe.plan.seq_len, t.micro_batch or 1
    # The recipe's accumulation would make each timed step ~0.5M tokens; a few micro-batches
    # keep the optimizer's share of a step while the check stays short.
    accum = min(t.grad_accum or 1, 2)
    warmup, timed = (CPU_WARMUP_STEPS, CPU_TIMED_STEPS) if cpu else (WARMUP_STEPS, TIMED_STEPS)
    if cpu:
        config, seq_len, micro = tiny(config), 32, 2
    devices = 1 if cpu or run["strategy"] == "auto" else gpus
    settings = RunSettings(
        config=dataclasses.replace(config, max_seq_len=max(config.max_seq_len, seq_len)),
        seq_len=seq_len, micro_batch=micro, grad_accum=accum, devices=devices, num_nodes=1,
        total_steps=warmup + timed, accelerator="cpu" if cpu else "gpu",
        strategy=run["strategy"], precision="bf16-mixed", checkpointing=run["checkpointing"],
    )
    # No validation, no checkpoint, one logged step at the very end: only training is timed.
    train = dataclasses.replace(
        t, precision="bf16-mixed", compile=run["compile"], warmup_steps=1,
        activation_checkpointing=run["checkpointing"] and run["strategy"] != "fsdp",
        ckpt_every=10**9, log_every=10**9, val_every=10**9,
    )
    return settings, train, warmup, timed


class SyntheticTokens(L.LightningDataModule):
    """Uniform random tokens of the model's vocabulary (what the check times is the step, not
    the data), the same on every rank."""

    def __init__(self, vocab: int, seq_len: int, micro_batch: int, batches: int, seed: int = 0):
        super().__init__()
        self.vocab, self.seq_len, self.micro_batch = vocab, seq_len, micro_batch
        self.batches, self.seed = batches, seed

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        tokens = torch.randint(0, self.vocab, (self.batches * self.micro_batch, self.seq_len + 1),
                               generator=g)
        pairs = torch.utils.data.TensorDataset(tokens[:, :-1], tokens[:, 1:])
        return torch.utils.data.DataLoader(pairs, batch_size=self.micro_batch)


class Timer(L.Callback):
    """Times the optimizer steps after `warmup`, waiting for the GPU only at the two ends."""

    def __init__(self, warmup: int, accum: int):
        self.warmup, self.accum = warmup, accum
        self.start = self.end = None
        self.steps = 0

    def _now(self, trainer) -> float:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % self.accum:
            return
        if trainer.global_step == self.warmup:
            self.start = self._now(trainer)
        elif trainer.global_step > self.warmup:
            self.end = self._now(trainer)
            self.steps = trainer.global_step - self.warmup


def predicted_bytes(settings) -> dict:
    """The memory model's figure for this run, per device (states + buffers + activations)."""
    from domainlm.plan import memory

    strategy = {"auto": "ddp", "ddp": "ddp", "fsdp": "fsdp", "deepspeed_stage_2": "zero2",
                "deepspeed_stage_3": "fsdp"}[settings.strategy]  # ZeRO-3 shards like FSDP
    shape, n = settings.config, settings.config.num_params()
    states = memory.state_bytes(n, settings.precision, strategy, settings.devices)
    buffers = memory.buffer_bytes(shape, settings.precision, strategy, settings.devices)
    activations = memory.activation_bytes(shape, settings.micro_batch, settings.seq_len,
                                          settings.precision, settings.checkpointing)
    return {"predicted_memory_bytes": states.total + buffers + activations,
            "predicted": {"weights": states.weights, "grads": states.grads,
                          "optimizer": states.optimizer, "buffers": buffers,
                          "activations": activations, "strategy": strategy}}


def one_run(run: dict, cpu: bool, gpus: int) -> dict:
    """Train one run for a few steps; its figures (rank 0)."""
    from domainlm.train.loop import build_trainer
    from domainlm.train.module import PretrainModule

    settings, train, warmup, timed = settings_for(run, cpu, gpus)
    s = settings
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.matmul.allow_tf32 = True
    L.seed_everything(0, verbose=False)
    module = PretrainModule(
        s.config, train, total_steps=s.total_steps, grad_accum=s.grad_accum, seq_len=s.seq_len,
        micro_batch=s.micro_batch, fused_optimizer=s.strategy == "auto",
    )
    data = SyntheticTokens(s.config.vocab_size, s.seq_len, s.micro_batch,
                           s.total_steps * s.grad_accum)
    timer = Timer(warmup, s.grad_accum)
    out = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=os.environ.get("GPU_CHECK_TMP")))
    trainer, _, _ = build_trainer(s, train, out, module, has_val=False, progress=False,
                                  extra_callbacks=(timer,), loggers=False)
    # No checkpoint at the end either (a 1B model's would be 13 GB of writing, after the timing).
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    seconds = time.perf_counter() - t0
    elapsed = timer.end - timer.start
    tokens_per_s = timer.steps * s.tokens_per_step / elapsed  # all devices
    flops_per_token = s.config.flops_per_token(s.seq_len)
    device = "cpu" if cpu else torch.cuda.get_device_name(0)
    peak = None if cpu else peak_flops(device)
    if cpu:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak_memory = torch.cuda.max_memory_allocated()
    return {
        **run, "device": device, "devices": s.devices, "precision": s.precision,
        "params": s.config.num_params(), "n_layers": s.config.n_layers,
        "d_model": s.config.d_model, "vocab_size": s.config.vocab_size, "seq_len": s.seq_len,
        "micro_batch": s.micro_batch, "grad_accum": s.grad_accum,
        "steps": {"warmup": warmup, "timed": timer.steps},
        "tokens_per_step": s.tokens_per_step, "tokens_per_s": round(tokens_per_s, 1),
        "flops_per_token": flops_per_token,
        "mfu": None if peak is None else round(tokens_per_s * flops_per_token
                                               / (peak * s.devices), 4),
        "peak_flops_per_device": peak,
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": "process max RSS (CPU)" if cpu else "torch.cuda.max_memory_allocated",
        **predicted_bytes(s),
        "seconds": round(seconds, 1),
        "error": None,
    }


def child(args) -> None:
    run = next(r for r in plan_runs(args.cpu, args.gpus) if r["name"] == args.run)
    result = one_run(run, args.cpu, args.gpus)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU (the tests' mode)")
    p.add_argument("--out", default=None, help="the JSON file (default: bench/gpu_check.json, "
                   "or build/gpu-check/gpu_check_cpu.json with --cpu)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {GPU_BUDGET_S} on a GPU, "
                   f"{CPU_BUDGET_S} with --cpu); a run still going at the end is stopped")
    p.add_argument("--run", help=argparse.SUPPRESS)  # one run, in a subprocess
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--gpus", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        child(args)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; use --cpu for the CPU mode", file=sys.stderr)
        return 2
    gpus = 0 if args.cpu else torch.cuda.device_count()
    out = Path(args.out or ("build/gpu-check/gpu_check_cpu.json" if args.cpu
                            else "bench/gpu_check.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.cpu else torch.cuda.get_device_name(0)
    report = {"mode": "cpu" if args.cpu else "gpu", "device": device, "gpus": gpus,
              "cpu_cores": os.cpu_count(), "peak_flops_per_device": peak_flops(device),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": "python scripts/gpu_check.py" + (" --cpu" if args.cpu else ""),
              **versions(), "runs": []}
    budget = args.budget or (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
    t0 = time.perf_counter()
    for run in plan_runs(args.cpu, gpus):
        left = budget - (time.perf_counter() - t0)
        result_file = out.with_name(out.stem + ".run.json")
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run", run["name"],
               "--result", str(result_file), "--gpus", str(gpus)] + (["--cpu"] if args.cpu else [])
        print(f"gpu_check: {run['name']} ({left:.0f} s of the budget left)", flush=True)
        error = None
        if left < 30:
            error = "not run: the time budget was spent"
        else:
            try:
                proc = subprocess.run(cmd, timeout=left, capture_output=True, text=True)
                if proc.returncode != 0:
                    error = (proc.stderr or proc.stdout).strip().splitlines()[-1][:500] \
                        if (proc.stderr or proc.stdout).strip() else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                error = "stopped: the time budget ran out"
        if error is None and result_file.is_file():
            result = json.loads(result_file.read_text(encoding="utf-8"))
            result_file.unlink()
        else:
            result = {**run, "error": error or "no result written"}
        report["runs"].append(result)
        shown = ", ".join(f"{k} {result[k]}" for k in ("tokens_per_s", "mfu", "peak_memory_bytes",
                                                       "predicted_memory_bytes") if k in result)
        print(f"gpu_check: {run['name']}: {shown or result['error']}", flush=True)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"gpu_check: wrote {out} ({report['wall_seconds']} s)")
    return 0 if all(r.get("error") is None for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
