"""Hugging Face tokenizer files (tokenizer.json and configs) that encode as our SentencePiece does.

transformers can convert a tokenizer.model itself, but its converters assume Llama's own settings
(a dummy-prefix space, legacy handling) and change between releases; building tokenizer.json
here from the model's pieces, scores and types pins the behaviour down to the one our
SentencePiece training options give (domainlm/tokenizer/train.py), and the tests compare the two
token for token.

What SentencePiece does, and how tokenizer.json reproduces it:

* Normalization is the identity except that " " becomes "▁" (U+2581); no dummy prefix, no
  collapsing of spaces: a Replace normalizer, and no pre-tokenizer at all. SentencePiece runs
  one Viterbi (unigram) or merge loop (BPE) over the whole normalized text; splitting it into
  words first would only lose the whitespace-only pieces ("▁▁▁") that
  allow_whitespace_only_pieces learns. split_digits needs no pre-tokenizer either: it is a
  training rule (no piece holds two digits), so every digit is its own piece whatever the
  segmentation.
* User-defined pieces (chat pieces, "\\n", "\\n\\n", "\\t") are always one piece. The unigram
  model finds them by SentencePiece's own score for them (_user_defined_score), which also
  settles "\\n\\n\\n" as "\\n" + "\\n\\n"; SentencePiece's BPE matches them longest-first
  before merging, as added tokens (normalized=False) do. Chat pieces are also special added
  tokens, so that skip_special_tokens drops them.
* Control, byte and unused pieces are never produced from text. They must sit in the model's
  vocabulary at their ids, so they get a score so low that no segmentation chooses them
  (_unmatchable_score); byte fallback looks byte pieces up by name, not by score.
* The decoder inverts it: "▁" → " ", byte pieces → bytes → UTF-8, and no stripping.

Remaining differences from SentencePiece (tests/test_export_hf.py asserts the first two, and
equality everywhere else):

* The control pieces are special tokens, so by default the literal text "<s>", "</s>",
  "<pad>" or "<unk>" becomes that one token, where SentencePiece spells it out in ordinary
  pieces: Hugging Face's convention. With split_special_tokens=True the unigram tokenizer
  equals SentencePiece here too; the BPE one then also spells out the chat pieces.
* Unigram ties: a run of one repeated character ("▁▁▁▁▁", "-----") that the same pieces spell
  in different orders ("▁" + "▁▁▁▁" or "▁▁▁▁" + "▁") has exactly equal scores. SentencePiece
  adds scores in float32, so its choice follows the rounding of everything before the run;
  tokenizers adds in float64. Same pieces, same count, another order; measured: 2 tokens of
  1.2 million on 60 files of the standard library's Python source (the tests' 512-piece model).
* The literal text of a control or byte piece (say "<0x41>") that holds a character which is
  not itself in the vocabulary becomes that piece in the unigram tokenizer: tokenizers
  derives its unknown-character penalty from the lowest score, which the unmatchable score
  is. Real vocabularies hold "<", ">", "x" and hex digits.
* BPE: where two splits of one piece ("a"+"bc", "ab"+"c") could both merge in one text,
  SentencePiece takes the leftmost and tokenizers the split ranked first. Not observed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from domainlm.errors import UserError
from domainlm.files import write_json
from domainlm.tokenizer import special

# Piece types and model types of sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
_FLT_MIN = float(np.finfo(np.float32).tiny)  # C's FLT_MIN, where SentencePiece starts its max

# Written as the model's maximum length when the caller does not know the model's context.
DEFAULT_MAX_LENGTH = 2048


def read_model_proto(tokenizer_model: Path) -> Any:
    """The parsed SentencePiece ModelProto; a missing or unreadable file is a UserError."""
    tokenizer_model = Path(tokenizer_model)
    if not tokenizer_model.is_file():
        raise UserError(
            f"{tokenizer_model} is missing: run `make tokenizer` first, or pass the path of the "
            "tokenizer.model the model was trained with"
        )
    try:
        # The generated module ships in the sentencepiece wheel; it refuses a protobuf runtime
        # older than the one it was generated with, so the import is here, with the fix.
        from google.protobuf.message import DecodeError
        from sentencepiece import sentencepiece_model_pb2
    except Exception as e:  # ImportError, or protobuf's VersionError
        raise UserError(
            f"reading {tokenizer_model} needs a protobuf that matches sentencepiece ({e}); "
            "run `pip install -U protobuf`"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(tokenizer_model.read_bytes())
    except DecodeError as e:
        raise UserError(f"{tokenizer_model} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"{tokenizer_model} is not a SentencePiece model (it has no pieces)")
    return proto


def _check_supported(proto: Any, where: Path) -> None:
    """Refuse settings that the tokenizer.json below would not reproduce."""
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    settings = {
        "model_type": (trainer.model_type in (UNIGRAM, BPE), "unigram or bpe"),
        "normalization_rule_name": (not norm.precompiled_charsmap, "identity"),
        "add_dummy_prefix": (not norm.add_dummy_prefix, "false"),
        "remove_extra_whitespaces": (not norm.remove_extra_whitespaces, "false"),
        "escape_whitespaces": (norm.escape_whitespaces, "true"),
        "treat_whitespace_as_suffix": (not trainer.treat_whitespace_as_suffix, "false"),
        "byte_fallback": (trainer.byte_fallback, "true"),
    }
    for name, (ok, want) in settings.items():
        if not ok:
            raise UserError(
                f"{where}: SentencePiece option {name} must be {want} for the Hugging Face export; "
                "train the tokenizer with domainlm (`make tokenizer`), which sets it"
            )


def _unmatchable_score(proto: Any) -> float:
    """A score that loses to every other segmentation of the same characters.

    A reserved piece of k characters competes with paths of k nodes that score at least the
    lowest normal score each, so anything below k times that loses. It also becomes the
    model's lowest score, which tokenizers uses for its unknown-character penalty where
    SentencePiece uses the lowest normal score. That changes no segmentation of ordinary
    text: a character that is not a piece is in no normal piece, so every segmentation pays
    the same penalty for it; only a reserved piece's own text can then win (module docstring).
    """
    normal = [p.score for p in proto.pieces if p.type == NORMAL]
    lowest = min(normal, default=0.0)
    longest = max((len(p.piece) for p in proto.pieces if p.type != NORMAL), default=1)
    return 2.0 * (longest + 1) * min(lowest, -1.0) - 10.0


def _bpe_merges(proto: Any) -> list[tuple[str, str]]:
    """Merges in SentencePiece's priority: the merged piece's score, then where it splits.

    SentencePiece's BPE merges the adjacent pair whose concatenation is the highest-scoring
    normal piece; tokenizers' BPE merges the pair of lowest rank, so every split of every
    normal piece into two normal pieces gets a rank in that order.
    """
    normal = {p.piece for p in proto.pieces if p.type == NORMAL}
    order = sorted(
        (i for i, p in enumerate(proto.pieces) if p.type == NORMAL),
        key=lambda i: (-proto.pieces[i].score, i),
    )
    merges = []
    for i in order:
        piece = proto.pieces[i].piece
        for k in range(1, len(piece)):
            if piece[:k] in normal and piece[k:] in normal:
                merges.append((piece[:k], piece[k:]))
    return merges


def _user_defined_score(proto: Any, piece: str) -> float:
    """SentencePiece's unigram score for a user-defined piece (unigram_model.cc).

    It is UTF-8 length × the highest normal score − 0.1, where the highest score starts from
    FLT_MIN (the smallest positive float), so with the usual all-negative scores it is -0.1:
    above every normal piece, so the piece is always chosen, and equal for every user-defined
    piece, so "\\n\\n\\n" is "\\n" + "\\n\\n" by the Viterbi's tie rule, which tokenizers shares.
    """
    highest = max([_FLT_MIN, *(p.score for p in proto.pieces if p.type == NORMAL)])
    return float(np.float32(len(piece.encode()) * np.float32(highest) - np.float32(0.1)))


def _unigram_score(proto: Any, piece: Any, never: float) -> float:
    if piece.type == NORMAL:
        return piece.score
    if piece.type == USER_DEFINED:
        return _user_defined_score(proto, piece.piece)
    return never


def build_tokenizer(proto: Any) -> Tokenizer:
    """The tokenizers.Tokenizer equivalent to this SentencePiece model."""
    pieces = list(proto.pieces)
    unk_id = next((i for i, p in enumerate(pieces) if p.type == UNKNOWN), special.UNK_ID)
    unigram = proto.trainer_spec.model_type == UNIGRAM
    if unigram:
        never = _unmatchable_score(proto)
        vocab = [(p.piece, _unigram_score(proto, p, never)) for p in pieces]
        model: Any = models.Unigram(vocab, unk_id=unk_id, byte_fallback=True)
    else:
        model = models.BPE(
            vocab={p.piece: i for i, p in enumerate(pieces)},
            merges=_bpe_merges(proto),
            unk_token=pieces[unk_id].piece,
            byte_fallback=True,
        )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    # Control and chat pieces are special tokens: skip_special_tokens drops them when decoding.
    # Whitespace pieces are text; the unigram model finds them itself (by the score above),
    # BPE as added tokens, matched longest-first as SentencePiece's BPE matches them.
    chat = [p.piece for p in pieces if p.type == USER_DEFINED]
    chat = [p for p in chat if p not in special.WHITESPACE_PIECES]
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in pieces
            if p.type in (UNKNOWN, CONTROL) or p.piece in chat
        ]
    )
    if not unigram:
        tok.add_tokens(
            [
                AddedToken(p.piece, special=False, normalized=False)
                for p in pieces
                if p.type == USER_DEFINED and p.piece not in chat
            ]
        )
    # Added tokens take the id of their piece; a new id would mean a piece string is duplicated.
    if tok.get_vocab_size(with_added_tokens=True) != len(pieces):
        raise UserError("the SentencePiece model repeats a piece; train the tokenizer again")
    return tok


def _added_tokens_decoder(tok: Tokenizer) -> dict[str, dict[str, Any]]:
    out = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        out[str(i)] = {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
    return out


def write_tokenizer_files(
    tokenizer_model: Path,
    out: Path,
    chat_template: str | None = None,
    *,
    model_max_length: int | None = None,
) -> None:
    """Write tokenizer.model, tokenizer.json, tokenizer_config.json, special_tokens_map.json.

    model_max_length is the model's context (max_seq_len); transformers warns past it.
    """
    tokenizer_model, out = Path(tokenizer_model), Path(out)
    proto = read_model_proto(tokenizer_model)
    _check_supported(proto, tokenizer_model)
    pieces = {p.piece: i for i, p in enumerate(proto.pieces)}
    for piece, want in special.CONTROL_PIECES.items():
        if pieces.get(piece) != want:
            raise UserError(
                f"{tokenizer_model} has {piece!r} at id {pieces.get(piece)}, expected {want}: it "
                "was not trained by this version of domainlm; run `make tokenizer` again"
            )
    chat = [
        p.piece
        for p in proto.pieces
        if p.type == USER_DEFINED and p.piece not in special.WHITESPACE_PIECES
    ]

    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_model, out / "tokenizer.model")
    tok = build_tokenizer(proto)
    tok.save(str(out / "tokenizer.json"))

    tokens = {
        # The token before a document in training (eos), as config.json's bos_token_id says.
        "bos_token": special.DOCUMENT_START,
        "eos_token": special.EOS,
        "unk_token": special.UNK,
        "pad_token": special.PAD,
    }
    config: dict[str, Any] = {
        # The generic class loads tokenizer.json as written; naming LlamaTokenizer would make
        # transformers 5 rebuild a BPE tokenizer with a dummy prefix from the vocabulary.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "additional_special_tokens": chat,
        # Pretraining documents are followed by </s>; a text is read after one, never after <s>.
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length or DEFAULT_MAX_LENGTH,
        "added_tokens_decoder": _added_tokens_decoder(tok),
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    write_json(out / "tokenizer_config.json", config)
    write_json(out / "special_tokens_map.json", {**tokens, "additional_special_tokens": chat})
