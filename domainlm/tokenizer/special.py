"""The reserved pieces of every domainlm tokenizer and their ids: the one place stages read them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from domainlm.errors import UserError

# Control pieces, at fixed ids in every model, so that padding masks, BOS/EOS insertion and the
# exported configs (Hugging Face, GGUF) never have to look them up per run.
UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
PAD_ID = 3
UNK = "<unk>"
BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
CONTROL_PIECES: dict[str, int] = {UNK: UNK_ID, BOS: BOS_ID, EOS: EOS_ID, PAD: PAD_ID}

# The token that precedes a document in training: the token arrays put eos after every document
# (tokenizer/encode.py), so a document is read right after eos, never after <s>. The exported
# folders name it as their bos (config.json, generation_config.json, tokenizer_config.json), so a
# tool that starts a text with bos (lm-eval's rolling perplexity) reads it as training did.
DOCUMENT_START_ID = EOS_ID
DOCUMENT_START = EOS

# The chat template's pieces when a recipe does not name its own (recipe `special_tokens`).
DEFAULT_CHAT_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# Whitespace that SentencePiece never sees while training (it trains on lines), reserved so that
# a newline is one piece instead of a byte-fallback piece, and a paragraph break is one piece.
# Runs of spaces need no reservation: allow_whitespace_only_pieces lets training learn them.
WHITESPACE_PIECES: tuple[str, ...] = ("\n", "\n\n", "\t")

# The first id after the control pieces: chat pieces follow in recipe order, then whitespace.
FIRST_USER_ID = len(CONTROL_PIECES)


def user_symbols(chat_tokens: Sequence[str]) -> list[str]:
    """SentencePiece `user_defined_symbols`, in id order: the chat pieces, then whitespace."""
    check_chat_tokens(chat_tokens)
    return [*chat_tokens, *WHITESPACE_PIECES]


def chat_token_ids(chat_tokens: Sequence[str]) -> dict[str, int]:
    """The id of each chat piece in a model trained with these chat tokens."""
    return {t: FIRST_USER_ID + i for i, t in enumerate(chat_tokens)}


def expected_ids(chat_tokens: Sequence[str]) -> dict[str, int]:
    """Every reserved piece and the id it has in a model trained with these chat tokens."""
    ids = dict(CONTROL_PIECES)
    for i, piece in enumerate(user_symbols(chat_tokens)):
        ids[piece] = FIRST_USER_ID + i
    return ids


def check_chat_tokens(chat_tokens: Sequence[str]) -> None:
    """Chat pieces must be distinct, non-empty and unlike the control and whitespace pieces."""
    seen: set[str] = set()
    for t in chat_tokens:
        if not t or t != t.strip() or any(ch.isspace() for ch in t):
            raise UserError(
                f"tokenizer.special_tokens: {t!r} is empty or holds whitespace; "
                "use pieces such as '<|user|>'"
            )
        if t in CONTROL_PIECES or t in seen:
            raise UserError(
                f"tokenizer.special_tokens: {t!r} is listed twice or is a control piece "
                f"({', '.join(CONTROL_PIECES)}); remove it"
            )
        seen.add(t)


def trainer_options(chat_tokens: Sequence[str]) -> dict[str, Any]:
    """The SentencePiece training options that put every reserved piece at its id."""
    return {
        "unk_id": UNK_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "pad_id": PAD_ID,
        "unk_piece": UNK,
        "bos_piece": BOS,
        "eos_piece": EOS,
        "pad_piece": PAD,
        "user_defined_symbols": user_symbols(chat_tokens),
    }


@dataclass(frozen=True)
class SpecialTokens:
    """The reserved ids of one trained model, as later stages need them."""

    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    chat: dict[str, int]  # chat piece -> id, in recipe order
    whitespace: dict[str, int]  # reserved whitespace piece -> id

    @property
    def newline_id(self) -> int:
        return self.whitespace["\n"]

    @classmethod
    def from_model(cls, sp: Any, chat_tokens: Sequence[str] | None = None) -> SpecialTokens:
        """Read (and check) the reserved ids from a loaded `SentencePieceProcessor`.

        With `chat_tokens`, the model must hold exactly those chat pieces; without, they are
        read from the model.
        """
        if chat_tokens is None:
            # The chat pieces are exactly the ones between the control and whitespace pieces.
            first_ws = sp.piece_to_id(WHITESPACE_PIECES[0])
            chat_tokens = [sp.id_to_piece(i) for i in range(FIRST_USER_ID, first_ws)]
        for piece, want in expected_ids(chat_tokens).items():
            got = sp.piece_to_id(piece)
            if got != want or (piece != UNK and got == sp.unk_id()):
                raise UserError(
                    f"the tokenizer model has {piece!r} at id {got}, expected {want}: it was not "
                    "trained by this version of domainlm; run `make tokenizer` again"
                )
        return cls(
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            chat=chat_token_ids(chat_tokens),
            whitespace={p: sp.piece_to_id(p) for p in WHITESPACE_PIECES},
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "unk_id": self.unk_id,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "chat": dict(self.chat),
            "whitespace": dict(self.whitespace),
        }
