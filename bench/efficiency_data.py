"""The token-efficiency benchmark's data: the demo's text (the standard library's documentation,
no download), a SentencePiece vocabulary of the demo's size trained on it, and train/val token
streams; batches are a pure function of (seed, step), so runs that share steps see the same."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from domainlm.corpus.python_docs import iter_documents
from domainlm.recipe import TokenizerConfig
from domainlm.tokenizer.train import trainer_options

VOCAB = 2048  # recipes/demo.yaml's tokenizer.vocab_size
VAL_SHARE = 20  # one document in VAL_SHARE is held out, by content hash
DATA_VERSION = 1


@dataclass
class Streams:
    train: np.ndarray  # int64 token ids, documents joined by eos
    val: np.ndarray
    vocab_size: int

    def batch(self, seed: int, step: int, micro_batch: int, seq_len: int):
        """The training batch of optimizer step `step`: windows at offsets drawn from
        (seed, step) alone, whatever run, budget or branch asks for it."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.train) - seq_len - 1, size=micro_batch)
        return _windows(self.train, starts, seq_len)

    def val_batches(self, windows: int, micro_batch: int, seq_len: int):
        """The same validation windows for every run: evenly spaced over the val stream."""
        starts = np.linspace(0, len(self.val) - seq_len - 2, windows).astype(np.int64)
        return [_windows(self.val, starts[i : i + micro_batch], seq_len)
                for i in range(0, windows, micro_batch)]


def _windows(stream: np.ndarray, starts: np.ndarray, seq_len: int):
    rows = np.stack([stream[s : s + seq_len + 1] for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def load(work: Path, limit_docs: int | None = None) -> Streams:
    """Build (once, cached under work/) the tokenizer and the token streams."""
    tag = f"v{DATA_VERSION}-{VOCAB}-{limit_docs or 'all'}"
    folder = work / f"data-{tag}"
    meta = folder / "meta.json"
    if not meta.exists():
        _build(folder, limit_docs)
    info = json.loads(meta.read_text())
    return Streams(np.load(folder / "train.npy"), np.load(folder / "val.npy"), info["vocab_size"])


def _build(folder: Path, limit_docs: int | None) -> None:
    docs = [text for _, text in iter_documents()][:limit_docs]
    train = [d for d in docs if _bucket(d) != 0]
    val = [d for d in docs if _bucket(d) == 0]
    options = trainer_options(TokenizerConfig(vocab_size=VOCAB), VOCAB, threads=1)
    options["max_sentence_length"] = 1 << 20
    spm.set_random_generator_seed(1234)
    writer = io.BytesIO()
    lines = [line for d in train for line in d.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=writer, **options)
    sp = spm.SentencePieceProcessor(model_proto=writer.getvalue())
    eos = sp.eos_id()
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("val", val)):
        ids = [t for ids in sp.encode(part) for t in [*ids, eos]]
        np.save(folder / f"{name}.npy", np.asarray(ids, dtype=np.int64))
    (folder / "meta.json").write_text(json.dumps({
        "vocab_size": sp.get_piece_size(), "train_docs": len(train), "val_docs": len(val),
    }))


def _bucket(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % VAL_SHARE
