"""The token-efficiency benchmark measures what it says: a budget's decay branch off the shared
WSD trunk is the same run as that budget trained alone, and tokens-to-target interpolates
between the budgets around the target."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench` sits beside `tests`

from bench import efficiency as eff  # noqa: E402
from bench.efficiency_data import Streams  # noqa: E402

TINY = eff.Size("tiny", dataclasses.replace(eff._llama(1, 32, 2, 64, vocab=64), max_seq_len=16),
                micro_batch=2, seq_len=16, steps=20)


@pytest.fixture(scope="module")
def data() -> Streams:
    rng = np.random.default_rng(0)
    # A learnable stream: each token is the previous one plus 1 or 2 (mod 64).
    steps = rng.integers(1, 3, size=6000)
    stream = np.cumsum(steps) % 64
    return Streams(stream[:5000].astype(np.int64), stream[5000:].astype(np.int64), 64)


def test_a_decay_branch_is_the_budget_trained_alone(data):
    cfg = eff.CANDIDATE
    branched = eff.candidate(TINY, data, seed=3, cfg=cfg, fractions=(0.5, 1.0))
    warmup = eff.optim.warmup_steps(eff.BASELINE, TINY.steps)
    for budget, loss in branched.items():
        alone = eff.Trainer(TINY, cfg, data, 3, warmup)
        alone.run(budget, budget)
        assert alone.val_loss() == loss, budget
    assert branched[20] < branched[10]  # it learns: more tokens, lower loss


def test_the_baseline_is_adamw_cosine_and_the_candidate_muon_wsd(data):
    assert (eff.BASELINE.optimizer, eff.BASELINE.schedule) == ("adamw", "cosine")
    assert (eff.CANDIDATE.optimizer, eff.CANDIDATE.schedule) == ("muon", "wsd")
    loss = eff.baseline(TINY, data, seed=1)
    assert loss < np.log(64)  # below the uniform guess: it trained


def test_steps_to_reach_interpolates_in_log_steps():
    losses = {10: 5.0, 20: 4.0, 40: 3.0}
    assert eff.steps_to_reach(losses, 5.5) == 10.0  # the smallest budget already reaches it
    assert eff.steps_to_reach(losses, 4.0) == pytest.approx(20.0)
    assert eff.steps_to_reach(losses, 3.5) == pytest.approx(np.sqrt(20 * 40))
    assert eff.steps_to_reach(losses, 2.0) is None  # never reached


def test_ratio_median_counts_a_seed_that_never_reached_as_more():
    res = eff.SizeResult(TINY, [4.0, 4.0, 4.0],
                         [{10: 3.9, 20: 3.5}, {10: 4.5, 20: 4.2}, {10: 4.5, 20: 4.2}])
    assert res.ratios()[0] == pytest.approx(0.5) and res.ratios()[1:] == [None, None]
    assert res.median_ratio() is None
