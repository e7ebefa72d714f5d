"""The pretraining benchmark compares like with like: its raw PyTorch loop and its Lightning
loop (the Trainer of `make pretrain`) compute the same losses from the same seed and batches."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` sits beside `tests`

from bench.pretrain import Size, _llama, lightning_loop, quiet, raw_loop, write_tokens  # noqa: E402
from bench.pretrain import train_config as bench_train_config  # noqa: E402

TINY = Size("tiny", _llama(256, 2, 32, 2, 64, 32), micro_batch=2, seq_len=32, warmup=1, timed=2)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("bench") / "tokens", 256, 5000)


@pytest.mark.parametrize("precision, optimizer",
                         [("32-true", "adamw"), ("bf16-mixed", "adamw"), ("bf16-mixed", "muon")])
def test_raw_and_lightning_loops_compute_the_same_losses(
    tokens: Path, tmp_path: Path, precision: str, optimizer: str
) -> None:
    # every step goes through the logging path
    cfg = bench_train_config(TINY, log_every=1, optimizer=optimizer)
    raw = raw_loop(TINY, tokens, cfg, precision=precision)
    with quiet():
        lit = lightning_loop(TINY, tokens, cfg, tmp_path / "run", precision=precision)
    assert len(raw.times) == len(lit.times) == TINY.steps
    assert raw.seconds(TINY.warmup) > 0 and lit.seconds(TINY.warmup) > 0
    losses = torch.stack(raw.losses)
    assert torch.isfinite(losses).all() and losses[0] > 5.0  # about ln(256) at the start
    assert torch.equal(losses, torch.stack(lit.losses))
    with open(tmp_path / "run" / "logs" / "metrics.csv", newline="") as f:
        logged = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [float(r["train/loss"]) for r in logged] == pytest.approx(raw.loss_values())
