"""Instruction files (Alpaca, prompt/completion, chat) read into Examples; bad lines quarantined."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.corpus import jsonlines
from domainlm.corpus.jsonlines import ShardError, json_objects, json_type
from domainlm.corpus.mix import unit_hash
from domainlm.corpus.readers import shard_format
from domainlm.corpus.records import QUARANTINE, Rejected, clip
from domainlm.errors import UserError
from domainlm.files import canonical_json

ROLES = ("system", "user", "assistant")

# Line-level reasons shared with the corpus reader, so both stages' rejected files read alike.
INVALID_UTF8 = jsonlines.INVALID_UTF8
INVALID_JSON = jsonlines.INVALID_JSON
NOT_AN_OBJECT = jsonlines.NOT_AN_OBJECT
TOO_LONG = jsonlines.TOO_LONG
TRUNCATED = jsonlines.TRUNCATED
# Record-level reasons of instruction data; the detail names the field.
MISSING_FIELD = f"{QUARANTINE}:missing_field"
EMPTY_FIELD = f"{QUARANTINE}:empty_field"
NOT_STRING = f"{QUARANTINE}:not_string"
BAD_FIELD = f"{QUARANTINE}:bad_field"
BAD_ROLE = f"{QUARANTINE}:bad_role"
BAD_ORDER = f"{QUARANTINE}:bad_order"
UNKNOWN_SHAPE = f"{QUARANTINE}:unknown_shape"

DEFAULT_MAX_RECORD_BYTES = 8 * 1024 * 1024  # as corpus.max_record_bytes
_SUFFIXES = ("jsonl", "jsonl.gz", "jsonl.zst")
_SHAPES = (
    '{"instruction", "input" (optional), "output"}, {"prompt", "completion"}, '
    '{"messages": [{"role", "content"}, ...]} or ShareGPT {"conversations": [{"from", "value"}]}'
)
# ShareGPT's speaker names; "messages" must use the OpenAI role names themselves.
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant"}
_SHAREGPT_ROLES |= {"assistant": "assistant", "bot": "assistant", "model": "assistant"}


@dataclass
class Example:
    """One conversation to train on; the last message is the assistant reply that is learnt."""

    task: str
    messages: list[dict]  # {"role": system|user|assistant, "content": str}
    origin: str  # "file:line", where it came from

    def content_key(self) -> str:
        """The conversation itself (not where it came from): equal content, equal key."""
        return canonical_json(self.messages)


class BadRecord(Exception):
    """A record that holds no usable conversation: its quarantine reason and detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def read_instructions(
    path: Path,
    task: str,
    quarantine: list[dict],
    *,
    key: str = "finetune.data[].path",
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> list[Example]:
    """The usable examples of one JSONL file (also .jsonl.gz, .jsonl.zst), in file order.

    The shape is detected per record. Every unusable line is appended to `quarantine` as
    {task, origin "file:line", reason, detail, text}; a file that cannot be used at all (missing,
    empty, not UTF-8 text, unreadable compression) is a UserError naming the recipe `key`.
    """
    path = Path(path)
    rel = str(path)
    usage = f"one JSON object per line, in one of these shapes: {_SHAPES}"
    if not path.exists():
        raise UserError(f"{key}: {rel} does not exist; give the path of a JSONL file with {usage}")
    if path.is_dir() or shard_format(path) not in _SUFFIXES:
        raise UserError(
            f"{key}: {rel} is not a .jsonl, .jsonl.gz or .jsonl.zst file; write {usage} "
            "(a JSON array converts with `jq -c '.[]' in.json > out.jsonl`)"
        )
    examples: list[Example] = []
    seen = 0
    try:
        # The corpus reader's lines: sniffing, BOM, gzip/zstd, cut files, over-long lines, the
        # same reasons and fixes (this stage's details name no byte values).
        for item in json_objects(path, rel, max_record_bytes, name_byte=False):
            seen += 1
            if isinstance(item, Rejected):
                quarantine.append(_entry(task, item.origin, item.reason, item.detail, item.text))
                continue
            origin, text, obj = item
            try:
                examples.append(Example(task, to_messages(obj), origin))
            except BadRecord as e:
                line = clip(text.rstrip("\r\n"))
                quarantine.append(_entry(task, origin, e.reason, e.detail, line))
    except ShardError as e:
        raise UserError(f"{key}: {e}") from None
    if seen == 0:
        raise UserError(f"{key}: {rel} is empty; write {usage}, or remove it from the recipe")
    return examples


def count(examples: list[Example], quarantine: list[dict], task: str | None = None) -> dict:
    """read = kept + quarantined, with the quarantined by reason (of one task, or all)."""
    kept = sum(1 for e in examples if task is None or e.task == task)
    reasons = Counter(q["reason"] for q in quarantine if task is None or q["task"] == task)
    n_bad = sum(reasons.values())
    return {"read": kept + n_bad, "kept": kept, "quarantined": dict(sorted(reasons.items()))}


def split_heldout(
    examples: list[Example], heldout_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, held-out) by a hash of each example's content: copies of one conversation land
    in the same split, and the split does not move when files are renamed or reordered."""
    train, heldout = [], []
    for e in examples:
        side = heldout if unit_hash("heldout", e.content_key()) < heldout_fraction else train
        side.append(e)
    return train, heldout


def _entry(task: str, origin: str, reason: str, detail: str, text: str | None) -> dict:
    return {"task": task, "origin": origin, "reason": reason, "detail": detail, "text": text}


# --------------------------------------------------------------------------------------------
# Records.


def to_messages(rec: dict) -> list[dict]:
    """The conversation a record holds, checked; BadRecord(reason, detail) when unusable."""
    if "messages" in rec:
        return _chat(rec["messages"], "messages", "role", "content", None)
    if "conversations" in rec:
        return _chat(rec["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES)
    if "instruction" in rec or "output" in rec:
        instruction = _text(rec, "instruction")
        user = instruction
        extra = rec.get("input")
        if extra is not None:
            if type(extra) is not str:
                got = json_type(extra)
                raise BadRecord(NOT_STRING, f"`input` must be a string, got {got}")
            _check_unicode(extra, "input")
            if extra.strip():
                user += "\n\n" + extra
        output = _text(rec, "output", hint=("response", "answer", "target"))
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if "prompt" in rec or "completion" in rec:
        prompt = _text(rec, "prompt")
        completion = _text(rec, "completion", hint=("response", "answer", "output"))
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    fields = ", ".join(repr(k) for k in list(rec)[:12]) or "none"
    detail = f"not an instruction record (its fields: {fields}); use {_SHAPES}"
    raise BadRecord(UNKNOWN_SHAPE, detail)


def _text(rec: dict, name: str, where: str = "", hint: tuple[str, ...] = ()) -> str:
    field = f"{where}.{name}" if where else name
    value = rec.get(name)
    if value is None:
        detail = f"`{field}` is missing" if name not in rec else f"`{field}` is null"
        alt = next((h for h in hint if h in rec), None)
        if alt is not None:
            detail += f"; if {alt!r} holds it, rename it to {name!r}"
        raise BadRecord(MISSING_FIELD, detail)
    if type(value) is not str:
        raise BadRecord(NOT_STRING, f"`{field}` must be a string, got {json_type(value)}")
    if not value.strip():
        raise BadRecord(EMPTY_FIELD, f"`{field}` is empty or only whitespace")
    _check_unicode(value, field)
    return value


def _check_unicode(value: str, field: str) -> None:
    # A "\udXXX" escape without its pair parses to a str that SentencePiece cannot encode.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        detail = (
            f"`{field}` holds an unpaired surrogate escape (\\u{ord(value[e.start]):04x}); "
            "fix the exporter (it split an emoji or similar)"
        )
        raise BadRecord(INVALID_UTF8, detail) from None


def _chat(
    turns: Any, field: str, role_key: str, content_key: str, aliases: dict[str, str] | None
) -> list[dict]:
    if type(turns) is not list:
        got = json_type(turns)
        raise BadRecord(BAD_FIELD, f"`{field}` must be a list of messages, got {got}")
    out = []
    for i, m in enumerate(turns):
        where = f"{field}[{i}]"
        if type(m) is not dict:
            got = json_type(m)
            expected = f"an object {{{role_key}, {content_key}}}"
            raise BadRecord(BAD_FIELD, f"`{where}` must be {expected}, got {got}")
        role = m.get(role_key)
        if role is None:
            raise BadRecord(MISSING_FIELD, f"`{where}.{role_key}` is missing")
        role = aliases.get(role) if aliases is not None and type(role) is str else role
        if role not in ROLES:
            names = ", ".join(aliases or ROLES)
            detail = f"`{where}.{role_key}` is {m[role_key]!r}; use one of {names}"
            if aliases is None and type(role) is str and role in _SHAREGPT_ROLES:
                detail += f" ({role!r} is {_SHAREGPT_ROLES[role]!r})"
            raise BadRecord(BAD_ROLE, detail)
        if role == "system" and m.get(content_key) == "":
            continue  # exporters write an empty system turn for "none"; it carries nothing
        out.append({"role": role, "content": _text(m, content_key, where)})
    _check_order(out, field)
    return out


def _check_order(messages: list[dict], field: str) -> None:
    """An optional leading system message, then user and assistant alternating, ending with
    the assistant: the reply that is trained on is the last message."""
    if not messages:
        raise BadRecord(EMPTY_FIELD, f"`{field}` has no messages")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            k = i + len(messages) - len(body)
            raise BadRecord(
                BAD_ORDER,
                f"message {k} is {m['role']!r} where {want!r} is expected: an optional first "
                "system message, then user and assistant alternating",
            )
    if not body or body[-1]["role"] != "assistant":
        raise BadRecord(
            BAD_ORDER,
            f"`{field}` must end with an assistant message (the reply that is trained on)",
        )
