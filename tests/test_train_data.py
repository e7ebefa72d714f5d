"""Pretraining data: windows, the resumable per-step sampler, the DataModule, the baseline."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from domainlm.errors import UserError
from domainlm.tokenizer.arrays import TokenArrays
from domainlm.train.data import (
    PretrainData,
    StepSampler,
    TokenWindows,
    epoch_permutation,
    unigram_baseline,
)

EOS = 2


def write_tokens(
    out: Path, splits: dict[str, list[list[int]]], vocab_size: int = 1000, eos_id: int = EOS
) -> Path:
    """A tokens folder as `make tokens` writes it: each document followed by eos."""
    out.mkdir(parents=True, exist_ok=True)
    meta: dict = {"dtype": "uint16", "byte_order": "little", "vocab_size": vocab_size,
                  "eos_id": eos_id, "tokenizer_hash": "test"}
    for split, docs in splits.items():
        lengths = [len(d) + 1 for d in docs]
        tokens = np.array([t for d in docs for t in [*d, eos_id]], dtype="<u2")
        tokens.tofile(out / f"{split}.bin")
        offsets = np.zeros(len(docs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(out / f"{split}.idx.npy", offsets)
        n = len(tokens)
        meta[split] = {"file": f"{split}.bin", "index": f"{split}.idx.npy", "tokens": n,
                       "bytes": 3 * n + 1, "docs": len(docs), "unique_tokens": n,
                       "unique_docs": len(docs), "unique_bytes": 3 * n + 1}
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "manifest.json").write_text(json.dumps({"stage": "tokens"}))
    return out


def docs_of(n_tokens: int, seed: int = 0) -> list[list[int]]:
    """Documents of random lengths holding about n_tokens tokens (ids 3..999, never eos)."""
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        d = rng.integers(3, 1000, size=int(rng.integers(1, 20))).tolist()
        docs.append(d)
        total += len(d) + 1
    return docs


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens", {"train": docs_of(1000, 1), "val": docs_of(300, 2)})


# ------------------------------------------------------------------------------------ windows


def test_windows_hold_the_array_shifted_by_one(tokens_dir: Path) -> None:
    arrays = TokenArrays(tokens_dir, "train")
    tokens = np.asarray(arrays.tokens, dtype=np.int64)
    w = TokenWindows(arrays, seq_len=16)
    assert len(w) == (len(tokens) - 1) // 16
    assert len(w) * 16 + 1 <= len(tokens) < (len(w) + 1) * 16 + 1
    for i in (0, 1, len(w) - 1):
        x, y = w[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16,)
        assert x.tolist() == tokens[i * 16 : i * 16 + 16].tolist()
        assert y.tolist() == tokens[i * 16 + 1 : i * 16 + 17].tolist()
    assert w[0][1][-1] == w[1][0][0]  # the one shared boundary token
    with pytest.raises(IndexError):
        w[len(w)]


def test_windows_pickle_without_copying_the_array(tokens_dir: Path) -> None:
    w = TokenWindows(TokenArrays(tokens_dir, "train"), seq_len=8)
    blob = pickle.dumps(w)
    assert len(blob) < w.arrays.num_tokens  # far less than the 2 bytes per token of a copy
    back = pickle.loads(blob)
    assert len(back) == len(w)
    assert all(torch.equal(a, b) for a, b in zip(back[3], w[3], strict=True))


def test_a_split_of_exactly_one_window(tmp_path: Path) -> None:
    d = write_tokens(tmp_path / "t", {"train": [[5, 6, 7, 8]], "val": []})  # 5 tokens
    w = TokenWindows(TokenArrays(d, "train"), seq_len=4)
    assert len(w) == 1
    assert w[0][0].tolist() == [5, 6, 7, 8] and w[0][1].tolist() == [6, 7, 8, EOS]


def test_a_split_shorter_than_a_window_says_the_fix(tmp_path: Path) -> None:
    d = write_tokens(tmp_path / "t", {"train": [[5, 6, 7]], "val": []})  # 4 tokens
    with pytest.raises(UserError) as e:
        TokenWindows(TokenArrays(d, "train"), seq_len=4)
    msg = str(e.value)
    assert "train split" in msg and "4 tokens" in msg
    assert "train.seq_len" in msg and "plan.seq_len" in msg and "more data" in msg


# ------------------------------------------------------------------------------------ sampler


def sampler(n: int = 23, **kw) -> StepSampler:
    args = dict(micro_batch=2, grad_accum=3, world_size=2, rank=0, total_steps=6, seed=7)
    return StepSampler(n, **{**args, **kw})


def run_order(n: int, world: int, **kw) -> list[int]:
    """The global order the ranks together consume: step, micro-batch, rank."""
    per_rank = [list(sampler(n, world_size=world, rank=r, **kw)) for r in range(world)]
    return [i for j in range(len(per_rank[0])) for r in range(world) for i in per_rank[r][j]]


def test_every_window_once_per_epoch_across_ranks() -> None:
    n = 23  # not a multiple of the global batch (12): steps straddle epoch boundaries
    order = run_order(n, 2)
    assert len(order) == 6 * 12
    for e in range(3):
        epoch = order[e * n : (e + 1) * n]
        assert sorted(epoch) == list(range(n))
        assert epoch == np.random.default_rng([7, e]).permutation(n).tolist()
    assert order[3 * n :] == np.random.default_rng([7, 3]).permutation(n)[:3].tolist()
    s = sampler(n)
    assert [i for step in range(6) for i in s.samples(step)] == order


def test_epoch_permutation_is_the_generators_permutation() -> None:
    for n, seed, e in [(1, 0, 0), (1000, 3, 2), (4097, 1234, 0)]:
        expected = np.random.default_rng([seed, e]).permutation(n)
        assert epoch_permutation(n, seed, e).tolist() == expected.tolist()


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_two_ranks_see_what_one_process_sees(grad_accum: int) -> None:
    one = list(sampler(50, world_size=1, micro_batch=4, grad_accum=grad_accum))
    r0 = list(sampler(50, world_size=2, rank=0, micro_batch=2, grad_accum=grad_accum))
    r1 = list(sampler(50, world_size=2, rank=1, micro_batch=2, grad_accum=grad_accum))
    assert len(one) == len(r0) == len(r1) == 6 * grad_accum
    assert [a + b for a, b in zip(r0, r1, strict=True)] == one
    assert not set(r0[0]) & set(r1[0])
    for step in range(6):
        s1 = sampler(50, world_size=1, micro_batch=4, grad_accum=grad_accum).samples(step)
        s2 = sampler(50, world_size=2, micro_batch=2, grad_accum=grad_accum).samples(step)
        assert s1 == s2 == [i for b in one[step * grad_accum : (step + 1) * grad_accum] for i in b]


def test_resuming_at_step_k_yields_the_tail() -> None:
    for rank in (0, 1):
        full = list(sampler(rank=rank))
        for k in (0, 1, 4, 5, 6):
            tail = list(sampler(rank=rank, start_step=k))
            assert tail == full[k * 3 :]
            assert sampler(start_step=k).remaining() == (6 - k) * 3 == len(tail)


def test_a_callable_start_is_read_when_iterated() -> None:
    step = SimpleNamespace(value=0)
    s = sampler(start_step=lambda: step.value)
    full = list(s)
    step.value = 2  # Lightning builds the loader, then restores global_step
    assert list(s) == full[2 * 3 :]
    assert len(s) == 6 * 3  # the whole run, as Lightning counts batches across a resume


def test_seed_and_epoch_change_the_order() -> None:
    assert list(sampler(seed=7)) == list(sampler(seed=7))
    assert list(sampler(seed=7)) != list(sampler(seed=8))
    s = sampler(24)  # two steps of 12 windows per epoch
    e0, e1 = s.samples(0) + s.samples(1), s.samples(2) + s.samples(3)
    assert sorted(e0) == sorted(e1) == list(range(24))
    assert e0 != e1


def test_sampler_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sampler(rank=2)
    with pytest.raises(ValueError):
        sampler(0)


# ------------------------------------------------------------------------------------ module


def data(tokens_dir: Path, trainer=None, **kw) -> PretrainData:
    args = dict(seq_len=8, micro_batch=2, grad_accum=2, total_steps=5, seed=3, val_batches=None)
    dm = PretrainData(tokens_dir, **{**args, **kw})
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def test_train_loader_starts_at_the_trainers_step(tokens_dir: Path) -> None:
    trainer = SimpleNamespace(global_step=0, world_size=2, global_rank=1)
    dm = data(tokens_dir, trainer)
    loader = dm.train_dataloader()
    trainer.global_step = 3  # restored after the loader was built
    batches = list(loader)
    assert len(batches) == (5 - 3) * 2
    windows = TokenWindows(TokenArrays(tokens_dir, "train"), 8)
    ref = StepSampler(len(windows), micro_batch=2, grad_accum=2, world_size=2, rank=0,
                      total_steps=5, seed=3)
    step3 = ref.samples(3)  # micro-batch 0: rank 0 takes [0:2], rank 1 takes [2:4]
    x, y = batches[0]
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert x.tolist() == [windows[i][0].tolist() for i in step3[2:4]]
    assert y.tolist() == [windows[i][1].tolist() for i in step3[2:4]]
    assert batches[1][0].tolist() == [windows[i][0].tolist() for i in step3[6:8]]


def test_train_loader_without_a_trainer_is_one_process_from_step_0(tokens_dir: Path) -> None:
    dm = data(tokens_dir)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 * 2
    ref = StepSampler(len(dm.train_windows), micro_batch=2, grad_accum=2, world_size=1,
                      rank=0, total_steps=5, seed=3)
    assert batches[0][0].tolist() == [dm.train_windows[i][0].tolist() for i in ref.samples(0)[:2]]


def test_val_split_is_equal_and_disjoint_per_rank(tokens_dir: Path) -> None:
    n_val = len(data(tokens_dir).val_windows)
    shares = [data(tokens_dir, SimpleNamespace(global_step=0, world_size=3, global_rank=r))
              .val_indices() for r in range(3)]
    assert [len(s) for s in shares] == [n_val // 3] * 3
    assert [i for s in shares for i in s] == list(range(3 * (n_val // 3)))
    limited = [data(tokens_dir, SimpleNamespace(global_step=0, world_size=2, global_rank=r),
                    val_batches=2) for r in range(2)]
    assert [list(dm.val_indices()) for dm in limited] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    batches = list(limited[1].val_dataloader())
    assert len(batches) == 2
    assert batches[0][0].tolist() == [limited[1].val_windows[i][0].tolist() for i in (4, 5)]


def test_properties_come_from_meta(tokens_dir: Path) -> None:
    dm = PretrainData(tokens_dir, seq_len=8, micro_batch=2, grad_accum=1, total_steps=1, seed=0,
                      val_batches=None)  # properties open the arrays before setup()
    meta = json.loads((tokens_dir / "meta.json").read_text())
    assert dm.vocab_size == 1000 and dm.eos_id == EOS
    assert dm.train_tokens == meta["train"]["tokens"]
    assert dm.has_val
    assert dm.val_bytes_per_token == pytest.approx(meta["val"]["bytes"] / meta["val"]["tokens"])


def test_an_empty_val_split_means_no_validation(tmp_path: Path) -> None:
    d = write_tokens(tmp_path / "t", {"train": docs_of(200), "val": []})
    dm = data(d)
    assert not dm.has_val and dm.val_bytes_per_token is None
    assert len(dm.val_dataloader()) == 0
    assert len(list(dm.train_dataloader())) == 10


# ------------------------------------------------------------------------------------ baseline


def test_unigram_baseline_by_hand(tmp_path: Path) -> None:
    d = write_tokens(tmp_path / "t", {"train": [[0, 0, 0, 1]], "val": [[0, 2]]},
                     vocab_size=4, eos_id=3)
    # train [0 0 0 1 3]: counts 3 1 0 1, add-one over 4 pieces: p = 4/9 2/9 1/9 2/9
    # val [0 2 3]: -(ln 4/9 + ln 1/9 + ln 2/9) / 3
    expected = -(math.log(4 / 9) + math.log(1 / 9) + math.log(2 / 9)) / 3
    got = unigram_baseline(TokenArrays(d, "train"), TokenArrays(d, "val"))
    assert got == pytest.approx(expected, rel=1e-12)


def test_unigram_baseline_is_below_uniform_on_skewed_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    p = 1 / np.arange(1, 257)
    p /= p.sum()
    draw = lambda n: rng.choice(256, size=n, p=p)  # noqa: E731 (Zipf-like, no eos id)
    docs = {s: [[int(t) for t in draw(50) if t != EOS] for _ in range(k)]
            for s, k in (("train", 400), ("val", 40))}
    d = write_tokens(tmp_path / "t", docs, vocab_size=256)
    got = unigram_baseline(TokenArrays(d, "train"), TokenArrays(d, "val"))
    assert 0 < got < math.log(256) - 0.5


# ------------------------------------------------------------------------------------ Lightning


def test_a_resumed_lightning_run_sees_the_uninterrupted_runs_batches(
    tokens_dir: Path, tmp_path: Path
) -> None:
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(1000, 2)
            self.seen: list[tuple[int, int, int, list]] = []

        def training_step(self, batch, batch_idx):
            t = self.trainer
            self.seen.append((t.current_epoch, t.global_step, batch_idx, batch[0].tolist()))
            return self.emb(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt_dir: Path, resume: Path | None = None) -> Recorder:
        dm = PretrainData(tokens_dir, seq_len=8, micro_batch=2, grad_accum=2, total_steps=6,
                          seed=1, val_batches=None)
        model = Recorder()
        # The checkpoint is written mid-epoch at step 2, as by a run that is then killed.
        every2 = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True)
        trainer = L.Trainer(max_steps=max_steps, max_epochs=-1, accumulate_grad_batches=2,
                            accelerator="cpu", use_distributed_sampler=False, logger=False,
                            limit_val_batches=0, callbacks=[every2], enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(model, dm, ckpt_path=resume)
        return model

    full = fit(6, tmp_path / "full")
    first = fit(2, tmp_path / "killed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = fit(6, tmp_path / "rest", tmp_path / "killed" / "epoch=0-step=2.ckpt")
    assert [s[1] for s in rest.seen] == [2, 2, 3, 3, 4, 4, 5, 5]
    # Same epoch, steps, batch indices and windows: the resume did not end Lightning's epoch
    # early (which would run epoch-end hooks and validation where the full run had none).
    assert first.seen + rest.seen == full.seen
    assert {s[0] for s in full.seen} == {0}
    assert not [w for w in caught if "not resumable" in str(w.message)]
