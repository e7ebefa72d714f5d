"""Pretraining benchmark: CPU tokens/s of `make pretrain`'s Lightning loop, and its overhead
against a minimal raw PyTorch loop of the same model, batch, precision, optimizer and data."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader

from bench.common import commit, machine, table, write_section
from domainlm.model.llama import Llama
from domainlm.recipe import TrainConfig
from domainlm.recipe.model import LlamaConfig
from domainlm.tokenizer.arrays import TokenArrays, TokenWindows
from domainlm.train import optim
from domainlm.train.data import PretrainData, StepSampler
from domainlm.train.loop import build_trainer
from domainlm.train.module import PretrainModule
from domainlm.train.settings import RunSettings

WORK = Path("build/bench/pretrain")
TARGET = 0.03  # the bound on the Lightning loop's overhead
SEED = 1234  # the recipe default
EOS = 2
PRECISION = "bf16-mixed"  # the recipe default, also on the CPU


@dataclass(frozen=True)
class Size:
    name: str
    config: LlamaConfig
    micro_batch: int
    seq_len: int
    warmup: int  # steps before the timed ones (optimizer state, first-call costs)
    timed: int  # a multiple of log_every, so that every run logs equally often

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def steps(self) -> int:
        return self.warmup + self.timed


def _llama(vocab: int, layers: int, d: int, heads: int, ffn: int, seq_len: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, n_layers=layers, d_model=d, n_heads=heads,
                       n_kv_heads=heads, ffn_dim=ffn, max_seq_len=seq_len)


# The demo recipe's planned size (~0.45M parameters) and a ~5M one. Steps: about 6 s and 12 s
# of timed work per run on a 2-core EPYC, so that 3 runs of each loop take ~2.5 minutes.
SIZES = [
    Size("demo", _llama(2048, 6, 64, 1, 192, 256), micro_batch=16, seq_len=256,
         warmup=5, timed=40),
    Size("5M", _llama(8192, 4, 256, 4, 704, 256), micro_batch=8, seq_len=256,
         warmup=5, timed=30),
]


@dataclass
class Run:
    """One training run: the end time of every optimizer step, and every step's loss."""

    times: list[float] = field(default_factory=list)
    losses: list[torch.Tensor] = field(default_factory=list)

    def seconds(self, warmup: int) -> float:
        """Wall time of the steps after the first `warmup` ones (end of step warmup - 1 to the
        end of the last step)."""
        return self.times[-1] - self.times[warmup - 1]

    def loss_values(self) -> list[float]:
        return [float(x) for x in self.losses]


def write_tokens(out: Path, vocab_size: int, n_tokens: int, seed: int = 0) -> Path:
    """A train-only tokens folder as `make tokens` writes it: random documents, each ended by
    eos (ids drawn uniformly; the speed of a step does not depend on which ids it sees)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 1024, size=n_tokens // 64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1]
    tokens = rng.integers(EOS + 1, vocab_size, size=int(lengths.sum()), dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens[offsets[1:] - 1] = EOS
    out.mkdir(parents=True, exist_ok=True)
    tokens.astype("<u2").tofile(out / "train.bin")
    np.save(out / "train.idx.npy", offsets)
    n = len(tokens)
    meta = {"dtype": "uint16", "byte_order": "little", "vocab_size": vocab_size, "eos_id": EOS,
            "tokenizer_hash": "bench",
            "train": {"file": "train.bin", "index": "train.idx.npy", "tokens": n, "bytes": 4 * n,
                      "docs": len(lengths), "unique_tokens": n, "unique_docs": len(lengths),
                      "unique_bytes": 4 * n}}
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "manifest.json").write_text(json.dumps({"stage": "tokens", "bench": True}))
    return out


def train_config(size: Size, log_every: int = 10, optimizer: str = "adamw") -> TrainConfig:
    """The recipe's defaults (AdamW, warmup + cosine, clip 1.0, log every 10) at this batch;
    optimizer muon: Muon on the hidden matrices with warmup-stable-decay."""
    return TrainConfig(precision=PRECISION, strategy="auto", accelerator="cpu",
                       micro_batch=size.micro_batch, grad_accum=1, seq_len=size.seq_len,
                       tokens=size.steps * size.tokens_per_step, log_every=log_every,
                       optimizer=optimizer, schedule="wsd" if optimizer == "muon" else "cosine")


def raw_loop(size: Size, tokens_dir: Path, cfg: TrainConfig, precision: str = PRECISION) -> Run:
    """The minimal loop: the same model, batches, autocast, AdamW, clipping and schedule as
    `make pretrain`, written out in plain PyTorch, with nothing logged."""
    steps = size.steps
    torch.manual_seed(SEED)
    model = Llama(size.config)
    model.train()
    optimizer = optim.make_optimizer(model, cfg, fused=True)
    warmup = optim.warmup_steps(cfg, steps)
    schedule = LambdaLR(optimizer, lambda s: optim.lr_factor(s, steps, warmup, cfg))
    windows = TokenWindows(TokenArrays(tokens_dir, "train"), size.seq_len)
    sampler = StepSampler(len(windows), micro_batch=size.micro_batch, grad_accum=1,
                          world_size=1, rank=0, total_steps=steps, seed=SEED)
    loader = DataLoader(windows, batch_sampler=sampler)
    bf16 = precision == "bf16-mixed"
    run = Run()
    for x, y in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        run.losses.append(loss.detach())
        run.times.append(time.perf_counter())
    return run


class StepClock(L.Callback):
    """The end time and loss of every optimizer step; listed last, so it runs after our other
    callbacks' on_train_batch_end (what runs after it is counted in the next step's time)."""

    def __init__(self) -> None:
        self.run = Run()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.run.losses.append(outputs["loss"])
        self.run.times.append(time.perf_counter())


def lightning_loop(
    size: Size, tokens_dir: Path, cfg: TrainConfig, root: Path, precision: str = PRECISION
) -> Run:
    """`make pretrain`'s loop: PretrainModule, PretrainData and the Trainer as
    domainlm/train/pretrain.py builds them for one CPU device without a val split."""
    steps = size.steps
    if root.exists():
        shutil.rmtree(root)
    data = PretrainData(tokens_dir, seq_len=size.seq_len, micro_batch=size.micro_batch,
                        grad_accum=1, total_steps=steps, seed=SEED, val_batches=cfg.val_batches)
    data.setup("fit")
    torch.manual_seed(SEED)  # the raw loop's initial weights
    module = PretrainModule(size.config, cfg, total_steps=steps, grad_accum=1,
                            seq_len=size.seq_len, micro_batch=size.micro_batch,
                            val_bytes_per_token=None, fused_optimizer=True)
    clock = StepClock()
    settings = RunSettings(
        config=size.config,
        seq_len=size.seq_len,
        micro_batch=size.micro_batch,
        grad_accum=1,
        devices=1,
        num_nodes=1,
        total_steps=steps,
        accelerator="cpu",
        strategy="auto",
        precision=precision,
        checkpointing=False,
    )
    # The Trainer `make pretrain` builds; ckpt_every (200) is beyond the run, so nothing is
    # saved while steps are timed. The clock is the last callback.
    trainer, _, _ = build_trainer(
        settings, cfg, root, module, has_val=False, progress=False, extra_callbacks=(clock,)
    )
    trainer.fit(module, datamodule=data, weights_only=True)
    if len(clock.run.times) != steps:
        raise RuntimeError(f"Lightning ran {len(clock.run.times)} steps, not {steps}")
    return clock.run


@contextlib.contextmanager
def quiet():
    """Lightning's start-up messages and the dataloader-workers hint, not shown."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@dataclass
class Result:
    size: Size
    optimizer: str
    raw: list[float]  # timed seconds of each run
    lightning: list[float]
    loss_diff: float  # the largest |raw loss - Lightning loss| over all steps of the first runs
    raw_steps: list[float] = field(default_factory=list)  # every timed step of every run
    lightning_steps: list[float] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        """Trimmed-mean step time of Lightning over the raw loop's, minus 1.

        Every timed step of every run is pooled per loop and the slowest 5% of each pool is
        dropped: on a shared machine another process's burst lands on whole steps of either
        loop, which a mean would count and a median of whole runs turns into +-10% swings. The
        logging steps (one in log_every, 10%) stay in, so their cost is counted.
        """
        if not self.raw_steps:
            return statistics.median(self.lightning) / statistics.median(self.raw) - 1
        return _trimmed_mean(self.lightning_steps) / _trimmed_mean(self.raw_steps) - 1

    @property
    def pair_overheads(self) -> list[float]:
        return [lt / rt - 1 for rt, lt in zip(self.raw, self.lightning, strict=True)]

    @property
    def extra_ms_per_step(self) -> float:
        """Lightning's added wall time per optimizer step: a figure that, unlike the overhead
        ratio, does not shrink as the model grows."""
        gap = statistics.median(self.lightning) - statistics.median(self.raw)
        return 1000 * gap / self.size.timed

    def tokens_per_s(self, seconds: float) -> float:
        return self.size.timed * self.size.tokens_per_step / seconds


def measure(size: Size, runs: int, work: Path = WORK, optimizer: str = "adamw") -> Result:
    """`runs` raw and `runs` Lightning runs, alternated (and the order flipped every round) so
    that a busy spell on a shared machine slows both alike."""
    tokens = write_tokens(work / f"tokens-{size.name}", size.config.vocab_size,
                          max(300_000, 2 * size.steps * size.tokens_per_step))
    cfg = train_config(size, optimizer=optimizer)
    raw: list[Run] = []
    lit: list[Run] = []
    for r in range(runs):
        order = ("raw", "lightning") if r % 2 == 0 else ("lightning", "raw")
        for kind in order:
            if kind == "raw":
                raw.append(raw_loop(size, tokens, cfg))
            else:
                with quiet():
                    lit.append(lightning_loop(size, tokens, cfg, work / f"run-{size.name}"))
    shutil.rmtree(work / f"run-{size.name}", ignore_errors=True)
    diff = max(abs(a - b) for a, b in zip(raw[0].loss_values(), lit[0].loss_values(),
                                          strict=True))
    return Result(
        size,
        optimizer,
        [x.seconds(size.warmup) for x in raw],
        [x.seconds(size.warmup) for x in lit],
        diff,
        [d for x in raw for d in _steps(x, size.warmup)],
        [d for x in lit for d in _steps(x, size.warmup)],
    )


def _trimmed_mean(values: list[float], drop: float = 0.05) -> float:
    kept = sorted(values)[: max(1, round(len(values) * (1 - drop)))]
    return statistics.fmean(kept)


def _steps(run: Run, warmup: int) -> list[float]:
    return [b - a for a, b in zip(run.times[warmup - 1 :], run.times[warmup:], strict=False)]


def _fmt_range(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)} - {format(max(values), fmt)}"


def report(results: list[Result], runs: int, quick: bool, load: float, seconds: float,
           section: str = "pretrain") -> str:
    cores = os.cpu_count() or 1
    shared = f" (more than {cores}: other work shared the cores)" if load > cores else ""
    log_every = train_config(results[0].size).log_every
    rows = []
    for res in results:
        s, c = res.size, res.size.config
        raw_tps = [res.tokens_per_s(t) for t in res.raw]
        lit_tps = [res.tokens_per_s(t) for t in res.lightning]
        pairs = [100 * o for o in res.pair_overheads]
        rows.append([
            s.name,
            res.optimizer,
            f"{c.num_params():,}",
            f"{c.n_layers} x {c.d_model}, {c.n_heads} head(s), ffn {c.ffn_dim}, "
            f"vocab {c.vocab_size}",
            f"{s.micro_batch} x {s.seq_len}",
            f"{s.warmup} + {s.timed}",
            f"{res.tokens_per_s(statistics.median(res.raw)):,.0f} "
            f"({_fmt_range(raw_tps, ',.0f')})",
            f"{res.tokens_per_s(statistics.median(res.lightning)):,.0f} "
            f"({_fmt_range(lit_tps, ',.0f')})",
            f"**{100 * res.overhead:+.1f}%** ({_fmt_range(pairs, '+.1f')})",
            f"{res.extra_ms_per_step:+.1f}",
            "0" if res.loss_diff == 0 else f"{res.loss_diff:.1e}",
        ])
    met = {f"{r.size.name} {r.optimizer}": r.overhead <= TARGET for r in results}
    if all(met.values()):
        verdict = "met"
    elif not any(met.values()):
        verdict = "not met"
    else:
        verdict = (f"met for {', '.join(k for k, v in met.items() if v)}; not met for "
                   f"{', '.join(k for k, v in met.items() if not v)}")
    if quick:
        verdict += " (a smoke run: too few steps to judge)"
    if all(r.size.timed % log_every == 0 for r in results):
        logging_note = f"the timed steps are a multiple of {log_every}, so every run logs as often"
    else:
        logging_note = f"the timed steps are not a multiple of {log_every}, so logging is not timed"
    header = (
        f"## Pretraining (`make pretrain`, CPU{', optimizer: muon' if 'muon' in section else ''})"
        f"\n\nMachine: {machine()}. Commit {commit()}. "
        f"Command: `python -m bench {section}{' --quick' if quick else ''}` (median of {runs} "
        f"run(s) of each loop, alternated, {time.strftime('%Y-%m-%d')}; the section took "
        f"{seconds:.0f} s). torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"lightning {L.__version__}. Load average around the runs: {load:.1f}{shared}.\n"
    )
    body = [
        "Both loops train the same decoder from the same seed on the same batches (random "
        "tokens through `TokenWindows` + `StepSampler`), with bf16-mixed autocast, the optimizer "
        "from `make_optimizer` (adamw: fused AdamW with the warmup + cosine schedule; muon: "
        "Muon on the hidden matrices + fused AdamW on the rest, with warmup-stable-decay) and "
        "gradient clipping at 1.0. "
        "**Raw**: a plain PyTorch loop (forward, backward, clip, step, zero_grad, scheduler "
        "step), nothing logged. **Lightning**: `PretrainModule` + `PretrainData` + the Trainer "
        "as `make pretrain` builds it (bf16-mixed, clip 1.0, `ThroughputBar`, `GracefulStop`, "
        "`ModelCheckpoint` with nothing due in the run, CSV and TensorBoard loggers, logging "
        f"every {log_every} steps; no validation, no progress bar). Each run's first steps are "
        f"left out; {logging_note}. Tokens/s is the median run's, with the range over runs. "
        "Overhead: every timed step of every run is pooled per loop, the slowest 5% of each "
        "pool dropped (another process's burst on this shared machine lands on whole steps), "
        "and the mean Lightning step over the mean raw step, minus 1; the logging steps stay "
        "in, so their cost counts. In brackets, the range of whole-run ratios over the "
        "alternated raw/Lightning pairs, which such bursts widen. \"ms/step added\" is the "
        "gap of the median runs per optimizer step, which does not shrink as the model "
        "grows.\n",
        table(
            ["model", "optimizer", "params", "shape", "batch (seqs x tokens)",
             "steps (warm-up + timed)",
             "raw tokens/s (range)", "Lightning tokens/s (range)", "overhead (range)",
             "ms/step added", "max loss difference"],
            rows,
        ),
        f"\nTarget: overhead <= {100 * TARGET:.0f}%: **{verdict}**. The last column is the "
        "largest difference between the two loops' losses, step by step, in their first runs "
        "(0: the same computation, bit for bit).\n",
    ]
    return header + "\n" + "\n".join(body)


def run(quick: bool = False, sizes: list[Size] | None = None, work: Path = WORK,
        optimizer: str = "adamw", runs: int = 5) -> str:
    runs = 1 if quick else runs
    if sizes is None:
        sizes = SIZES
        if quick:  # a smoke run: every code path, a few steps each
            sizes = [Size(s.name, s.config, s.micro_batch, s.seq_len, warmup=1, timed=2)
                     for s in SIZES]
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    results = [measure(s, runs, work, optimizer) for s in sizes]
    load = (load_before + os.getloadavg()[0]) / 2
    section = "pretrain" if optimizer == "adamw" else f"pretrain-{optimizer}"
    return report(results, runs, quick, load, time.perf_counter() - t0, section)


def main(quick: bool = False) -> None:
    body = run(quick)
    write_section("pretrain", body)
    print(body)


def main_muon(quick: bool = False) -> None:
    """The same comparison with optimizer: muon (+ wsd), 3 runs of each loop."""
    body = run(quick, optimizer="muon", runs=3)
    write_section("pretrain-muon", body)
    print(body)
