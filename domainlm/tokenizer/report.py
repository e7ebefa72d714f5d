"""Measuring a trained tokenizer on held-out documents and writing report.json / report.md."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, NamedTuple

from domainlm.tokenizer.special import BOS, EOS, PAD, UNK, UNK_ID

MAX_EXAMPLES = 5  # round-trip failures listed in the report (all are counted)
SNIPPET = 30  # characters shown either side of the first difference


class Doc(NamedTuple):
    """One evaluation document."""

    origin: str
    source: str
    text: str


def encode_all(sp: Any, texts: list[str], threads: int) -> list[list[int]]:
    return sp.encode(texts, out_type=int, num_threads=threads) if texts else []


def encoded_size(sp: Any, texts: list[str], threads: int) -> dict[str, Any]:
    """BloombergGPT's criterion for the vocabulary size: the bits needed to write the texts as
    tokens, tokens x log2(V), together with the usual bytes per token."""
    ids = encode_all(sp, texts, threads)
    tokens = sum(len(x) for x in ids)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    vocab = sp.get_piece_size()
    return {
        "vocab_size": vocab,
        "tokens": tokens,
        "bits": round(tokens * math.log2(vocab)),
        "bytes": n_bytes,
        "bytes_per_token": _ratio(n_bytes, tokens),
    }


def _ratio(a: float, b: float, digits: int = 4) -> float | None:
    return round(a / b, digits) if b else None


def _first_difference(a: str, b: str) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def evaluate(sp: Any, docs: list[Doc], threads: int) -> dict[str, Any]:
    """Bytes per token and tokens per word (overall and per source), the unknown rate, the
    round-trip check and the comparison with a byte-level baseline, on `docs`."""
    texts = [d.text for d in docs]
    ids = encode_all(sp, texts, threads)
    decoded = sp.decode(ids) if ids else []
    vocab = sp.get_piece_size()
    per_source: dict[str, dict[str, int]] = defaultdict(
        lambda: {"docs": 0, "bytes": 0, "chars": 0, "words": 0, "tokens": 0}
    )
    unknown = 0
    failures = []
    for doc, doc_ids, back in zip(docs, ids, decoded, strict=True):
        s = per_source[doc.source]
        s["docs"] += 1
        s["bytes"] += len(doc.text.encode("utf-8"))
        s["chars"] += len(doc.text)
        s["words"] += len(doc.text.split())
        s["tokens"] += len(doc_ids)
        unknown += sum(1 for i in doc_ids if i == UNK_ID)
        if back != doc.text:
            failures.append((doc, back))

    def summary(c: dict[str, int]) -> dict[str, Any]:
        return {
            **c,
            "bytes_per_token": _ratio(c["bytes"], c["tokens"]),
            "chars_per_token": _ratio(c["chars"], c["tokens"]),
            "tokens_per_word": _ratio(c["tokens"], c["words"]),
        }

    total = {
        k: sum(s[k] for s in per_source.values())
        for k in ("docs", "bytes", "chars", "words", "tokens")
    }
    bits = total["tokens"] * math.log2(vocab)
    baseline_bits = 8 * total["bytes"]
    examples = []
    for doc, back in failures[:MAX_EXAMPLES]:
        at = _first_difference(doc.text, back)
        examples.append(
            {
                "origin": doc.origin,
                "source": doc.source,
                "position": at,
                "expected": doc.text[max(0, at - SNIPPET) : at + SNIPPET],
                "decoded": back[max(0, at - SNIPPET) : at + SNIPPET],
            }
        )
    return {
        "total": {
            **summary(total),
            "bits": round(bits),
            "bits_per_byte": _ratio(bits, total["bytes"]),
        },
        "sources": {name: summary(c) for name, c in sorted(per_source.items())},
        "unknown": {"tokens": unknown, "rate": _ratio(unknown, total["tokens"], 8) or 0.0},
        "round_trip": {"checked": len(docs), "failures": len(failures), "examples": examples},
        "baseline": {
            "name": "UTF-8 bytes (one token per byte, 8 bits each)",
            "tokens": total["bytes"],
            "bits": baseline_bits,
            "tokenizer_bits": round(bits),
            # Below 1: the tokenizer writes the text in fewer bits than raw bytes do.
            "bits_ratio": _ratio(bits, baseline_bits),
            "token_ratio": _ratio(total["tokens"], total["bytes"]),
        },
    }


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("-" if x is None else str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def _md_code(text: str) -> str:
    """Inline code that shows whitespace and survives Markdown tables."""
    return "`" + repr(text)[1:-1].replace("`", "\\`").replace("|", "\\|") + "`"


def render_markdown(report: dict[str, Any]) -> str:
    """report.md, written from report.json's numbers only."""
    m = report["model"]
    s = report["sample"]
    e = report["eval"]
    t = e["total"]
    parts = [f"# Tokenizer report: {report['run']}", ""]
    parts.append(
        f"SentencePiece {m['type']}, vocabulary {m['vocab_size']} "
        f"({'chosen from candidates' if m['auto'] else 'as set in the recipe'}), "
        f"byte fallback {'on' if m['byte_fallback'] else 'off'}, "
        f"digits {'split' if m['split_digits'] else 'not split'}."
    )
    parts.append(
        f"Trained on {s['docs']} of {s['available_docs']} training documents "
        f"({s['chars']} characters, {s['lines']} lines); measured on {e['docs']} "
        f"{e['split']} documents."
    )
    parts.append("\n## Compression\n")
    rows = [
        [
            name,
            c["docs"],
            c["bytes"],
            c["tokens"],
            c["bytes_per_token"],
            c["chars_per_token"],
            c["tokens_per_word"],
        ]
        for name, c in e["sources"].items()
    ]
    rows.append(
        [
            "**total**",
            t["docs"],
            t["bytes"],
            t["tokens"],
            t["bytes_per_token"],
            t["chars_per_token"],
            t["tokens_per_word"],
        ]
    )
    parts.append(
        _table(
            ["source", "docs", "bytes", "tokens", "bytes/token", "chars/token", "tokens/word"], rows
        )
    )
    b = e["baseline"]
    parts.append("\n## Against a byte-level baseline\n")
    parts.append(
        _table(
            ["encoding", "tokens", "bits", "bits/byte"],
            [
                ["bytes (8 bits each)", b["tokens"], b["bits"], 8.0],
                [
                    f"this tokenizer (log2 {m['vocab_size']} bits each)",
                    t["tokens"],
                    b["tokenizer_bits"],
                    t["bits_per_byte"],
                ],
            ],
        )
    )
    parts.append(
        f"\nThe tokenizer needs {b['bits_ratio']} of the baseline's bits and "
        f"{b['token_ratio']} of its tokens."
    )
    parts.append("\n## Checks\n")
    rt = e["round_trip"]
    parts.append(
        f"- unknown pieces: {e['unknown']['tokens']} of {t['tokens']} tokens "
        f"(rate {e['unknown']['rate']})"
    )
    parts.append(
        f"- round trip `decode(encode(x)) == x`: {rt['failures']} failures in "
        f"{rt['checked']} documents"
    )
    if rt["examples"]:
        parts.append("")
        parts.append(
            _table(
                ["document", "at character", "expected", "decoded"],
                [
                    [x["origin"], x["position"], _md_code(x["expected"]), _md_code(x["decoded"])]
                    for x in rt["examples"]
                ],
            )
        )
    if m["auto"]:
        parts.append("\n## Vocabulary size (smallest encoded size wins)\n")
        parts.append(
            _table(
                ["vocab size", "status", "tokens", "bits", "bytes/token"],
                [
                    [
                        f"**{c['vocab_size']}**" if c.get("chosen") else c["vocab_size"],
                        c["status"] if c["status"] == "trained" else f"skipped: {c['reason']}",
                        c.get("tokens"),
                        c.get("bits"),
                        c.get("bytes_per_token"),
                    ]
                    for c in report["vocab_curve"]
                ],
            )
        )
    sp = report["special_tokens"]
    parts.append("\n## Reserved pieces\n")
    rows = [
        [_md_code(UNK), sp["unk_id"]],
        [_md_code(BOS), sp["bos_id"]],
        [_md_code(EOS), sp["eos_id"]],
        [_md_code(PAD), sp["pad_id"]],
    ]
    rows += [[_md_code(k), v] for k, v in {**sp["chat"], **sp["whitespace"]}.items()]
    parts.append(_table(["piece", "id"], rows))
    return "\n".join(parts) + "\n"
