"""Log-probabilities in OpenAI's two response shapes: the completions' legacy object (tokens,
token_logprobs, top_logprobs, text_offset) and chat's `logprobs.content` list (token, logprob,
bytes, top_logprobs), from the decoder's per-token log-probs and the tokenizer's pieces."""

from __future__ import annotations

import codecs
from typing import Any

from domainlm.model.sampling import Logprob

Entry = tuple[int, Logprob | None]  # a token id and its log-prob (None: the prompt's first)


class TokenText:
    """What each token id contributes to the text: its bytes, and the string that names it in
    log-probs (the piece, with SentencePiece's "▁" as a space; byte pieces and control pieces
    by their own names, "<0xE6>", "</s>", so that distinct tokens never share a name)."""

    def __init__(self, sp: Any) -> None:
        self.names: list[str] = []
        self.bytes: list[bytes] = []
        for i in range(sp.get_piece_size()):
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                name, data = piece, bytes([int(piece[3:5], 16)])
            elif sp.is_control(i):
                name, data = piece, b""
            elif sp.is_unknown(i):
                name, data = piece, sp.decode([i]).encode()
            else:
                name = piece.replace("\u2581", " ")
                data = name.encode()
            self.names.append(name)
            self.bytes.append(data)

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Where each token starts in the decoded text (characters from `start`); the bytes of
        a character split over several tokens all start where the character does."""
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        out, pos = [], start
        for i in ids:
            out.append(pos)
            pos += len(decoder.decode(self.bytes[i]))
        return out


def completion_logprobs(table: TokenText, entries: list[Entry], start: int = 0) -> dict:
    """The completions' `logprobs` object. top_logprobs holds the requested alternatives and
    the chosen token itself (as vLLM does), so the chosen token is greedy exactly when its
    log-prob is the largest there."""
    ids = [i for i, _ in entries]
    tops: list[dict[str, float] | None] = []
    for i, lp in entries:
        if lp is None:
            tops.append(None)
            continue
        top = {table.names[t]: v for t, v in lp.top}
        top.setdefault(table.names[i], lp.logprob)
        tops.append(top)
    return {"tokens": [table.names[i] for i in ids],
            "token_logprobs": [None if lp is None else lp.logprob for _, lp in entries],
            "top_logprobs": tops,
            "text_offset": table.offsets(ids, start)}


def _item(table: TokenText, token: int, logprob: float) -> dict:
    return {"token": table.names[token], "logprob": logprob, "bytes": list(table.bytes[token])}


def chat_logprobs(table: TokenText, entries: list[Entry]) -> dict:
    """Chat's `logprobs` object: {"content": [...], "refusal": None}."""
    content = []
    for i, lp in entries:
        if lp is None:
            continue
        content.append({**_item(table, i, lp.logprob),
                        "top_logprobs": [_item(table, t, v) for t, v in lp.top]})
    return {"content": content, "refusal": None}
