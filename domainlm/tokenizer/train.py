"""`make tokenizer`: train a SentencePiece model on a hashed sample of the corpus and report it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import click
import sentencepiece as spm

from domainlm.errors import UserError
from domainlm.files import (
    atomic_path,
    hash_file,
    read_json,
    write_json,
    write_text,
)
from domainlm.recipe import Recipe, TokenizerConfig, section_dict
from domainlm.stage import Stage, file_inputs, run_stage
from domainlm.tokenizer import special
from domainlm.tokenizer.report import Doc, encoded_size, evaluate, render_markdown
from domainlm.tokenizer.sample import (
    MAX_SENTENCE_BYTES,
    pick,
    pick_eval_docs,
    scan,
    sentences,
    write_sample,
)

# Bump when the stage makes a different model or report from the same inputs.
STAGE_VERSION = 1
OUTPUTS = ("tokenizer.model", "tokenizer.vocab", "report.json", "report.md")


class _VocabSizeError(Exception):
    """SentencePiece could not make a vocabulary of the size asked for from this sample."""

    def __init__(self, vocab_size: int, reason: str, limit: int | None):
        super().__init__(reason)
        self.vocab_size = vocab_size
        self.reason = reason
        self.limit = limit  # the largest (too high) or smallest (too small) size it can reach


# ----------------------------------------------------------------------------- inputs


def corpus_files(recipe: Recipe) -> tuple[list[Path], list[Path]]:
    """The corpus' train and val Parquet files; a missing corpus is a user error."""
    corpus_dir = recipe.layout.corpus
    manifest_path = recipe.layout.manifest("corpus")
    if not manifest_path.exists():
        raise UserError(f"{manifest_path} is missing: run `make corpus RECIPE={recipe.path}` first")
    manifest = read_json(manifest_path)
    names = sorted(n for n in manifest.get("outputs", {}) if n.endswith(".parquet"))
    train = [corpus_dir / n for n in names if n.startswith("train-")]
    val = [corpus_dir / n for n in names if n.startswith("val-")]
    missing = [p for p in train + val if not p.exists()]
    if missing:
        raise UserError(
            f"{missing[0]} is listed in {manifest_path} but missing: run "
            f"`make corpus RECIPE={recipe.path}` again (with --force if it says up to date)"
        )
    return train, val


# ----------------------------------------------------------------------------- training


def _threads(cfg: TokenizerConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def trainer_options(cfg: TokenizerConfig, vocab_size: int, threads: int) -> dict[str, Any]:
    """Every SentencePiece training option the stage sets (recorded in the manifest)."""
    return {
        "model_type": cfg.type,
        "vocab_size": vocab_size,
        "character_coverage": cfg.character_coverage,
        "byte_fallback": cfg.byte_fallback,
        "split_digits": cfg.split_digits,
        # Whitespace is kept exactly, so decode(encode(x)) == x for code and layout.
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": False,
        "allow_whitespace_only_pieces": True,
        "split_by_whitespace": True,
        "max_sentence_length": MAX_SENTENCE_BYTES,
        "hard_vocab_limit": True,
        "num_threads": threads,
        "minloglevel": 2,
        **special.trainer_options(cfg.special_tokens),
    }


_TOO_HIGH = re.compile(r"Vocabulary size too high.*?<=\s*(\d+)", re.S)
_TOO_SMALL = re.compile(r"smaller than required_chars\.\s*(\d+) vs (\d+)", re.S)


def _train_model(sample: Path, options: dict[str, Any], seed: int) -> bytes:
    """Train one model; the model's bytes (a sentence iterator and an in-memory writer keep
    paths out of the model file, so it does not depend on where the build folder is)."""
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(sample), model_writer=writer, **options
        )
    except RuntimeError as e:
        msg = str(e)
        if m := _TOO_HIGH.search(msg):
            raise _VocabSizeError(
                options["vocab_size"], f"too high for the sample (at most {m[1]})", int(m[1])
            ) from None
        if m := _TOO_SMALL.search(msg):
            raise _VocabSizeError(
                options["vocab_size"],
                f"too small for the {m[2]} required characters and reserved pieces",
                int(m[2]),
            ) from None
        raise
    return writer.getvalue()


def _vocab_text(sp: Any) -> str:
    # SentencePiece's own .vocab format (piece TAB score), except that pieces are written with
    # JSON string escapes: the reserved "\n" and "\t" pieces would otherwise break the lines.
    return "".join(
        f"{json.dumps(sp.id_to_piece(i), ensure_ascii=False)[1:-1]}\t{sp.get_score(i):g}\n"
        for i in range(sp.get_piece_size())
    )


def _check_config(cfg: TokenizerConfig) -> list[int]:
    """The vocabulary sizes to train, after the checks the recipe loader also makes (recipes
    can be built in code)."""
    sizes = sorted(set(cfg.candidates)) if cfg.vocab_size == "auto" else [cfg.vocab_size]
    if not sizes:
        raise UserError("tokenizer.candidates: vocab_size: auto needs at least one candidate")
    for v in sizes:
        if v < 256 or v % 64:
            key = "candidates" if cfg.vocab_size == "auto" else "vocab_size"
            raise UserError(
                f"tokenizer.{key}: {v} is not a multiple of 64 (>= 256); use e.g. 8192 or 32768"
            )
    if cfg.sample_docs < 1 or cfg.max_sample_chars < 1 or cfg.eval_docs < 1:
        raise UserError("tokenizer: sample_docs, max_sample_chars and eval_docs must be >= 1")
    special.check_chat_tokens(cfg.special_tokens)
    return sizes


# ----------------------------------------------------------------------------- the stage


def train_tokenizer(recipe: Recipe, force: bool = False, progress: bool = True) -> dict:
    """Build build/<run>/tokenizer/ from the corpus and the recipe; returns the manifest."""
    cfg = recipe.tokenizer
    sizes = _check_config(cfg)
    train_paths, val_paths = corpus_files(recipe)
    if not train_paths:
        raise UserError(
            f"{recipe.layout.corpus} has no training documents: check the corpus report "
            "(everything may have been filtered) and run `make corpus` again"
        )
    out = recipe.layout.tokenizer
    stage = Stage(
        "tokenizer",
        recipe.layout.manifest("tokenizer"),
        file_inputs(train_paths + val_paths, recipe.layout.root),
        {"seed": recipe.seed, "tokenizer": section_dict(cfg), "sentencepiece": spm.__version__},
        STAGE_VERSION,
        outputs=[out / n for n in OUTPUTS],
        hashes=recipe.layout.hashes,
    )
    return run_stage(
        stage, lambda _: _train(recipe, sizes, train_paths, val_paths, progress), force=force
    )


def _train(
    recipe: Recipe, sizes: list[int], train_paths: list[Path], val_paths: list[Path],
    progress: bool,
) -> dict:
    """The stage's work: sample, train (each candidate size), measure, write the files."""
    t_start = time.perf_counter()
    cfg = recipe.tokenizer
    say = click.echo if progress else (lambda *a, **k: None)
    out = recipe.layout.tokenizer
    threads = _threads(cfg)
    work = out / ".work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        picked, available = pick(
            scan(train_paths, recipe.seed, "tokenizer-sample"),
            cfg.sample_docs,
            cfg.max_sample_chars,
        )
        sample_path = work / "sample.txt"
        sample = {"available_docs": available, **write_sample(train_paths, picked, sample_path)}
        if not sample["chars"]:
            raise UserError(
                f"{recipe.layout.corpus}: the training split holds no text to train on; "
                "check the corpus report and run `make corpus` again"
            )
        say(
            f"tokenizer: sample of {sample['docs']}/{sample['available_docs']} training "
            f"documents, {sample['chars']:,} characters, {sample['lines']:,} lines "
            f"(caps: {cfg.sample_docs:,} documents, {cfg.max_sample_chars:,} characters)"
        )
        eval_docs, eval_split = pick_eval_docs(recipe, val_paths, train_paths)
        say(f"tokenizer: measuring on {len(eval_docs)} {eval_split} documents")
        t_sample = time.perf_counter() - t0

        t0 = time.perf_counter()
        model, curve, size_seconds = _train_sizes(
            recipe, sizes, sample_path, sample, eval_docs, threads, say
        )
        t_train = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    t0 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_proto=model)
    reserved = special.SpecialTokens.from_model(sp, cfg.special_tokens)
    measured = evaluate(sp, eval_docs, threads)
    t_eval = time.perf_counter() - t0
    report = {
        "run": recipe.name,
        "model": {
            "type": cfg.type,
            "vocab_size": sp.get_piece_size(),
            "auto": cfg.vocab_size == "auto",
            "byte_fallback": cfg.byte_fallback,
            "split_digits": cfg.split_digits,
        },
        "sample": sample,
        "eval": {"split": eval_split, "docs": len(eval_docs), **measured},
        "vocab_curve": curve,
        "special_tokens": reserved.as_dict(),
    }

    with atomic_path(out / "tokenizer.model") as tmp:
        tmp.write_bytes(model)
    write_text(out / "tokenizer.vocab", _vocab_text(sp))
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    outputs = {n: {"hash": hash_file(out / n)} for n in OUTPUTS}

    entries = {
        "options": trainer_options(cfg, sp.get_piece_size(), threads),
        "vocab_size": sp.get_piece_size(),
        "special_tokens": reserved.as_dict(),
        "counts": {
            "sample": sample,
            "eval_docs": len(eval_docs),
            "eval_tokens": measured["total"]["tokens"],
            "round_trip_failures": measured["round_trip"]["failures"],
            "unknown_tokens": measured["unknown"]["tokens"],
        },
        "outputs": outputs,
        "run": {
            "threads": threads,
            "seconds": {
                "sample": round(t_sample, 3),
                "train": round(t_train, 3),
                "train_per_vocab_size": size_seconds,
                "evaluate": round(t_eval, 3),
                "total": round(time.perf_counter() - t_start, 3),
            },
        },
    }
    _summary(report, out)
    return entries


def _train_sizes(
    recipe: Recipe,
    sizes: list[int],
    sample_path: Path,
    sample: dict[str, Any],
    eval_docs: list[Doc],
    threads: int,
    say: Any,
) -> tuple[bytes, list[dict[str, Any]], dict[str, float]]:
    """Train one model per size; keep the one that writes the eval documents in fewest bits.

    Returns the model, the curve (for the report) and the seconds per size (for the manifest,
    so that the report stays byte-identical between builds)."""
    cfg = recipe.tokenizer
    auto = cfg.vocab_size == "auto"
    texts = [d.text for d in eval_docs]
    curve: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    best: tuple[int, bytes] | None = None
    ceiling: int | None = None
    for i, v in enumerate(sizes, 1):
        tag = f"[{i}/{len(sizes)}] " if auto else ""
        if ceiling is not None and v > ceiling:
            curve.append(
                {
                    "vocab_size": v,
                    "status": "skipped",
                    "reason": f"too high for the sample (at most {ceiling})",
                }
            )
            say(f"tokenizer: {tag}vocab {v}: skipped, above the sample's maximum {ceiling}")
            continue
        say(f"tokenizer: {tag}training {cfg.type} vocab {v} on {threads} threads ...")
        t0 = time.perf_counter()
        try:
            model = _train_model(sample_path, trainer_options(cfg, v, threads), recipe.seed)
        except _VocabSizeError as e:
            if not auto:
                raise UserError(_vocab_advice(e, sample)) from None
            if "too high" in e.reason:
                ceiling = e.limit
            seconds[str(v)] = round(time.perf_counter() - t0, 3)
            curve.append({"vocab_size": v, "status": "skipped", "reason": e.reason})
            say(f"tokenizer: {tag}vocab {v}: skipped, {e.reason}")
            continue
        sp = spm.SentencePieceProcessor(model_proto=model)
        size = encoded_size(sp, texts, threads)
        seconds[str(v)] = round(time.perf_counter() - t0, 3)
        curve.append({"status": "trained", **size, "chosen": False})
        say(
            f"tokenizer: {tag}vocab {v}: {size['tokens']:,} tokens, {size['bits']:,} bits, "
            f"{size['bytes_per_token']} bytes/token ({seconds[str(v)]:.1f}s)"
        )
        # Strictly fewer bits to replace: on a tie the smaller vocabulary wins.
        if best is None or size["bits"] < best[0]:
            best = (size["bits"], model)
            for c in curve:
                c["chosen"] = c is curve[-1]
    if best is None:
        reasons = "; ".join(f"{c['vocab_size']}: {c['reason']}" for c in curve)
        raise UserError(
            f"tokenizer.candidates: no candidate could be trained ({reasons}); use smaller "
            "candidates or a larger sample (sample_docs, max_sample_chars, more corpus)"
        )
    if auto:
        chosen = next(c for c in curve if c.get("chosen"))
        say(f"tokenizer: chose vocab {chosen['vocab_size']} (fewest bits on the eval documents)")
    return best[1], curve, seconds


def _vocab_advice(e: _VocabSizeError, sample: dict[str, Any]) -> str:
    if "too high" in e.reason:
        return (
            f"tokenizer.vocab_size: {e.vocab_size} is {e.reason}: the sample has "
            f"{sample['docs']} documents ({sample['chars']:,} characters). Lower vocab_size "
            f"to a multiple of 64 <= {e.limit}, use vocab_size: auto, or train on more text "
            "(sample_docs, max_sample_chars, a larger corpus)"
        )
    return (
        f"tokenizer.vocab_size: {e.vocab_size} is {e.reason} (needs more than {e.limit}); "
        "raise vocab_size or lower character_coverage"
    )


def _summary(report: dict[str, Any], out: Path) -> None:
    t = report["eval"]["total"]
    rt = report["eval"]["round_trip"]
    b = report["eval"]["baseline"]
    click.echo(
        f"tokenizer: vocab {report['model']['vocab_size']}, {t['bytes_per_token']} bytes/token, "
        f"{t['tokens_per_word']} tokens/word, {b['bits_ratio']} of the byte baseline's bits, "
        f"{report['eval']['unknown']['tokens']} unknown, {rt['failures']} round-trip failures "
        f"in {rt['checked']} documents"
    )
    if rt["failures"]:
        click.secho(
            f"tokenizer: warning: {rt['failures']} documents do not decode to themselves; "
            f"examples in {out / 'report.md'}",
            fg="yellow",
            err=True,
        )
    click.echo(f"tokenizer: wrote {out}/ (tokenizer.model, tokenizer.vocab, report.md)")
