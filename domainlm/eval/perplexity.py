"""Perplexity and bits per byte of any model on the corpus' validation split, per source.

Each source's documents are encoded with the run's SentencePiece model, each followed by eos,
and concatenated after one leading eos (the separator the token arrays use between documents),
so every document token and every document's closing eos is a target exactly once: the leading
eos is context only. The stream is cut into non-overlapping windows of seq_len targets, each
read with a fresh context (as TokenWindows reads the token arrays); the last window, shorter
when the count is not a multiple of seq_len, is scored too with its fewer targets.

bits per byte = nats / ln 2 / UTF-8 bytes of the texts: it does not depend on the tokenizer, so
models with different vocabularies compare (as BloombergGPT reports). The eos targets are part
of the nats (they are what ends a document) but add no bytes.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
from torch import nn

from domainlm.errors import UserError
from domainlm.model.evaluate import Loss, evaluate_stream
from domainlm.tokenizer.special import EOS_ID


def read_val(corpus_dir: Path) -> list[tuple[str, str]]:
    """(text, source) of every row of the corpus' val-*.parquet files, in file and row order."""
    import pyarrow.parquet as pq

    corpus_dir = Path(corpus_dir)
    files = sorted(corpus_dir.glob("val-*.parquet"))
    if not files:
        raise UserError(
            f"{corpus_dir} has no val-*.parquet files: build the corpus first (make corpus), "
            "with a validation split"
        )
    rows: list[tuple[str, str]] = []
    for f in files:
        table = pq.read_table(f, columns=["text", "source"])
        rows += zip(
            table.column("text").to_pylist(), table.column("source").to_pylist(), strict=True
        )
    return rows


def source_streams(
    rows: list[tuple[str, str]], sp, max_tokens: int | None = None
) -> dict[str, tuple[np.ndarray, int, int]]:
    """source -> (eos + doc1 + eos + doc2 + eos ..., documents, UTF-8 bytes), sources sorted.

    With max_tokens, a source takes whole documents in order until it has at least max_tokens
    targets (so its bytes are exactly those of the documents scored).
    """
    docs: dict[str, list[str]] = defaultdict(list)
    for text, source in rows:
        docs[source].append(text)
    out = {}
    for source in sorted(docs):
        ids: list[int] = [EOS_ID]
        n_docs = n_bytes = 0
        for text, encoded in zip(docs[source], sp.encode(docs[source]), strict=True):
            if max_tokens is not None and len(ids) - 1 >= max_tokens:
                break
            ids += encoded + [EOS_ID]
            n_docs += 1
            n_bytes += len(text.encode("utf-8"))
        out[source] = (np.asarray(ids, dtype=np.int64), n_docs, n_bytes)
    return out


def _summary(loss: Loss, docs: int) -> dict:
    return {"documents": docs, **loss.to_dict()}


def perplexity_by_source(
    model: nn.Module,
    tokenizer_model: Path,
    corpus_dir: Path,
    seq_len: int,
    max_tokens: int | None = None,
    micro_batch: int = 8,
) -> dict:
    """{"sources": {source: stats}, "overall": stats} on the val split of corpus_dir.

    stats: documents, tokens (targets scored, eos included), bytes (UTF-8 of the texts), nats
    (their sum), loss = nats / tokens, ppl = exp(loss), bits_per_byte = nats / ln 2 / bytes.
    overall sums tokens, bytes and nats over the sources (a token-weighted mean, not a mean of
    the sources' ppl). max_tokens caps each source (whole documents, see source_streams).
    """
    import sentencepiece as spm

    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, not {max_tokens}")
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise UserError(f"{tokenizer_model} is missing: train the tokenizer first (make tokenizer)")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    streams = source_streams(read_val(corpus_dir), sp, max_tokens)
    sources = {}
    losses = {}
    for source, (ids, docs, n_bytes) in streams.items():
        losses[source] = evaluate_stream(model, ids, seq_len, micro_batch, n_bytes)
        sources[source] = _summary(losses[source], docs)
    overall = _summary(
        sum(losses.values(), Loss(0.0, 0, 0)), sum(s["documents"] for s in sources.values())
    )
    return {"seq_len": seq_len, "max_tokens": max_tokens, "sources": sources, "overall": overall}
