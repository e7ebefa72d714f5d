"""Builders of stage outputs for tests: corpus splits as `make corpus` writes them, and a
whole tiny run (corpus, tokenizer, tokens) for the stages after them."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from textgen import document

from domainlm.files import hash_file, hash_json, write_json

# Text that trips tokenizers: layout, code, numbers and scripts absent from the training text.
HARD_TEXTS = [
    "  leading spaces, trailing spaces  ",
    "one\n\n\n\nfour newlines, then a tab\tand\t\ttwo\n",
    "def f(x):\n    if x:\n\treturn [1, 2]\n        # deep\n    return None\n",
    "Prices: 3.14159, 1,000,000 and 2024-01-31; -0.5e-10",
    "emoji 😀🚀 CJK 日本語の文章 한국어 combining e\u0301 a\u0308 \u00e9 Zalgo z\u0336\u0337",
    "\n\nstarts with blank lines and ends with spaces\n   \n",
    "chat <|user|>hello<|end|><|assistant|>hi <|end|>",
    "mixed\r\nline endings\rand\u2028separators\u00a0nbsp\u200bzero-width",
    "\t\t  \t",
]

CODE = """class Ledger:
    \"\"\"A ledger of {n} entries.\"\"\"

    def total(self, rows):
        for row in rows:
            if row.amount > {n}:
\t\t\tyield row.amount * 100
        return sum(r.amount for r in rows)
"""


def row(text: str, source: str, origin: str, copy: int = 0) -> dict:
    return {
        "id": origin,
        "text": text,
        "source": source,
        "origin": origin,
        "license": None,
        "created": None,
        "meta": None,
        "copy": copy,
    }


def write_split(path: Path, rows: list[dict]) -> None:
    schema = pa.schema(
        [(k, pa.string()) for k in ("id", "text", "source", "origin", "license", "created", "meta")]
        + [("copy", pa.int32())]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_corpus(corpus_dir: Path, train: list[dict], val: list[dict]) -> None:
    """Corpus-stage outputs as `make corpus` writes them: Parquet splits and a manifest."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for name, rows in (("train-00000.parquet", train), ("val-00000.parquet", val)):
        write_split(corpus_dir / name, rows)
        outputs[name] = {"rows": len(rows), "hash": hash_file(corpus_dir / name)}
    write_json(
        corpus_dir / "manifest.json",
        {"stage": "corpus", "fingerprint": hash_json(outputs), "outputs": outputs},
    )


def tiny_corpus() -> tuple[list[dict], list[dict]]:
    rng = random.Random(7)
    train = [row(document(rng, 150), "news", f"news/a.jsonl:{i}") for i in range(50)]
    train += [row(CODE.format(n=i), "code", f"code/b.jsonl:{i}") for i in range(20)]
    # Upsampled repeats (copy > 0) of two documents: never in the tokenizer's sample.
    train += [row(r["text"], r["source"], r["origin"], copy=1) for r in train[:2]]
    val = [row(document(rng, 150), "news", f"news/v.jsonl:{i}") for i in range(5)]
    val += [row(t, "hard", f"hard/h.jsonl:{i}") for i, t in enumerate(HARD_TEXTS)]
    val += [row(CODE.format(n=99), "code", "code/v.jsonl:0")]
    return train, val


def small_config(**overrides):
    """A tiny decoder shape with grouped-query attention (4 query heads, 2 key/value heads)."""
    from domainlm.recipe.model import LlamaConfig

    shape = dict(
        vocab_size=101,
        n_layers=2,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=64,
        tie_embeddings=False,
        rope_theta=10000.0,
        norm_eps=1e-5,
    )
    shape.update(overrides)
    return LlamaConfig(**shape)


def grammar_corpus(docs: int = 240, seed: int = 3) -> tuple[list[dict], list[dict]]:
    """Documents from a small grammar: far more predictable from context than from token
    frequencies alone, so a few hundred training steps beat the unigram baseline clearly."""
    rng = random.Random(seed)
    nouns = "ledger account invoice client auditor bond market report".split()
    verbs = "reviews closes opens signs files audits values prices".split()
    adjs = "quarterly annual overdue final signed pending".split()

    def sentence() -> str:
        a, n, v, b, m = (rng.choice(x) for x in (adjs, nouns, verbs, adjs, nouns))
        return f"The {a} {n} {v} the {b} {m} on day {rng.randint(1, 28)}."

    def text() -> str:
        return " ".join(sentence() for _ in range(rng.randint(4, 9)))

    rows = [row(text(), "grammar", f"grammar/g.jsonl:{i}") for i in range(docs)]
    cut = docs * 9 // 10
    return rows[:cut], rows[cut:]


def tiny_run(
    root: Path,
    name: str = "tiny",
    vocab_size: int = 384,
    corpus: tuple[list[dict], list[dict]] | None = None,
    **sections,
) -> Path:
    """A recipe under `root` whose corpus, tokenizer and tokens are built; returns its path.

    The corpus is tiny_corpus() (~60 documents of prose and code); `sections` are merged into
    the recipe (e.g. model=..., train=...).
    """
    from domainlm.recipe import load_recipe
    from domainlm.tokenizer.tokens import encode_tokens
    from domainlm.tokenizer.train import train_tokenizer

    build = root / "build"
    write_corpus(build / name / "corpus", *(corpus or tiny_corpus()))
    data = {
        "name": name,
        "seed": 5,
        "build_dir": str(build),
        "corpus": {"sources": [{"name": "news", "path": str(root / "shards")}]},
        "tokenizer": {"vocab_size": vocab_size, "threads": 2},
        **sections,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    recipe = load_recipe(path)
    train_tokenizer(recipe, progress=False)
    encode_tokens(recipe, progress=False)
    return path


def sentencepiece_model(folder: Path, vocab_size: int = 320, seed: int = 0,
                        model_type: str | None = None, lines: list[str] | None = None) -> Path:
    """A tiny tokenizer.model trained with the tokenizer stage's options on English-like lines
    (or `lines`), of the recipe's default type or `model_type`, for tests that need a real one
    (e.g. to export a Hugging Face folder); about a second."""
    import io

    import sentencepiece as spm

    from domainlm.recipe import TokenizerConfig
    from domainlm.tokenizer.train import trainer_options

    rng = random.Random(seed)
    if lines is None:
        lines = [line for _ in range(40) for line in document(rng, 80).split("\n") if line]
    cfg = TokenizerConfig() if model_type is None else TokenizerConfig(type=model_type)
    writer = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=writer,
        **trainer_options(cfg, vocab_size, threads=1),
    )
    path = Path(folder) / "tokenizer.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(writer.getvalue())
    return path


TINY_VOCAB = 320  # sentencepiece_model's size, so a tiny_model can be exported with it


def tiny_model(seed: int = 0, **overrides):
    """A small_config Llama with the tiny tokenizer's vocabulary, in eval mode."""
    import torch

    from domainlm.model.llama import Llama

    torch.manual_seed(seed)
    return Llama(small_config(vocab_size=TINY_VOCAB, **overrides)).eval()


def random_tokens(batch: int = 2, length: int = 12, seed: int = 1):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (batch, length), generator=g)


def logits_of(module, idx):
    import torch

    with torch.no_grad():
        return module(idx)[0]


def run_killed_after_checkpoint(args: list[str], nth: int, env: dict | None = None):
    """`python -m domainlm *args`, killed with SIGKILL by itself right after its nth step
    checkpoint is on disk: kill -9 at that moment, at a point that does not depend on how fast
    the machine is (a poll from outside saw a fast run finish, or a half-written file)."""
    import subprocess
    import sys

    killer = (
        "import os, signal, sys\n"
        "from lightning.pytorch.callbacks import ModelCheckpoint\n"
        "save = ModelCheckpoint._save_checkpoint\n"
        "seen = []\n"
        "def save_then_die(self, trainer, filepath):\n"
        "    save(self, trainer, filepath)\n"
        "    if 'step-' in os.path.basename(filepath):\n"
        "        seen.append(filepath)\n"
        f"        if len(seen) == {int(nth)}:\n"
        "            os.kill(os.getpid(), signal.SIGKILL)\n"
        "ModelCheckpoint._save_checkpoint = save_then_die\n"
        "from domainlm.cli import main\n"
        "sys.argv = ['domainlm', *sys.argv[1:]]\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", killer, *args], env=env, capture_output=True)
