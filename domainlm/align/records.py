"""Preference files read into pairs: ranked completions, preference pairs (TRL's format, text or
chat messages) and scored completions; every unusable line quarantined with file:line and why."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.corpus import jsonlines
from domainlm.corpus.jsonlines import ShardError, json_objects, json_type
from domainlm.corpus.readers import shard_format
from domainlm.corpus.records import QUARANTINE, Rejected, clip
from domainlm.errors import UserError
from domainlm.files import canonical_json

ROLES = ("system", "user", "assistant")
MISSING_FIELD = f"{QUARANTINE}:missing_field"
EMPTY_FIELD = f"{QUARANTINE}:empty_field"
BAD_FIELD = f"{QUARANTINE}:bad_field"
BAD_RANKING = f"{QUARANTINE}:bad_ranking"
BAD_SCORE = f"{QUARANTINE}:bad_score"
UNLABELED = f"{QUARANTINE}:unlabeled"
UNKNOWN_SHAPE = f"{QUARANTINE}:unknown_shape"
SHAPES = (
    'ranked {"prompt", "completions": [...], "ranking": [rank of each, 1 = best]}, pairs '
    '{"prompt", "chosen", "rejected"} (text or chat messages, as TRL), or scored '
    '{"prompt", "completion", "score"}'
)
DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Pair:
    """One preference: for `prompt` (chat messages ending with the user's), `chosen` is the
    better reply than `rejected`; origin says where it came from (file:line)."""

    prompt: tuple[tuple[str, str], ...]  # ((role, content), ...): hashable, ordered
    chosen: str
    rejected: str
    origin: str

    @property
    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]


@dataclass
class Preferences:
    """What the preference sources hold: pairs, the best-known reply of every prompt (the
    reference of the programmatic judge), counts that add up and the quarantined lines."""

    pairs: list[Pair] = field(default_factory=list)
    # prompt -> its best-known reply: the first `reference` given, else the first top reply
    best: dict[tuple, str] = field(default_factory=dict)
    referenced: set[tuple] = field(default_factory=set)  # prompts whose best is a `reference`
    counts: dict[str, dict] = field(default_factory=dict)  # source -> counts
    quarantined: list[dict] = field(default_factory=list)


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def ranking_pairs(
    completions: list[str], ranks: list[int | float]
) -> tuple[list[tuple[str, str]], int, int]:
    """(better, worse) for every pair of a ranking (rank 1 is best), plus how many pairs were
    dropped as ties (equal ranks) and as identical texts: the three add up to k(k-1)/2."""
    pairs, ties, identical = [], 0, 0
    k = len(completions)
    for i in range(k):
        for j in range(i + 1, k):
            if ranks[i] == ranks[j]:
                ties += 1
            elif completions[i] == completions[j]:
                identical += 1  # the same text ranked twice: it teaches nothing
            elif ranks[i] < ranks[j]:
                pairs.append((completions[i], completions[j]))
            else:
                pairs.append((completions[j], completions[i]))
    return pairs, ties, identical


def read_preferences(
    path: Path, source: str, into: Preferences, *, key: str = "align.data[].path",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> None:
    """Add the pairs of one JSONL file (also .jsonl.gz, .jsonl.zst) to `into`, in file order.

    The shape is detected per line. Scored completions become pairs per prompt once the whole
    file is read. Counts: records = kept + quarantined; pairs from rankings and scores with
    ties and identical texts dropped and counted. A file that cannot be used at all is a
    UserError naming the recipe `key`.
    """
    path = Path(path)
    rel = str(path)
    usage = f"one JSON object per line: {SHAPES}"
    if not path.is_file():
        raise UserError(f"{key}: {rel} does not exist; give a JSONL file with {usage}")
    if shard_format(path) not in ("jsonl", "jsonl.gz", "jsonl.zst"):
        raise UserError(f"{key}: {rel} is not .jsonl, .jsonl.gz or .jsonl.zst; write {usage}")
    c: Counter = Counter()
    reasons: Counter = Counter()
    scored: dict[tuple, list[tuple[float, str, str]]] = {}
    try:
        for item in json_objects(path, rel, max_record_bytes, name_byte=False):
            c["records"] += 1
            if isinstance(item, Rejected):
                _quarantine(into, reasons, source, item.origin, item.reason, item.detail,
                            item.text)
                continue
            origin, text, obj = item
            try:
                shape = _add(obj, origin, into, c, scored)
            except BadRecord as e:
                _quarantine(into, reasons, source, origin, e.reason, e.detail,
                            clip(text.rstrip("\r\n")))
                continue
            c[f"shape:{shape}"] += 1
    except ShardError as e:
        raise UserError(f"{key}: {e}") from None
    if c["records"] == 0:
        raise UserError(f"{key}: {rel} is empty; write {usage}, or remove it from the recipe")
    for prompt, items in scored.items():
        texts = [t for _, t, _ in items]
        pairs, ties, identical = ranking_pairs(texts, [-s for s, _, _ in items])
        origins = {t: o for _, t, o in items}
        for better, worse in pairs:
            into.pairs.append(Pair(prompt, better, worse, f"{origins[better]}>{origins[worse]}"))
        c["pairs"] += len(pairs)
        c["ties"] += ties
        c["identical"] += identical
        c["unpaired"] += len(items) == 1
        into.best.setdefault(prompt, max(items)[1])
    shapes = {k: c[f"shape:{k}"] for k in ("ranked", "pair", "scored")}
    counts = {"records": c["records"], "kept": sum(shapes.values()), "shapes": shapes,
              "quarantined": dict(sorted(reasons.items()))}
    counts |= {k: c[k] for k in ("pairs", "ties", "identical", "unpaired")}
    into.counts[source] = counts


def _quarantine(into, reasons, source, origin, reason, detail, text) -> None:
    reasons[reason] += 1
    into.quarantined.append(
        {"source": source, "origin": origin, "reason": reason, "detail": detail, "text": text}
    )


def _add(obj: dict, origin: str, into: Preferences, c: Counter, scored: dict) -> str:
    """Check one record and add what it holds; returns its shape. BadRecord when unusable."""
    # `reference`: a known-good reply, the judge's reference for the prompt; never paired
    ref = None if obj.get("reference") is None else _text(obj["reference"], "reference")
    shape, prompt = _add_shape(obj, origin, into, c, scored)
    if ref is not None and prompt not in into.referenced:
        into.best[prompt] = ref
        into.referenced.add(prompt)
    return shape


def _add_shape(obj: dict, origin: str, into: Preferences, c: Counter, scored: dict
               ) -> tuple[str, tuple]:
    """The record's pairs (or scored completion) added; returns its shape and its prompt."""
    if "completions" in obj or "ranking" in obj:
        prompt = parse_prompt(obj)
        completions = obj.get("completions")
        if type(completions) is not list or len(completions) < 2:
            raise BadRecord(BAD_FIELD, "`completions` must be a list of at least 2 replies, got "
                            + (json_type(completions) if type(completions) is not list
                               else f"{len(completions)}"))
        texts = [_reply(v, f"completions[{i}]") for i, v in enumerate(completions)]
        ranking = obj.get("ranking")
        if ranking is None:
            raise BadRecord(UNLABELED, "`ranking` is missing or null: the record has not been "
                            "labeled yet (give the rank of each completion, 1 = best)")
        if type(ranking) is not list or len(ranking) != len(texts) or not all(
            type(r) in (int, float) and r >= 1 for r in ranking
        ):
            raise BadRecord(BAD_RANKING, f"`ranking` must hold one rank (a number >= 1, 1 = "
                            f"best, equal ranks for ties) per completion ({len(texts)}), got "
                            f"{clip(str(ranking))}")
        pairs, ties, identical = ranking_pairs(texts, ranking)
        for better, worse in pairs:
            into.pairs.append(Pair(prompt, better, worse, origin))
        c["pairs"] += len(pairs)
        c["ties"] += ties
        c["identical"] += identical
        into.best.setdefault(prompt, texts[min(range(len(texts)), key=lambda i: ranking[i])])
        return "ranked", prompt
    if "chosen" in obj or "rejected" in obj:
        prompt, chosen, rejected = _pair(obj)
        if chosen == rejected:
            c["identical"] += 1
        else:
            into.pairs.append(Pair(prompt, chosen, rejected, origin))
            c["pairs"] += 1
            into.best.setdefault(prompt, chosen)
        return "pair", prompt
    if "completion" in obj or "score" in obj:
        prompt = parse_prompt(obj)
        text = _reply(obj.get("completion"), "completion")
        score = obj.get("score")
        if type(score) not in (int, float) or score != score or abs(score) == float("inf"):
            raise BadRecord(BAD_SCORE, f"`score` must be a finite number, got {json_type(score)}")
        scored.setdefault(prompt, []).append((float(score), text, origin))
        return "scored", prompt
    fields = ", ".join(repr(k) for k in list(obj)[:12]) or "none"
    raise BadRecord(UNKNOWN_SHAPE, f"not a preference record (its fields: {fields}); use {SHAPES}")


def _pair(obj: dict) -> tuple[tuple, str, str]:
    """(prompt, chosen, rejected); without `prompt`, the conversations' shared start is the
    prompt (TRL's implicit-prompt format)."""
    if "prompt" in obj:
        return parse_prompt(obj), _reply(obj.get("chosen"), "chosen"), _reply(
            obj.get("rejected"), "rejected")
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if type(v) is not list:
            raise BadRecord(MISSING_FIELD, f"`prompt` is missing, and `{name}` is not a "
                            "conversation whose shared start could be the prompt")
    if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
        raise BadRecord(BAD_FIELD, "`prompt` is missing and `chosen` and `rejected` do not "
                        "share every message but their last: give `prompt` explicitly")
    prompt = _messages(chosen[:-1], "chosen")
    return prompt, _reply(chosen[-1:], "chosen"), _reply(rejected[-1:], "rejected")


def parse_prompt(obj: dict) -> tuple:
    value = obj.get("prompt")
    if value is None:
        raise BadRecord(MISSING_FIELD, "`prompt` is missing or null")
    if type(value) is str:
        return (("user", _text(value, "prompt")),)
    if type(value) is list:
        return _messages(value, "prompt")
    raise BadRecord(BAD_FIELD, f"`prompt` must be text or a list of messages, got "
                    f"{json_type(value)}")


def _messages(turns: list, name: str) -> tuple:
    """Chat messages of a prompt: an optional system message, then user and assistant
    alternating, ending with the user's."""
    out = []
    for i, m in enumerate(turns):
        where = f"{name}[{i}]"
        if type(m) is not dict:
            raise BadRecord(BAD_FIELD, f"`{where}` must be an object {{role, content}}, got "
                            f"{json_type(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord(BAD_FIELD, f"`{where}.role` is {role!r}; use one of "
                            f"{', '.join(ROLES)}")
        out.append((role, _text(m.get("content"), f"{where}.content")))
    body = out[1:] if out and out[0][0] == "system" else out
    want = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if not body or [r for r, _ in body] != want or body[-1][0] != "user":
        raise BadRecord(BAD_FIELD, f"`{name}` must be an optional system message, then user "
                        "and assistant alternating, ending with the user's message")
    return tuple(out)


def _reply(value: Any, name: str) -> str:
    """A completion: text, or TRL's conversational form [{"role": "assistant", "content"}].
    It may be empty: a model that answers nothing is a sample labelers rank too."""
    if type(value) is list:
        if len(value) != 1 or type(value[0]) is not dict or value[0].get("role") != "assistant":
            raise BadRecord(BAD_FIELD, f"`{name}` as messages must be one assistant message")
        value = value[0].get("content")
        name = f"{name}[0].content"
    return _text(value, name, empty=True)


def _text(value: Any, name: str, empty: bool = False) -> str:
    if value is None:
        raise BadRecord(MISSING_FIELD, f"`{name}` is missing or null")
    if type(value) is not str:
        raise BadRecord(BAD_FIELD, f"`{name}` must be text, got {json_type(value)}")
    if not empty and not value.strip():
        raise BadRecord(EMPTY_FIELD, f"`{name}` is empty or only whitespace")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(jsonlines.INVALID_UTF8, f"`{name}` holds an unpaired surrogate escape; "
                        "fix the exporter") from None
    return value


def prompt_key(prompt: tuple) -> str:
    """A prompt's content as text: equal prompts, equal keys (the held-out split hashes it)."""
    return canonical_json(prompt)
