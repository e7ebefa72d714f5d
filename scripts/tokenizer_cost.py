"""What the tokenizer type costs: SentencePiece unigram vs BPE trained on a run's corpus.

Trains both types with the tokenizer stage's own sample, options and vocabulary size (the
recipe's; with `vocab_size: auto`, its largest candidate), and measures each on the stage's
evaluation documents: tokens per byte (a model reads and predicts that many tokens per byte of
text, so at equal loss per token its bits per byte scale with it), the round trip, and the
tokens of the unigram model the BPE model writes differently. The GGUF export needs BPE
(llama.cpp reproduces SentencePiece's BPE segmentation exactly, not its unigram one:
docs/quantize.md), which is why the figure matters.

    python scripts/tokenizer_cost.py [--recipe recipes/demo.yaml] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm

from domainlm.errors import UserError
from domainlm.recipe import load_recipe
from domainlm.tokenizer.report import evaluate
from domainlm.tokenizer.sample import pick, pick_eval_docs, scan, write_sample
from domainlm.tokenizer.train import _train_model, corpus_files, trainer_options

TYPES = ("unigram", "bpe")


def measure(recipe_path: str, threads: int = 2) -> dict:
    recipe = load_recipe(recipe_path)
    cfg = recipe.tokenizer
    size = max(cfg.candidates) if cfg.vocab_size == "auto" else cfg.vocab_size
    train_paths, val_paths = corpus_files(recipe)
    picked, _ = pick(
        scan(train_paths, recipe.seed, "tokenizer-sample"), cfg.sample_docs, cfg.max_sample_chars
    )
    docs, split = pick_eval_docs(recipe, val_paths, train_paths)
    work = Path(tempfile.mkdtemp())
    try:
        sample = work / "sample.txt"
        write_sample(train_paths, picked, sample)
        out: dict = {"recipe": recipe_path, "vocab_size": size, "eval_split": split,
                     "eval_docs": len(docs)}
        for kind in TYPES:
            options = trainer_options(dataclasses.replace(cfg, type=kind), size, threads)
            sp = spm.SentencePieceProcessor(model_proto=_train_model(sample, options, recipe.seed))
            m = evaluate(sp, docs, threads)
            total = m["total"]
            out[kind] = {
                "tokens": total["tokens"],
                "bytes": total["bytes"],
                "tokens_per_byte": round(total["tokens"] / total["bytes"], 5),
                "round_trip_failures": m["round_trip"]["failures"],
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["bpe_vs_unigram_tokens"] = round(out["bpe"]["tokens"] / out["unigram"]["tokens"], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    try:
        result = measure(args.recipe)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind in TYPES:
        r = result[kind]
        print(f"{kind:8s} vocab {result['vocab_size']}: {r['tokens']:,} tokens for "
              f"{r['bytes']:,} bytes = {r['tokens_per_byte']:.4f} tokens/byte, "
              f"{r['round_trip_failures']} round-trip failures")
    print(f"BPE writes the {result['eval_docs']} {result['eval_split']} documents in "
          f"{result['bpe_vs_unigram_tokens']:.4f}x the unigram model's tokens")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
